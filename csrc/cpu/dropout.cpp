// Fused dropout on the CPU: Philox mask + scale in one pass, no mask tensor, 8 elements per Philox
// call (16-bit keep test, contract v2). Bytes per element: read x, write y (2·sizeof(T)). On CPUs
// with AVX-512 the Philox rounds and the masked multiply run from the registers
// (dropout_avx512.h); elsewhere a Philox block (vectorized across calls) and a plain apply loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu_kernels.h"
#include "dropout.h"
#include "dropout_avx512.h"
#include "dropout_host.h"

namespace dropreg {
namespace {

using cpu::kBlockGroups;
using cpu::philox_block;

constexpr int64_t kMaskBlockElems = kU16PerGroup * kBlockGroups;  // elements per Philox block (256)

// u[w] is word w of the block (group w / 4, word w % 4): element e reads half e & 1 of u[e / 2].
template <typename scalar_t, typename acc_t>
DROPREG_CPU_CLONES void apply_block(const scalar_t* __restrict__ x, scalar_t* y,
                                    const uint32_t* __restrict__ u, int64_t count,
                                    uint32_t threshold, acc_t scale) {
  for (int64_t e = 0; e < count; ++e) {
    const uint32_t u16 = (u[e >> 1] >> ((e & 1) * 16)) & 0xFFFFu;
    y[e] = dropout_element<scalar_t, acc_t>(x[e], u16, threshold, scale);
  }
}

template <typename scalar_t, typename acc_t>
void dropout_kernel(const scalar_t* x, scalar_t* y, int64_t n, uint32_t threshold, acc_t scale,
                    uint64_t seed, uint64_t offset) {
#if DROPREG_HAVE_AVX512_DROPOUT
  // threshold = 2^16 (drop everything) does not fit the 16-bit compare: the plain loop below.
  static const bool avx512 = cpu::cpu_has_avx512_dropout();
  if (avx512 && threshold < 65536u) {
    constexpr int64_t kStep = cpu::kAvx512StepElems;
    const int64_t steps = (n + kStep - 1) / kStep;
    // 256 steps (32k elements) a task: large enough for the scheduling, small enough for balance.
    at::parallel_for(0, steps, 256, [&](int64_t s0, int64_t s1) {
      const int64_t begin = s0 * kStep;
      const int64_t end = std::min(n, s1 * kStep);
      cpu::dropout_avx512<scalar_t>(x + begin, y + begin, end - begin, begin, threshold, static_cast<double>(scale),
                                    seed, offset);
    });
    return;
  }
#endif
  const int64_t blocks = (n + kMaskBlockElems - 1) / kMaskBlockElems;
  at::parallel_for(0, blocks, 32, [&](int64_t b0, int64_t b1) {
    alignas(64) uint32_t u[cpu::kBlockWords];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kMaskBlockElems;
      philox_block(seed, offset, kStreamDropoutMask, static_cast<uint64_t>(b * kBlockGroups), u);
      apply_block<scalar_t, acc_t>(x + begin, y + begin, u, std::min(kMaskBlockElems, n - begin),
                                   threshold, scale);
    }
  });
}

void dropout_into(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng) {
  const int64_t* state = rng.data_ptr<int64_t>();
  const uint64_t seed = static_cast<uint64_t>(state[0]);
  const uint64_t offset = static_cast<uint64_t>(state[1]);
  const uint32_t threshold = dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dropout_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                    x.numel(), threshold, dropout_scale<acc_t>(p), seed, offset);
  });
}

at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& rng) {
  return dropout_out_of_place(x, p, rng, &dropout_into);
}

void dropout_cpu_(at::Tensor& x, double p, const at::Tensor& rng) { dropout_in_place(x, p, rng, &dropout_into); }

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_", &dropout_cpu_);
}

}  // namespace dropreg
