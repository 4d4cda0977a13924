// The ops that draw their own state (<op>_draw, schemas in ops.cpp) on the CPU: one definition for
// all. A draw op's arguments are its base op's with `rng` replaced by a trailing `seed`, and its
// outputs the base op's followed by the state; so this kernel draws the state as rng_state does (two
// words of the CPU generator on the host, under its lock, as torch's own CPU samplers take them: no
// tensor op is dispatched), puts it where the base op takes `rng`, calls the base op's CPU kernel on
// the same stack and appends the state. (The CUDA ops have draw kernels of their own, which read
// the generator's state in the op's kernel: cuda/rng.cuh.) Also the CPU kernel of rng_state.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>

namespace dropreg {
namespace {

// [seed, 0] for an explicit seed, else two words of torch's default CPU generator.
at::Tensor draw_state(const std::optional<int64_t>& seed) {
  at::Tensor rng = at::detail::empty_cpu({2}, at::kLong, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
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

class DrawKernel final : public c10::OperatorKernel {
 public:
  // base: the op whose `rng` argument (at position rng_index) the draw op replaces.
  DrawKernel(std::string base, size_t rng_index) : base_name_(std::move(base)), rng_index_(rng_index) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
    const size_t num_args = op.schema().arguments().size();  // the base op's, with seed for rng
    const std::optional<int64_t> seed = torch::jit::pop(*stack).toOptional<int64_t>();
    at::Tensor rng = draw_state(seed);
    stack->insert(stack->end() - static_cast<std::ptrdiff_t>(num_args - 1 - rng_index_), rng);
    // Straight to the base op's CPU kernel: every key above the backend was handled for this op.
    base().redispatchBoxed(kCpu, stack);
    stack->emplace_back(std::move(rng));
  }

 private:
  static constexpr c10::DispatchKeySet kCpu{c10::DispatchKey::CPU};

  const c10::OperatorHandle& base() {
    std::call_once(found_, [&] { base_ = c10::Dispatcher::singleton().findSchemaOrThrow(base_name_.c_str(), ""); });
    return *base_;
  }

  std::string base_name_;
  size_t rng_index_;
  std::once_flag found_;
  std::optional<c10::OperatorHandle> base_;
};

torch::CppFunction draw_kernel(const char* base, size_t rng_index) {
  return torch::CppFunction::makeFromBoxedFunctor(std::make_unique<DrawKernel>(base, rng_index));
}

at::Tensor rng_state_cpu(const at::Tensor&, std::optional<int64_t> seed) { return draw_state(seed); }

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  m.impl("rng_state", &rng_state_cpu);
  m.impl("dropout_draw", draw_kernel("dropreg::dropout", 2));
  m.impl("dropout_draw_", draw_kernel("dropreg::dropout_", 2));
  m.impl("dropout_indexed_draw", draw_kernel("dropreg::dropout_indexed", 2));
  m.impl("cross_entropy_sample_draw", draw_kernel("dropreg::cross_entropy_sample", 2));
  m.impl("cross_entropy_sample_grad_draw", draw_kernel("dropreg::cross_entropy_sample_grad", 2));
  m.impl("site_penalty_draw", draw_kernel("dropreg::site_penalty", 5));
}

}  // namespace dropreg
