// The per-call RNG state [seed, offset] of the CUDA kernels, as one kernel argument (CUDA only).
//
// An op reads its state from one of two places:
// - given: an int64 [seed, offset] tensor in device memory (the op's `rng` argument, e.g. the
//   state a forward saved for its backward);
// - drawn (the <op>_draw ops, rng_state): reserved on the host from torch's CUDA generator with
//   philox_cuda_state, as torch's own samplers do (flash-attention's discipline): no kernel, no
//   copy. Outside a capture the seed and offset are values in the argument; under CUDA-graph
//   capture they are pointers that every replay refills, so each replay draws a fresh state. The
//   kernel's first thread writes the state it used to `out`, the draw op's rng output, which the
//   backward reads. An explicit seed gives [seed, 0].
// Offsets drawn from the generator have bit 63 set: torch's curand-style kernels use the same key
// (the generator's seed) with the thread index in the counter's high words, which never has that
// bit, so our counters (dropreg_ext/reference.py) never meet theirs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <utility>

namespace dropreg {
namespace cuda {

// Counter offsets one call reserves: its streams are offset + 0..2 (reference.py), and the CUDA
// generator hands out offsets in multiples of 4.
constexpr uint64_t kOffsetsPerCall = 4;
constexpr uint64_t kGeneratorOffsetBit = uint64_t{1} << 63;

struct RngArg {
  const int64_t* state = nullptr;  // given: [seed, offset] in device memory
  at::PhiloxCudaState philox;      // drawn (when state is null)
  uint64_t offset_bits = 0;        // drawn from the generator: kGeneratorOffsetBit
  int64_t* out = nullptr;          // drawn: where the kernel writes the state it used
};

struct RngState {
  uint64_t seed, offset;
};

__device__ __forceinline__ RngState load_rng(const RngArg& rng) {
  if (rng.state != nullptr) return {static_cast<uint64_t>(rng.state[0]), static_cast<uint64_t>(rng.state[1])};
  const auto [seed, offset] = at::cuda::philox::unpack(rng.philox);
  return {seed, offset | rng.offset_bits};
}

// The drawn state, written once per launch (block 0, thread 0) for the backward that regenerates it.
__device__ __forceinline__ void store_rng(const RngArg& rng, const RngState& state) {
  if (rng.out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    rng.out[0] = static_cast<int64_t>(state.seed);
    rng.out[1] = static_cast<int64_t>(state.offset);
  }
}

// Writes a draw op's state where its op launches no kernel that would (an empty input): one thread;
// nothing for a given state.
template <int = 0>
__global__ void write_rng_kernel(const RngArg rng) {
  store_rng(rng, load_rng(rng));
}

inline void write_rng(const RngArg& rng, cudaStream_t stream) {
  if (rng.out == nullptr) return;
  write_rng_kernel<<<1, 1, 0, stream>>>(rng);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The state of a tensor argument `rng` (checked by the op: int64 (2,) on the input's device).
inline RngArg given_rng(const at::Tensor& rng) {
  RngArg arg;
  arg.state = rng.const_data_ptr<int64_t>();
  return arg;
}

// A draw op's state on `like`'s device, and the (2,) int64 tensor its kernel writes it to.
inline std::pair<RngArg, at::Tensor> draw_rng(const at::Tensor& like, const std::optional<int64_t>& seed) {
  at::Tensor out = at::empty({2}, like.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
  RngArg arg;
  arg.out = out.data_ptr<int64_t>();
  if (seed.has_value()) {
    arg.philox = at::PhiloxCudaState(static_cast<uint64_t>(*seed), 0);
    return {arg, out};
  }
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(like.device().index()));
  std::lock_guard<std::mutex> lock(gen->mutex_);
  arg.philox = gen->philox_cuda_state(kOffsetsPerCall);
  arg.offset_bits = kGeneratorOffsetBit;
  return {arg, out};
}

}  // namespace cuda
}  // namespace dropreg
