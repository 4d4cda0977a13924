// Cross-entropy with a sampled label on the CPU (reference.cross_entropy_sample, ce_grad,
// ce_grad_backward). Rows run in parallel; each row is read from memory once, in 128-element
// blocks: per block the max (online, earlier sums rescaled), Σ exp(z - max) and the Gumbel-max
// argmax, with exp/log by SLEEF (cpu_kernels.h). For float accumulation on AVX-512 CPUs the
// block loops run 16 logits a register (cross_entropy_avx512.h), the same arithmetic in the same order.
// The Gumbel draws use the global element index r·C + c, so ŷ does not depend on threading.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "cpu_kernels.h"
#include "cross_entropy_avx512.h"
#include "cross_entropy_host.h"
#include "regularizer.h"

namespace dropreg {
namespace {

using cpu::kBlockElems;
using cpu::kSumLanes;  // Σ exp(z - m): partials in double, summed in lane order at the row's end

// Rows per parallel task: enough elements per task to amortize scheduling.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// Exact Gumbel scores z + G for the elements k[0..n) of a block (G as in reference.gumbel_noise:
// the same SLEEF log, so the same bits), merged into `best` in index order.
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

// The loops of one block: the AVX-512 ones (cross_entropy_avx512.h) where use_avx512, else these
// portable loops, which do the same arithmetic in the same order.
#if DROPREG_HAVE_AVX512_CE
#define DROPREG_CE_AVX512(call)                                     \
  if constexpr (std::is_same_v<acc_t, float>) {                     \
    if (use_avx512<acc_t>()) return call;                           \
  }
#else
#define DROPREG_CE_AVX512(call)
#endif

// e[k] = z[k] in acc_t; the block's max (NaN never wins); flags a non-finite z and a NaN.
template <typename scalar_t, typename acc_t>
acc_t scan_block(const scalar_t* zb, int64_t n, acc_t* e, bool* nonfinite, bool* nan) {
  DROPREG_CE_AVX512(cpu::scan_block<scalar_t>(zb, n, e, nonfinite, nan))
  acc_t block_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < n; ++k) {
    const acc_t x = static_cast<acc_t>(zb[k]);
    e[k] = x;
    block_max = x > block_max ? x : block_max;
    *nonfinite |= !std::isfinite(x);
    *nan |= x != x;
  }
  return block_max;
}

// u[w]: the Gumbel words of the 32 calls from first_group (element 4·first_group + w).
template <typename acc_t>
void gumbel_words(uint64_t seed, uint64_t offset, uint64_t first_group, uint64_t* ids, uint32_t* u) {
#if DROPREG_HAVE_AVX512_CE
  if (use_avx512<acc_t>()) {
    for (int64_t k = 0; k < cpu::kBlockGroups; ++k) ids[k] = first_group + static_cast<uint64_t>(k);
    return cpu::philox_list(seed, offset + kStreamGumbel, ids, cpu::kBlockGroups, u);
  }
#endif
  (void)ids;
  cpu::philox_block(seed, offset, kStreamGumbel, first_group, u);
}

// e[k] = exp(e[k] - m) and, when `add`, partial[k % kSumLanes] += e[k].
template <typename acc_t>
void exp_sum_block(acc_t* e, int64_t n, acc_t m, bool add, double* partial) {
  DROPREG_CE_AVX512(cpu::exp_sum_block(e, n, m, add, partial))
  for (int64_t k = 0; k < n; ++k) e[k] -= m;
  cpu::vexp_inplace(e, n);
  if (add) {
    for (int64_t k = 0; k < n; ++k) partial[k % kSumLanes] += e[k];
  }
}

// The k < n that pass the filter below (1 - u_k < e_k·bound), in order, into cand; their count.
template <typename acc_t>
int64_t candidates(const uint32_t* ub, const acc_t* e, int64_t n, acc_t bound, int32_t* cand) {
  DROPREG_CE_AVX512(cpu::candidates(ub, e, n, bound, cand))
  int64_t count = 0;
  for (int64_t k = 0; k < n; ++k) {
    const acc_t one_minus_u = acc_t(1) - static_cast<acc_t>(uniform_open01(ub[k]));
    cand[count] = static_cast<int32_t>(k);
    count += one_minus_u < e[k] * bound;
  }
  return count;
}

// G's row: g[c] = (exp(z[c] - l) - [c == y]) · s.
template <typename scalar_t, typename acc_t>
void grad_row(const scalar_t* zr, int64_t C, acc_t l, int64_t y, acc_t s, acc_t* p, scalar_t* gr) {
  DROPREG_CE_AVX512(cpu::grad_row<scalar_t>(zr, C, l, y, s, gr))
  for (int64_t c0 = 0; c0 < C; c0 += kBlockElems) {
    const int64_t n = std::min(kBlockElems, C - c0);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<acc_t>(zr[c0 + k]) - l;
    cpu::vexp_inplace(p, n);
    for (int64_t k = 0; k < n; ++k) {
      gr[c0 + k] = static_cast<scalar_t>((p[k] - (c0 + k == y ? acc_t(1) : acc_t(0))) * s);
    }
  }
}
#undef DROPREG_CE_AVX512

// Per row, in one read, per 128-element block: the online max m (earlier sums rescaled when it
// grows), Σ exp(z - m) for the log-sum-exp, and the Gumbel-max argmax ŷ = argmax_c z_c + G_c, G_c = -log E_c,
// E_c = -log u_c. Computing both logs for every element would triple the transcendental work,
// so the exact score is computed only for candidates: with S the best score so far,
// z_c + G_c > S  ⇔  E_c < exp(z_c - S) = e_c · exp(m - S), and E_c ≥ 1 - u_c, so an element with
// 1 - u_c ≥ e_c · exp(m - S) · (1 + 1e-3) cannot win (the margin covers the float rounding of
// e_c and of the scores). About exp(lse - S) = O(1) elements per row pass the filter; they get the
// reference's exact score, so ŷ is the reference's bit for bit. Once a NaN or ±inf is seen, the
// rest of the row takes the exact path.
template <typename scalar_t, typename acc_t>
void cross_entropy_sample_rows(const scalar_t* z, const int64_t* target, int64_t N, int64_t C,
                               int64_t ignore_index, uint64_t seed, uint64_t offset, acc_t* loss,
                               acc_t* lse_out, int64_t* yhat) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kMargin = acc_t(1.001);
  at::parallel_for(0, N, row_grain(C), [&](int64_t r0, int64_t r1) {
    alignas(64) uint32_t u[kBlockElems];
    alignas(64) acc_t e[kBlockElems];
    alignas(64) float scratch[kBlockElems];
    alignas(64) int32_t cand[kBlockElems];
    alignas(64) int32_t all[kBlockElems];
    alignas(64) uint64_t ids[cpu::kBlockGroups];
    for (int32_t k = 0; k < kBlockElems; ++k) all[k] = k;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* zr = z + r * C;
      const int64_t t = target[r];
      const bool valid = t != ignore_index;
      TORCH_CHECK(!valid || (t >= 0 && t < C), "argument 'target' must hold class indices in [0, ", C,
                  ") or ignore_index=", ignore_index, ", got ", t, " in row ", r);
      acc_t m = -kInf;  // running row max (online: the row is read once; NaN never wins it)
      bool nonfinite = false;
      bool any_nan = false;  // a NaN makes the lse NaN, as in torch.logsumexp
      // Σ exp(z - m) so far, in double: a float running sum over a 50k-class row would lose
      // ~√C·u to rounding (the summands are float and exact in double, so this sum is exact to
      // ~C·2^-53).
      double partial[kSumLanes] = {};
      ArgmaxState<acc_t> best = argmax_identity<acc_t>();
      acc_t bound = kInf;  // exp(m - S)·margin: +inf until a best score S exists
      const int64_t begin = r * C;
      const int64_t end = begin + C;
      for (int64_t blk = begin - begin % kBlockElems; blk < end; blk += kBlockElems) {
        const int64_t lo = std::max(begin, blk);
        const int64_t n = std::min(end, blk + kBlockElems) - lo;
        const scalar_t* zb = zr + (lo - begin);
        const acc_t block_max = scan_block<scalar_t, acc_t>(zb, n, e, &nonfinite, &any_nan);
        if (block_max > m) {  // rescale what was summed so far to the new max
          const double rescale = std::exp(static_cast<double>(m) - static_cast<double>(block_max));
          for (double& p : partial) p *= rescale;
          m = block_max;
          if (!nonfinite && best.score > -kInf) bound = std::exp(m - best.score) * kMargin;
        }
        const uint32_t* ub = u + (lo - blk);
        // While m = -inf every value so far is -inf and adds 0 (exp(-inf - -inf) would be NaN).
        const bool add = m > -kInf;
        const bool exact = nonfinite || !(bound < kInf);
        gumbel_words<acc_t>(seed, offset, static_cast<uint64_t>(blk) / 4, ids, u);
        exp_sum_block<acc_t>(e, n, m, add, partial);
        const int64_t count = exact ? n : candidates<acc_t>(ub, e, n, bound, cand);
        merge_exact_scores<scalar_t, acc_t>(zb, ub, exact ? all : cand, count, lo - begin, scratch, best);
        if (!nonfinite && best.score > -kInf) bound = std::exp(m - best.score) * kMargin;
      }
      double sum = 0;
      for (const double p : partial) sum += p;
      // All -inf or a +inf: lse = m, as torch.logsumexp (exp(m - m) above would be NaN).
      const acc_t lse = any_nan ? std::numeric_limits<acc_t>::quiet_NaN()
                                : (std::isinf(m) ? m : static_cast<acc_t>(m + std::log(sum)));
      lse_out[r] = lse;
      loss[r] = valid ? lse - static_cast<acc_t>(zr[t]) : acc_t(0);
      yhat[r] = valid ? best.index : ignore_index;
    }
  });
}

template <typename scalar_t, typename acc_t>
void ce_grad_rows(const scalar_t* z, const acc_t* lse, const int64_t* label, const acc_t* row_scale,
                  int64_t N, int64_t C, int64_t ignore_index, scalar_t* out) {
  at::parallel_for(0, N, row_grain(C), [&](int64_t r0, int64_t r1) {
    alignas(64) acc_t p[kBlockElems];
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* zr = z + r * C;
      scalar_t* gr = out + r * C;
      const int64_t y = label[r];
      if (y == ignore_index) {
        std::fill(gr, gr + C, scalar_t(0));
        continue;
      }
      TORCH_CHECK(y >= 0 && y < C, "argument 'label' must hold class indices in [0, ", C,
                  ") or ignore_index=", ignore_index, ", got ", y, " in row ", r);
      grad_row<scalar_t, acc_t>(zr, C, lse[r], y, row_scale[r], p, gr);
    }
  });
}

template <typename scalar_t, typename acc_t>
void ce_grad_backward_rows(const scalar_t* u, const scalar_t* z, const acc_t* lse, const int64_t* label,
                           const acc_t* row_scale, int64_t N, int64_t C, int64_t ignore_index,
                           scalar_t* grad_z, acc_t* grad_scale) {
  at::parallel_for(0, N, row_grain(C), [&](int64_t r0, int64_t r1) {
    alignas(64) acc_t p[kBlockElems];
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* zr = z + r * C;
      const scalar_t* ur = u + r * C;
      scalar_t* gr = grad_z + r * C;
      const int64_t y = label[r];
      if (y == ignore_index) {
        std::fill(gr, gr + C, scalar_t(0));
        grad_scale[r] = 0;
        continue;
      }
      TORCH_CHECK(y >= 0 && y < C, "argument 'label' must hold class indices in [0, ", C,
                  ") or ignore_index=", ignore_index, ", got ", y, " in row ", r);
      const acc_t l = lse[r];
      const acc_t s = row_scale[r];
      double pu_sum = 0;  // ⟨p, u⟩ accumulated in double, as the lse's Σ exp above
      for (int64_t c0 = 0; c0 < C; c0 += kBlockElems) {
        const int64_t n = std::min(kBlockElems, C - c0);
        for (int64_t k = 0; k < n; ++k) p[k] = static_cast<acc_t>(zr[c0 + k]) - l;
        cpu::vexp_inplace(p, n);
        for (int64_t k = 0; k < n; ++k) pu_sum += p[k] * static_cast<acc_t>(ur[c0 + k]);
      }
      const acc_t pu = static_cast<acc_t>(pu_sum);
      for (int64_t c0 = 0; c0 < C; c0 += kBlockElems) {
        const int64_t n = std::min(kBlockElems, C - c0);
        for (int64_t k = 0; k < n; ++k) p[k] = static_cast<acc_t>(zr[c0 + k]) - l;
        cpu::vexp_inplace(p, n);
        for (int64_t k = 0; k < n; ++k) {
          gr[c0 + k] = static_cast<scalar_t>(
              ce_grad_backward_element<acc_t>(p[k], static_cast<acc_t>(ur[c0 + k]), pu, s));
        }
      }
      grad_scale[r] = pu - static_cast<acc_t>(ur[y]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_sample_cpu(const at::Tensor& z_in,
                                                                        const at::Tensor& target_in,
                                                                        const at::Tensor& rng,
                                                                        int64_t ignore_index) {
  check_cross_entropy_sample_args(z_in, target_in, rng);
  const at::Tensor z = z_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t N = z.size(0), C = z.size(1);
  at::Tensor loss = at::empty({N}, z.options().dtype(acc_type(z)));
  at::Tensor lse = at::empty({N}, z.options().dtype(acc_type(z)));
  at::Tensor yhat = at::empty({N}, z.options().dtype(at::kLong));
  const at::Tensor state_tensor = rng.contiguous();  // kept alive while `state` is read
  const int64_t* state = state_tensor.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cross_entropy_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cross_entropy_sample_rows<scalar_t, acc_t>(
        z.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), N, C, ignore_index,
        static_cast<uint64_t>(state[0]), static_cast<uint64_t>(state[1]), loss.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), yhat.data_ptr<int64_t>());
  });
  return {loss, lse, yhat};
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
  m.impl("ce_grad", &ce_grad_cpu);
  m.impl("ce_grad_backward", &ce_grad_backward_cpu);
}

}  // namespace dropreg
