// Cross-entropy with a sampled label on the CPU (reference.cross_entropy_sample,
// cross_entropy_sample_grad, ce_grad, ce_grad_backward). Rows run in parallel; each row is read
// from memory once, in 128-element blocks of flat indices: per block the max (online, earlier
// sums rescaled), Σ exp(z - max) and the Gumbel-max argmax, with exp/log by SLEEF (cpu_kernels.h).
// For float accumulation on AVX-512 CPUs the block runs from the registers
// (cross_entropy_avx512.h), the same arithmetic in the same order. The fused op keeps the row's
// exp(z - max) in a per-thread buffer (a row of 50k floats fits in L2) and writes G from it, so z
// is read once and G written once. The Gumbel draws use the global element index r·C + c, so ŷ
// does not depend on threading.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "cross_entropy.h"
#include "cross_entropy_avx2.h"
#include "cross_entropy_avx512.h"
#include "cross_entropy_host.h"
#include "fresh_output.h"

namespace dropreg {
namespace {

using cpu::kBlockElems;
using cpu::kSumLanes;  // Σ exp(z - m): partials in double, summed in lane order at the row's end

// Rows per parallel task: enough elements per task to amortize scheduling.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// Exact Gumbel scores z + G for the elements k[0..n) of a block (G as in reference.gumbel_noise:
// the same SLEEF log, so the same bits), merged into `best` in index order. zb and ub are indexed
// by the same offsets k; the column of offset k is first_col + k.
template <typename scalar_t, typename acc_t>
void merge_exact_scores(const scalar_t* zb, const uint32_t* ub, const int32_t* k, int64_t n,
                        int64_t first_col, float* scratch, ArgmaxState<acc_t>& best) {
  for (int64_t j = 0; j < n; ++j) scratch[j] = uniform_open01(ub[k[j]]);
  cpu::vlog_inplace(scratch, n);
  for (int64_t j = 0; j < n; ++j) scratch[j] = -scratch[j];
  cpu::vlog_inplace(scratch, n);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t score = static_cast<acc_t>(zb[k[j]]) + static_cast<acc_t>(-scratch[j]);
    best = argmax_merge<acc_t>(best, {score, first_col + k[j]});
  }
}

// Whether the AVX-512 loops (cross_entropy_avx512.h) run: float accumulation on a CPU that has them.
template <typename acc_t>
bool use_avx512() {
#if DROPREG_HAVE_AVX512_CE
  static const bool avx512 = cpu::cpu_has_avx512();
  return std::is_same_v<acc_t, float> && avx512;
#else
  return false;
#endif
}

// Whether the AVX2 sample loop (cross_entropy_avx2.h) runs: float accumulation, AVX2 but no AVX-512.
template <typename acc_t>
bool use_avx2() {
#if DROPREG_HAVE_AVX2_CE
  static const bool avx2 = cpu::cpu_path() == cpu::CpuPath::kAvx2;
  return std::is_same_v<acc_t, float> && avx2;
#else
  return false;
#endif
}

// The offsets 0, 1, ..., kBlockElems - 1: the candidates of a block on the exact path.
struct AllOffsets {
  alignas(64) int32_t k[kBlockElems];
  AllOffsets() {
    for (int32_t j = 0; j < kBlockElems; ++j) k[j] = j;
  }
};
const AllOffsets kAllOffsets;

// The portable sample_block (cross_entropy_avx512.h has the AVX-512 one, which does the same
// arithmetic in the same order; only its exp differs, within 2 ulp): the offsets [lo, hi) of the
// 128-element block at flat index blk (z points there) update the row state `st`; e[k] =
// exp(z[k] - m) at offsets [lo, hi) (e is the fused gradient's row buffer, or a block's), their
// sum into partial k % kSumLanes (the block's 8 elements of a lane summed in acc_t first, in
// order); u[0..128) the Gumbel u32 of the block; the candidates of the filter (see
// cross_entropy_sample_rows) into cand, or the offsets [lo, hi) on the exact path. Returns their
// number and points *cand_out at them.
template <typename scalar_t, typename acc_t>
int64_t sample_block(const scalar_t* z, int64_t lo, int64_t hi, cpu::RowState<acc_t>& st, uint64_t seed,
                     uint64_t offset, uint64_t first_call, acc_t* e, uint32_t* u, int32_t* cand,
                     const int32_t** cand_out) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
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
  cpu::vexp_inplace(e + lo, hi - lo);
  if (st.m > -kInf) {  // while m = -inf every value so far is -inf and adds 0 (e would be NaN)
    for (int lane = 0; lane < kSumLanes; ++lane) {
      acc_t lane_sum = 0;
      for (int64_t k = lane; k < kBlockElems; k += kSumLanes) lane_sum += k >= lo && k < hi ? e[k] : acc_t(0);
      st.partial[lane] += static_cast<double>(lane_sum);
    }
  }
  cpu::philox_block(seed, offset, kStreamGumbel, first_call, u);
  if (st.nonfinite || !(st.bound < kInf)) {
    *cand_out = kAllOffsets.k + lo;
    return hi - lo;
  }
  int64_t count = 0;
  for (int64_t k = lo; k < hi; ++k) {
    const acc_t one_minus_u = acc_t(1) - static_cast<acc_t>(uniform_open01(u[k]));
    cand[count] = static_cast<int32_t>(k);
    count += one_minus_u < e[k] * st.bound;
  }
  *cand_out = cand;
  return count;
}

// G's row: g[c] = (exp(z[c] - l) - [c == y]) · s.
template <typename scalar_t, typename acc_t>
void grad_row(const scalar_t* zr, int64_t C, acc_t l, int64_t y, acc_t s, acc_t* p, scalar_t* gr) {
#if DROPREG_HAVE_AVX512_CE
  if constexpr (std::is_same_v<acc_t, float>) {
    if (use_avx512<acc_t>()) return cpu::grad_row<scalar_t>(zr, C, l, y, s, gr);
  }
#endif
  for (int64_t c0 = 0; c0 < C; c0 += kBlockElems) {
    const int64_t n = std::min(kBlockElems, C - c0);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<acc_t>(zr[c0 + k]) - l;
    cpu::vexp_inplace(p, n);
    for (int64_t k = 0; k < n; ++k) {
      gr[c0 + k] = static_cast<scalar_t>((p[k] - (c0 + k == y ? acc_t(1) : acc_t(0))) * s);
    }
  }
}

// Per parallel task: the fused gradient's row buffer (e = exp(z - m_b) of every column, after a
// block of padding, since a row's first block starts up to 127 columns before it) and the running
// max m_b after each block b.
template <typename acc_t>
struct GradRowBuffer {
  std::vector<acc_t> e;
  std::vector<acc_t> block_max;
  explicit GradRowBuffer(int64_t C) : e(static_cast<size_t>(C + 2 * kBlockElems)), block_max(static_cast<size_t>(C / kBlockElems + 2)) {}
  acc_t* col(int64_t c) { return e.data() + kBlockElems + c; }
};

// One row's sample pass. Per 128-element block of flat indices (aligned, so that a block's Gumbel
// draws are 32 whole Philox calls): the online max m (earlier sums rescaled when it grows),
// Σ exp(z - m) for the log-sum-exp, and the Gumbel-max argmax ŷ = argmax_c z_c + G_c,
// G_c = -log E_c, E_c = -log u_c. Computing both logs for every element would triple the
// transcendental work, so the exact score is computed only for candidates: with S the best score
// so far, z_c + G_c > S  ⇔  E_c < exp(z_c - S) = e_c · exp(m - S), and E_c ≥ 1 - u_c, so an
// element with 1 - u_c ≥ e_c · exp(m - S) · (1 + 1e-3) cannot win (the margin covers the float
// rounding of e_c and of the scores). About exp(lse - S) = O(1) elements per row pass the filter;
// they get the reference's exact score, so ŷ is the reference's bit for bit. Once a NaN or ±inf is
// seen, the rest of the row takes the exact path. With `grad`, the e of every column and the m of
// every block stay in its buffer for the gradient.
template <typename scalar_t, typename acc_t>
cpu::RowState<acc_t> sample_row(const scalar_t* z, int64_t begin, int64_t C, uint64_t seed, uint64_t offset,
                                GradRowBuffer<acc_t>* grad) {
  alignas(64) uint32_t u[kBlockElems];
  alignas(64) acc_t e_block[kBlockElems];
  alignas(64) float scratch[kBlockElems];
  alignas(64) int32_t cand[kBlockElems];
  cpu::RowState<acc_t> st;
  const int64_t end = begin + C;
  int64_t b = 0;
  for (int64_t blk = begin - begin % kBlockElems; blk < end; blk += kBlockElems, ++b) {
    const int64_t lo = std::max(begin, blk) - blk;
    const int64_t hi = std::min(end, blk + kBlockElems) - blk;
    acc_t* e = grad != nullptr ? grad->col(blk - begin) : e_block;
    const uint64_t first_call = static_cast<uint64_t>(blk) / 4;
    const int32_t* candidates = cand;
    int64_t count = -1;
    if constexpr (std::is_same_v<acc_t, float>) {
      float* e_out = grad != nullptr ? e : nullptr;
      const uint64_t stream = offset + kStreamGumbel;
#if DROPREG_HAVE_AVX512_CE
      if (use_avx512<acc_t>()) {
        count = cpu::sample_block<scalar_t>(z + blk, lo, hi, st, seed, stream, first_call, e_out, u, cand);
      }
#endif
#if DROPREG_HAVE_AVX2_CE
      if (use_avx2<acc_t>()) {
        count = cpu::sample_block_avx2<scalar_t>(z + blk, lo, hi, st, seed, stream, first_call, e_out, u, cand);
      }
#endif
      (void)e_out;
      (void)stream;
    }
    if (count < 0) {
      count = sample_block<scalar_t, acc_t>(z + blk, lo, hi, st, seed, offset, first_call, e, u, cand, &candidates);
    }
    if (count > 0) {  // most blocks have none once a best score exists
      merge_exact_scores<scalar_t, acc_t>(z + blk, u, candidates, count, blk - begin, scratch, st.best);
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
template <typename scalar_t, typename acc_t>
void grad_from_sample(const scalar_t* z, int64_t begin, int64_t C, acc_t lse, int64_t y, acc_t s, bool finite,
                      GradRowBuffer<acc_t>& buf, scalar_t* g) {
  if (!finite) return grad_row<scalar_t, acc_t>(z + begin, C, lse, y, s, buf.e.data(), g + begin);
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
    const acc_t* e = buf.col(blk - begin);
    const int64_t y_off = begin + y - blk;  // the label's offset in this block (outside [lo, hi): not here)
    if constexpr (std::is_same_v<acc_t, float>) {
      const int64_t y_in = y_off >= lo && y_off < hi ? y_off : -1;
#if DROPREG_HAVE_AVX512_CE
      if (use_avx512<acc_t>()) {
        cpu::scale_block<scalar_t>(e, lo, hi, f, y_in, s, g + blk);
        continue;
      }
#endif
#if DROPREG_HAVE_AVX2_CE
      if (use_avx2<acc_t>()) {
        cpu::scale_block_avx2<scalar_t>(e, lo, hi, f, y_in, s, g + blk);
        continue;
      }
#endif
      (void)y_in;
    }
    for (int64_t k = lo; k < hi; ++k) {
      g[blk + k] = static_cast<scalar_t>((e[k] * f - (k == y_off ? acc_t(1) : acc_t(0))) * s);
    }
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

// The sample of every row; `grad` (nullable) receives the sampled label's gradient G and
// `grad_true` (nullable, with true_scale) the true label's G_true.
template <typename scalar_t, typename acc_t>
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
            sample_row<scalar_t, acc_t>(z, r * C, C, seed, offset, buf ? &*buf : nullptr);
        const acc_t lse = st.lse();
        lse_out[r] = lse;
        loss[r] = valid ? lse - static_cast<acc_t>(zr[t]) : acc_t(0);
        yhat[r] = valid ? st.best.index : ignore_index;
        for (auto [g, y, s] : {std::tuple{grad, st.best.index, acc_t(1)},
                               std::tuple{grad_true, t, true_scale ? true_scale[r] : acc_t(0)}}) {
          if (g == nullptr) continue;
          if (valid) {
            grad_from_sample<scalar_t, acc_t>(z, r * C, C, lse, y, s, !st.nonfinite, *buf, g);
          } else {
            std::fill(g + r * C, g + (r + 1) * C, scalar_t(0));
          }
        }
      }
    };
  });
}

template <typename scalar_t, typename acc_t>
void ce_grad_rows(const scalar_t* z, const acc_t* lse, const int64_t* label, const acc_t* row_scale,
                  int64_t N, int64_t C, int64_t ignore_index, scalar_t* out) {
  parallel_rows(N, C, {out}, [&] {
    return [&, p = std::vector<acc_t>(kBlockElems)](int64_t r0, int64_t r1) mutable {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* zr = z + r * C;
        scalar_t* gr = out + r * C;
        const int64_t y = label[r];
        if (!labelled_row(y, r, C, ignore_index, "label")) {
          std::fill(gr, gr + C, scalar_t(0));
          continue;
        }
        grad_row<scalar_t, acc_t>(zr, C, lse[r], y, row_scale[r], p.data(), gr);
      }
    };
  });
}

// ⟨p, w⟩ of one row with p = exp(z - l) and w = u_g + s·u_t (null cotangents: 0) kept in the row
// buffers p and w: partial[k % kSumLanes] += p_k·w_k in double, summed in lane order (as the
// AVX-512 loop).
template <typename scalar_t, typename acc_t>
acc_t softmax_dot2_row(const scalar_t* z, const scalar_t* u_g, const scalar_t* u_t, acc_t s, int64_t C, acc_t l,
                       acc_t* p, acc_t* w) {
  alignas(64) double partial[kSumLanes] = {};
  bool done = false;
#if DROPREG_HAVE_AVX512_CE
  if constexpr (std::is_same_v<acc_t, float>) {
    if (use_avx512<acc_t>()) {
      cpu::softmax_dot2_row<scalar_t>(z, u_g, u_t, s, C, l, p, w, partial);
      done = true;
    }
  }
#endif
  if (!done) {
    for (int64_t k = 0; k < C; ++k) p[k] = static_cast<acc_t>(z[k]) - l;
    cpu::vexp_inplace(p, C);
    for (int64_t k = 0; k < C; ++k) {
      w[k] = (u_g != nullptr ? static_cast<acc_t>(u_g[k]) : acc_t(0)) +
             (u_t != nullptr ? s * static_cast<acc_t>(u_t[k]) : acc_t(0));
      partial[k % kSumLanes] += p[k] * w[k];
    }
  }
  double sum = 0;
  for (const double part : partial) sum += part;
  return static_cast<acc_t>(sum);
}

// VJP of ce_grad per row: ⟨p, u⟩ in a first pass that keeps p = exp(z - lse) and u in per-thread
// row buffers (softmax_dot2_row, below), then grad_z = s·p ⊙ (u - ⟨p, u⟩) from the buffers: z and u
// are read from memory once, one exp per element.
template <typename scalar_t, typename acc_t>
void ce_grad_backward_rows(const scalar_t* u, const scalar_t* z, const acc_t* lse, const int64_t* label,
                           const acc_t* row_scale, int64_t N, int64_t C, int64_t ignore_index,
                           scalar_t* grad_z, acc_t* grad_scale) {
  parallel_rows(N, C, {grad_z}, [&] {
    return [&, p = std::vector<acc_t>(static_cast<size_t>(C)), w = std::vector<acc_t>(static_cast<size_t>(C))](
               int64_t r0, int64_t r1) mutable {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* zr = z + r * C;
        const scalar_t* ur = u + r * C;
        scalar_t* gr = grad_z + r * C;
        const int64_t y = label[r];
        if (!labelled_row(y, r, C, ignore_index, "label")) {
          std::fill(gr, gr + C, scalar_t(0));
          grad_scale[r] = 0;
          continue;
        }
        const acc_t s = row_scale[r];
        const acc_t pu = softmax_dot2_row<scalar_t, acc_t>(zr, ur, nullptr, acc_t(0), C, lse[r], p.data(), w.data());
        grad_scale[r] = pu - static_cast<acc_t>(ur[y]);
#if DROPREG_HAVE_AVX512_CE
        if constexpr (std::is_same_v<acc_t, float>) {
          if (use_avx512<acc_t>()) {
            cpu::softmax_vjp_row<scalar_t>(p.data(), w.data(), C, pu, s, gr);
            continue;
          }
        }
#endif
        for (int64_t k = 0; k < C; ++k) gr[k] = static_cast<scalar_t>(ce_grad_backward_element<acc_t>(p[k], w[k], pu, s));
      }
    };
  });
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
  at::Tensor loss = at::empty({N}, z.options().dtype(acc_type(z)));
  at::Tensor lse = at::empty({N}, z.options().dtype(acc_type(z)));
  at::Tensor yhat = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor grad;
  if (with_grad) grad = at::empty_like(z, at::MemoryFormat::Contiguous);
  const bool with_true = with_grad && true_scale.has_value();
  at::Tensor grad_true = with_true ? at::empty_like(z, at::MemoryFormat::Contiguous) : z.new_empty({0});
  const at::Tensor scale = with_true ? true_scale->contiguous() : at::Tensor();
  const at::Tensor state_tensor = rng.contiguous();  // kept alive while `state` is read
  const int64_t* state = state_tensor.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cross_entropy_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cross_entropy_sample_rows<scalar_t, acc_t>(
        z.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), N, C, ignore_index,
        static_cast<uint64_t>(state[0]), static_cast<uint64_t>(state[1]), loss.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), yhat.data_ptr<int64_t>(), with_grad ? grad.data_ptr<scalar_t>() : nullptr,
        with_true ? scale.const_data_ptr<acc_t>() : nullptr, with_true ? grad_true.data_ptr<scalar_t>() : nullptr);
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
template <typename scalar_t, typename acc_t>
void sample_grad_backward_rows(const acc_t* grad_loss, const scalar_t* u_g, const scalar_t* u_t, const scalar_t* z,
                               const acc_t* lse, const int64_t* target, const acc_t* true_scale, int64_t N, int64_t C,
                               int64_t ignore_index, scalar_t* grad_z) {
  parallel_rows(N, C, {grad_z}, [&] {
    return [&, p = std::vector<acc_t>(static_cast<size_t>(C)), w = std::vector<acc_t>(static_cast<size_t>(C))](
               int64_t r0, int64_t r1) mutable {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* gr = grad_z + r * C;
        const int64_t y = target[r];
        if (!labelled_row(y, r, C, ignore_index, "target")) {
          std::fill(gr, gr + C, scalar_t(0));
          continue;
        }
        const acc_t s = true_scale != nullptr ? true_scale[r] : acc_t(0);
        const acc_t gl = grad_loss != nullptr ? grad_loss[r] : acc_t(0);
        const acc_t pw = softmax_dot2_row<scalar_t, acc_t>(z + r * C, u_g ? u_g + r * C : nullptr,
                                                           u_t ? u_t + r * C : nullptr, s, C, lse[r], p.data(),
                                                           w.data());
#if DROPREG_HAVE_AVX512_CE
        if constexpr (std::is_same_v<acc_t, float>) {
          if (use_avx512<acc_t>()) {
            cpu::softmax_vjp2_row<scalar_t>(p.data(), w.data(), C, pw, gl, y, gr);
            continue;
          }
        }
#endif
        for (int64_t k = 0; k < C; ++k) {
          gr[k] = static_cast<scalar_t>(p[k] * (w[k] - pw) + gl * (p[k] - (k == y ? acc_t(1) : acc_t(0))));
        }
      }
    };
  });
}

at::Tensor cross_entropy_sample_grad_backward_cpu(const std::optional<at::Tensor>& grad_loss,
                                                  const std::optional<at::Tensor>& grad_g,
                                                  const std::optional<at::Tensor>& grad_g_true, const at::Tensor& z_in,
                                                  const at::Tensor& lse, const at::Tensor& target,
                                                  const std::optional<at::Tensor>& true_scale, int64_t ignore_index) {
  check_sample_grad_backward_args(grad_loss, grad_g, grad_g_true, z_in, lse, target, true_scale);
  const at::Tensor z = z_in.contiguous();
  at::Tensor grad_z = at::empty_like(z, at::MemoryFormat::Contiguous);
  const auto contiguous = [](const std::optional<at::Tensor>& t) { return t ? t->contiguous() : at::Tensor(); };
  const at::Tensor gl = contiguous(grad_loss), ug = contiguous(grad_g), ut = contiguous(grad_g_true);
  const at::Tensor ts = grad_g_true ? contiguous(true_scale) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cross_entropy_sample_grad_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sample_grad_backward_rows<scalar_t, acc_t>(
        gl.defined() ? gl.const_data_ptr<acc_t>() : nullptr, ug.defined() ? ug.const_data_ptr<scalar_t>() : nullptr,
        ut.defined() ? ut.const_data_ptr<scalar_t>() : nullptr, z.const_data_ptr<scalar_t>(),
        lse.contiguous().const_data_ptr<acc_t>(), target.contiguous().const_data_ptr<int64_t>(),
        ts.defined() ? ts.const_data_ptr<acc_t>() : nullptr, z.size(0), z.size(1), ignore_index,
        grad_z.data_ptr<scalar_t>());
  });
  return grad_z;
}

at::Tensor ce_grad_cpu(const at::Tensor& z_in, const at::Tensor& lse, const at::Tensor& label,
                       const at::Tensor& row_scale, int64_t ignore_index) {
  check_ce_grad_args(z_in, lse, label, row_scale);
  const at::Tensor z = z_in.contiguous();
  at::Tensor out = at::empty_like(z, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ce_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ce_grad_rows<scalar_t, acc_t>(z.const_data_ptr<scalar_t>(), lse.contiguous().const_data_ptr<acc_t>(),
                                  label.contiguous().const_data_ptr<int64_t>(),
                                  row_scale.contiguous().const_data_ptr<acc_t>(), z.size(0), z.size(1),
                                  ignore_index, out.data_ptr<scalar_t>());
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
  at::Tensor grad_z = at::empty_like(z, at::MemoryFormat::Contiguous);
  at::Tensor grad_scale = at::empty_like(row_scale, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ce_grad_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ce_grad_backward_rows<scalar_t, acc_t>(
        u.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), lse.contiguous().const_data_ptr<acc_t>(),
        label.contiguous().const_data_ptr<int64_t>(), row_scale.contiguous().const_data_ptr<acc_t>(), z.size(0),
        z.size(1), ignore_index, grad_z.data_ptr<scalar_t>(), grad_scale.data_ptr<acc_t>());
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
