// The running state of one row of the cross-entropy sample pass (cross_entropy.cpp), shared by its
// portable, AVX2 and AVX-512 block steps.
#pragma once

#include <cmath>
#include <limits>

#include "blocks.h"
#include "cross_entropy.h"

namespace dropreg {
namespace cpu {

// The row's max m so far, Σ exp(z - m) as kSumLanes partial sums in
// double (a float running sum over a 50k-class row would lose ~√C·u to rounding), the non-finite
// flags, the best Gumbel score S so far and the candidate bound exp(m - S)·kMargin (+inf until S
// exists, or once a non-finite logit sends the rest of the row down the exact path). The margin,
// and why the CUDA kernels' differs: docs/numerics.md.
template <typename acc_t>
struct RowState {
  static constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  static constexpr acc_t kMargin = acc_t(1.001);

  acc_t m = -kInf;
  acc_t bound = kInf;
  bool nonfinite = false;
  bool nan = false;  // a NaN makes the lse NaN, as in torch.logsumexp
  ArgmaxState<acc_t> best = argmax_identity<acc_t>();
  alignas(64) double partial[kSumLanes] = {};

  // A larger running max: what was summed so far is rescaled to it.
  void raise_max(acc_t new_max) {
    const double rescale = std::exp(static_cast<double>(m) - static_cast<double>(new_max));
    for (double& p : partial) p *= rescale;
    m = new_max;
    update_bound();
  }

  void update_bound() {
    if (!nonfinite && best.score > -kInf) bound = std::exp(m - best.score) * kMargin;
  }

  // log Σ exp(z): m + log Σ partial; m itself when m = ±inf (all -inf, or a +inf: exp(m - m) would
  // be NaN), NaN when a NaN was seen.
  acc_t lse() const {
    double sum = 0;
    for (const double p : partial) sum += p;
    if (nan) return std::numeric_limits<acc_t>::quiet_NaN();
    return std::isinf(m) ? m : static_cast<acc_t>(m + std::log(sum));
  }
};

}  // namespace cpu
}  // namespace dropreg
