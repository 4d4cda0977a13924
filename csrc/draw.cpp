// The ops that draw their own state (<op>_draw, schemas in ops.cpp) on the CPU: one definition for
// all. A draw op's arguments are its base op's with `rng` replaced by a trailing `seed`, and its
// outputs the base op's followed by the state; so this kernel draws the state as rng_state does (two
// words of the CPU generator on the host, under its lock, as torch's own CPU samplers take them: no
// tensor op is dispatched), puts it where the base op takes `rng`, calls the base op's CPU kernel on
// the same arguments and appends the state. (The CUDA ops have draw kernels of their own, which read
// the generator's state in the op's kernel: cuda/rng.cuh.) Also the CPU kernel of rng_state.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "registered_ops.h"

namespace dropreg {
namespace {

// [seed, 0] for an explicit seed, else two words of torch's default CPU generator.
Tensor draw_state(const std::optional<int64_t>& seed) {
  Tensor rng = at::detail::empty_cpu({2}, at::kLong, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  int64_t* state = rng.data_ptr<int64_t>();
  if (seed.has_value()) {
    state[0] = *seed;
    state[1] = 0;
    return rng;
  }
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  auto* impl = gen.get<at::CPUGeneratorImpl>();
  state[0] = static_cast<int64_t>(impl->random64());
  state[1] = static_cast<int64_t>(impl->random64());
  return rng;
}

// The draw ops' CPU kernels: the state drawn, passed to the base op's CPU kernel where it takes
// `rng` (typed, straight to that kernel: every key above the backend was handled for the draw op),
// and appended to its outputs.
constexpr c10::DispatchKeySet kCpu{c10::DispatchKey::CPU};

template <typename Out>
auto with_state(Out&& out, const Tensor& rng) {
  if constexpr (std::is_same_v<std::decay_t<Out>, Tensor>) {
    return std::make_tuple(std::forward<Out>(out), rng);
  } else {
    return std::tuple_cat(std::forward<Out>(out), std::make_tuple(rng));
  }
}

std::tuple<Tensor, Tensor> dropout_draw_cpu(const Tensor& x, double p, std::optional<int64_t> seed) {
  const Tensor rng = draw_state(seed);
  return with_state(dropout_op().redispatch(kCpu, x, p, rng), rng);
}

Tensor dropout_draw_inplace_cpu(Tensor& x, double p, std::optional<int64_t> seed) {
  const Tensor rng = draw_state(seed);
  dropout_inplace_op().redispatch(kCpu, x, p, rng);
  return rng;
}

std::tuple<Tensor, Tensor> dropout_indexed_draw_cpu(const Tensor& x, double p, c10::IntArrayRef index_strides,
                                                    int64_t index_base, std::optional<int64_t> seed) {
  const Tensor rng = draw_state(seed);
  return with_state(dropout_indexed_op().redispatch(kCpu, x, p, rng, index_strides, index_base), rng);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ce_sample_draw_cpu(const Tensor& z, const Tensor& target,
                                                              int64_t ignore_index, std::optional<int64_t> seed) {
  const Tensor rng = draw_state(seed);
  return with_state(ce_sample_op().redispatch(kCpu, z, target, rng, ignore_index), rng);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ce_sample_grad_draw_cpu(
    const Tensor& z, const Tensor& target, int64_t ignore_index, const OptTensor& true_scale,
    std::optional<int64_t> seed) {
  const Tensor rng = draw_state(seed);
  return with_state(ce_sample_grad_op().redispatch(kCpu, z, target, rng, ignore_index, true_scale), rng);
}

std::tuple<Tensor, Tensor> site_penalty_draw_cpu(const Tensor& h, const OptTensor& g_e, const OptTensor& g_i,
                                                 double q, c10::string_view noise, std::optional<int64_t> seed) {
  const Tensor rng = draw_state(seed);
  return with_state(site_penalty_op().redispatch(kCpu, h, g_e, g_i, q, noise, rng), rng);
}

Tensor rng_state_cpu(const Tensor&, std::optional<int64_t> seed) { return draw_state(seed); }

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  m.impl("rng_state", &rng_state_cpu);
  m.impl("dropout_draw", &dropout_draw_cpu);
  m.impl("dropout_draw_", &dropout_draw_inplace_cpu);
  m.impl("dropout_indexed_draw", &dropout_indexed_draw_cpu);
  m.impl("cross_entropy_sample_draw", &ce_sample_draw_cpu);
  m.impl("cross_entropy_sample_grad_draw", &ce_sample_grad_draw_cpu);
  m.impl("site_penalty_draw", &site_penalty_draw_cpu);
}

}  // namespace dropreg
