// The argument checks of every op, for the CPU and CUDA launchers alike (declared in the *_host.h
// headers and checks.h), defined once and compiled by the host compiler: the .cu
// files keep only launches and kernels (flash-attention's layout, its api .cpp beside its kernels).
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "checks.h"
#include "cross_entropy_host.h"
#include "dropout_host.h"
#include "site_penalty_host.h"

namespace dropreg {

// ---------------------------------------------------------------------------------------------
// dropout, philox
// ---------------------------------------------------------------------------------------------

void check_dropout_draw_args(const at::Tensor& x, double p) {
  DROPREG_CHECK_FLOATING(x);
  DROPREG_CHECK_PROB(p);
}

void check_dropout_index(const at::Tensor& x, c10::IntArrayRef index_strides, int64_t index_base) {
  TORCH_CHECK(static_cast<int64_t>(index_strides.size()) == x.dim(), "argument 'index_strides' must have one stride "
              "per dim of x (", x.dim(), "), got ", index_strides);
  TORCH_CHECK(index_base >= 0, "argument 'index_base' must be >= 0, got ", index_base);
  // The largest index, base + Σ (n_k - 1)·stride_k, must stay below 2^63.
  uint64_t largest = static_cast<uint64_t>(index_base);
  for (int64_t d = 0; d < x.dim(); ++d) {
    TORCH_CHECK(index_strides[d] >= 0, "argument 'index_strides' must be >= 0, got ", index_strides);
    if (x.size(d) == 0) return;  // no element, no index
    const uint64_t span = static_cast<uint64_t>(x.size(d) - 1);
    const uint64_t stride = static_cast<uint64_t>(index_strides[d]);
    TORCH_CHECK(stride == 0 || span <= (uint64_t{1} << 63) / stride, "argument 'index_strides' ", index_strides,
                " gives indices of 2^63 or more for x of shape ", x.sizes());
    largest += span * stride;
    TORCH_CHECK(largest < (uint64_t{1} << 63), "arguments 'index_strides' ", index_strides, " and 'index_base' ",
                index_base, " give indices of 2^63 or more for x of shape ", x.sizes());
  }
}

void check_dropout_args(const at::Tensor& x, double p, const at::Tensor& rng) {
  check_dropout_draw_args(x, p);
  DROPREG_CHECK_RNG(rng, x);
}

void check_philox_args(const at::Tensor& counter, const at::Tensor& key) { DROPREG_CHECK_PHILOX_ARGS(counter, key); }

// ---------------------------------------------------------------------------------------------
// cross-entropy
// ---------------------------------------------------------------------------------------------

void check_logits(const at::Tensor& z) {
  DROPREG_CHECK_FLOATING(z);
  TORCH_CHECK(z.dim() == 2, "argument 'z' must be 2-D logits (N, C), got shape ", z.sizes());
  TORCH_CHECK(z.size(0) == 0 || z.size(1) > 0, "argument 'z' must have at least one class (C >= 1), got shape ",
              z.sizes());
}

void check_labels(const at::Tensor& label, const char* name, const at::Tensor& z) {
  TORCH_CHECK(label.scalar_type() == at::kLong && label.dim() == 1 && label.size(0) == z.size(0), "argument '",
              name, "' must be an int64 tensor of shape (", z.size(0), ",), got ", label.scalar_type(),
              " of shape ", label.sizes());
  TORCH_CHECK(label.device() == z.device(), "argument '", name, "' must be on the device of 'z' (", z.device(),
              "), got ", label.device());
}

void check_row_values(const at::Tensor& v, const char* name, const at::Tensor& z) {
  TORCH_CHECK(v.scalar_type() == acc_type(z) && v.dim() == 1 && v.size(0) == z.size(0), "argument '", name,
              "' must be a ", acc_type(z), " tensor of shape (", z.size(0), ",) (the accumulation type of ",
              z.scalar_type(), " logits), got ", v.scalar_type(), " of shape ", v.sizes());
  TORCH_CHECK(v.device() == z.device(), "argument '", name, "' must be on the device of 'z' (", z.device(),
              "), got ", v.device());
}

void check_cotangent(const at::Tensor& u, const at::Tensor& z, const char* name) {
  TORCH_CHECK(u.sizes() == z.sizes() && u.scalar_type() == z.scalar_type() && u.device() == z.device(),
              "argument '", name, "' must match z (", z.scalar_type(), " of shape ", z.sizes(), " on ", z.device(),
              "), got ", u.scalar_type(), " of shape ", u.sizes(), " on ", u.device());
}

void check_cross_entropy_sample_draw_args(const at::Tensor& z, const at::Tensor& target) {
  check_logits(z);
  check_labels(target, "target", z);
}

void check_cross_entropy_sample_args(const at::Tensor& z, const at::Tensor& target, const at::Tensor& rng) {
  check_cross_entropy_sample_draw_args(z, target);
  DROPREG_CHECK_RNG(rng, z);
}

void check_true_scale(const std::optional<at::Tensor>& true_scale, const at::Tensor& z) {
  if (true_scale.has_value()) check_row_values(*true_scale, "true_scale", z);
}

void check_sample_grad_backward_args(const std::optional<at::Tensor>& grad_loss,
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

void check_ce_grad_args(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& label,
                        const at::Tensor& row_scale) {
  check_logits(z);
  check_row_values(lse, "lse", z);
  check_labels(label, "label", z);
  check_row_values(row_scale, "row_scale", z);
}

void check_cuda_columns(int64_t cols) {
  TORCH_CHECK(cols < std::numeric_limits<int32_t>::max(),
              "argument 'z' must have fewer than 2^31 - 1 columns on CUDA, got ", cols);
}

// ---------------------------------------------------------------------------------------------
// site penalty
// ---------------------------------------------------------------------------------------------

NoiseKind parse_noise(const std::string& noise) {
  if (noise == "rademacher") return kRademacher;
  TORCH_CHECK(noise == "dropout",
              "argument 'noise' must be \"rademacher\" or \"dropout\", got \"", noise, "\"");
  return kDropoutNoise;
}

void check_noise_prob(double q) {
  TORCH_CHECK(std::isfinite(q) && q >= 0.0 && q < 1.0, "argument 'q' must be in [0, 1), got ", q);
}

void check_site_grad(const std::optional<at::Tensor>& g, const char* name, const at::Tensor& h) {
  if (!g.has_value()) return;
  TORCH_CHECK(g->sizes() == h.sizes() && g->scalar_type() == h.scalar_type() && g->device() == h.device(),
              "argument '", name, "' must match h (", h.scalar_type(), " of shape ", h.sizes(), " on ", h.device(),
              "), got ", g->scalar_type(), " of shape ", g->sizes(), " on ", g->device());
}

NoiseKind check_site_draw_args(const at::Tensor& h, const std::optional<at::Tensor>& g_e,
                               const std::optional<at::Tensor>& g_i, double q, const std::string& noise) {
  DROPREG_CHECK_FLOATING(h);
  check_site_grad(g_e, "g_e", h);
  check_site_grad(g_i, "g_i", h);
  check_noise_prob(q);
  return parse_noise(noise);
}

NoiseKind check_site_args(const at::Tensor& h, const std::optional<at::Tensor>& g_e,
                          const std::optional<at::Tensor>& g_i, double q, const std::string& noise,
                          const at::Tensor& rng) {
  const NoiseKind kind = check_site_draw_args(h, g_e, g_i, q, noise);
  DROPREG_CHECK_RNG(rng, h);
  return kind;
}

void check_site_output_grad(const at::Tensor& grad, const at::Tensor& h) {
  TORCH_CHECK(grad.scalar_type() == acc_type(h) && grad.dim() == 1 && grad.numel() == 2, "argument 'grad' must be a ",
              acc_type(h), " tensor [a, b] of shape (2,) (the accumulation type of ", h.scalar_type(),
              " 'h'), got ", grad.scalar_type(), " of shape ", grad.sizes());
  DROPREG_CHECK_SAME_DEVICE(grad, h);
}

}  // namespace dropreg
