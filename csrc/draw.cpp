// The ops that draw their own state (<op>_draw, schemas in ops.cpp) where the backend has no kernel
// of its own for them: one definition for all. A draw op's arguments are its base op's with `rng`
// replaced by a trailing `seed`, and its outputs the base op's followed by the state; so this kernel
// takes the state from rng_state on the same device, puts it where the base op takes `rng`, calls
// the base op's kernel for that device on the same stack and appends the state. On the CPU that is
// the whole story (rng_state draws two words of the CPU generator on the host, under its lock, as
// torch's own CPU samplers take them: no tensor op is dispatched); on a GPU rng_state is one more
// launch, which the CUDA kernels that read the generator's state themselves avoid (cuda/rng.cuh).
// Also the CPU kernel of rng_state.
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
  // base: the op whose `rng` argument (at position rng_index) the draw op replaces; backend: the
  // dispatch key this kernel is registered for (that of the base op's kernel it calls).
  DrawKernel(std::string base, size_t rng_index, c10::DispatchKey backend)
      : base_name_(std::move(base)), rng_index_(rng_index), backend_(backend) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
    const size_t num_args = op.schema().arguments().size();  // the base op's, with seed for rng
    const std::optional<int64_t> seed = torch::jit::pop(*stack).toOptional<int64_t>();
    const at::Tensor& like = (*stack)[stack->size() - (num_args - 1)].toTensor();
    at::Tensor rng = rng_state().redispatch(c10::DispatchKeySet(backend_), like, seed);
    stack->insert(stack->end() - static_cast<std::ptrdiff_t>(num_args - 1 - rng_index_), rng);
    // Straight to the base op's kernel: every key above the backend was handled for this op.
    base().redispatchBoxed(c10::DispatchKeySet(backend_), stack);
    stack->emplace_back(std::move(rng));
  }

 private:
  static c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, std::optional<int64_t>)> rng_state() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("dropreg::rng_state", "")
                               .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
    return op;
  }

  const c10::OperatorHandle& base() {
    std::call_once(found_, [&] { base_ = c10::Dispatcher::singleton().findSchemaOrThrow(base_name_.c_str(), ""); });
    return *base_;
  }

  std::string base_name_;
  size_t rng_index_;
  c10::DispatchKey backend_;
  std::once_flag found_;
  std::optional<c10::OperatorHandle> base_;
};

torch::CppFunction draw_kernel(const char* base, size_t rng_index, c10::DispatchKey backend) {
  return torch::CppFunction::makeFromBoxedFunctor(std::make_unique<DrawKernel>(base, rng_index, backend));
}

at::Tensor rng_state_cpu(const at::Tensor&, std::optional<int64_t> seed) { return draw_state(seed); }

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  constexpr auto kCpu = c10::DispatchKey::CPU;
  m.impl("rng_state", &rng_state_cpu);
  m.impl("dropout_draw", draw_kernel("dropreg::dropout", 2, kCpu));
  m.impl("dropout_draw_", draw_kernel("dropreg::dropout_", 2, kCpu));
  m.impl("dropout_indexed_draw", draw_kernel("dropreg::dropout_indexed", 2, kCpu));
  m.impl("cross_entropy_sample_draw", draw_kernel("dropreg::cross_entropy_sample", 2, kCpu));
  m.impl("cross_entropy_sample_grad_draw", draw_kernel("dropreg::cross_entropy_sample_grad", 2, kCpu));
  m.impl("site_penalty_draw", draw_kernel("dropreg::site_penalty", 5, kCpu));
}

// The CUDA cross-entropy kernels read their state from memory only (yet): rng_state's launch, then theirs.
TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  constexpr auto kCuda = c10::DispatchKey::CUDA;
  m.impl("cross_entropy_sample_draw", draw_kernel("dropreg::cross_entropy_sample", 2, kCuda));
  m.impl("cross_entropy_sample_grad_draw", draw_kernel("dropreg::cross_entropy_sample_grad", 2, kCuda));
}

}  // namespace dropreg
