// Host-side argument checks (defined in checks.cpp) and helpers of the site-penalty ops, shared by
// the CPU and CUDA launchers: metadata only, no host sync; the noise amplitude in double.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "checks.h"
#include "dropout.h"
#include "site_penalty.h"

namespace dropreg {

// "rademacher" -> kRademacher, "dropout" -> kDropoutNoise; anything else is a user error.
NoiseKind parse_noise(const std::string& noise);

// The site-noise drop probability: q = 1 would make q/(1-q) infinite.
void check_noise_prob(double q);

// The positive noise value `a` of site_noise_value, in double (cast once to acc_t by the caller),
// as reference.site_noise_amplitude: pow(·, 0.5) rather than sqrt mirrors Python's `** 0.5` bit
// for bit; the dropout kind's t / (2^16 - t) is q'/(1-q') for the quantized q' = t / 2^16.
inline double site_noise_amplitude(double q, NoiseKind kind) {
  if (kind == kRademacher) return std::pow(q / (1.0 - q), 0.5);
  const uint32_t t = dropout_threshold(q);
  return static_cast<double>(t) / static_cast<double>(65536u - t);
}

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

// The site backward's buffers, shared by the CPU and CUDA launchers (after their argument checks):
// the inputs made contiguous and the gradients allocated contiguous, like their inputs.
struct SiteBackwardIo {
  at::Tensor h, g_e, g_i;                 // contiguous; g_e / g_i undefined when not given
  at::Tensor grad_h, grad_g_e, grad_g_i;  // grad_g_e / grad_g_i empty when their g is not given
};

inline SiteBackwardIo site_backward_io(const at::Tensor& h, const std::optional<at::Tensor>& g_e,
                                       const std::optional<at::Tensor>& g_i) {
  SiteBackwardIo io{h.contiguous(), contiguous_or_undefined(g_e), contiguous_or_undefined(g_i), {}, {}, {}};
  io.grad_h = at::empty_like(io.h, at::MemoryFormat::Contiguous);
  io.grad_g_e = empty_like_or_none(io.g_e, h);
  io.grad_g_i = empty_like_or_none(io.g_i, h);
  return io;
}

}  // namespace dropreg
