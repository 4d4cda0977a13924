// Cross-entropy with a sampled label on CUDA (docs/design.md §2, fused op 2).
//
//   cross_entropy_sample       one read pass over each row of z (N, C):
//                                lse_r  = log Σ_c exp(z_rc)
//                                ŷ_r    = argmax_c (z_rc + G_rc)    (Gumbel-max, G: kStreamGumbel)
//                                loss_r = lse_r - z_r[target_r]
//                              bytes/elem: sizeof(T) read, nothing written per element.
//   cross_entropy_sample_grad  the same kernel, keeping the row in shared memory, then
//                                G_rc = exp(z_rc - lse_r) - [c == ŷ_r]    (0 on ignored rows)
//                              from it: sizeof(T) read + sizeof(T) written. loss, lse and ŷ are
//                              cross_entropy_sample's bits (the same kernel computes them), G is
//                              ce_grad's (the same formula). Rows that do not fit on chip: the
//                              sample, then ce_grad (z read twice).
//   ce_grad                    G_rc = row_scale_r · (exp(z_rc - lse_r) - [c == label_r]) over the
//                              sample's row layout: sizeof(T) read + sizeof(T) written.
//   ce_grad_backward           grad_z = row_scale · p ⊙ (u - ⟨p, u⟩), grad_row_scale = ⟨p, u⟩ - u[label]:
//                              z and u read once and kept in shared memory for the second pass
//                              when the row fits (2·sizeof(T) read + sizeof(T) written), else read
//                              twice (4·sizeof(T) read; the second read hits L2 for short rows).
//
// Chunks. Elements are taken in chunks of consecutive flat indices i = r·C + c, aligned to
// multiples of the chunk size: one or two 16-byte vector loads when the chunk lies inside the row
// and the tensors are aligned, else element by element (the rows' edge chunks: the alignment shift
// of Apex's xentropy). The sample's chunks are 8 elements (4 for double), i.e. whole Philox calls
// of the Gumbel stream (groups i >> 2); ce_grad_backward's are one 16-byte vector.
//
// The sample pass. Per chunk a thread raises its running max m to the chunk's max (the sum so far
// rescaled once, not per element) and adds e = exp(z - m) to its Σ exp. The same e filters the
// Gumbel-max candidates before any log: with S a lower bound on the row's best score, an element
// can only win if z + G >= S, i.e. E = -log u <= exp(z - S), and E >= 1 - u, so only elements with
//   1 - u < e · exp(m - S + δ),   δ = 1e-3 + |S|·2^-22
// can (δ covers the rounding of e, of the bound and of the scores, as the margin of the CPU's
// filter in cross_entropy.cpp; the |S| term keeps it valid for huge logits, whose scores round
// to a coarse grid). The test costs
// one FMA and one compare per element (1 - u is read exactly from the bits of the draw), and a
// chunk's Philox calls are skipped when none of its elements can pass. S is the largest of the
// thread's best score, m - 2.82 (the max element scores at least m + min G = m - 2.8115) and the
// bound the row's threads share every kShareEvery chunks; each thread seeds its best with the
// exact score of its first chunk's max, so the first shared bound is already near the row's best
// score (a few candidates a row instead of ~2% of the elements for logits of spread 3). Only the
// candidates get the exact score z + (-log(-log u)), the reference's formula, so ŷ is the
// reference's bit for bit whatever the filter lets through. NaN and ±inf need no flag on this
// path: their e is NaN (a candidate, scored exactly) or 0.
//
// Row layout (RowPlan): a function of C and the dtype only, never of N or of the device, so the
// reduction trees, and every result, are the same bits on every GPU and batch size.
//   group mode  rows that touch at most 32 times kGroupThreadBytes of chunks: L = 1, 2, ..., 32
//               lanes a row (the fewest that take at most kGroupThreadBytes each), 256 / L rows
//               a 256-thread block; xor-shuffle reductions only.
//   block mode  a 512-thread block a row. A sample row whose chunks exceed kOnChipBytes is split
//               into `splits` parts of kSplitThreadBytes a thread, one block each;
//               cross_entropy_merge_kernel merges their states in split order.
// Lane t of a row (or split) takes the chunks t, t + L, ... in order: a sequential sum, then a
// fixed tree (xor butterfly over the lanes or the warp, the warps in index order, the splits in
// order). Rows (or splits) are visited in a grid-stride loop over a grid of one resident wave.
//
// (seed, offset) are read from device memory; invalid targets trip a device assert, as in
// PyTorch's nll_loss: no host sync anywhere.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cross_entropy.h"
#include "cross_entropy_host.h"
#include "cuda_utils.cuh"
#include "philox.h"

namespace dropreg {
namespace {

// Group mode: 256-thread blocks of L-lane rows. Block mode: a 512-thread block a row.
constexpr int kGroupThreads = 256;
constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / cuda::kWarpSize;
// Elementwise kernels (ce_grad, the split merge).
constexpr int kElementwiseThreads = 256;
// Bytes of its row's chunks a thread takes at most in group mode.
constexpr int64_t kGroupThreadBytes = 256;
// Shared memory a block-mode row may keep on chip (the fused gradient's z, the backward's z and
// u): two such 512-thread blocks share an H100/H200 SM (228 KB). For the fused gradient 24.5k
// float or 53k bfloat16 columns (GPT-2's 50257 in bfloat16); for the backward 12k / 24k.
constexpr int64_t kOnChipBytes = 104 * 1024;
// Bytes of a split a thread takes: N = 32 rows of 128k floats make 512 blocks, enough for every SM.
constexpr int64_t kSplitThreadBytes = 64;
// The threads of a row share their best-score bound every kShareEvery chunks.
constexpr int kShareEvery = 2;

// The candidate filter (see the top of the file): -min G over the Gumbel stream's u, rounded up;
// δ's constant term; and 2^23, the scale of 1 - u's integer.
constexpr float kGumbelMin = 2.82f;
constexpr float kFilterMargin = 1e-3f;
constexpr float kTwo23 = 8388608.0f;

using cuda::AlignedVec;
using cuda::ChunkShape;
using cuda::grid_size;
using cuda::is_aligned;
using cuda::kFullMask;
using cuda::kWarpSize;
using cuda::max_dynamic_smem;
using cuda::mul_rn;

// ---------------------------------------------------------------------------------------------
// Chunks and row plans
// ---------------------------------------------------------------------------------------------

// A chunk of kElems consecutive flat indices, as 16-byte vectors (kVecs of kV elements).
template <typename scalar_t, int kElemsArg>
struct Chunk {
  using scalar = scalar_t;
  static constexpr int kElems = kElemsArg;
  static constexpr int kV = cuda::vec_elems<scalar_t, kElems>();
  static constexpr int kVecs = kElems / kV;
  static constexpr int64_t kBytes = kElems * static_cast<int64_t>(sizeof(scalar_t));
  using Vec = AlignedVec<scalar_t, kV>;
};

// The sample kernel's chunk (and ce_grad's, which visits rows the same way): two Philox calls (8
// elements, one or two vectors) for 2- and 4-byte types, so the per-chunk work (the bound, the
// share, the loop) is spread over 8 elements; one call for double (whose 8 elements would not fit
// the register budget).
template <typename scalar_t>
using SampleChunk = Chunk<scalar_t, sizeof(scalar_t) == 8 ? 4 : 8>;

// ce_grad_backward's chunk: one 16-byte vector (two for double), keeping two arrays' chunks in
// registers and on chip.
template <typename scalar_t>
using BackwardChunk = Chunk<scalar_t, ChunkShape<scalar_t>::kElems>;

// How the rows of an (N, C) problem are spread over threads (see the top of the file).
struct RowPlan {
  bool block_mode;  // one block a row (or split); else `lanes` lanes a row
  int lanes;        // threads a row: 1, 2, ..., 32 (group mode) or kRowThreads
  int64_t splits;   // blocks a row (block mode, cross_entropy_sample only), 1 otherwise
  int iters;        // chunks a thread takes of a row (of a split): the loops' uniform trip count
};

int plan_threads(const RowPlan& plan) { return plan.block_mode ? kRowThreads : kGroupThreads; }

// `arrays` tensors kept on chip (1: z, 2: z and u); `split`: long rows may be split across blocks.
template <typename C>
RowPlan plan_rows(int64_t cols, int64_t arrays, bool split) {
  // The most chunks a row touches: rows start at r·C, i.e. at multiples of C's lowest set bit
  // (up to kElems) inside a chunk.
  const int64_t step = std::min<int64_t>(C::kElems, cols & -cols);
  const int64_t chunks = (C::kElems - step + cols - 1) / C::kElems + 1;
  const int64_t group_iters = kGroupThreadBytes / (arrays * C::kBytes);
  if (chunks <= kWarpSize * group_iters) {
    int lanes = 1;
    while (lanes * group_iters < chunks) lanes *= 2;
    return {false, lanes, 1, static_cast<int>((chunks + lanes - 1) / lanes)};
  }
  const int64_t iters = (chunks + kRowThreads - 1) / kRowThreads;
  if (!split || iters * kRowThreads * arrays * C::kBytes <= kOnChipBytes) {
    return {true, kRowThreads, 1, static_cast<int>(iters)};
  }
  const int64_t split_iters = std::max<int64_t>(1, kSplitThreadBytes / C::kBytes);
  const int64_t splits = (iters + split_iters - 1) / split_iters;
  const int64_t per_split = (chunks + splits - 1) / splits;
  return {true, kRowThreads, splits, static_cast<int>((per_split + kRowThreads - 1) / kRowThreads)};
}

// Shared memory of a block that keeps its rows' chunks: every thread its own `iters` chunks.
template <typename C>
size_t stash_bytes(const RowPlan& plan, int64_t arrays) {
  return static_cast<size_t>(plan.iters) * plan_threads(plan) * arrays * C::kBytes;
}

// ---------------------------------------------------------------------------------------------
// Chunk and reduction helpers
// ---------------------------------------------------------------------------------------------

// A thread's own chunks in shared memory, laid out (iteration, vector, thread) so that the
// 16-byte accesses of a warp are consecutive (no bank conflicts), and no thread reads another's:
// vector w of its chunk `it` is mine[(it·kVecs + w)·kThreads], mine = stash + threadIdx.x.
template <typename C, int kThreads>
__device__ __forceinline__ typename C::Vec* stash_slot(typename C::Vec* mine, int it, int w) {
  return mine + (it * C::kVecs + w) * kThreads;
}

// x[e] from a chunk's vectors.
template <typename C, typename acc_t>
__device__ __forceinline__ void unpack(const typename C::Vec (&v)[C::kVecs], acc_t (&x)[C::kElems]) {
#pragma unroll
  for (int w = 0; w < C::kVecs; ++w) {
#pragma unroll
    for (int e = 0; e < C::kV; ++e) x[w * C::kV + e] = static_cast<acc_t>(v[w].v[e]);
  }
}

// Stores y as the chunk at flat index base: whole vectors when `full`, else its elements in [begin, end).
template <typename C, typename acc_t>
__device__ __forceinline__ void store_chunk_vecs(typename C::scalar* __restrict__ dst, int64_t base, int64_t begin,
                                                 int64_t end, bool full, const acc_t (&y)[C::kElems]) {
  using scalar_t = typename C::scalar;
  if (full) {
#pragma unroll
    for (int w = 0; w < C::kVecs; ++w) {
      typename C::Vec v;
#pragma unroll
      for (int e = 0; e < C::kV; ++e) v.v[e] = static_cast<scalar_t>(y[w * C::kV + e]);
      *reinterpret_cast<typename C::Vec*>(dst + base + w * C::kV) = v;
    }
  } else {
#pragma unroll
    for (int e = 0; e < C::kElems; ++e) {
      if (base + e >= begin && base + e < end) dst[base + e] = static_cast<scalar_t>(y[e]);
    }
  }
}

__device__ __forceinline__ float max_num(float a, float b) { return fmaxf(a, b); }  // NaN loses
__device__ __forceinline__ double max_num(double a, double b) { return fmax(a, b); }

// e = exp(x - m) for Σ exp and the filter: the hardware exp2 (one MUFU, ~2 ulp, results below
// 2^-126 flushed to 0) of (x - m)·log2(e), about (2 + 2·|x - m|)·2^-24 relative, and exactly 1 at
// the max. e of a float logit within 87 of the running max is never flushed; one below that
// neither moves Σ exp nor can win (the max's own score is at least m - 2.82). The double path
// keeps libdevice's exp.
__device__ __forceinline__ float sum_exp(float x, float m) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"((x - m) * 1.4426950408889634f));
  return y;
}
__device__ __forceinline__ double sum_exp(double x, double m) { return exp(x - m); }

// exp(d)·2^23, the filter's bound for d = m - S + δ; its error (~2^-22 + |d|·2^-23 relative) is
// inside the margin δ.
__device__ __forceinline__ float filter_bound(float d) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(fmaf(d, 1.4426950408889634f, 23.0f)));
  return y;
}
__device__ __forceinline__ double filter_bound(double d) { return exp(d) * 8388608.0; }

// 1 - u of the Gumbel stream's word w as the float 2^23 + v, where 1 - u = (v + 1/2)·2^-23:
// u = ((w >> 9) + 1/2)·2^-23 gives v = 2^23 - 1 - (w >> 9), i.e. the 23 low bits flipped, under
// the exponent of 2^23. Exact, and no conversion instruction.
__device__ __forceinline__ float one_minus_u_bits(uint32_t w) { return __uint_as_float((w >> 9) ^ 0x4B7FFFFFu); }

// The best-score bound shared between threads, as an int whose order is the float order (the
// bound rounded down to float; NaN counts as -inf).
__device__ __forceinline__ float round_down(float v) { return v; }
__device__ __forceinline__ float round_down(double v) { return __double2float_rd(v); }

__device__ __forceinline__ int bound_key(float v) {
  const int bits = __float_as_int(v == v ? v : -INFINITY);
  return bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
}

__device__ __forceinline__ float bound_value(int key) { return __int_as_float(key >= 0 ? key : key ^ 0x7FFFFFFF); }

// Merges two (max, Σ exp) states: m = max(m1, m2), s = s_hi + s_lo·exp(m_lo - m_hi), the larger
// side never scaled (exp(inf - inf) would be NaN); equal maxima are added. The explicit FMA
// rounds the same way wherever it is compiled, and the merge is symmetric, so an xor butterfly
// leaves the same bits in every lane. m is never NaN (NaN never wins the max); a NaN logit makes
// s NaN.
template <typename acc_t>
__device__ __forceinline__ LseState<acc_t> lse_combine(LseState<acc_t> a, LseState<acc_t> b) {
  if (a.m == b.m) return {a.m, a.s + b.s};
  const bool a_is_max = a.m > b.m;
  const LseState<acc_t> hi = a_is_max ? a : b;
  const LseState<acc_t> lo = a_is_max ? b : a;
  return {hi.m, fma(lo.s, acc_exp(lo.m - hi.m), hi.s)};
}

// log Σ exp(z) of a row's state, torch.logsumexp's values: NaN if a NaN was seen, m itself when
// m = ±inf (an all -inf row, or a +inf), else m + log s (s >= 1: the max adds exp(0) = 1).
template <typename acc_t>
__device__ __forceinline__ acc_t finish_lse(LseState<acc_t> l) {
  if (l.s != l.s) return std::numeric_limits<acc_t>::quiet_NaN();
  if (isinf(l.m)) return l.m;
  return l.m + acc_log(l.s);
}

// The row's (lse, argmax) states merged over `width` lanes by an xor butterfly: lse_combine is
// symmetric and argmax_merge a total order, so every lane ends with the same bits.
template <typename acc_t>
__device__ __forceinline__ void butterfly_ce(LseState<acc_t>& l, ArgmaxState<acc_t>& g, int width) {
  for (int off = width / 2; off > 0; off >>= 1) {
    const LseState<acc_t> lo{__shfl_xor_sync(kFullMask, l.m, off), __shfl_xor_sync(kFullMask, l.s, off)};
    const ArgmaxState<acc_t> go{
        __shfl_xor_sync(kFullMask, g.score, off),
        static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(g.index), off))};
    l = lse_combine<acc_t>(l, lo);
    g = argmax_merge<acc_t>(g, go);
  }
}

// Σ v over the row's lanes, returned to every lane (bit-identical everywhere: the xor butterfly
// adds the same pairs on each lane, and each thread sums the warp partials in index order). In
// block mode every thread of the block must call it.
template <typename acc_t, bool kBlockMode>
__device__ __forceinline__ acc_t row_sum(acc_t v, int lanes, acc_t* sh /* [kRowWarps] */) {
  const int width = kBlockMode ? kWarpSize : lanes;
  for (int off = width / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  if constexpr (kBlockMode) {
    if (threadIdx.x % kWarpSize == 0) sh[threadIdx.x / kWarpSize] = v;
    __syncthreads();
    acc_t total = acc_t(0);
#pragma unroll
    for (int w = 0; w < kRowWarps; ++w) total += sh[w];
    __syncthreads();  // sh is reused by the next row
    v = total;
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// cross_entropy_sample (and the fused gradient)
// ---------------------------------------------------------------------------------------------

// Philox4x32-10 of the Gumbel stream (philox.h's philox_group, the same words) for the kCalls
// consecutive groups of a chunk, computed side by side: the round keys depend on the seed only
// (uniform registers) and each round's key serves every call.
struct GumbelPhilox {
  uint32_t key0;
  uint32_t key1;
  uint32_t c2;  // counter words 2-3: offset + stream
  uint32_t c3;

  __device__ __forceinline__ GumbelPhilox(uint64_t seed, uint64_t offset)
      : key0(static_cast<uint32_t>(seed)),
        key1(static_cast<uint32_t>(seed >> 32)),
        c2(static_cast<uint32_t>(offset + kStreamGumbel)),
        c3(static_cast<uint32_t>((offset + kStreamGumbel) >> 32)) {}

  template <int kCalls>
  __device__ __forceinline__ void operator()(uint64_t group, Philox4 (&r)[kCalls]) const {
#pragma unroll
    for (int c = 0; c < kCalls; ++c) {
      r[c].x[0] = static_cast<uint32_t>(group + c);
      r[c].x[1] = static_cast<uint32_t>((group + c) >> 32);
      r[c].x[2] = c2;
      r[c].x[3] = c3;
    }
    uint32_t k0 = key0, k1 = key1;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
#pragma unroll
      for (int c = 0; c < kCalls; ++c) philox_round(r[c].x[0], r[c].x[1], r[c].x[2], r[c].x[3], k0, k1);
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
  }
};

// Block mode's shared state: the warps' partial states, the shared bound, and the row's result
// broadcast to the fused gradient.
template <typename acc_t>
struct RowShared {
  LseState<acc_t> l[kRowWarps];
  ArgmaxState<acc_t> g[kRowWarps];
  int bound;
  acc_t lse;
  int64_t yhat;
};

// a / b for non-negative a and b: a 32-bit division when both fit (the int64 one is a long
// subroutine, paid per row).
__device__ __forceinline__ int64_t div_index(int64_t a, int64_t b) {
  if ((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) <= 0xFFFFFFFFu) {
    return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  }
  return a / b;
}

// The state a split of a row leaves for the merge kernel.
template <typename acc_t>
struct SamplePartial {
  LseState<acc_t> l;
  ArgmaxState<acc_t> best;
};

template <typename scalar_t, typename acc_t>
struct SampleArgs {
  const scalar_t* z;               // (rows, cols) contiguous
  const int64_t* target;           // (rows,)
  const int64_t* rng;              // [seed, offset]
  acc_t* loss;                     // (rows,)
  acc_t* lse;                      // (rows,)
  int64_t* yhat;                   // (rows,)
  SamplePartial<acc_t>* partials;  // (rows, splits) when splits > 1
  scalar_t* grad;                  // (rows, cols) fused gradient (splits == 1, shared memory), or null
  int64_t rows;
  int64_t cols;
  int64_t ignore_index;
  RowPlan plan;
  bool vec;  // z and grad 16-byte aligned
};

// loss, lse and ŷ of a row from its merged state.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_row(const SampleArgs<scalar_t, acc_t>& a, int64_t row, int64_t tgt,
                                          LseState<acc_t> l, const ArgmaxState<acc_t>& best) {
  const acc_t row_lse = finish_lse<acc_t>(l);
  a.lse[row] = row_lse;
  if (tgt != a.ignore_index) {
    const bool in_range = tgt >= 0 && tgt < a.cols;
    CUDA_KERNEL_ASSERT(in_range && "cross_entropy_sample: target out of bounds");
    const acc_t z_target =
        in_range ? static_cast<acc_t>(a.z[row * a.cols + tgt]) : std::numeric_limits<acc_t>::quiet_NaN();
    a.loss[row] = row_lse - z_target;
    a.yhat[row] = best.index;
  } else {
    a.loss[row] = acc_t(0);
    a.yhat[row] = a.ignore_index;
  }
}

// The Gumbel-max step of the chunk at flat index base (t = e·bound + 2^23 of its elements, e =
// their exp(z - m), bound = exp(m - S + δ)·2^23): the candidates' exact scores merged into
// `best`; a candidate's logit is read again (a cache hit; the hot path keeps no logits in
// registers). kFull: every element of the chunk is in the row (the hot path, no masks).
template <bool kFull, typename scalar_t, typename acc_t, int kElems>
__device__ __forceinline__ void sample_candidates(const acc_t (&t)[kElems], const bool (&in_row)[kElems],
                                                  const scalar_t* __restrict__ z, int64_t base, int64_t begin,
                                                  const GumbelPhilox& philox, ArgmaxState<acc_t>& best) {
  // 2^23 + v < t whenever 1 - u = (v + 1/2)·2^-23 < e·bound (v is an integer and t is rounded
  // once), so the test only ever adds candidates. t <= 2^23 everywhere: no u can pass, no draw.
  bool need = false;
#pragma unroll
  for (int e = 0; e < kElems; ++e) need = need || ((kFull || in_row[e]) && !(t[e] <= acc_t(kTwo23)));  // NaN: needed
  if (!need) return;
  Philox4 r[kElems / 4];
  philox(static_cast<uint64_t>(base) / 4, r);
  bool pass[kElems];
  bool any = false;
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    pass[e] = (kFull || in_row[e]) && !(static_cast<acc_t>(one_minus_u_bits(r[e / 4].x[e % 4])) >= t[e]);
    any = any || pass[e];
  }
  if (!any) return;
  unsigned cand = 0;
#pragma unroll
  for (int e = 0; e < kElems; ++e) cand |= pass[e] ? 1u << e : 0u;
  do {
    const int e = __ffs(cand) - 1;
    cand &= cand - 1;
    uint32_t w = r[0].x[0];
#pragma unroll
    for (int i = 1; i < kElems; ++i) w = e == i ? r[i / 4].x[i % 4] : w;
    const acc_t score = static_cast<acc_t>(z[base + e]) + static_cast<acc_t>(gumbel_from_uint32(w));
    best = argmax_merge<acc_t>(best, ArgmaxState<acc_t>{score, base + e - begin});
  } while (cand != 0);
}

template <typename scalar_t, typename acc_t, bool kBlockMode>
__global__ void __launch_bounds__(kBlockMode ? kRowThreads : kGroupThreads, kBlockMode ? 2 : 4)
    cross_entropy_sample_kernel(const SampleArgs<scalar_t, acc_t> a) {
  using C = SampleChunk<scalar_t>;
  using Vec = typename C::Vec;
  constexpr int kThreads = kBlockMode ? kRowThreads : kGroupThreads;
  constexpr int kElems = C::kElems;
  const scalar_t kNegInf = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
  __shared__ RowShared<acc_t> sh;
  extern __shared__ __align__(16) unsigned char smem[];
  Vec* const stash = reinterpret_cast<Vec*>(smem) + threadIdx.x;  // this thread's chunks (fused gradient)
  const bool fused = a.grad != nullptr;
  const int lanes = kBlockMode ? kThreads : a.plan.lanes;
  const int rows_per_block = kThreads / lanes;
  const int t = threadIdx.x % lanes;
  const GumbelPhilox philox(static_cast<uint64_t>(a.rng[0]), static_cast<uint64_t>(a.rng[1]));
  const int64_t items = a.rows * a.plan.splits;
  if constexpr (kBlockMode) {
    if (threadIdx.x == 0) sh.bound = bound_key(-INFINITY);
    __syncthreads();
  }

  // The loop bound is uniform over the block, and so (per row) is every trip count below: block
  // mode's barriers and the lanes' shuffles are reached by all threads. A lane whose row is past
  // the end takes part with nothing to do.
  for (int64_t item0 = static_cast<int64_t>(blockIdx.x) * rows_per_block; item0 < items;
       item0 += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t item = item0 + threadIdx.x / lanes;
    const bool row_ok = item < items;
    const int64_t row = a.plan.splits == 1 ? item : div_index(item, a.plan.splits);
    const int64_t split = item - row * a.plan.splits;
    const int64_t tgt = row_ok ? a.target[row] : a.ignore_index;
    const bool valid = tgt != a.ignore_index;  // ignored rows need the lse but no sample
    const int64_t begin = row * a.cols;
    const int64_t end = begin + a.cols;
    // The chunks of the row (of its split) are k_begin + j, j in [0, n); the full ones (in the
    // row, and aligned tensors) are j in [full_lo, full_hi).
    const int64_t first = begin / kElems;
    const int64_t chunks = (end - 1) / kElems - first + 1;
    const int64_t seg = a.plan.splits == 1 ? chunks : div_index(chunks + a.plan.splits - 1, a.plan.splits);
    const int64_t k_begin = first + split * seg;
    const int n = row_ok ? static_cast<int>(std::min(seg, (end - 1) / kElems + 1 - k_begin)) : 0;
    const int full_lo = static_cast<int>(std::max<int64_t>(0, (begin + kElems - 1) / kElems - k_begin));
    const int full_hi = a.vec ? static_cast<int>(std::max<int64_t>(full_lo, std::min<int64_t>(end / kElems - k_begin, n)))
                              : full_lo;

    LseState<acc_t> l = lse_identity<acc_t>();
    ArgmaxState<acc_t> best = argmax_identity<acc_t>();
    float shared_bound = -INFINITY;
    int j = t;
    int64_t base = (k_begin + j) * kElems;  // flat index of chunk j
    for (int it = 0; it < a.plan.iters; ++it, j += lanes, base += static_cast<int64_t>(lanes) * kElems) {
      const bool active = j < n;
      const bool full = j >= full_lo && j < full_hi;
      acc_t x[kElems];
      bool in_row[kElems];
      if (active) {
        if (full) {
          Vec v[C::kVecs];
#pragma unroll
          for (int w = 0; w < C::kVecs; ++w) v[w] = reinterpret_cast<const Vec*>(a.z + base)[w];
          if (fused) {
#pragma unroll
            for (int w = 0; w < C::kVecs; ++w) *stash_slot<C, kThreads>(stash, it, w) = v[w];
          }
          unpack<C, acc_t>(v, x);
        } else {
          // An edge chunk's elements outside the row read as -inf: they add 0 and never win.
#pragma unroll
          for (int e = 0; e < kElems; ++e) {
            in_row[e] = base + e >= begin && base + e < begin + a.cols;
            const scalar_t raw = in_row[e] ? a.z[base + e] : kNegInf;
            if (fused) stash_slot<C, kThreads>(stash, it, e / C::kV)->v[e % C::kV] = raw;
            x[e] = static_cast<acc_t>(raw);
          }
        }
        // The chunk's max raises m once (the sum so far rescaled once).
        acc_t cm = x[0];
#pragma unroll
        for (int e = 1; e < kElems; ++e) cm = max_num(cm, x[e]);
        if (cm > l.m) {
          l.s = mul_rn(l.s, acc_exp(l.m - cm));
          l.m = cm;
        }
        // Seed: the exact score of the first chunk's max (its first occurrence), so that the first
        // shared bound is a real score near the row's best rather than m - 2.82 (which lets about
        // e^6 times more candidates through on spread-out logits).
        if (it == 0 && valid && cm > -std::numeric_limits<acc_t>::infinity()) {
          int e_max = kElems - 1;
#pragma unroll
          for (int e = kElems - 2; e >= 0; --e) e_max = x[e] == cm ? e : e_max;
          Philox4 r[1];
          philox(static_cast<uint64_t>(base + e_max) / 4, r);
          const int word = static_cast<int>((base + e_max) % 4);
          const uint32_t w = word == 0 ? r[0].x[0] : (word == 1 ? r[0].x[1] : (word == 2 ? r[0].x[2] : r[0].x[3]));
          best = argmax_merge<acc_t>(best, ArgmaxState<acc_t>{cm + static_cast<acc_t>(gumbel_from_uint32(w)),
                                                              base + e_max - begin});
        }
      }

      // The thread's lower bound on the row's best score, and every kShareEvery chunks the row's.
      const acc_t own = max_num(best.score, l.m - (acc_t(kGumbelMin) + fabs(l.m) * acc_t(4.76837158203125e-07)));
      if (it % kShareEvery == 0) {
        if constexpr (kBlockMode) {
          int key = __reduce_max_sync(kFullMask, bound_key(round_down(own)));
          if (threadIdx.x % kWarpSize == 0) atomicMax(&sh.bound, key);
          __syncwarp();
          key = max(key, *reinterpret_cast<volatile int*>(&sh.bound));
          shared_bound = bound_value(key);
        } else {
          float v = round_down(own);
          for (int off = 1; off < lanes; off <<= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
          shared_bound = v;
        }
      }

      // Σ exp and the filter's t = e·bound + 2^23, with e = exp(x - m) (0 for an edge chunk's
      // -inf padding). While m is infinite (an all -inf prefix, or a +inf) e = exp(x) instead:
      // finite, 0 or +inf for numbers and NaN only for a NaN, so s records exactly whether a NaN
      // was seen (all finish_lse needs then), and the filter still passes every element that can
      // win (its bound is +inf or NaN, or 0 with only -inf logits behind it).
      acc_t tq[kElems];
      if (active) {
        const acc_t s_bound = max_num(own, static_cast<acc_t>(shared_bound));
        const acc_t bound =
            filter_bound(l.m - s_bound + (acc_t(kFilterMargin) + fabs(s_bound) * acc_t(2.384185791015625e-07)));
        const acc_t shift = isfinite(l.m) ? l.m : acc_t(0);
        acc_t sum[kElems];
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          sum[e] = sum_exp(x[e], shift);
          tq[e] = fma(sum[e], bound, acc_t(kTwo23));
        }
#pragma unroll
        for (int width = kElems / 2; width > 0; width /= 2) {
#pragma unroll
          for (int e = 0; e < width; ++e) sum[e] = sum[e] + sum[e + width];
        }
        l.s = l.s + sum[0];
      }

      if (active && valid) {
        if (full) {
          sample_candidates<true, scalar_t, acc_t, kElems>(tq, in_row, a.z, base, begin, philox, best);
        } else {
          sample_candidates<false, scalar_t, acc_t, kElems>(tq, in_row, a.z, base, begin, philox, best);
        }
      }
    }

    // The row's state: group mode's butterfly leaves it in every lane; block mode reduces the
    // warps in thread 0 and broadcasts the result through shared memory.
    acc_t row_lse;
    int64_t row_yhat;
    if constexpr (kBlockMode) {
      const int lane = threadIdx.x % kWarpSize;
      const int warp = threadIdx.x / kWarpSize;
      butterfly_ce<acc_t>(l, best, kWarpSize);
      if (lane == 0) {
        sh.l[warp] = l;
        sh.g[warp] = best;
      }
      __syncthreads();
      if (warp == 0) {
        l = lane < kRowWarps ? sh.l[lane] : lse_identity<acc_t>();
        best = lane < kRowWarps ? sh.g[lane] : argmax_identity<acc_t>();
        butterfly_ce<acc_t>(l, best, kWarpSize);
        if (lane == 0) {
          if (a.plan.splits > 1) {
            a.partials[item] = SamplePartial<acc_t>{l, best};
          } else {
            write_row(a, row, tgt, l, best);
            sh.lse = finish_lse<acc_t>(l);
            sh.yhat = best.index;
          }
          sh.bound = bound_key(-INFINITY);  // every thread has left the row's loop
        }
      }
      __syncthreads();
      row_lse = sh.lse;
      row_yhat = sh.yhat;
    } else {
      butterfly_ce<acc_t>(l, best, lanes);
      if (row_ok && t == 0) write_row(a, row, tgt, l, best);
      row_lse = finish_lse<acc_t>(l);
      row_yhat = best.index;
    }

    // The fused gradient from the thread's own chunks: G = exp(z - lse) - [c == ŷ] with
    // ce_grad's formula (row_scale 1), 0 on ignored rows. The next row's first barrier or
    // shared-memory write comes after every thread has read sh.lse / sh.yhat.
    if (fused) {
      for (int it = 0, jj = t; it < a.plan.iters && jj < n; ++it, jj += lanes) {
        const int64_t base = (k_begin + jj) * kElems;
        Vec v[C::kVecs];
#pragma unroll
        for (int w = 0; w < C::kVecs; ++w) v[w] = *stash_slot<C, kThreads>(stash, it, w);
        acc_t x[kElems];
        unpack<C, acc_t>(v, x);
        const int64_t yhat_at = begin + row_yhat - base;  // ŷ's place in the chunk, if there
        acc_t y[kElems];
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          y[e] = valid ? ce_grad_element<acc_t>(x[e], row_lse, e == yhat_at, acc_t(1)) : acc_t(0);
        }
        store_chunk_vecs<C, acc_t>(a.grad, base, begin, end, jj >= full_lo && jj < full_hi, y);
      }
    }
  }
}

// The split rows' states merged in split order, then loss, lse and ŷ: one thread a row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    cross_entropy_merge_kernel(const SampleArgs<scalar_t, acc_t> a) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kElementwiseThreads + threadIdx.x; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kElementwiseThreads) {
    LseState<acc_t> l = lse_identity<acc_t>();
    ArgmaxState<acc_t> best = argmax_identity<acc_t>();
    for (int64_t s = 0; s < a.plan.splits; ++s) {
      const SamplePartial<acc_t> p = a.partials[row * a.plan.splits + s];
      l = lse_combine<acc_t>(l, p.l);
      best = argmax_merge<acc_t>(best, p.best);
    }
    write_row(a, row, a.target[row], l, best);
  }
}

template <typename scalar_t, typename acc_t>
auto sample_kernel(const RowPlan& plan) {
  return plan.block_mode ? cross_entropy_sample_kernel<scalar_t, acc_t, true>
                         : cross_entropy_sample_kernel<scalar_t, acc_t, false>;
}

// Launches the sample kernel (and the merge of split rows); `smem` > 0 with a.grad: the fused
// gradient, whose stash the caller checked fits (max_dynamic_smem).
template <typename scalar_t, typename acc_t>
void launch_sample(const SampleArgs<scalar_t, acc_t>& a, size_t smem, cudaStream_t stream) {
  const auto kernel = sample_kernel<scalar_t, acc_t>(a.plan);
  const int threads = plan_threads(a.plan);
  const int64_t rows_per_block = threads / a.plan.lanes;
  const int64_t work = (a.rows * a.plan.splits + rows_per_block - 1) / rows_per_block;
  kernel<<<grid_size(kernel, work, threads, smem), threads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.plan.splits > 1) {
    const auto merge = cross_entropy_merge_kernel<scalar_t, acc_t>;
    const int64_t blocks = (a.rows + kElementwiseThreads - 1) / kElementwiseThreads;
    merge<<<grid_size(merge, blocks, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------------------------------------
// ce_grad
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct RowParams {
  acc_t lse;
  acc_t scale;
  int64_t label;
  bool valid;
};

template <typename acc_t>
__device__ __forceinline__ RowParams<acc_t> load_row_params(
    const acc_t* __restrict__ lse, const int64_t* __restrict__ label,
    const acc_t* __restrict__ row_scale, int64_t row, int64_t cols, int64_t ignore_index) {
  RowParams<acc_t> p;
  p.label = label[row];
  p.valid = p.label != ignore_index;
  CUDA_KERNEL_ASSERT((!p.valid || (p.label >= 0 && p.label < cols)) &&
                     "label out of bounds");
  p.lse = lse[row];
  p.scale = row_scale[row];
  return p;
}

template <typename scalar_t, typename acc_t>
struct GradArgs {
  const scalar_t* z;        // (rows, cols) contiguous
  const acc_t* lse;         // (rows,)
  const int64_t* label;     // (rows,)
  const acc_t* row_scale;   // (rows,)
  scalar_t* out;            // (rows, cols)
  int64_t rows;
  int64_t cols;
  int64_t ignore_index;
  RowPlan plan;  // the sample's plan: rows of split rows, no reduction
  bool vec;      // z and out 16-byte aligned
};

// Rows (or splits of rows) as the sample visits them, each chunk written from its own read: the
// row's lse, label and scale are read once, the one-hot is one compare per element.
template <typename scalar_t, typename acc_t, bool kBlockMode>
__global__ void __launch_bounds__(kBlockMode ? kRowThreads : kGroupThreads)
    ce_grad_kernel(const GradArgs<scalar_t, acc_t> a) {
  using C = SampleChunk<scalar_t>;
  using Vec = typename C::Vec;
  constexpr int kThreads = kBlockMode ? kRowThreads : kGroupThreads;
  constexpr int kElems = C::kElems;
  const int lanes = kBlockMode ? kThreads : a.plan.lanes;
  const int rows_per_block = kThreads / lanes;
  const int t = threadIdx.x % lanes;
  const int64_t items = a.rows * a.plan.splits;
  for (int64_t item0 = static_cast<int64_t>(blockIdx.x) * rows_per_block; item0 < items;
       item0 += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t item = item0 + threadIdx.x / lanes;
    if (item >= items) break;  // no collective below
    const int64_t row = a.plan.splits == 1 ? item : div_index(item, a.plan.splits);
    const int64_t split = item - row * a.plan.splits;
    const RowParams<acc_t> p = load_row_params<acc_t>(a.lse, a.label, a.row_scale, row, a.cols, a.ignore_index);
    const int64_t begin = row * a.cols;
    const int64_t end = begin + a.cols;
    const int64_t first = begin / kElems;
    const int64_t chunks = (end - 1) / kElems - first + 1;
    const int64_t seg = a.plan.splits == 1 ? chunks : div_index(chunks + a.plan.splits - 1, a.plan.splits);
    const int64_t k_begin = first + split * seg;
    const int n = static_cast<int>(std::min(seg, chunks - split * seg));
    const int full_lo = static_cast<int>(std::max<int64_t>(0, (begin + kElems - 1) / kElems - k_begin));
    const int full_hi = a.vec ? static_cast<int>(std::max<int64_t>(full_lo, std::min<int64_t>(end / kElems - k_begin, n)))
                              : full_lo;
    for (int j = t; j < n; j += lanes) {
      const int64_t base = (k_begin + j) * kElems;
      const bool full = j >= full_lo && j < full_hi;
      acc_t y[kElems];
      if (p.valid) {
        acc_t x[kElems];
        if (full) {
          Vec v[C::kVecs];
#pragma unroll
          for (int w = 0; w < C::kVecs; ++w) v[w] = reinterpret_cast<const Vec*>(a.z + base)[w];
          unpack<C, acc_t>(v, x);
        } else {
#pragma unroll
          for (int e = 0; e < kElems; ++e) {
            x[e] = base + e >= begin && base + e < end ? static_cast<acc_t>(a.z[base + e]) : acc_t(0);
          }
        }
        const int64_t label_at = begin + p.label - base;  // the label's place in the chunk, if there
#pragma unroll
        for (int e = 0; e < kElems; ++e) y[e] = ce_grad_element<acc_t>(x[e], p.lse, e == label_at, p.scale);
      } else {
#pragma unroll
        for (int e = 0; e < kElems; ++e) y[e] = acc_t(0);
      }
      store_chunk_vecs<C, acc_t>(a.out, base, begin, end, full, y);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ce_grad_backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* u;        // (rows, cols) contiguous
  const scalar_t* z;        // (rows, cols) contiguous
  const acc_t* lse;         // (rows,)
  const int64_t* label;     // (rows,)
  const acc_t* row_scale;   // (rows,)
  scalar_t* grad_z;         // (rows, cols)
  acc_t* grad_row_scale;    // (rows,)
  int64_t rows;
  int64_t cols;
  int64_t ignore_index;
  RowPlan plan;
  bool vec;      // u, z and grad_z 16-byte aligned
  bool on_chip;  // z and u kept in shared memory between the passes
};

// Pass 1 reads z and u (keeping them in shared memory when on_chip) for ⟨p, u⟩; pass 2 writes
// grad_z from shared memory or a second read. The two passes do the same arithmetic either way.
template <typename scalar_t, typename acc_t, bool kBlockMode>
__global__ void __launch_bounds__(kBlockMode ? kRowThreads : kGroupThreads)
    ce_grad_backward_kernel(const BackwardArgs<scalar_t, acc_t> a) {
  using C = BackwardChunk<scalar_t>;
  using Vec = typename C::Vec;
  constexpr int kThreads = kBlockMode ? kRowThreads : kGroupThreads;
  constexpr int kElems = C::kElems;
  __shared__ acc_t sh[kRowWarps];
  extern __shared__ __align__(16) unsigned char smem[];
  Vec* const stash_z = reinterpret_cast<Vec*>(smem) + threadIdx.x;  // this thread's chunks of z ...
  Vec* const stash_u = stash_z + a.plan.iters * C::kVecs * kThreads;  // ... and of u
  const int lanes = kBlockMode ? kThreads : a.plan.lanes;
  const int rows_per_block = kThreads / lanes;
  const int t = threadIdx.x % lanes;

  // Uniform loop bound, and `valid` is uniform over a row's lanes: row_sum's barriers and shuffles
  // are reached by every thread.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block; row0 < a.rows;
       row0 += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = row0 + threadIdx.x / lanes;
    const bool row_ok = row < a.rows;
    const RowParams<acc_t> p = row_ok ? load_row_params<acc_t>(a.lse, a.label, a.row_scale, row, a.cols,
                                                               a.ignore_index)
                                      : RowParams<acc_t>{acc_t(0), acc_t(0), 0, false};
    const int64_t begin = row * a.cols;
    const int64_t end = begin + a.cols;
    // The row's chunks are first + j, j in [0, n); the full ones j in [full_lo, full_hi).
    const int64_t first = begin / kElems;
    const int n = row_ok ? static_cast<int>((end - 1) / kElems - first + 1) : 0;
    const int full_lo = static_cast<int>((begin + kElems - 1) / kElems - first);
    const int full_hi = a.vec ? static_cast<int>(std::max<int64_t>(full_lo, end / kElems - first)) : full_lo;

    // Pass 1: ⟨p, u⟩ of the row. An edge chunk's elements outside the row read as z = -inf,
    // u = 0: they add p·u = 0 (or NaN where the row's own elements do, lse = -inf or NaN), so the
    // chunk needs no mask.
    const scalar_t kNegInf = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
    acc_t pu_part = acc_t(0);
    if (p.valid) {
      for (int it = 0, j = t; it < a.plan.iters && j < n; ++it, j += lanes) {
        const int64_t base = (first + j) * kElems;
        acc_t zx[kElems], ux[kElems];
        if (j >= full_lo && j < full_hi) {
          Vec zv[C::kVecs], uv[C::kVecs];
#pragma unroll
          for (int w = 0; w < C::kVecs; ++w) {
            zv[w] = reinterpret_cast<const Vec*>(a.z + base)[w];
            uv[w] = reinterpret_cast<const Vec*>(a.u + base)[w];
          }
          if (a.on_chip) {
#pragma unroll
            for (int w = 0; w < C::kVecs; ++w) {
              *stash_slot<C, kThreads>(stash_z, it, w) = zv[w];
              *stash_slot<C, kThreads>(stash_u, it, w) = uv[w];
            }
          }
          unpack<C, acc_t>(zv, zx);
          unpack<C, acc_t>(uv, ux);
        } else {
#pragma unroll
          for (int e = 0; e < kElems; ++e) {
            const bool in_row = base + e >= begin && base + e < end;
            const scalar_t zr = in_row ? a.z[base + e] : kNegInf;
            const scalar_t ur = in_row ? a.u[base + e] : scalar_t();
            if (a.on_chip) {
              stash_slot<C, kThreads>(stash_z, it, e / C::kV)->v[e % C::kV] = zr;
              stash_slot<C, kThreads>(stash_u, it, e / C::kV)->v[e % C::kV] = ur;
            }
            zx[e] = static_cast<acc_t>(zr);
            ux[e] = static_cast<acc_t>(ur);
          }
        }
#pragma unroll
        for (int e = 0; e < kElems; ++e) pu_part += softmax_prob<acc_t>(zx[e], p.lse) * ux[e];
      }
    }
    const acc_t pu = row_sum<acc_t, kBlockMode>(pu_part, lanes, sh);

    // Pass 2: grad_z = row_scale · p · (u - ⟨p, u⟩), 0 on ignored rows; an edge chunk stores its
    // row's elements only.
    for (int it = 0, j = t; it < a.plan.iters && j < n; ++it, j += lanes) {
      const int64_t base = (first + j) * kElems;
      const bool full = j >= full_lo && j < full_hi;
      acc_t y[kElems];
      if (p.valid) {
        acc_t zx[kElems], ux[kElems];
        if (a.on_chip || full) {
          Vec zv[C::kVecs], uv[C::kVecs];
#pragma unroll
          for (int w = 0; w < C::kVecs; ++w) {
            zv[w] = a.on_chip ? *stash_slot<C, kThreads>(stash_z, it, w) : reinterpret_cast<const Vec*>(a.z + base)[w];
            uv[w] = a.on_chip ? *stash_slot<C, kThreads>(stash_u, it, w) : reinterpret_cast<const Vec*>(a.u + base)[w];
          }
          unpack<C, acc_t>(zv, zx);
          unpack<C, acc_t>(uv, ux);
        } else {
#pragma unroll
          for (int e = 0; e < kElems; ++e) {
            const bool in_row = base + e >= begin && base + e < end;
            zx[e] = in_row ? static_cast<acc_t>(a.z[base + e]) : acc_t(0);
            ux[e] = in_row ? static_cast<acc_t>(a.u[base + e]) : acc_t(0);
          }
        }
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          y[e] = ce_grad_backward_element<acc_t>(softmax_prob<acc_t>(zx[e], p.lse), ux[e], pu, p.scale);
        }
      } else {
#pragma unroll
        for (int e = 0; e < kElems; ++e) y[e] = acc_t(0);
      }
      store_chunk_vecs<C, acc_t>(a.grad_z, base, begin, end, full, y);
    }
    if (row_ok && t == 0) {
      // p.label was asserted to be in [0, cols); NaN rather than an out-of-bounds read otherwise.
      const bool in_range = p.label >= 0 && p.label < a.cols;
      const acc_t u_label =
          in_range ? static_cast<acc_t>(a.u[begin + p.label]) : std::numeric_limits<acc_t>::quiet_NaN();
      a.grad_row_scale[row] = p.valid ? pu - u_label : acc_t(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: argument checks, allocation, dispatch.
// ---------------------------------------------------------------------------------------------

// loss, lse, ŷ into the given tensors, and the fused gradient into `grad` when it is defined
// and the row fits on chip. Returns whether it wrote `grad`.
bool sample_into(const at::Tensor& zc, const at::Tensor& tc, const at::Tensor& rc, int64_t ignore_index,
                 at::Tensor& loss, at::Tensor& lse, at::Tensor& yhat, at::Tensor* grad) {
  const int64_t rows = zc.size(0);
  const int64_t cols = zc.size(1);
  check_cuda_columns(cols);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  bool fused = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "cross_entropy_sample_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowPlan plan = plan_rows<SampleChunk<scalar_t>>(cols, 1, true);
    const size_t smem = stash_bytes<SampleChunk<scalar_t>>(plan, 1);
    fused = grad != nullptr && plan.splits == 1 && smem <= max_dynamic_smem(sample_kernel<scalar_t, acc_t>(plan));
    at::Tensor partials;
    if (plan.splits > 1) {
      partials = at::empty({rows * plan.splits * static_cast<int64_t>(sizeof(SamplePartial<acc_t>))},
                           zc.options().dtype(at::kByte));
    }
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    scalar_t* gp = fused ? grad->data_ptr<scalar_t>() : nullptr;
    const uintptr_t align = ChunkShape<scalar_t>::kAlign;
    const SampleArgs<scalar_t, acc_t> args{
        zp, tc.const_data_ptr<int64_t>(), rc.const_data_ptr<int64_t>(), loss.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), yhat.data_ptr<int64_t>(),
        plan.splits > 1 ? reinterpret_cast<SamplePartial<acc_t>*>(partials.data_ptr()) : nullptr, gp, rows, cols,
        ignore_index, plan, is_aligned(zp, align) && is_aligned(gp, align)};
    launch_sample<scalar_t, acc_t>(args, fused ? smem : 0, stream);
  });
  return fused;
}

// loss and lse (z's accumulation dtype) and ŷ (int64), one per row of z.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_outputs(const at::Tensor& z) {
  const auto rows = z.size(0);
  return {at::empty({rows}, z.options().dtype(acc_type(z))), at::empty({rows}, z.options().dtype(acc_type(z))),
          at::empty({rows}, z.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_sample_cuda(const at::Tensor& z,
                                                                         const at::Tensor& target,
                                                                         const at::Tensor& rng,
                                                                         int64_t ignore_index) {
  check_cross_entropy_sample_args(z, target, rng);
  const c10::cuda::CUDAGuard guard(z.device());
  auto [loss, lse, yhat] = sample_outputs(z);
  if (z.size(0) == 0) return {loss, lse, yhat};
  sample_into(z.contiguous(), target.contiguous(), rng.contiguous(), ignore_index, loss, lse, yhat, nullptr);
  return {loss, lse, yhat};
}

at::Tensor ce_grad_cuda(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& label,
                        const at::Tensor& row_scale, int64_t ignore_index) {
  check_ce_grad_args(z, lse, label, row_scale);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  at::Tensor out = at::empty_like(zc, at::MemoryFormat::Contiguous);
  if (zc.numel() == 0) return out;
  const int64_t rows = zc.size(0);
  const int64_t cols = zc.size(1);
  check_cuda_columns(cols);
  const at::Tensor lc = lse.contiguous();
  const at::Tensor yc = label.contiguous();
  const at::Tensor sc = row_scale.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "ce_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowPlan plan = plan_rows<SampleChunk<scalar_t>>(cols, 1, true);
    const auto kernel = plan.block_mode ? ce_grad_kernel<scalar_t, acc_t, true> : ce_grad_kernel<scalar_t, acc_t, false>;
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const uintptr_t align = ChunkShape<scalar_t>::kAlign;
    const GradArgs<scalar_t, acc_t> args{zp, lc.const_data_ptr<acc_t>(), yc.const_data_ptr<int64_t>(),
                                         sc.const_data_ptr<acc_t>(), op, rows, cols, ignore_index, plan,
                                         is_aligned(zp, align) && is_aligned(op, align)};
    const int threads = plan_threads(plan);
    const int64_t rows_per_block = threads / plan.lanes;
    const int64_t work = (rows * plan.splits + rows_per_block - 1) / rows_per_block;
    kernel<<<grid_size(kernel, work, threads), threads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ce_grad_backward_cuda(const at::Tensor& u, const at::Tensor& z,
                                                         const at::Tensor& lse,
                                                         const at::Tensor& label,
                                                         const at::Tensor& row_scale,
                                                         int64_t ignore_index) {
  check_ce_grad_args(z, lse, label, row_scale);
  check_cotangent(u, z);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  const at::Tensor uc = u.contiguous();
  at::Tensor grad_z = at::empty_like(zc, at::MemoryFormat::Contiguous);
  at::Tensor grad_row_scale = at::empty_like(row_scale, at::MemoryFormat::Contiguous);
  const int64_t rows = zc.size(0);
  const int64_t cols = zc.size(1);
  if (rows == 0) return {grad_z, grad_row_scale};
  check_cuda_columns(cols);
  const at::Tensor lc = lse.contiguous();
  const at::Tensor yc = label.contiguous();
  const at::Tensor sc = row_scale.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "ce_grad_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowPlan plan = plan_rows<BackwardChunk<scalar_t>>(cols, 2, false);
    const auto kernel = plan.block_mode ? ce_grad_backward_kernel<scalar_t, acc_t, true>
                                        : ce_grad_backward_kernel<scalar_t, acc_t, false>;
    const size_t stash = stash_bytes<BackwardChunk<scalar_t>>(plan, 2);
    const bool on_chip = stash <= static_cast<size_t>(kOnChipBytes) && stash <= max_dynamic_smem(kernel);
    const size_t smem = on_chip ? stash : 0;
    const uintptr_t align = ChunkShape<scalar_t>::kAlign;
    const scalar_t* up = uc.const_data_ptr<scalar_t>();
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_z.data_ptr<scalar_t>();
    const BackwardArgs<scalar_t, acc_t> args{
        up, zp, lc.const_data_ptr<acc_t>(), yc.const_data_ptr<int64_t>(), sc.const_data_ptr<acc_t>(), gp,
        grad_row_scale.data_ptr<acc_t>(), rows, cols, ignore_index, plan,
        is_aligned(up, align) && is_aligned(zp, align) && is_aligned(gp, align), on_chip};
    const int threads = plan_threads(plan);
    const int64_t rows_per_block = threads / plan.lanes;
    const int blocks = grid_size(kernel, (rows + rows_per_block - 1) / rows_per_block, threads, smem);
    kernel<<<blocks, threads, smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_z, grad_row_scale};
}

// The sample and G = exp(z - lse) - onehot(ŷ) (0 on ignored rows) in one kernel when the row fits
// on chip; otherwise the sample, then ce_grad(z, lse, ŷ, 1) on the valid rows (z read twice). With
// true_scale, G_true = ce_grad(z, lse, target, true_scale) by one more ce_grad pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_sample_grad_cuda(
    const at::Tensor& z, const at::Tensor& target, const at::Tensor& rng, int64_t ignore_index,
    const std::optional<at::Tensor>& true_scale) {
  check_cross_entropy_sample_args(z, target, rng);
  check_true_scale(true_scale, z);
  const c10::cuda::CUDAGuard guard(z.device());
  auto [loss, lse, yhat] = sample_outputs(z);
  at::Tensor grad = at::empty_like(z, at::MemoryFormat::Contiguous);
  at::Tensor grad_true = true_scale ? at::empty_like(z, at::MemoryFormat::Contiguous) : z.new_empty({0});
  if (z.size(0) == 0) return {loss, lse, yhat, grad, grad_true};
  const at::Tensor zc = z.contiguous();
  if (!sample_into(zc, target.contiguous(), rng.contiguous(), ignore_index, loss, lse, yhat, &grad)) {
    const at::Tensor label = yhat.masked_fill(target == ignore_index, kSampledLabelIgnore);
    grad = ce_grad_cuda(zc, lse, label, at::ones_like(lse), kSampledLabelIgnore);
  }
  if (true_scale) grad_true = ce_grad_cuda(zc, lse, target, *true_scale, ignore_index);
  return {loss, lse, yhat, grad, grad_true};
}

// The fused op's backward from the other kernels: ce_grad_backward of w = grad_g + true_scale·grad_g_true
// (formed in the accumulation dtype, rounded once to z's) plus ce_grad of grad_loss.
at::Tensor cross_entropy_sample_grad_backward_cuda(const std::optional<at::Tensor>& grad_loss,
                                                   const std::optional<at::Tensor>& grad_g,
                                                   const std::optional<at::Tensor>& grad_g_true, const at::Tensor& z,
                                                   const at::Tensor& lse, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& true_scale, int64_t ignore_index) {
  check_sample_grad_backward_args(grad_loss, grad_g, grad_g_true, z, lse, target, true_scale);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor ones = at::ones_like(lse);
  at::Tensor grad_z;
  if (grad_g || grad_g_true) {
    at::Tensor w = grad_g ? grad_g->to(acc_type(z)) : at::zeros_like(z, z.options().dtype(acc_type(z)));
    if (grad_g_true) w = w + true_scale->unsqueeze(1) * grad_g_true->to(acc_type(z));
    grad_z = std::get<0>(ce_grad_backward_cuda(w.to(z.scalar_type()), z, lse, target, ones, ignore_index));
  }
  if (grad_loss) {
    const at::Tensor from_loss = ce_grad_cuda(z, lse, target, *grad_loss, ignore_index);
    grad_z = grad_z.defined() ? grad_z + from_loss : from_loss;
  }
  return grad_z.defined() ? grad_z : at::zeros_like(z, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  m.impl("cross_entropy_sample", &cross_entropy_sample_cuda);
  m.impl("cross_entropy_sample_grad", &cross_entropy_sample_grad_cuda);
  m.impl("cross_entropy_sample_grad_backward", &cross_entropy_sample_grad_backward_cuda);
  m.impl("ce_grad", &ce_grad_cuda);
  m.impl("ce_grad_backward", &ce_grad_backward_cuda);
}

}  // namespace dropreg
