// Cross-entropy with a sampled label on the CPU (reference.cross_entropy_sample,
// cross_entropy_sample_grad, ce_grad, ce_grad_backward). Rows run in parallel; each row is read
// from memory once, in 128-element blocks of flat indices: per block the max (online, earlier
// sums rescaled), Σ exp(z - max) and the Gumbel-max argmax, with exp/log by SLEEF (exp_log.h).
// For float accumulation the ISA's row of the cross-entropy table (loops.h) runs the blocks and
// rows from the registers (cross_entropy_avx512.h, cross_entropy_avx2.h), the same arithmetic in
// the same order as the portable loops below, which run elsewhere. The fused op keeps the row's
// exp(z - max) in a per-thread buffer (a row of 50k floats fits in L2) and writes G from it, so z
// is read once and G written once. The Gumbel draws (contract v3: 16 filter bits a logit, the
// refinement for candidates only) use the global element index r·C + c, so ŷ does not depend on
// threading.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "cross_entropy.h"
#include "cross_entropy_host.h"
#include "cross_entropy_row.h"
#include "exp_log.h"
#include "fresh_output.h"
#include "isa.h"
#include "loops.h"

namespace dropreg {
namespace {

using cpu::Isa;
using cpu::kBlockElems;
using cpu::kSumLanes;  // Σ exp(z - m): partials in double, summed in lane order at the row's end

// Rows of up to this many columns keep their per-thread row buffers inline (no heap allocation
// per call: what small calls feel).
constexpr int64_t kInlineRowColumns = 256;

// Rows per parallel task: enough elements per task to amortize scheduling.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// Candidates in a block beyond which their refinement draws are computed for the span of calls
// they touch at once (vectorized, as a row's first block and short rows need) rather than one
// scalar Philox call each.
constexpr int64_t kScalarRefinements = 2;

// Exact Gumbel scores z + G for the elements k[0..n) of the block at flat index blk (G as in
// reference.gumbel_noise: h the block's filter bits, v the refinement draws, the same SLEEF log, so
// the same bits), merged into `best` in index order. zb and hb are indexed by the same offsets k;
// the column of offset k is first_col + k.
template <Isa isa, typename scalar_t, typename acc_t>
void merge_exact_scores(const scalar_t* zb, const uint16_t* hb, const int32_t* k, int64_t n, int64_t blk,
                        int64_t first_col, const GumbelStreams& streams, uint64_t seed, uint64_t offset,
                        float* scratch, ArgmaxState<acc_t>& best) {
  if (n > kScalarRefinements) {
    alignas(64) uint32_t v[kBlockElems];
    const int64_t first = k[0] / 4, calls = k[n - 1] / 4 + 1 - first;
    cpu::philox_calls<isa>(seed, offset, kStreamGumbelRefine, static_cast<uint64_t>(blk) / 4 + first, calls,
                           v + 4 * first);
    for (int64_t j = 0; j < n; ++j) scratch[j] = gumbel_uniform(hb[k[j]], v[k[j]]);
  } else {
    for (int64_t j = 0; j < n; ++j) scratch[j] = gumbel_uniform(hb[k[j]], streams.refinement(blk + k[j]));
  }
  cpu::vlog<isa>(scratch, n);
  for (int64_t j = 0; j < n; ++j) scratch[j] = -scratch[j];
  cpu::vlog<isa>(scratch, n);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t score = static_cast<acc_t>(zb[k[j]]) + static_cast<acc_t>(-scratch[j]);
    best = argmax_merge<acc_t>(best, {score, first_col + k[j]});
  }
}

// ---------------------------------------------------------------------------------------------
// The portable loops, each with the contract of its table entry (loops.h: CrossEntropyLoops):
// every row's loops for f64 logits, the portable row's for all, and the AVX2 row's rows.
// ---------------------------------------------------------------------------------------------

// The offsets [lo, hi) of the 128-element block at flat index blk (z points there) update the row
// state `st`; e[k] = exp(z[k] - m) at offsets [lo, hi) (stored at e_out when not null: the fused
// gradient's row buffer), their sum into partial k % kSumLanes (the block's 8 elements of a lane
// summed in acc_t first, in order); h the block's filter bits (stream: offset + kStreamGumbel, the
// calls from first_call that [lo, hi) touches); the candidates of the filter (see sample_row) into
// cand, all of [lo, hi) on the exact path. Returns their number. The AVX-512 loop does the same
// arithmetic in the same order; only its exp differs, within 2 ulp.
template <Isa isa, typename scalar_t, typename acc_t>
int64_t sample_block_portable(const scalar_t* z, int64_t lo, int64_t hi, cpu::RowState<acc_t>& st, uint64_t seed,
                     uint64_t stream, uint64_t first_call, acc_t* e_out, uint16_t* h, int32_t* cand) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  alignas(64) acc_t e_block[kBlockElems];
  acc_t* e = e_out != nullptr ? e_out : e_block;
  acc_t block_max = -kInf;
  for (int64_t k = lo; k < hi; ++k) {
    const acc_t x = static_cast<acc_t>(z[k]);
    e[k] = x;
    block_max = x > block_max ? x : block_max;  // NaN never wins
    st.nonfinite |= !std::isfinite(x);
    st.nan |= x != x;
  }
  if (block_max > st.m) st.raise_max(block_max);
  for (int64_t k = lo; k < hi; ++k) e[k] -= st.m;
  cpu::vexp<isa>(e + lo, hi - lo);
  if (st.m > -kInf) {  // while m = -inf every value so far is -inf and adds 0 (e would be NaN)
    for (int lane = 0; lane < kSumLanes; ++lane) {
      acc_t lane_sum = 0;
      for (int64_t k = lane; k < kBlockElems; k += kSumLanes) lane_sum += k >= lo && k < hi ? e[k] : acc_t(0);
      st.partial[lane] += static_cast<double>(lane_sum);
    }
  }
  alignas(64) uint32_t words[kBlockElems / 2];
  const int64_t call_lo = lo / kU16PerGroup, call_hi = (hi + kU16PerGroup - 1) / kU16PerGroup;
  cpu::philox_calls<isa>(seed, 0, stream, first_call + static_cast<uint64_t>(call_lo), call_hi - call_lo,
                         words + 4 * call_lo);
  for (int64_t k = lo; k < hi; ++k) h[k] = static_cast<uint16_t>(words[k >> 1] >> (16 * (k & 1)));
  const bool exact = st.nonfinite || !(st.bound < kInf);
  int64_t count = 0;
  for (int64_t k = lo; k < hi; ++k) {
    // 1 - u >= (w + 1/2)·2^-23 (exact), whatever the refinement: the filter needs h alone.
    const acc_t one_minus_u = (static_cast<acc_t>(gumbel_filter_w(h[k])) + acc_t(0.5)) * acc_t(1.1920928955078125e-07);
    cand[count] = static_cast<int32_t>(k);
    count += exact || one_minus_u < e[k] * st.bound;
  }
  return count;
}

// g[k] = (e[k]·f - [k == y])·s for the offsets k in [lo, hi) of a block.
template <typename scalar_t, typename acc_t>
void scale_block_portable(const acc_t* e, int64_t lo, int64_t hi, acc_t f, int64_t y, acc_t s, scalar_t* g) {
  for (int64_t k = lo; k < hi; ++k) g[k] = static_cast<scalar_t>((e[k] * f - (k == y ? acc_t(1) : acc_t(0))) * s);
}

// G's row: g[c] = (exp(z[c] - l) - [c == y]) · s.
template <Isa isa, typename scalar_t, typename acc_t>
void grad_row_portable(const scalar_t* z, int64_t n, acc_t l, int64_t y, acc_t s, scalar_t* g) {
  alignas(64) acc_t p[kBlockElems];
  for (int64_t c0 = 0; c0 < n; c0 += kBlockElems) {
    const int64_t m = std::min(kBlockElems, n - c0);
    for (int64_t k = 0; k < m; ++k) p[k] = static_cast<acc_t>(z[c0 + k]) - l;
    cpu::vexp<isa>(p, m);
    for (int64_t k = 0; k < m; ++k) {
      g[c0 + k] = static_cast<scalar_t>((p[k] - (c0 + k == y ? acc_t(1) : acc_t(0))) * s);
    }
  }
}

// p[k] = exp(z[k] - l) and w[k] = u_g[k] + s·u_t[k] (a null cotangent: 0) into the row buffers p and
// w, and partial[k % kSumLanes] += p[k]·w[k] in double.
template <Isa isa, typename scalar_t, typename acc_t>
void softmax_dot2_row_portable(const scalar_t* z, const scalar_t* u_g, const scalar_t* u_t, acc_t s, int64_t n, acc_t l,
                      acc_t* p, acc_t* w, double* partial) {
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<acc_t>(z[k]) - l;
  cpu::vexp<isa>(p, n);
  for (int64_t k = 0; k < n; ++k) {
    w[k] = (u_g != nullptr ? static_cast<acc_t>(u_g[k]) : acc_t(0)) +
           (u_t != nullptr ? s * static_cast<acc_t>(u_t[k]) : acc_t(0));
    partial[k % kSumLanes] += p[k] * w[k];
  }
}

// g[k] = s·p[k]·(u[k] - pu) (ce_grad_backward_element).
template <typename scalar_t, typename acc_t>
void softmax_vjp_row_portable(const acc_t* p, const acc_t* u, int64_t n, acc_t pu, acc_t s, scalar_t* g) {
  for (int64_t k = 0; k < n; ++k) g[k] = static_cast<scalar_t>(ce_grad_backward_element<acc_t>(p[k], u[k], pu, s));
}

// g[k] = p[k]·(w[k] - pw) + gl·(p[k] - [k == y]) (sample_grad_backward_element).
template <typename scalar_t, typename acc_t>
void softmax_vjp2_row_portable(const acc_t* p, const acc_t* w, int64_t n, acc_t pw, acc_t gl, int64_t y, scalar_t* g) {
  for (int64_t k = 0; k < n; ++k) {
    g[k] = static_cast<scalar_t>(sample_grad_backward_element<acc_t>(p[k], w[k], pw, gl, k == y));
  }
}

// The loops of isa's row: its table entries where it has them, else the portable loops above.
template <Isa isa, typename scalar_t, typename acc_t>
struct RowLoops {
  static constexpr cpu::CrossEntropyLoops<scalar_t, acc_t> kRow = cpu::kCrossEntropyLoops<isa, scalar_t, acc_t>;
  static constexpr auto sample_block = cpu::entry_or(kRow.sample_block, &sample_block_portable<isa, scalar_t, acc_t>);
  static constexpr auto scale_block = cpu::entry_or(kRow.scale_block, &scale_block_portable<scalar_t, acc_t>);
  static constexpr auto grad_row = cpu::entry_or(kRow.grad_row, &grad_row_portable<isa, scalar_t, acc_t>);
  static constexpr auto softmax_dot2_row =
      cpu::entry_or(kRow.softmax_dot2_row, &softmax_dot2_row_portable<isa, scalar_t, acc_t>);
  static constexpr auto softmax_vjp_row =
      cpu::entry_or(kRow.softmax_vjp_row, &softmax_vjp_row_portable<scalar_t, acc_t>);
  static constexpr auto softmax_vjp2_row =
      cpu::entry_or(kRow.softmax_vjp2_row, &softmax_vjp2_row_portable<scalar_t, acc_t>);
};

// ---------------------------------------------------------------------------------------------
// The rows.
// ---------------------------------------------------------------------------------------------

// Per parallel task: the fused gradient's row buffer (e = exp(z - m_b) of every column, after a
// block of padding, since a row's first block starts up to 127 columns before it) and the running
// max m_b after each block b.
template <typename acc_t>
struct GradRowBuffer {
  c10::SmallVector<acc_t, kInlineRowColumns + 2 * kBlockElems> e;
  c10::SmallVector<acc_t, kInlineRowColumns / kBlockElems + 2> block_max;
  explicit GradRowBuffer(int64_t C) : e(static_cast<size_t>(C + 2 * kBlockElems)), block_max(static_cast<size_t>(C / kBlockElems + 2)) {}
  acc_t* col(int64_t c) { return e.data() + kBlockElems + c; }
};

// One row's sample pass. Per 128-element block of flat indices (aligned, so that a block's filter
// bits are 16 whole Philox calls): the online max m (earlier sums rescaled when it grows),
// Σ exp(z - m) for the log-sum-exp, and the Gumbel-max argmax ŷ = argmax_c z_c + G_c,
// G_c = -log E_c, E_c = -log u_c. Computing both logs for every element would triple the
// transcendental work, so the exact score is computed only for candidates: with S the best score
// so far, z_c + G_c > S  ⇔  E_c < exp(z_c - S) = e_c · exp(m - S), and E_c ≥ 1 - u_c, so an
// element with 1 - u_c ≥ e_c · exp(m - S) · (1 + 1e-3) cannot win (the margin covers the float
// rounding of e_c and of the scores). The filter reads 1 - u_c's lower bound from the 16 filter
// bits h_c alone (gumbel_filter_w); a candidate then draws its refinement bits, the rest of u_c.
// About exp(lse - S) = O(1) elements per row pass the filter; they get the reference's exact
// score, so ŷ is the reference's bit for bit. Once a NaN or ±inf is seen, the rest of the row takes
// the exact path. With `grad`, the e of every column and the m of every block stay in its buffer
// for the gradient.
template <Isa isa, typename scalar_t, typename acc_t>
cpu::RowState<acc_t> sample_row(const scalar_t* z, int64_t begin, int64_t C, uint64_t seed, uint64_t offset,
                                GradRowBuffer<acc_t>* grad) {
  alignas(64) uint16_t h[kBlockElems];
  alignas(64) float scratch[kBlockElems];
  alignas(64) int32_t cand[kBlockElems];
  const GumbelStreams streams(seed, offset);
  cpu::RowState<acc_t> st;
  const int64_t end = begin + C;
  int64_t b = 0;
  for (int64_t blk = begin - begin % kBlockElems; blk < end; blk += kBlockElems, ++b) {
    const int64_t lo = std::max(begin, blk) - blk;
    const int64_t hi = std::min(end, blk + kBlockElems) - blk;
    acc_t* e_out = grad != nullptr ? grad->col(blk - begin) : nullptr;
    const int64_t count = RowLoops<isa, scalar_t, acc_t>::sample_block(
        z + blk, lo, hi, st, seed, offset + kStreamGumbel, static_cast<uint64_t>(blk) / kU16PerGroup, e_out, h, cand);
    if (count > 0) {  // most blocks have none once a best score exists
      merge_exact_scores<isa, scalar_t, acc_t>(z + blk, h, cand, count, blk, blk - begin, streams, seed, offset,
                                               scratch, st.best);
      st.update_bound();
    }
    if (grad != nullptr) grad->block_max[b] = st.m;
  }
  return st;
}

// A fused gradient's row from the sample pass: g[c] = (e_c · exp(m_b - lse) - [c == y])·s (e_c =
// exp(z_c - m_b), m_b the running max after c's block b), rounded once to scalar_t: no second exp
// and no second read of z. A row with a non-finite logit takes ce_grad's formula instead, which
// gives the reference's values for ±inf and NaN.
template <Isa isa, typename scalar_t, typename acc_t>
void grad_from_sample(const scalar_t* z, int64_t begin, int64_t C, acc_t lse, int64_t y, acc_t s, bool finite,
                      GradRowBuffer<acc_t>& buf, scalar_t* g) {
  using Loops = RowLoops<isa, scalar_t, acc_t>;
  if (!finite) return Loops::grad_row(z + begin, C, lse, y, s, g + begin);
  const int64_t end = begin + C;
  int64_t b = 0;
  // f changes only where the running max does (a few times a row), so it is computed only there.
  acc_t f_max = buf.block_max[0];
  acc_t f = static_cast<acc_t>(std::exp(static_cast<double>(f_max) - static_cast<double>(lse)));
  for (int64_t blk = begin - begin % kBlockElems; blk < end; blk += kBlockElems, ++b) {
    const int64_t lo = std::max(begin, blk) - blk;
    const int64_t hi = std::min(end, blk + kBlockElems) - blk;
    if (buf.block_max[b] != f_max) {
      f_max = buf.block_max[b];
      f = static_cast<acc_t>(std::exp(static_cast<double>(f_max) - static_cast<double>(lse)));
    }
    const int64_t y_off = begin + y - blk;  // the label's offset in this block (outside [lo, hi): not here)
    Loops::scale_block(buf.col(blk - begin), lo, hi, f, y_off >= lo && y_off < hi ? y_off : -1, s, g + blk);
  }
}

// Whether row r, of class index y, is computed: false where y is ignore_index (the caller writes the
// row's zeros); a y outside [0, C) is the user's error, naming the argument the labels came in.
inline bool labelled_row(int64_t y, int64_t r, int64_t C, int64_t ignore_index, const char* name) {
  if (y == ignore_index) return false;
  TORCH_CHECK(y >= 0 && y < C, "argument '", name, "' must hold class indices in [0, ", C,
              ") or ignore_index=", ignore_index, ", got ", y, " in row ", r);
  return true;
}

// The rows of an op that writes fresh N x C outputs `outs` (fresh_output.h: their pages are mapped
// ahead of the rows by one thread; the null ones are not written) or none.
template <typename scalar_t, typename MakeWorker>
void parallel_rows(int64_t N, int64_t C, std::initializer_list<scalar_t*> outs, const MakeWorker& make_worker) {
  std::vector<char*> fresh;
  for (scalar_t* out : outs) {
    if (out != nullptr) fresh.push_back(reinterpret_cast<char*>(out));
  }
  if (!fresh.empty()) {
    cpu::parallel_rows_fresh(N, row_grain(C), fresh, C * int64_t(sizeof(scalar_t)), make_worker);
  } else {
    at::parallel_for(0, N, row_grain(C), [&](int64_t r0, int64_t r1) { make_worker()(r0, r1); });
  }
}

// The rows of an op whose labels are label[0..N) and whose fresh N x C output is `out`, in
// parallel: row(r, y, gr, p, w) for each row r whose label y is a class (gr: its output row; p, w:
// the thread's row buffers of C values where `buffers`, else null); a row of ignore_index gets
// zeros and ignored(r).
template <typename scalar_t, typename acc_t, typename Row, typename Ignored>
void labelled_rows(int64_t N, int64_t C, const int64_t* label, int64_t ignore_index, const char* name, bool buffers,
                   scalar_t* out, const Row& row, const Ignored& ignored) {
  parallel_rows(N, C, {out}, [&] {
    const size_t row_buffer = buffers ? static_cast<size_t>(C) : 0;
    using RowBuffer = c10::SmallVector<acc_t, kInlineRowColumns>;
    return [&, p = RowBuffer(row_buffer), w = RowBuffer(row_buffer)](int64_t r0, int64_t r1) mutable {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* gr = out + r * C;
        if (labelled_row(label[r], r, C, ignore_index, name)) {
          row(r, label[r], gr, p.data(), w.data());
        } else {
          std::fill(gr, gr + C, scalar_t(0));
          ignored(r);
        }
      }
    };
  });
}

// The sample of every row; `grad` (nullable) receives the sampled label's gradient G and
// `grad_true` (nullable, with true_scale) the true label's G_true.
template <Isa isa, typename scalar_t, typename acc_t>
void cross_entropy_sample_rows(const scalar_t* z, const int64_t* target, int64_t N, int64_t C,
                               int64_t ignore_index, uint64_t seed, uint64_t offset, acc_t* loss,
                               acc_t* lse_out, int64_t* yhat, scalar_t* grad, const acc_t* true_scale,
                               scalar_t* grad_true) {
  parallel_rows(N, C, {grad, grad_true}, [&] {
    std::optional<GradRowBuffer<acc_t>> buf;
    if (grad != nullptr || grad_true != nullptr) buf.emplace(C);
    return [&, buf = std::move(buf)](int64_t r0, int64_t r1) mutable {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* zr = z + r * C;
        const int64_t t = target[r];
        const bool valid = labelled_row(t, r, C, ignore_index, "target");
        const cpu::RowState<acc_t> st =
            sample_row<isa, scalar_t, acc_t>(z, r * C, C, seed, offset, buf ? &*buf : nullptr);
        const acc_t lse = st.lse();
        lse_out[r] = lse;
        loss[r] = valid ? lse - static_cast<acc_t>(zr[t]) : acc_t(0);
        yhat[r] = valid ? st.best.index : ignore_index;
        for (auto [g, y, s] : {std::tuple{grad, st.best.index, acc_t(1)},
                               std::tuple{grad_true, t, true_scale ? true_scale[r] : acc_t(0)}}) {
          if (g == nullptr) continue;
          if (valid) {
            grad_from_sample<isa, scalar_t, acc_t>(z, r * C, C, lse, y, s, !st.nonfinite, *buf, g);
          } else {
            std::fill(g + r * C, g + (r + 1) * C, scalar_t(0));
          }
        }
      }
    };
  });
}

template <Isa isa, typename scalar_t, typename acc_t>
void ce_grad_rows(const scalar_t* z, const acc_t* lse, const int64_t* label, const acc_t* row_scale,
                  int64_t N, int64_t C, int64_t ignore_index, scalar_t* out) {
  labelled_rows<scalar_t, acc_t>(
      N, C, label, ignore_index, "label", false, out,
      [&](int64_t r, int64_t y, scalar_t* gr, acc_t*, acc_t*) {
        RowLoops<isa, scalar_t, acc_t>::grad_row(z + r * C, C, lse[r], y, row_scale[r], gr);
      },
      [](int64_t) {});
}

// ⟨p, w⟩ of one row with p = exp(z - l) and w = u_g + s·u_t (null cotangents: 0) kept in the row
// buffers p and w: partial[k % kSumLanes] += p_k·w_k in double, summed in lane order.
template <Isa isa, typename scalar_t, typename acc_t>
acc_t softmax_dot2(const scalar_t* z, const scalar_t* u_g, const scalar_t* u_t, acc_t s, int64_t C, acc_t l, acc_t* p,
                   acc_t* w) {
  alignas(64) double partial[kSumLanes] = {};
  RowLoops<isa, scalar_t, acc_t>::softmax_dot2_row(z, u_g, u_t, s, C, l, p, w, partial);
  double sum = 0;
  for (const double part : partial) sum += part;
  return static_cast<acc_t>(sum);
}

// VJP of ce_grad per row: ⟨p, u⟩ in a first pass that keeps p = exp(z - lse) and u in per-thread
// row buffers (softmax_dot2), then grad_z = s·p ⊙ (u - ⟨p, u⟩) from the buffers: z and u are read
// from memory once, one exp per element.
template <Isa isa, typename scalar_t, typename acc_t>
void ce_grad_backward_rows(const scalar_t* u, const scalar_t* z, const acc_t* lse, const int64_t* label,
                           const acc_t* row_scale, int64_t N, int64_t C, int64_t ignore_index,
                           scalar_t* grad_z, acc_t* grad_scale) {
  labelled_rows<scalar_t, acc_t>(
      N, C, label, ignore_index, "label", true, grad_z,
      [&](int64_t r, int64_t y, scalar_t* gr, acc_t* p, acc_t* w) {
        const scalar_t* ur = u + r * C;
        const acc_t pu = softmax_dot2<isa, scalar_t, acc_t>(z + r * C, ur, nullptr, acc_t(0), C, lse[r], p, w);
        grad_scale[r] = pu - static_cast<acc_t>(ur[y]);
        RowLoops<isa, scalar_t, acc_t>::softmax_vjp_row(p, w, C, pu, row_scale[r], gr);
      },
      [&](int64_t r) { grad_scale[r] = 0; });
}

// loss, lse, ŷ and, with `with_grad`, the fused gradient G (an undefined tensor otherwise), and
// with true_scale G_true (an empty (0,) tensor otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& z_in, const at::Tensor& target_in, const at::Tensor& rng, int64_t ignore_index, bool with_grad,
    const std::optional<at::Tensor>& true_scale) {
  check_cross_entropy_sample_args(z_in, target_in, rng);
  check_true_scale(true_scale, z_in);
  const at::Tensor z = z_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t N = z.size(0), C = z.size(1);
  at::Tensor loss = cpu::fresh_cpu({N}, acc_type(z));
  at::Tensor lse = cpu::fresh_cpu({N}, acc_type(z));
  at::Tensor yhat = cpu::fresh_cpu({N}, at::kLong);
  at::Tensor grad;
  if (with_grad) grad = cpu::fresh_cpu(z.sizes(), z.scalar_type());
  const bool with_true = with_grad && true_scale.has_value();
  at::Tensor grad_true = cpu::fresh_cpu(with_true ? z.sizes() : c10::IntArrayRef{0}, z.scalar_type());
  const at::Tensor scale = with_true ? true_scale->contiguous() : at::Tensor();
  const at::Tensor state_tensor = rng.contiguous();  // kept alive while `state` is read
  const int64_t* state = state_tensor.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cross_entropy_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::with_cpu_isa([&]<Isa isa>() {
      cpu::note_entry(with_grad ? cpu::CpuOp::kCrossEntropySampleGrad : cpu::CpuOp::kCrossEntropySample, isa);
      cross_entropy_sample_rows<isa, scalar_t, acc_t>(
          z.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), N, C, ignore_index,
          static_cast<uint64_t>(state[0]), static_cast<uint64_t>(state[1]), loss.data_ptr<acc_t>(),
          lse.data_ptr<acc_t>(), yhat.data_ptr<int64_t>(), with_grad ? grad.data_ptr<scalar_t>() : nullptr,
          with_true ? scale.const_data_ptr<acc_t>() : nullptr, with_true ? grad_true.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {loss, lse, yhat, grad, grad_true};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_sample_cpu(const at::Tensor& z, const at::Tensor& target,
                                                                        const at::Tensor& rng, int64_t ignore_index) {
  auto [loss, lse, yhat, grad, grad_true] = sample_cpu(z, target, rng, ignore_index, false, std::nullopt);
  return {loss, lse, yhat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_sample_grad_cpu(
    const at::Tensor& z, const at::Tensor& target, const at::Tensor& rng, int64_t ignore_index,
    const std::optional<at::Tensor>& true_scale) {
  return sample_cpu(z, target, rng, ignore_index, true, true_scale);
}

// The backward of cross_entropy_sample_grad per row (reference.cross_entropy_sample_grad_backward):
// grad_z = p ⊙ (w - ⟨p, w⟩) + gl·(p - onehot(y)), w = u_g + s·u_t, in two passes of which the
// second reads the row buffers p and w (in cache): z and the cotangents are read from memory once,
// one exp per element, one fresh N x C output.
template <Isa isa, typename scalar_t, typename acc_t>
void sample_grad_backward_rows(const acc_t* grad_loss, const scalar_t* u_g, const scalar_t* u_t, const scalar_t* z,
                               const acc_t* lse, const int64_t* target, const acc_t* true_scale, int64_t N, int64_t C,
                               int64_t ignore_index, scalar_t* grad_z) {
  labelled_rows<scalar_t, acc_t>(
      N, C, target, ignore_index, "target", true, grad_z,
      [&](int64_t r, int64_t y, scalar_t* gr, acc_t* p, acc_t* w) {
        const acc_t s = true_scale != nullptr ? true_scale[r] : acc_t(0);
        const acc_t gl = grad_loss != nullptr ? grad_loss[r] : acc_t(0);
        const acc_t pw = softmax_dot2<isa, scalar_t, acc_t>(z + r * C, u_g ? u_g + r * C : nullptr,
                                                            u_t ? u_t + r * C : nullptr, s, C, lse[r], p, w);
        RowLoops<isa, scalar_t, acc_t>::softmax_vjp2_row(p, w, C, pw, gl, y, gr);
      },
      [](int64_t) {});
}

at::Tensor cross_entropy_sample_grad_backward_cpu(const std::optional<at::Tensor>& grad_loss,
                                                  const std::optional<at::Tensor>& grad_g,
                                                  const std::optional<at::Tensor>& grad_g_true, const at::Tensor& z_in,
                                                  const at::Tensor& lse, const at::Tensor& target,
                                                  const std::optional<at::Tensor>& true_scale, int64_t ignore_index) {
  check_sample_grad_backward_args(grad_loss, grad_g, grad_g_true, z_in, lse, target, true_scale);
  const at::Tensor z = z_in.contiguous();
  at::Tensor grad_z = cpu::fresh_cpu(z.sizes(), z.scalar_type());
  const auto contiguous = [](const std::optional<at::Tensor>& t) { return t ? t->contiguous() : at::Tensor(); };
  const at::Tensor gl = contiguous(grad_loss), ug = contiguous(grad_g), ut = contiguous(grad_g_true);
  const at::Tensor ts = grad_g_true ? contiguous(true_scale) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cross_entropy_sample_grad_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::with_cpu_isa([&]<Isa isa>() {
      cpu::note_entry(cpu::CpuOp::kCrossEntropySampleGradBackward, isa);
      sample_grad_backward_rows<isa, scalar_t, acc_t>(
          gl.defined() ? gl.const_data_ptr<acc_t>() : nullptr, ug.defined() ? ug.const_data_ptr<scalar_t>() : nullptr,
          ut.defined() ? ut.const_data_ptr<scalar_t>() : nullptr, z.const_data_ptr<scalar_t>(),
          lse.contiguous().const_data_ptr<acc_t>(), target.contiguous().const_data_ptr<int64_t>(),
          ts.defined() ? ts.const_data_ptr<acc_t>() : nullptr, z.size(0), z.size(1), ignore_index,
          grad_z.data_ptr<scalar_t>());
    });
  });
  return grad_z;
}

at::Tensor ce_grad_cpu(const at::Tensor& z_in, const at::Tensor& lse, const at::Tensor& label,
                       const at::Tensor& row_scale, int64_t ignore_index) {
  check_ce_grad_args(z_in, lse, label, row_scale);
  const at::Tensor z = z_in.contiguous();
  at::Tensor out = cpu::fresh_cpu(z.sizes(), z.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ce_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::with_cpu_isa([&]<Isa isa>() {
      cpu::note_entry(cpu::CpuOp::kCeGrad, isa);
      ce_grad_rows<isa, scalar_t, acc_t>(z.const_data_ptr<scalar_t>(), lse.contiguous().const_data_ptr<acc_t>(),
                                         label.contiguous().const_data_ptr<int64_t>(),
                                         row_scale.contiguous().const_data_ptr<acc_t>(), z.size(0), z.size(1),
                                         ignore_index, out.data_ptr<scalar_t>());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ce_grad_backward_cpu(const at::Tensor& u_in, const at::Tensor& z_in,
                                                        const at::Tensor& lse, const at::Tensor& label,
                                                        const at::Tensor& row_scale, int64_t ignore_index) {
  check_ce_grad_args(z_in, lse, label, row_scale);
  check_cotangent(u_in, z_in);
  const at::Tensor z = z_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  at::Tensor grad_z = cpu::fresh_cpu(z.sizes(), z.scalar_type());
  at::Tensor grad_scale = cpu::fresh_cpu(row_scale.sizes(), row_scale.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ce_grad_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::with_cpu_isa([&]<Isa isa>() {
      cpu::note_entry(cpu::CpuOp::kCeGradBackward, isa);
      ce_grad_backward_rows<isa, scalar_t, acc_t>(
          u.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), lse.contiguous().const_data_ptr<acc_t>(),
          label.contiguous().const_data_ptr<int64_t>(), row_scale.contiguous().const_data_ptr<acc_t>(), z.size(0),
          z.size(1), ignore_index, grad_z.data_ptr<scalar_t>(), grad_scale.data_ptr<acc_t>());
    });
  });
  return {grad_z, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  m.impl("cross_entropy_sample", &cross_entropy_sample_cpu);
  m.impl("cross_entropy_sample_grad", &cross_entropy_sample_grad_cpu);
  m.impl("cross_entropy_sample_grad_backward", &cross_entropy_sample_grad_backward_cpu);
  m.impl("ce_grad", &ce_grad_cpu);
  m.impl("ce_grad_backward", &ce_grad_backward_cpu);
}

}  // namespace dropreg
