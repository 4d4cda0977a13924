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
#include <vector>

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

// ---------------------------------------------------------------------------------------------
// Any layout: y and x of one shape, y dense (torch.empty_like(x)), x with any strides. The mask is
// that of the logical (row-major) index, but the walk follows y's memory order, tile by tile:
// a tile is kTileL consecutive positions along L, the logical last dim (logically consecutive
// elements: whole Philox calls serve them), by kTileM positions along M, the dim of y's stride 1
// (consecutive in memory: the apply loop streams). For channels_last, L is W and M is C. When L is
// M itself, a tile is one run along it.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kTileL = 256;
constexpr int64_t kTileM = 64;

// The words of calls ids[0..count) (4 per call, call-major).
void philox_words(uint64_t seed, uint64_t offset, const uint64_t* ids, int64_t count, uint32_t* words) {
#if DROPREG_HAVE_AVX512_DROPOUT
  static const bool avx512 = cpu::cpu_has_avx512_dropout();
  if (avx512) {
    cpu::philox_list(seed, offset + kStreamDropoutMask, ids, count, words);
    return;
  }
#endif
  for (int64_t k = 0; k < count; ++k) {
    const Philox4 r = philox_group(seed, offset, kStreamDropoutMask, ids[k]);
    for (int q = 0; q < 4; ++q) words[4 * k + q] = r.x[q];
  }
}

// y[m * 1 + l * y_l] = dropout(x[m * x_m + l * x_l]) for the tile's nl x nm elements, u16[l][m] the draws.
template <typename scalar_t, typename acc_t>
DROPREG_CPU_CLONES void apply_tile(const scalar_t* x, scalar_t* y, const uint16_t* u16, int64_t nl, int64_t nm,
                                   int64_t x_l, int64_t x_m, int64_t y_l, uint32_t threshold, acc_t scale) {
  for (int64_t l = 0; l < nl; ++l) {
    const scalar_t* xr = x + l * x_l;
    scalar_t* yr = y + l * y_l;
    const uint16_t* ur = u16 + l * kTileM;
    if (x_m == 1) {  // x dense like y (the usual case): both rows stream, and the loop vectorizes
      for (int64_t m = 0; m < nm; ++m) yr[m] = dropout_element<scalar_t, acc_t>(xr[m], ur[m], threshold, scale);
    } else {
      for (int64_t m = 0; m < nm; ++m) yr[m] = dropout_element<scalar_t, acc_t>(xr[m * x_m], ur[m], threshold, scale);
    }
  }
}

template <typename scalar_t, typename acc_t>
void dropout_strided_kernel(const at::Tensor& x_t, at::Tensor& y_t, uint32_t threshold, acc_t scale, uint64_t seed,
                            uint64_t offset) {
  const int64_t dims = x_t.dim();
  const auto sizes = x_t.sizes();
  const auto xs = x_t.strides();
  const auto ys = y_t.strides();
  const int64_t L = dims - 1;
  int64_t M = L;
  for (int64_t d = 0; d < dims; ++d) {
    if (ys[d] == 1 && sizes[d] > 1) M = d;
  }
  std::vector<int64_t> logical(dims, 1);  // row-major strides of the logical index
  for (int64_t d = dims - 2; d >= 0; --d) logical[d] = logical[d + 1] * sizes[d + 1];
  std::vector<int64_t> outer;  // the dims other than L and M, walked by a mixed-radix index
  for (int64_t d = 0; d < dims; ++d) {
    if (d != L && d != M) outer.push_back(d);
  }
  const int64_t size_l = sizes[L];
  const int64_t size_m = M == L ? 1 : sizes[M];
  const int64_t tiles_l = (size_l + kTileL - 1) / kTileL;
  const int64_t tiles_m = (size_m + kTileM - 1) / kTileM;
  int64_t outer_count = 1;
  for (int64_t d : outer) outer_count *= sizes[d];
  const scalar_t* x = x_t.const_data_ptr<scalar_t>();
  scalar_t* y = y_t.data_ptr<scalar_t>();
  const int64_t step_m = M == L ? 0 : 1;  // the m-th position along M is one element further in y
#if DROPREG_HAVE_AVX512_DROPOUT
  // The register path: L's runs are whole calls (its size a multiple of 8, so every outer and M
  // offset is too), x is dense along M like y, and the threshold fits the 16-bit compare.
  static const bool avx512 = cpu::cpu_has_avx512_dropout();
  const bool aligned_tiles = avx512 && M != L && size_l % kU16PerGroup == 0 && xs[M] == 1 && threshold < 65536u;
#endif
  at::parallel_for(0, outer_count * tiles_l * tiles_m, 1, [&](int64_t t0, int64_t t1) {
    constexpr int64_t kMaxIds = kTileM * (kTileL / kU16PerGroup + 2);
    std::vector<uint64_t> ids(kMaxIds);
    std::vector<uint32_t> words(4 * kMaxIds);
    std::vector<uint16_t> u16(kTileL * kTileM);
    int64_t first_id[kTileM];
    for (int64_t t = t0; t < t1; ++t) {
      int64_t rest = t / (tiles_l * tiles_m);
      const int64_t tile_l = (t / tiles_m) % tiles_l, tile_m = t % tiles_m;
      int64_t lbase = 0, xbase = 0, ybase = 0;
      for (int64_t k = static_cast<int64_t>(outer.size()) - 1; k >= 0; --k) {
        const int64_t d = outer[k];
        const int64_t i = rest % sizes[d];
        rest /= sizes[d];
        lbase += i * logical[d];
        xbase += i * xs[d];
        ybase += i * ys[d];
      }
      const int64_t l0 = tile_l * kTileL, m0 = tile_m * kTileM;
      const int64_t nl = std::min(kTileL, size_l - l0), nm = std::min(kTileM, size_m - m0);
      const int64_t lm = M == L ? 0 : logical[M];
#if DROPREG_HAVE_AVX512_DROPOUT
      if (aligned_tiles) {  // every tile row pair (l, m) starts a Philox call: the register path
        const int64_t xm = xs[M];
        for (int64_t mb = 0; mb < nm; mb += 32) {
          const int64_t f = lbase + (m0 + mb) * lm + l0;
          cpu::dropout_tile_avx512<scalar_t>(x + xbase + l0 * xs[L] + (m0 + mb) * xm, y + ybase + l0 * ys[L] + m0 + mb,
                                             nl, std::min<int64_t>(32, nm - mb), xs[L], ys[L],
                                             static_cast<uint64_t>(f / kU16PerGroup),
                                             static_cast<uint64_t>(lm / kU16PerGroup), threshold,
                                             static_cast<double>(scale), seed, offset);
        }
        continue;
      }
#endif
      int64_t count = 0;
      for (int64_t m = 0; m < nm; ++m) {
        const int64_t f = lbase + (m0 + m) * lm + l0;  // logical index of (m, l0)
        first_id[m] = count;
        for (int64_t g = f / kU16PerGroup; g <= (f + nl - 1) / kU16PerGroup; ++g) ids[count++] = static_cast<uint64_t>(g);
      }
      philox_words(seed, offset, ids.data(), count, words.data());
      const uint16_t* halves = reinterpret_cast<const uint16_t*>(words.data());  // u16 e of call k: 8k + e
      for (int64_t m = 0; m < nm; ++m) {
        const int64_t f = lbase + (m0 + m) * lm + l0;
        const int64_t origin = first_id[m] * kU16PerGroup - (f / kU16PerGroup) * kU16PerGroup;  // of f's call
        for (int64_t l = 0; l < nl; ++l) u16[l * kTileM + m] = halves[origin + f + l];
      }
      const int64_t xm = M == L ? 0 : xs[M];
      apply_tile<scalar_t, acc_t>(x + xbase + l0 * xs[L] + m0 * xm, y + ybase + l0 * ys[L] + m0 * step_m, u16.data(),
                                  nl, nm, xs[L], xm, ys[L], threshold, scale);
    }
  });
}

void dropout_into_strided(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng) {
  const int64_t* state = rng.data_ptr<int64_t>();
  const uint32_t threshold = dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cpu_strided", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dropout_strided_kernel<scalar_t, acc_t>(x, y, threshold, dropout_scale<acc_t>(p), static_cast<uint64_t>(state[0]),
                                            static_cast<uint64_t>(state[1]));
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
  return dropout_out_of_place(x, p, rng, &dropout_into, &dropout_into_strided);
}

void dropout_cpu_(at::Tensor& x, double p, const at::Tensor& rng) {
  dropout_in_place(x, p, rng, &dropout_into, &dropout_into_strided);
}

}  // namespace

// The CPU dropout path this process takes (declared in ops.cpp, reported by build_info).
const char* dropout_cpu_capability() {
#if DROPREG_HAVE_AVX512_DROPOUT
  if (cpu::cpu_has_avx512_dropout()) return "avx512";
#endif
  return "default";
}

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_", &dropout_cpu_);
}

}  // namespace dropreg
