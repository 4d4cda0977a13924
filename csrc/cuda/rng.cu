// rng_state on CUDA: the state [seed, offset] a draw op would use (rng.cuh), written by one thread.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "rng.cuh"

namespace dropreg {
namespace {

at::Tensor rng_state_cuda(const at::Tensor& like, std::optional<int64_t> seed) {
  const c10::cuda::CUDAGuard guard(like.device());
  auto [rng, state] = cuda::draw_rng(like, seed);
  cuda::write_rng(rng, at::cuda::getCurrentCUDAStream());
  return state;
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) { m.impl("rng_state", &rng_state_cuda); }

}  // namespace dropreg
