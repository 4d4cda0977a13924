// Host-side argument checks (defined in checks.cpp) and helpers of the site-penalty ops, shared by
// the CPU and CUDA launchers: metadata only, no host sync.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "checks.h"
#include "regularizer.h"

namespace dropreg {

// g: the gradient at the site for h (h's shape, dtype and device), when given.
void check_site_grad(const std::optional<at::Tensor>& g, const char* name, const at::Tensor& h);

// Checks shared by the forward and the backward; returns the noise kind. The _draw form: no rng.
NoiseKind check_site_draw_args(const at::Tensor& h, const std::optional<at::Tensor>& g_e,
                               const std::optional<at::Tensor>& g_i, double q, const std::string& noise);
NoiseKind check_site_args(const at::Tensor& h, const std::optional<at::Tensor>& g_e,
                          const std::optional<at::Tensor>& g_i, double q, const std::string& noise,
                          const at::Tensor& rng);

// grad = [a, b]: (2,) in h's accumulation dtype, on h's device.
void check_site_output_grad(const at::Tensor& grad, const at::Tensor& h);

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
