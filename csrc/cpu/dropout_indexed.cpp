// dropout_indexed on the CPU (reference.dropout_indexed): each element's mask at its logical index
// base + Σ_k i_k·stride_k (dropout_indexed.h), walked row by row of the merged index map, one Philox
// call per group of 8 consecutive indices. Scalar loops: the op serves the shards of distributed
// tensors, whose dropout is a small part of a step; the contiguous dropout is the fast path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "dropout.h"
#include "dropout_host.h"
#include "dropout_indexed.h"

namespace dropreg {
namespace {

constexpr int64_t kGrainElems = 16384;

template <typename scalar_t, typename acc_t>
void indexed_kernel(const scalar_t* x, scalar_t* y, int64_t n, const IndexMap& map, uint32_t threshold, acc_t scale,
                    uint64_t seed, uint64_t offset) {
  // Rows: runs along the innermost merged dim, whose indices step by its stride.
  const int64_t row = map.dims > 0 ? map.inner_size() : n;
  const uint64_t step = static_cast<uint64_t>(map.inner_stride());
  const int64_t rows = row > 0 ? n / row : 0;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(row, 1)), [&](int64_t r0, int64_t r1) {
    MaskReader reader{seed, offset};
    for (int64_t r = r0; r < r1; ++r) {
      const uint64_t first = map.index_of(r * row);
      const scalar_t* xr = x + r * row;
      scalar_t* yr = y + r * row;
      for (int64_t j = 0; j < row; ++j) {
        yr[j] = dropout_element<scalar_t, acc_t>(xr[j], reader.u16(first + j * step), threshold, scale);
      }
    }
  });
}

void indexed_into(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng, c10::IntArrayRef strides,
                  int64_t base) {
  const IndexMap map = make_index_map(x, strides, base);
  const at::Tensor state = rng.contiguous();
  const int64_t* s = state.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_indexed_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    indexed_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(), map,
                                    dropout_threshold(p), dropout_scale<acc_t>(p), static_cast<uint64_t>(s[0]),
                                    static_cast<uint64_t>(s[1]));
  });
}

at::Tensor dropout_indexed_cpu(const at::Tensor& x, double p, const at::Tensor& rng, c10::IntArrayRef index_strides,
                               int64_t index_base) {
  check_dropout_args(x, p, rng);
  check_dropout_index(x, index_strides, index_base);
  return into_layout_of(x, [&](const at::Tensor& xc, at::Tensor& yc) {
    indexed_into(xc, yc, p, rng, index_strides, index_base);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) { m.impl("dropout_indexed", &dropout_indexed_cpu); }

}  // namespace dropreg
