// Fused dropout on the CPU: Philox mask + scale in one pass, no mask tensor, 8 elements per Philox
// call (16-bit keep test, contract v2). Bytes per element: read x, write y (2·sizeof(T)). The ISA's
// row of the dropout table (loops.h) runs the Philox rounds and the masked multiply from the
// registers (AVX-512, AVX2); the portable loops are a Philox block (vectorized across calls by the
// compiler) and a plain apply loop, below.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "blocks.h"
#include "checks.h"
#include "dropout.h"
#include "dropout_host.h"
#include "fresh_output.h"
#include "isa.h"
#include "loops.h"
#include "transpose.h"

namespace dropreg {
namespace {

using cpu::Isa;

constexpr int64_t kMaskBlockElems = kU16PerGroup * cpu::kBlockGroups;  // elements per Philox block (256)

// y[e] = dropout of x[e] with the draw of element e in the Philox block's words u (half e & 1 of
// u[e / 2]), e < count.
template <typename scalar_t, typename acc_t>
DROPREG_INLINE_BODY void apply_block_body(const scalar_t* __restrict__ x, scalar_t* y, const uint32_t* __restrict__ u,
                                          int64_t count, uint32_t threshold, acc_t scale) {
  for (int64_t e = 0; e < count; ++e) {
    const uint32_t u16 = (u[e >> 1] >> ((e & 1) * 16)) & 0xFFFFu;
    y[e] = dropout_element<scalar_t, acc_t>(x[e], u16, threshold, scale);
  }
}

// The portable loops of the contiguous dropout, compiled for isa: y[0..n) = dropout of x[0..n) for
// the elements from `first` (a multiple of kMaskBlockElems), a Philox block and its apply at a time.
template <Isa isa, typename scalar_t, typename acc_t>
void dropout_blocks(const scalar_t* x, scalar_t* y, int64_t n, int64_t first, uint32_t threshold, acc_t scale,
                    uint64_t seed, uint64_t offset) {
  alignas(64) uint32_t u[cpu::kBlockWords];
  for (int64_t begin = 0; begin < n; begin += kMaskBlockElems) {
    cpu::philox_block<isa>(seed, offset, kStreamDropoutMask, static_cast<uint64_t>((first + begin) / kU16PerGroup), u);
    const int64_t count = std::min(kMaskBlockElems, n - begin);
    cpu::compiled_for<isa, &apply_block_body<scalar_t, acc_t>>(x + begin, y + begin, static_cast<const uint32_t*>(u),
                                                                 count, threshold, scale);
  }
}

constexpr int64_t kChunkElems = 16384;  // elements a task: large enough for the scheduling, small enough for balance

// Steps [0, steps) of `step_elems` elements each (the last one cut at n), in tasks of ~kChunkElems:
// where y is a fresh output (not x: dropout_ writes in place), through parallel_tasks_fresh
// (fresh_output.h: y's pages are mapped ahead of the writes), else parallel_for. make_worker()
// gives a thread its `void(int64_t s0, int64_t s1)`.
template <typename scalar_t, typename MakeWorker>
void parallel_steps(const scalar_t* x, scalar_t* y, int64_t n, int64_t step_elems, const MakeWorker& make_worker) {
  const int64_t steps = (n + step_elems - 1) / step_elems;
  const int64_t grain = std::max<int64_t>(1, kChunkElems / step_elems);
  if (static_cast<const void*>(x) == static_cast<const void*>(y)) {
    at::parallel_for(0, steps, grain, [&](int64_t s0, int64_t s1) { make_worker()(s0, s1); });
    return;
  }
  const auto offset = [&](int64_t s) { return std::min(n, s * step_elems) * int64_t(sizeof(scalar_t)); };
  cpu::parallel_tasks_fresh(steps, grain, {reinterpret_cast<char*>(y)}, offset, make_worker);
}

template <Isa isa, typename scalar_t, typename acc_t>
void dropout_kernel(const scalar_t* x, scalar_t* y, int64_t n, uint32_t threshold, acc_t scale, uint64_t seed,
                    uint64_t offset) {
  constexpr cpu::DropoutLoops<scalar_t, acc_t> loops = cpu::kDropoutLoops<isa, scalar_t, acc_t>;
  auto run = &dropout_blocks<isa, scalar_t, acc_t>;
  int64_t step = kMaskBlockElems;
  if constexpr (loops.run != nullptr) {
    if (threshold < 65536u) {
      run = loops.run;
      step = loops.step;
    }
  }
  parallel_steps(x, y, n, step, [&] {
    return [&](int64_t s0, int64_t s1) {
      const int64_t begin = s0 * step;
      run(x + begin, y + begin, std::min(n, s1 * step) - begin, begin, threshold, scale, seed, offset);
    };
  });
}

// ---------------------------------------------------------------------------------------------
// Any layout: y and x of one shape, y dense (torch.empty_like(x), or x itself when dense), x with
// any strides. The mask is that of the logical (row-major) index, but the walk follows y's memory
// order, tile by tile. After merging the dims that run on in all three index spaces (channels_last's
// H and W become one dim of stride C), L is the logical last dim and M the dim of y's stride 1: a
// tile is a run of positions along L (logically consecutive elements: whole Philox calls serve
// them) by a run along M (consecutive in memory: the apply streams). For channels_last, L is H·W
// and M is C. When M is L, a tile is one run along it.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kTileElems = 16384;  // a tile's draws (32 KB as u16) and Philox words stay in L1/L2
constexpr int64_t kTileM = 64;

// The dims of the walk: size-1 dims dropped, neighbours merged where the logical index and both
// tensors' strides run on.
struct Walk {
  std::vector<int64_t> sizes, xs, ys, logical;
};

Walk coalesce(const at::Tensor& x, const at::Tensor& y) {
  const int64_t dims = x.dim();
  std::vector<int64_t> logical(dims, 1);  // row-major strides of the logical index
  for (int64_t d = dims - 2; d >= 0; --d) logical[d] = logical[d + 1] * x.size(d + 1);
  Walk w;
  for (int64_t d = 0; d < dims; ++d) {
    const int64_t size = x.size(d);
    if (size == 1) continue;
    if (!w.sizes.empty() && w.xs.back() == x.stride(d) * size && w.ys.back() == y.stride(d) * size) {
      w.sizes.back() *= size;  // the previous kept dim runs on into this one
      w.xs.back() = x.stride(d);
      w.ys.back() = y.stride(d);
      w.logical.back() = logical[d];
      continue;
    }
    w.sizes.push_back(size);
    w.xs.push_back(x.stride(d));
    w.ys.push_back(y.stride(d));
    w.logical.push_back(logical[d]);
  }
  return w;
}

// The words of calls ids[0..count) of the mask stream (4 per call, call-major).
template <Isa isa, typename scalar_t, typename acc_t>
void philox_words(uint64_t seed, uint64_t offset, const uint64_t* ids, int64_t count, uint32_t* words) {
  constexpr cpu::PhiloxListFn simd = cpu::kDropoutLoops<isa, scalar_t, acc_t>.words;
  if constexpr (simd != nullptr) {
    simd(seed, offset + kStreamDropoutMask, ids, count, words);
  } else {
    for (int64_t k = 0; k < count; ++k) {
      const Philox4 r = philox_group(seed, offset, kStreamDropoutMask, ids[k]);
      for (int q = 0; q < 4; ++q) words[4 * k + q] = r.x[q];
    }
  }
}

// y[i * y_step] = dropout(x[i * x_step]) for i < n, with draws u16[0..n): the portable loops.
template <typename scalar_t, typename acc_t>
DROPREG_INLINE_BODY void apply_u16_body(const scalar_t* x, scalar_t* y, const uint16_t* u16, int64_t n,
                                        int64_t x_step, int64_t y_step, uint32_t threshold, acc_t scale) {
  if (x_step == 1 && y_step == 1) {  // the loop vectorizes
    for (int64_t i = 0; i < n; ++i) y[i] = dropout_element<scalar_t, acc_t>(x[i], u16[i], threshold, scale);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      y[i * y_step] = dropout_element<scalar_t, acc_t>(x[i * x_step], u16[i], threshold, scale);
    }
  }
}

template <Isa isa, typename scalar_t, typename acc_t>
void apply_u16(const scalar_t* x, scalar_t* y, const uint16_t* u16, int64_t n, int64_t x_step, int64_t y_step,
               uint32_t threshold, acc_t scale) {
  constexpr auto simd = cpu::kDropoutLoops<isa, scalar_t, acc_t>.apply_u16;
  if constexpr (simd != nullptr) {
    if (x_step == 1 && y_step == 1 && threshold < 65536u) return simd(x, y, u16, n, threshold, scale);
  }
  cpu::compiled_for<isa, &apply_u16_body<scalar_t, acc_t>>(x, y, u16, n, x_step, y_step, threshold, scale);
}

template <Isa isa, typename scalar_t, typename acc_t>
void dropout_strided_kernel(const at::Tensor& x_t, at::Tensor& y_t, uint32_t threshold, acc_t scale, uint64_t seed,
                            uint64_t offset) {
  constexpr auto rows = cpu::kDropoutLoops<isa, scalar_t, acc_t>.rows;
  const Walk w = coalesce(x_t, y_t);
  const int64_t dims = static_cast<int64_t>(w.sizes.size());
  if (dims == 0) return;  // numel <= 1 is contiguous: not routed here
  const int64_t L = dims - 1;
  int64_t M = L;
  for (int64_t d = 0; d < dims; ++d) {
    if (w.ys[d] == 1) M = d;
  }
  std::vector<int64_t> outer;  // the dims other than L and M, walked by a mixed-radix index
  for (int64_t d = 0; d < dims; ++d) {
    if (d != L && d != M) outer.push_back(d);
  }
  const int64_t size_l = w.sizes[L];
  const int64_t size_m = M == L ? 1 : w.sizes[M];
  const int64_t lm = M == L ? 0 : w.logical[M];  // logical stride along M
  const int64_t x_l = w.xs[L], y_l = w.ys[L], x_m = M == L ? 0 : w.xs[M], y_m = M == L ? 0 : 1;
  // The register rows (where the row has them): L's runs are whole calls (its size a multiple of 8,
  // so every outer and M offset is too), x is dense along M like y, the threshold fits the 16-bit
  // compare, and M fills the 32-call blocks to 3/4 at least. Their tiles span all of M, so rows are
  // written whole.
  const bool register_rows = rows != nullptr && M != L && size_l % kU16PerGroup == 0 && x_m == 1 &&
                             threshold < 65536u && 3 * 32 * ((size_m + 31) / 32) <= 4 * size_m;
  // Generic tiles hold about kTileElems draws: short L runs make tall tiles along M, and the other way.
  const int64_t tile_l = register_rows ? 256 : std::min(size_l, std::max<int64_t>(256, kTileElems / std::min(size_m, kTileM)));
  const int64_t tile_m = register_rows ? size_m : std::min(size_m, std::max(kTileM, kTileElems / tile_l));
  const int64_t tiles_l = (size_l + tile_l - 1) / tile_l;
  const int64_t tiles_m = (size_m + tile_m - 1) / tile_m;
  int64_t outer_count = 1;
  for (int64_t d : outer) outer_count *= w.sizes[d];
  const scalar_t* x = x_t.const_data_ptr<scalar_t>();
  scalar_t* y = y_t.data_ptr<scalar_t>();
  struct Tile {
    int64_t first;  // logical index of element (l0, m0)
    int64_t nl, nm;
    const scalar_t* x;
    scalar_t* y;
  };
  auto locate = [&](int64_t t) {
    int64_t rest = t / (tiles_l * tiles_m);
    const int64_t l0 = (t / tiles_m) % tiles_l * tile_l, m0 = t % tiles_m * tile_m;
    int64_t lbase = 0, xbase = 0, ybase = 0;
    for (int64_t k = static_cast<int64_t>(outer.size()) - 1; k >= 0; --k) {
      const int64_t d = outer[k];
      const int64_t i = rest % w.sizes[d];
      rest /= w.sizes[d];
      lbase += i * w.logical[d];
      xbase += i * w.xs[d];
      ybase += i * w.ys[d];
    }
    return Tile{lbase + l0 + m0 * lm, std::min(tile_l, size_l - l0), std::min(tile_m, size_m - m0),
                x + xbase + l0 * x_l + m0 * x_m, y + ybase + l0 * y_l + m0 * y_m};
  };
  const bool dense_tiles = x_m == 1 && x_l == tile_m && y_l == tile_m;  // each tile one block in x and y
  const int64_t max_ids = tile_m * (tile_l / kU16PerGroup + 2);
  // A thread's tiles, with its scratch: a tile's draws (generic tiles) or keep bits (register rows).
  auto make_worker = [&] {
    return [&, ids = std::vector<uint64_t>(register_rows ? 0 : max_ids),
            words = std::vector<uint32_t>(register_rows ? 0 : 4 * max_ids),
            u16 = std::vector<uint16_t>(register_rows ? 0 : tile_l * tile_m),
            first_id = std::vector<int64_t>(register_rows ? 0 : tile_m),
            runs = std::vector<const uint16_t*>(register_rows ? 0 : tile_m),
            keep = std::vector<uint32_t>(register_rows ? 8 * ((size_m + 31) / 32) : 0)](int64_t t0,
                                                                                           int64_t t1) mutable {
        for (int64_t t = t0; t < t1; ++t) {
          const Tile tile = locate(t);
          const int64_t nl = tile.nl, nm = tile.nm;
          if constexpr (rows != nullptr) {
            if (register_rows) {  // m0 = 0, nm = size_m
              rows(tile.x, tile.y, nl, nm, x_l, y_l, static_cast<uint64_t>(tile.first / kU16PerGroup),
                   static_cast<uint64_t>(lm / kU16PerGroup), threshold, static_cast<double>(scale), seed, offset,
                   keep.data());
              continue;
            }
          }
          // The calls of each m's run of nl logical indices f .. f + nl - 1, f = first + m·lm. Runs
          // that abut (channels_last, when a tile spans L) make one range of calls.
          int64_t count = 0;
          const int64_t g_first = tile.first / kU16PerGroup;
          if (lm == nl) {
            count = (tile.first + nm * nl - 1) / kU16PerGroup - g_first + 1;
            for (int64_t k = 0; k < count; ++k) ids[k] = static_cast<uint64_t>(g_first + k);
          } else {
            for (int64_t m = 0; m < nm; ++m) {
              const int64_t f = tile.first + m * lm;
              first_id[m] = count;
              for (int64_t g = f / kU16PerGroup; g <= (f + nl - 1) / kU16PerGroup; ++g) {
                ids[count++] = static_cast<uint64_t>(g);
              }
            }
          }
          philox_words<isa, scalar_t, acc_t>(seed, offset, ids.data(), count, words.data());
          const uint16_t* halves = reinterpret_cast<const uint16_t*>(words.data());  // u16 e of call k: 8k + e
          for (int64_t m = 0; m < nm; ++m) {  // where m's draws start
            const int64_t f = tile.first + m * lm;
            runs[m] = halves + (lm == nl ? f - g_first * kU16PerGroup : first_id[m] * kU16PerGroup + f % kU16PerGroup);
          }
          if (nm == 1) {  // one run along L: its draws are in place
            apply_u16<isa, scalar_t, acc_t>(tile.x, tile.y, runs[0], nl, x_l, y_l, threshold, scale);
            continue;
          }
          cpu::transpose_u16(runs.data(), nm, nl, u16.data());  // the draws in the tile's memory order: u16[l·nm + m]
          if (dense_tiles && nm == tile_m) {
            apply_u16<isa, scalar_t, acc_t>(tile.x, tile.y, u16.data(), nl * nm, 1, 1, threshold, scale);
            continue;
          }
          for (int64_t l = 0; l < nl; ++l) {
            apply_u16<isa, scalar_t, acc_t>(tile.x + l * x_l, tile.y + l * y_l, u16.data() + l * nm, nm, x_m, 1,
                                            threshold, scale);
          }
        }
    };
  };
  // Where y is fresh (not x) and holds the tiles one after another in memory (each tile whole rows
  // along M, the outer dims dense around them: channels_last), its pages are mapped ahead of the
  // tiles (fresh_output.h); elsewhere the tiles fault as they write.
  const int64_t tiles = outer_count * tiles_l * tiles_m;
  bool tile_order = static_cast<const void*>(x) != static_cast<const void*>(y) && tiles_m == 1 && y_l == size_m;
  int64_t dense_stride = size_l * size_m;
  for (int64_t k = static_cast<int64_t>(outer.size()) - 1; k >= 0; --k) {
    tile_order = tile_order && w.ys[outer[k]] == dense_stride;
    dense_stride *= w.sizes[outer[k]];
  }
  if (tile_order) {
    const auto tile_offset = [&](int64_t t) {
      return ((t / tiles_l) * size_l + (t % tiles_l) * tile_l) * size_m * int64_t(sizeof(scalar_t));
    };
    cpu::parallel_tasks_fresh(tiles, 1, {reinterpret_cast<char*>(y)}, tile_offset, make_worker);
  } else {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) { make_worker()(t0, t1); });
  }
}

void dropout_into_strided(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng) {
  const int64_t* state = rng.data_ptr<int64_t>();
  const uint32_t threshold = dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cpu_strided", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::with_cpu_isa([&]<Isa isa>() {
      cpu::note_entry(cpu::CpuOp::kDropoutStrided, isa);
      dropout_strided_kernel<isa, scalar_t, acc_t>(x, y, threshold, dropout_scale<acc_t>(p),
                                                   static_cast<uint64_t>(state[0]), static_cast<uint64_t>(state[1]));
    });
  });
}

void dropout_into(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng) {
  const int64_t* state = rng.data_ptr<int64_t>();
  const uint64_t seed = static_cast<uint64_t>(state[0]);
  const uint64_t offset = static_cast<uint64_t>(state[1]);
  const uint32_t threshold = dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::with_cpu_isa([&]<Isa isa>() {
      cpu::note_entry(cpu::CpuOp::kDropout, isa);
      dropout_kernel<isa, scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(), threshold,
                                           dropout_scale<acc_t>(p), seed, offset);
    });
  });
}

at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& rng) {
  return dropout_out_of_place(x, p, rng, &dropout_into, &dropout_into_strided);
}

void dropout_cpu_(at::Tensor& x, double p, const at::Tensor& rng) {
  dropout_in_place(x, p, rng, &dropout_into, &dropout_into_strided);
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_", &dropout_cpu_);
}

}  // namespace dropreg
