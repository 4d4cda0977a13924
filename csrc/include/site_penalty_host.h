// Host-side argument checks and helpers of the site-penalty ops, shared by the CPU and CUDA
// launchers: metadata only, no host sync.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "checks.h"
#include "regularizer.h"

namespace dropreg {

// g: the gradient at the site for h (h's shape, dtype and device), when given.
inline void check_site_grad(const std::optional<at::Tensor>& g, const char* name, const at::Tensor& h) {
  if (!g.has_value()) return;
  TORCH_CHECK(g->sizes() == h.sizes() && g->scalar_type() == h.scalar_type() && g->device() == h.device(),
              "argument '", name, "' must match h (", h.scalar_type(), " of shape ", h.sizes(), " on ", h.device(),
              "), got ", g->scalar_type(), " of shape ", g->sizes(), " on ", g->device());
}

// Checks shared by the forward and the backward; returns the noise kind.
inline NoiseKind check_site_args(const at::Tensor& h, const std::optional<at::Tensor>& g_e,
                                 const std::optional<at::Tensor>& g_i, double q, const std::string& noise,
                                 const at::Tensor& rng) {
  DROPREG_CHECK_FLOATING(h);
  check_site_grad(g_e, "g_e", h);
  check_site_grad(g_i, "g_i", h);
  check_noise_prob(q);
  DROPREG_CHECK_RNG(rng, h);
  return parse_noise(noise);
}

// grad = [a, b]: (2,) in h's accumulation dtype, on h's device.
inline void check_site_output_grad(const at::Tensor& grad, const at::Tensor& h) {
  TORCH_CHECK(grad.scalar_type() == acc_type(h) && grad.dim() == 1 && grad.numel() == 2, "argument 'grad' must be a ",
              acc_type(h), " tensor [a, b] of shape (2,) (the accumulation type of ", h.scalar_type(),
              " 'h'), got ", grad.scalar_type(), " of shape ", grad.sizes());
  DROPREG_CHECK_SAME_DEVICE(grad, h);
}

inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

template <typename scalar_t>
const scalar_t* const_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

// The gradient of a missing g_e / g_i is an empty tensor (the schema has no optional outputs).
inline at::Tensor empty_like_or_none(const at::Tensor& t, const at::Tensor& h) {
  return t.defined() ? at::empty_like(t, at::MemoryFormat::Contiguous) : at::empty({0}, h.options());
}

}  // namespace dropreg
