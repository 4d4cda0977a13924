// Site penalty on the CPU (reference.site_penalty / site_penalty_backward): one pass over
// (h, g_e, g_i) with η regenerated from the site-noise stream.
//
// Deterministic reduction: the elements are cut into fixed 4096-element chunks (independent of
// the thread count); each chunk is summed in acc_t as 16 partial sums (element k to partial
// k % 16, the partials then added in order), and the chunk sums are added in chunk order in double.
// Float accumulation runs the ISA's row of the site-penalty table (loops.h: site_penalty_avx512.h,
// site_penalty_avx2.h on whole 16-element steps), in the same order.
// η comes a chunk at a time (one Philox block of Rademacher bits, or 16 of dropout-kind u16s).
// Bytes per element: forward reads h, g_e, g_i; backward reads them and writes dh, dg_e, dg_i.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "isa.h"
#include "loops.h"
#include "site_penalty.h"
#include "site_penalty_host.h"

namespace dropreg {
namespace {

using cpu::Isa;
using cpu::kSumLanes;

// Elements per η block and per deterministic partial sum: one Philox block of Rademacher bits
// (32 calls x 128), sixteen of dropout-kind u16s (32 calls x 8 each).
constexpr int64_t kChunk = kBitsPerGroup * cpu::kBlockGroups;       // 4096
constexpr int64_t kU16BlockElems = kU16PerGroup * cpu::kBlockGroups;  // 256

struct NoiseParams {
  NoiseKind kind;
  double amplitude;  // the positive noise value, cast to acc_t by the kernels
  double negative;   // the negative one: -amplitude (Rademacher) or -1 (dropout kind)
  uint32_t threshold;
  uint64_t seed;
  uint64_t offset;
};

NoiseParams noise_params(double q, NoiseKind kind, const at::Tensor& rng) {
  const at::Tensor state_tensor = rng.contiguous();  // kept alive while `state` is read
  const int64_t* state = state_tensor.const_data_ptr<int64_t>();
  const double a = site_noise_amplitude(q, kind);
  return {kind, a, kind == kRademacher ? -a : -1.0, dropout_threshold(q), static_cast<uint64_t>(state[0]),
          static_cast<uint64_t>(state[1])};
}

// η of the elements [blk, blk + n) into eta[0..n), blk a multiple of kChunk and n <= kChunk.
// u[w] is word w % 4 of call w / 4 of a block: a bit k reads u[k / 32], a u16 k reads u[k / 2].
template <Isa isa, typename acc_t>
void noise_block(const NoiseParams& np, int64_t blk, int64_t n, acc_t* eta) {
  alignas(64) uint32_t u[cpu::kBlockWords];
  const acc_t a = static_cast<acc_t>(np.amplitude);
  if (np.kind == kRademacher) {
    cpu::philox_block<isa>(np.seed, np.offset, kStreamSiteNoise, static_cast<uint64_t>(blk / kBitsPerGroup), u);
    for (int64_t k = 0; k < n; ++k) {
      eta[k] = site_noise_value<acc_t>((u[k >> 5] >> (k & 31)) & 1u, np.kind, a, np.threshold);
    }
    return;
  }
  for (int64_t w0 = 0; w0 < n; w0 += kU16BlockElems) {
    cpu::philox_block<isa>(np.seed, np.offset, kStreamSiteNoise, static_cast<uint64_t>((blk + w0) / kU16PerGroup), u);
    const int64_t m = std::min(kU16BlockElems, n - w0);
    for (int64_t k = 0; k < m; ++k) {
      eta[w0 + k] = site_noise_value<acc_t>((u[k >> 1] >> ((k & 1) * 16)) & 0xFFFFu, np.kind, a, np.threshold);
    }
  }
}

// The chunks of n elements in parallel: fixed kChunk-element chunks (independent of the thread
// count), chunk c the elements [begin, begin + m). Each runs isa's vector loops where its row of
// the table has them and the chunk suits them (a 16-bit threshold, a length they take):
// vector(c, begin, m, words) with the chunk's Philox words of η (laid out as noise_block reads
// them: one call per 128 Rademacher bits, one per 8 dropout-kind draws); else the portable loops:
// portable(c, begin, m, eta) with η's values. Without g_i (`noise` false) no η is made.
template <Isa isa, typename scalar_t, typename acc_t, typename Vector, typename Portable>
void for_each_chunk(int64_t n, const NoiseParams& np, bool noise, const Vector& vector, const Portable& portable) {
  constexpr cpu::SitePenaltyLoops<scalar_t, acc_t> loops = cpu::kSitePenaltyLoops<isa, scalar_t, acc_t>;
  const int64_t per_call = np.kind == kRademacher ? kBitsPerGroup : kU16PerGroup;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  // The buffers hold one chunk, no more than n elements: a small site does not zero a whole chunk's.
  const int64_t cap = std::min(kChunk, n);
  const int64_t cap_calls = (cap + kU16PerGroup - 1) / kU16PerGroup;  // the most calls a chunk makes
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> eta(static_cast<size_t>(cap));
    std::vector<uint64_t> ids(loops.words != nullptr ? static_cast<size_t>(cap_calls) : 0);
    std::vector<uint32_t> words(loops.words != nullptr ? static_cast<size_t>(4 * cap_calls) : 0);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t m = std::min(kChunk, n - begin);
      if constexpr (loops.words != nullptr) {
        if (np.threshold < 65536u && m % loops.chunk_multiple == 0) {
          if (noise) {
            const int64_t calls = (m + per_call - 1) / per_call;
            for (int64_t k = 0; k < calls; ++k) ids[k] = static_cast<uint64_t>(begin / per_call + k);
            loops.words(np.seed, np.offset + kStreamSiteNoise, ids.data(), calls, words.data());
          }
          vector(c, begin, m, static_cast<const uint32_t*>(words.data()));
          continue;
        }
      }
      if (noise) noise_block<isa, acc_t>(np, begin, m, eta.data());
      portable(c, begin, m, static_cast<const acc_t*>(eta.data()));
    }
  });
}

// The penalty's two sums: chunk sums in acc_t (element k of a chunk to partial k % 16, the partials
// added in order), added in chunk order in double.
template <Isa isa, typename scalar_t, typename acc_t>
void penalty_kernel(const scalar_t* h, const scalar_t* ge, const scalar_t* gi, int64_t n, const NoiseParams& np,
                    double* out) {
  constexpr cpu::SitePenaltyLoops<scalar_t, acc_t> loops = cpu::kSitePenaltyLoops<isa, scalar_t, acc_t>;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(2 * chunks, 0.0);
  const auto vector = [&](int64_t c, int64_t begin, int64_t m, const uint32_t* words) {
    if constexpr (loops.sums != nullptr) {
      acc_t explicit_sum = 0, implicit_sum = 0;
      loops.sums(h + begin, ge == nullptr ? nullptr : ge + begin, gi == nullptr ? nullptr : gi + begin, m, words,
                 np.kind == kRademacher, static_cast<acc_t>(np.amplitude), static_cast<acc_t>(np.negative),
                 np.threshold, &explicit_sum, &implicit_sum);
      partial[2 * c] = explicit_sum;
      partial[2 * c + 1] = implicit_sum;
    }
  };
  const auto portable = [&](int64_t c, int64_t begin, int64_t m, const acc_t* eta) {
    acc_t explicit_part[kSumLanes] = {}, implicit_part[kSumLanes] = {};
    if (ge != nullptr) {
      for (int64_t k = 0; k < m; ++k) {
        explicit_part[k % kSumLanes] +=
            site_explicit_term<acc_t>(static_cast<acc_t>(ge[begin + k]), static_cast<acc_t>(h[begin + k]));
      }
    }
    if (gi != nullptr) {
      for (int64_t k = 0; k < m; ++k) {
        implicit_part[k % kSumLanes] += site_implicit_term<acc_t>(static_cast<acc_t>(gi[begin + k]), eta[k],
                                                                 static_cast<acc_t>(h[begin + k]));
      }
    }
    acc_t explicit_sum = 0, implicit_sum = 0;
    for (int j = 0; j < kSumLanes; ++j) {
      explicit_sum += explicit_part[j];
      implicit_sum += implicit_part[j];
    }
    partial[2 * c] = explicit_sum;
    partial[2 * c + 1] = implicit_sum;
  };
  for_each_chunk<isa, scalar_t, acc_t>(n, np, gi != nullptr, vector, portable);
  out[0] = out[1] = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    out[0] += partial[2 * c];
    out[1] += partial[2 * c + 1];
  }
}

// dh = 2a·g_e²·h + b·g_i·η, dg_e = 2a·g_e·h², dg_i = b·η·h, for grad = [a, b].
template <Isa isa, typename scalar_t, typename acc_t>
void penalty_backward_kernel(acc_t a, acc_t b, const scalar_t* h, const scalar_t* ge, const scalar_t* gi, int64_t n,
                             const NoiseParams& np, scalar_t* dh, scalar_t* dge, scalar_t* dgi) {
  constexpr cpu::SitePenaltyLoops<scalar_t, acc_t> loops = cpu::kSitePenaltyLoops<isa, scalar_t, acc_t>;
  const acc_t a2 = acc_t(2) * a;
  const auto vector = [&](int64_t, int64_t begin, int64_t m, const uint32_t* words) {
    if constexpr (loops.backward != nullptr) {
      const auto from_begin = [begin](auto* p) { return p == nullptr ? nullptr : p + begin; };
      loops.backward(a2, b, h + begin, from_begin(ge), from_begin(gi), m, words, np.kind == kRademacher,
                     static_cast<acc_t>(np.amplitude), static_cast<acc_t>(np.negative), np.threshold, dh + begin,
                     from_begin(dge), from_begin(dgi));
    }
  };
  const auto portable = [&](int64_t, int64_t begin, int64_t m, const acc_t* eta) {
    for (int64_t k = 0; k < m; ++k) {
      const acc_t hv = static_cast<acc_t>(h[begin + k]);
      acc_t d = 0;
      if (ge != nullptr) {
        const SitePartGrad<acc_t> part = site_explicit_grad<acc_t>(a2, static_cast<acc_t>(ge[begin + k]), hv);
        d = add_rn(d, part.dh);  // 0 + term: +0 for a -0 term, as the reference
        dge[begin + k] = static_cast<scalar_t>(part.dg);
      }
      if (gi != nullptr) {
        const SitePartGrad<acc_t> part = site_implicit_grad<acc_t>(b, static_cast<acc_t>(gi[begin + k]), eta[k], hv);
        d = add_rn(d, part.dh);
        dgi[begin + k] = static_cast<scalar_t>(part.dg);
      }
      dh[begin + k] = static_cast<scalar_t>(d);
    }
  };
  for_each_chunk<isa, scalar_t, acc_t>(n, np, gi != nullptr, vector, portable);
}

// h floating; g_e / g_i (optional) of h's shape and dtype; rng on h's device.
at::Tensor site_penalty_cpu(const at::Tensor& h_in, const std::optional<at::Tensor>& g_e,
                            const std::optional<at::Tensor>& g_i, double q, c10::string_view noise,
                            const at::Tensor& rng) {
  const NoiseKind kind = check_site_args(h_in, g_e, g_i, q, std::string(noise), rng);
  const NoiseParams np = noise_params(q, kind, rng);
  const at::Tensor h = h_in.contiguous();
  const at::Tensor ge = contiguous_or_undefined(g_e);
  const at::Tensor gi = contiguous_or_undefined(g_i);
  at::Tensor out = at::empty({2}, h.options().dtype(acc_type(h)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "site_penalty_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    double sums[2];
    cpu::with_cpu_isa([&]<Isa isa>() {
      cpu::note_entry(cpu::CpuOp::kSitePenalty, isa);
      penalty_kernel<isa, scalar_t, acc_t>(h.const_data_ptr<scalar_t>(), const_ptr_or_null<scalar_t>(ge),
                                           const_ptr_or_null<scalar_t>(gi), h.numel(), np, sums);
    });
    acc_t* o = out.data_ptr<acc_t>();  // the double sums rounded once, to nearest
    o[0] = static_cast<acc_t>(sums[0]);
    o[1] = static_cast<acc_t>(sums[1]);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> site_penalty_backward_cpu(
    const at::Tensor& grad, const at::Tensor& h_in, const std::optional<at::Tensor>& g_e,
    const std::optional<at::Tensor>& g_i, double q, c10::string_view noise, const at::Tensor& rng) {
  const NoiseKind kind = check_site_args(h_in, g_e, g_i, q, std::string(noise), rng);
  check_site_output_grad(grad, h_in);
  const NoiseParams np = noise_params(q, kind, rng);
  const SiteBackwardIo io = site_backward_io(h_in, g_e, g_i);
  const at::Tensor& h = io.h;
  const at::Tensor g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "site_penalty_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* ab = g.const_data_ptr<acc_t>();
    cpu::with_cpu_isa([&]<Isa isa>() {
      cpu::note_entry(cpu::CpuOp::kSitePenaltyBackward, isa);
      penalty_backward_kernel<isa, scalar_t, acc_t>(
          ab[0], ab[1], h.const_data_ptr<scalar_t>(), const_ptr_or_null<scalar_t>(io.g_e),
          const_ptr_or_null<scalar_t>(io.g_i), h.numel(), np, io.grad_h.data_ptr<scalar_t>(),
          io.g_e.defined() ? io.grad_g_e.data_ptr<scalar_t>() : nullptr,
          io.g_i.defined() ? io.grad_g_i.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {io.grad_h, io.grad_g_e, io.grad_g_i};
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  m.impl("site_penalty", &site_penalty_cpu);
  m.impl("site_penalty_backward", &site_penalty_backward_cpu);
}

}  // namespace dropreg
