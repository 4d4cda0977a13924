// The cross-entropy sample kernel (cross_entropy_sample, and the fused gradient of
// cross_entropy_sample_grad) and the merge of split rows; cross_entropy.cu launches them.
//
// The sample pass. Per chunk a thread raises its running max m to the chunk's max (the sum so far
// rescaled once, not per element) and adds e = exp(z - m) to its Σ exp. The same e filters the
// Gumbel-max candidates before any log: with S a lower bound on the row's best score, an element
// can only win if z + G >= S, i.e. E = -log u <= exp(z - S), and E >= 1 - u, so only elements with
//   1 - u < e · exp(m - S + δ),   δ = 1e-3 + |S|·2^-22
// can (δ covers the rounding of e, of the bound and of the scores, as the margin of the CPU's
// filter in cross_entropy.cpp; the |S| term keeps it valid for huge logits, whose scores round
// to a coarse grid). The test reads 1 - u's lower bound from the 16 filter bits h of the Gumbel
// stream alone (contract v3, cross_entropy.h: one Philox call a chunk of 8) and costs one FMA and
// one compare per element; a chunk's Philox call is skipped when none of its elements can pass,
// and a candidate draws its refinement bits (the rest of u) with one call of its own. S is the largest of the
// thread's best score, m - 2.82 (the max element scores at least m + min G = m - 2.8115) and the
// bound the row's threads share every kShareEvery chunks; each thread seeds its best with the
// exact score of its first chunk's max, so the first shared bound is already near the row's best
// score (a few candidates a row instead of ~2% of the elements for logits of spread 3). Only the
// candidates get the exact score z + (-log(-log u)), the reference's formula, so ŷ is the
// reference's bit for bit whatever the filter lets through. NaN and ±inf need no flag on this
// path: their e is NaN (a candidate, scored exactly) or 0.
//
// (seed, offset) come from a cuda::RngArg (rng.cuh: device memory, or torch's generator's Philox
// state); invalid targets trip a device assert, as in PyTorch's nll_loss: no host sync anywhere.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cross_entropy.h"
#include "cross_entropy_common.cuh"
#include "cuda_utils.cuh"
#include "philox.h"
#include "rng.cuh"

namespace dropreg {
namespace ce {

// The merge of split rows: one thread a row.
constexpr int kElementwiseThreads = 256;
// The threads of a row share their best-score bound every kShareEvery chunks.
constexpr int kShareEvery = 2;

// The candidate filter (see the top of the file): -min G over the Gumbel stream's u, rounded up;
// δ's constant term; and 2^23, the scale of 1 - u's integer.
constexpr float kGumbelMin = 2.82f;
constexpr float kFilterMargin = 1e-3f;
constexpr float kTwo23 = 8388608.0f;

using cuda::mul_rn;

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

// The filter's 1 - u >= (w + 1/2)·2^-23 of filter bits h (gumbel_filter_w) as the float 2^23 + w:
// w < 2^23 under the exponent of 2^23. Exact, and no conversion instruction.
__device__ __forceinline__ float filter_w_bits(uint32_t h) { return __uint_as_float(0x4B000000u | gumbel_filter_w(h)); }

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

// ---------------------------------------------------------------------------------------------
// cross_entropy_sample (and the fused gradient)
// ---------------------------------------------------------------------------------------------

// Philox4x32-10 of the Gumbel streams (cross_entropy.h's GumbelStreams, the same words): the
// filter bits' kCalls consecutive groups of a chunk, computed side by side, and a candidate's
// refinement; the round keys are computed once per thread.
struct GumbelPhilox {
  GumbelStreams streams;

  __device__ __forceinline__ GumbelPhilox(uint64_t seed, uint64_t offset) : streams(seed, offset) {}

  template <int kCalls>
  __device__ __forceinline__ void operator()(uint64_t group, Philox4 (&r)[kCalls]) const {
#pragma unroll
    for (int c = 0; c < kCalls; ++c) {
      r[c].x[0] = static_cast<uint32_t>(group + c);
      r[c].x[1] = static_cast<uint32_t>((group + c) >> 32);
      r[c].x[2] = streams.filter.c2;
      r[c].x[3] = streams.filter.c3;
    }
#pragma unroll
    for (int round = 0; round < 10; ++round) {
#pragma unroll
      for (int c = 0; c < kCalls; ++c) {
        philox_round(r[c].x[0], r[c].x[1], r[c].x[2], r[c].x[3], streams.filter.key.k0[round],
                     streams.filter.key.k1[round]);
      }
    }
  }

  // G of flat index i with filter bits h: its refinement bits drawn (one Philox call).
  __device__ __forceinline__ float gumbel_at(uint64_t i, uint32_t h) const { return gumbel(h, streams.refinement(i)); }
};

// The filter bits of element e of the chunk at flat index base (kElems elements, base a multiple of
// kElems) from the chunk's call r (group base / 8): u16 (base % 8) + e of the call, by selects for a
// 4-element chunk, whose half of the call is known only at run time.
template <int kElems>
__device__ __forceinline__ uint32_t chunk_filter_bits(const Philox4& r, int64_t base, int e) {
  static_assert(kElems == 4 || kElems == 8, "a chunk is half a filter call or a whole one");
  if constexpr (kElems == 8) return group_u16(r, e);
  const uint32_t word = (base & 4) != 0 ? r.x[2 + (e >> 1)] : r.x[e >> 1];
  return (word >> ((e & 1) * 16)) & 0xFFFFu;
}

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
  cuda::RngArg rng;                // [seed, offset]; a draw writes the state it used (block 0)
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
// registers), and its refinement bits are drawn. An edge chunk's elements outside the row [begin, end) (read as -inf, so their t is
// 2^23, or NaN while the bound is infinite) are skipped among the candidates, where the rare
// draws are: the per-element tests need no masks.
template <typename scalar_t, typename acc_t, int kElems>
__device__ __forceinline__ void sample_candidates(const acc_t (&t)[kElems], const scalar_t* __restrict__ z,
                                                  int64_t base, int64_t begin, int64_t end,
                                                  const GumbelPhilox& philox, ArgmaxState<acc_t>& best) {
  // 2^23 + w < t whenever (w + 1/2)·2^-23 < e·bound (w is an integer and t is rounded once), and
  // 1 - u >= (w + 1/2)·2^-23 whatever the refinement, so the test only ever adds candidates.
  // t <= 2^23 everywhere: no u can pass, no draw.
  bool need = false;
#pragma unroll
  for (int e = 0; e < kElems; ++e) need = need || !(t[e] <= acc_t(kTwo23));  // NaN: needed
  if (!need) return;
  Philox4 r[1];
  philox(static_cast<uint64_t>(base) / kU16PerGroup, r);
  unsigned cand = 0;
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    cand |= !(static_cast<acc_t>(filter_w_bits(chunk_filter_bits<kElems>(r[0], base, e))) >= t[e]) ? 1u << e : 0u;
  }
  while (cand != 0) {
    const int e = __ffs(cand) - 1;
    cand &= cand - 1;
    if (base + e < begin || base + e >= end) continue;
    uint32_t h = chunk_filter_bits<kElems>(r[0], base, 0);
#pragma unroll
    for (int i = 1; i < kElems; ++i) h = e == i ? chunk_filter_bits<kElems>(r[0], base, i) : h;
    const acc_t score = static_cast<acc_t>(z[base + e]) + static_cast<acc_t>(philox.gumbel_at(base + e, h));
    best = argmax_merge<acc_t>(best, ArgmaxState<acc_t>{score, base + e - begin});
  }
}

template <typename scalar_t, typename acc_t, bool kBlockMode>
__global__ void __launch_bounds__(RowLanes<kBlockMode>::kThreads, row_kernel_min_blocks<acc_t, kBlockMode>())
    cross_entropy_sample_kernel(const SampleArgs<scalar_t, acc_t> a) {
  using C = SampleChunk<scalar_t>;
  using Vec = typename C::Vec;
  constexpr int kThreads = RowLanes<kBlockMode>::kThreads;
  constexpr int kElems = C::kElems;
  const scalar_t kNegInf = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
  __shared__ RowShared<acc_t> sh;
  Vec* const stash = thread_stash<C>();  // this thread's chunks (fused gradient)
  const bool fused = a.grad != nullptr;
  const RowLanes<kBlockMode> lanes(a.plan);
  const cuda::RngState state = cuda::load_rng(a.rng);
  cuda::store_rng(a.rng, state);  // a draw's state, for the backward; the merge kernel reads none
  const GumbelPhilox philox(state.seed, state.offset);
  const int64_t items = a.rows * a.plan.splits;
  if constexpr (kBlockMode) {
    if (threadIdx.x == 0) sh.bound = bound_key(-INFINITY);
    __syncthreads();
  }

  // The loop bound is uniform over the block, and so (per row) is every trip count below: block
  // mode's barriers and the lanes' shuffles are reached by all threads. A lane whose row is past
  // the end takes part with nothing to do.
  for (int64_t item0 = lanes.first_step(); item0 < items; item0 += lanes.stride()) {
    const int64_t item = lanes.item(item0);
    const bool row_ok = item < items;
    const WorkItem w(item, a.plan.splits);
    const int64_t tgt = row_ok ? a.target[w.row] : a.ignore_index;
    const bool valid = tgt != a.ignore_index;  // ignored rows need the lse but no sample
    const RowChunks<kElems> rc(w, row_ok, a.cols, a.plan.splits, a.vec);

    LseState<acc_t> l = lse_identity<acc_t>();
    ArgmaxState<acc_t> best = argmax_identity<acc_t>();
    float shared_bound = -INFINITY;
    int j = lanes.t;
    int64_t base = rc.base(j);
    Vec* slot = stash;  // this thread's stash slots of chunk `it` (fused gradient)
    for (int it = 0; it < a.plan.iters;
         ++it, j += lanes.count, base += static_cast<int64_t>(lanes.count) * kElems, slot += C::kVecs * kThreads) {
      const bool active = j < rc.n;
      acc_t x[kElems];
      if (active) {
        Vec v[C::kVecs];
        if (rc.full(j)) {
#pragma unroll
          for (int w = 0; w < C::kVecs; ++w) v[w] = reinterpret_cast<const Vec*>(a.z + base)[w];
        } else {
          // An edge chunk's elements outside the row read as -inf: they add 0 and never win.
#pragma unroll
          for (int e = 0; e < kElems; ++e) {
            v[e / C::kV].v[e % C::kV] = base + e >= rc.begin && base + e < rc.end ? a.z[base + e] : kNegInf;
          }
        }
        if (fused) {
#pragma unroll
          for (int w = 0; w < C::kVecs; ++w) slot[w * kThreads] = v[w];
        }
        unpack<C, acc_t>(v, x);
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
          const uint64_t i_max = static_cast<uint64_t>(base + e_max);
          Philox4 r[1];
          philox(i_max / kU16PerGroup, r);
          const float g = philox.gumbel_at(i_max, select_u16(r[0], i_max));
          best = argmax_merge<acc_t>(best, ArgmaxState<acc_t>{cm + static_cast<acc_t>(g), base + e_max - rc.begin});
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
          for (int off = 1; off < lanes.count; off <<= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
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

      if (active && valid) sample_candidates<scalar_t, acc_t, kElems>(tq, a.z, base, rc.begin, rc.end, philox, best);
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
            write_row(a, w.row, tgt, l, best);
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
      butterfly_ce<acc_t>(l, best, lanes.count);
      if (row_ok && lanes.t == 0) write_row(a, w.row, tgt, l, best);
      row_lse = finish_lse<acc_t>(l);
      row_yhat = best.index;
    }

    // The fused gradient from the thread's own chunks: G = exp(z - lse) - [c == ŷ] with
    // ce_grad's formula (row_scale 1), 0 on ignored rows. The next row's first barrier or
    // shared-memory write comes after every thread has read sh.lse / sh.yhat.
    if (fused) {
      const Vec* slot = stash;
      int64_t base = rc.base(lanes.t);
      for (int it = 0, jj = lanes.t; it < a.plan.iters && jj < rc.n;
           ++it, jj += lanes.count, base += static_cast<int64_t>(lanes.count) * kElems, slot += C::kVecs * kThreads) {
        Vec v[C::kVecs];
#pragma unroll
        for (int w = 0; w < C::kVecs; ++w) v[w] = slot[w * kThreads];
        acc_t x[kElems];
        unpack<C, acc_t>(v, x);
        const int yhat_at = place_in_chunk<kElems>(rc.begin + row_yhat - base);
        acc_t y[kElems];
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          y[e] = valid ? ce_grad_element<acc_t>(x[e], row_lse, e == yhat_at, acc_t(1)) : acc_t(0);
        }
        store_chunk_vecs<C, acc_t>(a.grad, base, rc.begin, rc.end, rc.full(jj), y);
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

}  // namespace ce
}  // namespace dropreg
