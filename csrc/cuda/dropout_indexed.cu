// dropout_indexed on CUDA (reference.dropout_indexed): each element's mask at its logical index
// base + Σ_k i_k·stride_k (dropout_indexed.h). A thread takes 8 consecutive positions, steps the
// index along the innermost merged dim and recomputes it where a row ends; one Philox call per group
// of 8 consecutive indices it meets (MaskReader). Scalar accesses: the op serves the shards of
// distributed tensors; the contiguous dropout (dropout.cu) is the fast path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "cuda_utils.cuh"
#include "dropout.h"
#include "dropout_host.h"
#include "dropout_indexed.h"
#include "rng.cuh"

namespace dropreg {
namespace {

constexpr int kThreads = 256;
constexpr int kElems = 8;  // positions per thread and loop step

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dropout_indexed_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, const IndexMap map,
                           uint32_t threshold, acc_t scale, const cuda::RngArg rng) {
  const cuda::RngState state = cuda::load_rng(rng);
  cuda::store_rng(rng, state);
  MaskReader reader{state.seed, state.offset};
  const int64_t row = map.dims > 0 ? map.inner_size() : (n > 0 ? n : 1);
  const uint64_t step = static_cast<uint64_t>(map.inner_stride());
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kElems;
  for (int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kElems; first < n;
       first += stride) {
    const int64_t end = first + kElems < n ? first + kElems : n;
    uint64_t index = map.index_of(first);
    int64_t in_row = first % row;
    for (int64_t p = first; p < end; ++p) {
      y[p] = dropout_element<scalar_t, acc_t>(x[p], reader.u16(index), threshold, scale);
      if (++in_row == row) {
        in_row = 0;
        index = map.index_of(p + 1);
      } else {
        index += step;
      }
    }
  }
}

void launch_indexed(const at::Tensor& x, at::Tensor& y, double p, const IndexMap& map, const cuda::RngArg& rng) {
  const int64_t n = x.numel();
  if (n == 0 && rng.out == nullptr) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_indexed_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kernel = dropout_indexed_kernel<scalar_t, acc_t>;
    const int64_t work = (n + int64_t{kThreads} * kElems - 1) / (int64_t{kThreads} * kElems);
    kernel<<<cuda::grid_size(kernel, work, kThreads), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, map, dropout_threshold(p), dropout_scale<acc_t>(p),
        rng);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dropout_indexed_cuda(const at::Tensor& x, double p, const at::Tensor& rng, c10::IntArrayRef index_strides,
                                int64_t index_base) {
  check_dropout_args(x, p, rng);
  check_dropout_index(x, index_strides, index_base);
  const IndexMap map = make_index_map(x, index_strides, index_base);
  const at::Tensor state = rng.contiguous();
  return into_layout_of(x, [&](const at::Tensor& xc, at::Tensor& yc) {
    launch_indexed(xc, yc, p, map, cuda::given_rng(state));
  });
}

std::tuple<at::Tensor, at::Tensor> dropout_indexed_draw_cuda(const at::Tensor& x, double p,
                                                             c10::IntArrayRef index_strides, int64_t index_base,
                                                             std::optional<int64_t> seed) {
  check_dropout_draw_args(x, p);
  check_dropout_index(x, index_strides, index_base);
  const IndexMap map = make_index_map(x, index_strides, index_base);
  auto [rng, state] = cuda::draw_rng(x, seed);
  at::Tensor y = into_layout_of(x, [&](const at::Tensor& xc, at::Tensor& yc) { launch_indexed(xc, yc, p, map, rng); });
  return {y, state};
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  m.impl("dropout_indexed", &dropout_indexed_cuda);
  m.impl("dropout_indexed_draw", &dropout_indexed_draw_cuda);
}

}  // namespace dropreg
