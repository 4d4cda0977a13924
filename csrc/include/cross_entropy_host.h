// Host-side argument checks of the cross-entropy ops (cross_entropy_sample, cross_entropy_sample_grad,
// ce_grad, ce_grad_backward), shared by the CPU and CUDA launchers: metadata only, no host sync. The
// class-index range is checked where the labels are read (CPU: in the loop; CUDA: a device assert).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace dropreg {

// The label of the sampled gradient's ignored rows (reference.sampled_label): never a class, so a
// valid row whose ŷ equals a user's ignore_index (when that is a real class) keeps its one-hot.
constexpr int64_t kSampledLabelIgnore = -1;

// z: (N, C) floating logits with at least one class unless there are no rows.
inline void check_logits(const at::Tensor& z) {
  DROPREG_CHECK_FLOATING(z);
  TORCH_CHECK(z.dim() == 2, "argument 'z' must be 2-D logits (N, C), got shape ", z.sizes());
  TORCH_CHECK(z.size(0) == 0 || z.size(1) > 0, "argument 'z' must have at least one class (C >= 1), got shape ",
              z.sizes());
}

// label: int64 (N,) class indices on z's device.
inline void check_labels(const at::Tensor& label, const char* name, const at::Tensor& z) {
  TORCH_CHECK(label.scalar_type() == at::kLong && label.dim() == 1 && label.size(0) == z.size(0), "argument '",
              name, "' must be an int64 tensor of shape (", z.size(0), ",), got ", label.scalar_type(),
              " of shape ", label.sizes());
  TORCH_CHECK(label.device() == z.device(), "argument '", name, "' must be on the device of 'z' (", z.device(),
              "), got ", label.device());
}

// v: (N,) per-row values (lse, row_scale) in z's accumulation dtype, on z's device.
inline void check_row_values(const at::Tensor& v, const char* name, const at::Tensor& z) {
  TORCH_CHECK(v.scalar_type() == acc_type(z) && v.dim() == 1 && v.size(0) == z.size(0), "argument '", name,
              "' must be a ", acc_type(z), " tensor of shape (", z.size(0), ",) (the accumulation type of ",
              z.scalar_type(), " logits), got ", v.scalar_type(), " of shape ", v.sizes());
  TORCH_CHECK(v.device() == z.device(), "argument '", name, "' must be on the device of 'z' (", z.device(),
              "), got ", v.device());
}

// u: the cotangent of ce_grad, z's shape, dtype and device.
inline void check_cotangent(const at::Tensor& u, const at::Tensor& z, const char* name = "u") {
  TORCH_CHECK(u.sizes() == z.sizes() && u.scalar_type() == z.scalar_type() && u.device() == z.device(),
              "argument '", name, "' must match z (", z.scalar_type(), " of shape ", z.sizes(), " on ", z.device(),
              "), got ", u.scalar_type(), " of shape ", u.sizes(), " on ", u.device());
}

inline void check_cross_entropy_sample_args(const at::Tensor& z, const at::Tensor& target, const at::Tensor& rng) {
  check_logits(z);
  check_labels(target, "target", z);
  DROPREG_CHECK_RNG(rng, z);
}

// true_scale: optional per-row scale of G_true.
inline void check_true_scale(const std::optional<at::Tensor>& true_scale, const at::Tensor& z) {
  if (true_scale.has_value()) check_row_values(*true_scale, "true_scale", z);
}

// The backward of cross_entropy_sample_grad: optional cotangents of loss (per row), G and G_true (z's
// shape and dtype); G_true's needs the true_scale it was made with.
inline void check_sample_grad_backward_args(const std::optional<at::Tensor>& grad_loss,
                                            const std::optional<at::Tensor>& grad_g,
                                            const std::optional<at::Tensor>& grad_g_true, const at::Tensor& z,
                                            const at::Tensor& lse, const at::Tensor& target,
                                            const std::optional<at::Tensor>& true_scale) {
  check_logits(z);
  check_row_values(lse, "lse", z);
  check_labels(target, "target", z);
  if (grad_loss.has_value()) check_row_values(*grad_loss, "grad_loss", z);
  check_true_scale(true_scale, z);
  if (grad_g.has_value()) check_cotangent(*grad_g, z, "grad_g");
  if (grad_g_true.has_value()) check_cotangent(*grad_g_true, z, "grad_g_true");
  TORCH_CHECK(!grad_g_true.has_value() || true_scale.has_value(),
              "argument 'grad_g_true' needs the 'true_scale' G_true was made with");
}

inline void check_ce_grad_args(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& label,
                               const at::Tensor& row_scale) {
  check_logits(z);
  check_row_values(lse, "lse", z);
  check_labels(label, "label", z);
  check_row_values(row_scale, "row_scale", z);
}

}  // namespace dropreg
