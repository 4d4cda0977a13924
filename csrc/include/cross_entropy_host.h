// Host-side argument checks of the cross-entropy ops (cross_entropy_sample, cross_entropy_sample_grad,
// ce_grad, ce_grad_backward), shared by the CPU and CUDA launchers and defined in checks.cpp:
// metadata only, no host sync. The class-index range is checked where the labels are read (CPU: in
// the loop; CUDA: a device assert).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "checks.h"

namespace dropreg {

// The label of the sampled gradient's ignored rows (reference.sampled_label): never a class, so a
// valid row whose ŷ equals a user's ignore_index (when that is a real class) keeps its one-hot.
constexpr int64_t kSampledLabelIgnore = -1;

// z: (N, C) floating logits with at least one class unless there are no rows.
void check_logits(const at::Tensor& z);

// label: int64 (N,) class indices on z's device.
void check_labels(const at::Tensor& label, const char* name, const at::Tensor& z);

// v: (N,) per-row values (lse, row_scale) in z's accumulation dtype, on z's device.
void check_row_values(const at::Tensor& v, const char* name, const at::Tensor& z);

// u: the cotangent of ce_grad, z's shape, dtype and device.
void check_cotangent(const at::Tensor& u, const at::Tensor& z, const char* name = "u");

void check_cross_entropy_sample_args(const at::Tensor& z, const at::Tensor& target, const at::Tensor& rng);
// The _draw forms: no rng.
void check_cross_entropy_sample_draw_args(const at::Tensor& z, const at::Tensor& target);

// true_scale: optional per-row scale of G_true.
void check_true_scale(const std::optional<at::Tensor>& true_scale, const at::Tensor& z);

// The backward of cross_entropy_sample_grad: optional cotangents of loss (per row), G and G_true (z's
// shape and dtype); G_true's needs the true_scale it was made with.
void check_sample_grad_backward_args(const std::optional<at::Tensor>& grad_loss,
                                     const std::optional<at::Tensor>& grad_g,
                                     const std::optional<at::Tensor>& grad_g_true, const at::Tensor& z,
                                     const at::Tensor& lse, const at::Tensor& target,
                                     const std::optional<at::Tensor>& true_scale);

void check_ce_grad_args(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& label,
                        const at::Tensor& row_scale);

// The CUDA kernels index a row's chunks with ints: fewer than 2^31 - 1 columns.
void check_cuda_columns(int64_t cols);

}  // namespace dropreg
