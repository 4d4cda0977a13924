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

// The draw ops' CPU kernels, one template for all: the state drawn, passed to the base op's CPU
// kernel where it takes `rng` (typed, straight to that kernel: every key above the backend was handled
// for the draw op), and appended to its outputs (a base op without outputs: the state alone).
constexpr c10::DispatchKeySet kCpu{c10::DispatchKey::CPU};

template <typename Handle>
struct SignatureOf;

template <typename Sig>
struct SignatureOf<c10::TypedOperatorHandle<Sig>> {
  using type = Sig;
};

// draw_op, base_op: the typed handles (registered_ops.h); kRng: where the base op takes `rng`.
template <auto draw_op, auto base_op, size_t kRng, typename Sig = typename SignatureOf<decltype(draw_op())>::type>
struct DrawCpu;

template <auto draw_op, auto base_op, size_t kRng, typename Ret, typename... Args>
struct DrawCpu<draw_op, base_op, kRng, Ret(Args...)> {
  static Ret kernel(Args... args) {  // the base op's arguments without rng, then seed
    const auto all = std::forward_as_tuple(args...);
    const Tensor rng = draw_state(std::get<sizeof...(Args) - 1>(all));
    return call_base(all, rng, std::make_index_sequence<kRng>(),
                     std::make_index_sequence<sizeof...(Args) - 1 - kRng>());
  }

 private:
  template <typename All, size_t... Before, size_t... After>
  static Ret call_base(const All& all, const Tensor& rng, std::index_sequence<Before...>,
                       std::index_sequence<After...>) {
    const auto call = [&] {
      return base_op().redispatch(kCpu, std::get<Before>(all)..., rng, std::get<kRng + After>(all)...);
    };
    if constexpr (std::is_void_v<decltype(call())>) {
      call();
      return rng;
    } else if constexpr (std::is_same_v<decltype(call()), Tensor>) {
      return {call(), rng};
    } else {
      return std::tuple_cat(call(), std::make_tuple(rng));
    }
  }
};

Tensor rng_state_cpu(const Tensor&, std::optional<int64_t> seed) { return draw_state(seed); }

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  m.impl("rng_state", &rng_state_cpu);
  m.impl("dropout_draw", &DrawCpu<dropout_draw_op, dropout_op, 2>::kernel);
  m.impl("dropout_draw_", &DrawCpu<dropout_draw_inplace_op, dropout_inplace_op, 2>::kernel);
  m.impl("dropout_indexed_draw", &DrawCpu<dropout_indexed_draw_op, dropout_indexed_op, 2>::kernel);
  m.impl("cross_entropy_sample_draw", &DrawCpu<ce_sample_draw_op, ce_sample_op, 2>::kernel);
  m.impl("cross_entropy_sample_grad_draw", &DrawCpu<ce_sample_grad_draw_op, ce_sample_grad_op, 2>::kernel);
  m.impl("site_penalty_draw", &DrawCpu<site_penalty_draw_op, site_penalty_op, 5>::kernel);
}

}  // namespace dropreg
