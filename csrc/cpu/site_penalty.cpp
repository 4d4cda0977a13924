// Site penalty on the CPU (reference.site_penalty / site_penalty_backward): one pass over
// (h, g_e, g_i) with η regenerated from the site-noise stream.
//
// Deterministic reduction: the elements are cut into fixed 4096-element chunks (independent of
// the thread count); each chunk is summed in acc_t as 16 partial sums (element k to partial
// k % 16, the partials then added in order), and the chunk sums are added in chunk order in double.
// Float accumulation runs the loops of site_penalty_avx512.h on AVX-512 CPUs, of site_penalty_avx2.h
// on AVX2 ones (whole 16-element steps), in the same order.
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

#include "cpu_kernels.h"
#include "site_penalty_avx2.h"
#include "site_penalty_avx512.h"
#include "site_penalty_host.h"

namespace dropreg {
namespace {

using cpu::kBlockGroups;
using cpu::kSumLanes;
using cpu::philox_block;

// Elements per η block and per deterministic partial sum: one Philox block of Rademacher bits
// (32 calls x 128), sixteen of dropout-kind u16s (32 calls x 8 each).
constexpr int64_t kChunk = kBitsPerGroup * kBlockGroups;  // 4096
constexpr int64_t kU16BlockElems = kU16PerGroup * kBlockGroups;  // 256

struct NoiseParams {
  NoiseKind kind;
  double amplitude;  // positive noise value, cast to acc_t by the kernels
  uint32_t threshold;
  uint64_t seed;
  uint64_t offset;
};

NoiseParams noise_params(double q, NoiseKind kind, const at::Tensor& rng) {
  const at::Tensor state_tensor = rng.contiguous();  // kept alive while `state` is read
  const int64_t* state = state_tensor.const_data_ptr<int64_t>();
  return {kind, site_noise_amplitude(q, kind), dropout_threshold(q), static_cast<uint64_t>(state[0]),
          static_cast<uint64_t>(state[1])};
}

// η of the elements [blk, blk + n) into eta[0..n), blk a multiple of kChunk and n <= kChunk.
// u[w] is word w % 4 of call w / 4 of a block: a bit k reads u[k / 32], a u16 k reads u[k / 2].
template <typename acc_t>
void noise_block(const NoiseParams& np, int64_t blk, int64_t n, acc_t* eta) {
  alignas(64) uint32_t u[cpu::kBlockWords];
  const acc_t a = static_cast<acc_t>(np.amplitude);
  if (np.kind == kRademacher) {
    philox_block(np.seed, np.offset, kStreamSiteNoise, static_cast<uint64_t>(blk / kBitsPerGroup), u);
    for (int64_t k = 0; k < n; ++k) {
      eta[k] = site_noise_value<acc_t>((u[k >> 5] >> (k & 31)) & 1u, np.kind, a, np.threshold);
    }
    return;
  }
  for (int64_t w0 = 0; w0 < n; w0 += kU16BlockElems) {
    philox_block(np.seed, np.offset, kStreamSiteNoise, static_cast<uint64_t>((blk + w0) / kU16PerGroup), u);
    const int64_t m = std::min(kU16BlockElems, n - w0);
    for (int64_t k = 0; k < m; ++k) {
      eta[w0 + k] = site_noise_value<acc_t>((u[k >> 1] >> ((k & 1) * 16)) & 0xFFFFu, np.kind, a, np.threshold);
    }
  }
}

// Which vector loops run a chunk: float accumulation, a 16-bit threshold, the widest this CPU has;
// the AVX2 loops take whole 16-element steps only.
enum class Loops { kPortable, kAvx2, kAvx512 };

template <typename acc_t>
Loops vector_loops(const NoiseParams& np, int64_t m) {
  static const cpu::CpuPath path = cpu::cpu_path();
  if (!std::is_same_v<acc_t, float> || np.threshold >= 65536u) return Loops::kPortable;
  if (DROPREG_HAVE_AVX512_SITE && path == cpu::CpuPath::kAvx512) return Loops::kAvx512;
  if (DROPREG_HAVE_AVX2_SITE && path == cpu::CpuPath::kAvx2 && m % 16 == 0) return Loops::kAvx2;
  return Loops::kPortable;
}

#if DROPREG_HAVE_AVX512_SITE || DROPREG_HAVE_AVX2_SITE
// The Philox words of the chunk at blk (m elements), laid out as noise_block reads them: one call
// per 128 Rademacher bits, one per 8 dropout-kind draws.
void chunk_words(const NoiseParams& np, int64_t blk, int64_t m, Loops loops, uint64_t* ids, uint32_t* words) {
  const int64_t per_call = np.kind == kRademacher ? kBitsPerGroup : kU16PerGroup;
  const int64_t calls = (m + per_call - 1) / per_call;
  for (int64_t k = 0; k < calls; ++k) ids[k] = static_cast<uint64_t>(blk / per_call + k);
#if DROPREG_HAVE_AVX512_SITE
  if (loops == Loops::kAvx512) {
    cpu::philox_list(np.seed, np.offset + kStreamSiteNoise, ids, calls, words);
    return;
  }
#endif
#if DROPREG_HAVE_AVX2_SITE
  cpu::philox_list_avx2(np.seed, np.offset + kStreamSiteNoise, ids, calls, words);
#endif
  (void)loops;
}
#endif

template <typename scalar_t, typename acc_t>
void penalty_kernel(const scalar_t* h, const scalar_t* ge, const scalar_t* gi, int64_t n,
                    const NoiseParams& np, double* out) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(2 * chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> eta(kChunk);
#if DROPREG_HAVE_AVX512_SITE || DROPREG_HAVE_AVX2_SITE
    std::vector<uint64_t> ids(kChunk / kU16PerGroup);
    std::vector<uint32_t> words(kChunk / 2);
#endif
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t m = std::min(kChunk, n - begin);
#if DROPREG_HAVE_AVX512_SITE || DROPREG_HAVE_AVX2_SITE
      if constexpr (std::is_same_v<acc_t, float>) {
        const Loops loops = vector_loops<acc_t>(np, m);
        if (loops != Loops::kPortable) {
          if (gi != nullptr) chunk_words(np, begin, m, loops, ids.data(), words.data());
          const float a = static_cast<float>(np.amplitude);
          const float negative = np.kind == kRademacher ? -a : -1.0f;
          const scalar_t* ge_c = ge == nullptr ? nullptr : ge + begin;
          const scalar_t* gi_c = gi == nullptr ? nullptr : gi + begin;
          float explicit_sum = 0, implicit_sum = 0;
#if DROPREG_HAVE_AVX512_SITE
          if (loops == Loops::kAvx512) {
            cpu::site_sums16<scalar_t>(h + begin, ge_c, gi_c, m, words.data(), np.kind == kRademacher, a, negative,
                                       np.threshold, &explicit_sum, &implicit_sum);
          }
#endif
#if DROPREG_HAVE_AVX2_SITE
          if (loops == Loops::kAvx2) {
            cpu::site_sums8<scalar_t>(h + begin, ge_c, gi_c, m, words.data(), np.kind == kRademacher, a, negative,
                                      np.threshold, &explicit_sum, &implicit_sum);
          }
#endif
          partial[2 * c] = explicit_sum;
          partial[2 * c + 1] = implicit_sum;
          continue;
        }
      }
#endif
      acc_t explicit_part[kSumLanes] = {}, implicit_part[kSumLanes] = {};
      if (ge != nullptr) {
        for (int64_t k = 0; k < m; ++k) {
          explicit_part[k % kSumLanes] +=
              site_explicit_term<acc_t>(static_cast<acc_t>(ge[begin + k]), static_cast<acc_t>(h[begin + k]));
        }
      }
      if (gi != nullptr) {
        noise_block<acc_t>(np, begin, m, eta.data());
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
    }
  });
  out[0] = out[1] = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    out[0] += partial[2 * c];
    out[1] += partial[2 * c + 1];
  }
}

template <typename scalar_t, typename acc_t>
void penalty_backward_kernel(acc_t a, acc_t b, const scalar_t* h, const scalar_t* ge, const scalar_t* gi,
                             int64_t n, const NoiseParams& np, scalar_t* dh, scalar_t* dge, scalar_t* dgi) {
  const acc_t a2 = acc_t(2) * a;
  const int64_t blocks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, blocks, 2, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> eta(kChunk);
#if DROPREG_HAVE_AVX512_SITE || DROPREG_HAVE_AVX2_SITE
    std::vector<uint64_t> ids(kChunk / kU16PerGroup);
    std::vector<uint32_t> words(kChunk / 2);
#endif
    for (int64_t blkno = b0; blkno < b1; ++blkno) {
      const int64_t blk = blkno * kChunk;
      const int64_t m = std::min(kChunk, n - blk);
#if DROPREG_HAVE_AVX512_SITE || DROPREG_HAVE_AVX2_SITE
      if constexpr (std::is_same_v<acc_t, float>) {
        const Loops loops = vector_loops<acc_t>(np, m);
        if (loops != Loops::kPortable) {
          if (gi != nullptr) chunk_words(np, blk, m, loops, ids.data(), words.data());
          const float amp = static_cast<float>(np.amplitude);
          const float negative = np.kind == kRademacher ? -amp : -1.0f;
          const scalar_t* ge_c = ge == nullptr ? nullptr : ge + blk;
          const scalar_t* gi_c = gi == nullptr ? nullptr : gi + blk;
          scalar_t* dge_c = dge == nullptr ? nullptr : dge + blk;
          scalar_t* dgi_c = dgi == nullptr ? nullptr : dgi + blk;
#if DROPREG_HAVE_AVX512_SITE
          if (loops == Loops::kAvx512) {
            cpu::site_backward16<scalar_t>(a2, b, h + blk, ge_c, gi_c, m, words.data(), np.kind == kRademacher, amp,
                                           negative, np.threshold, dh + blk, dge_c, dgi_c);
          }
#endif
#if DROPREG_HAVE_AVX2_SITE
          if (loops == Loops::kAvx2) {
            cpu::site_backward8<scalar_t>(a2, b, h + blk, ge_c, gi_c, m, words.data(), np.kind == kRademacher, amp,
                                          negative, np.threshold, dh + blk, dge_c, dgi_c);
          }
#endif
          continue;
        }
      }
#endif
      if (gi != nullptr) noise_block<acc_t>(np, blk, m, eta.data());
      for (int64_t k = 0; k < m; ++k) {
        const acc_t hv = static_cast<acc_t>(h[blk + k]);
        acc_t d = 0;
        if (ge != nullptr) {
          const SitePartGrad<acc_t> part = site_explicit_grad<acc_t>(a2, static_cast<acc_t>(ge[blk + k]), hv);
          d = add_rn(d, part.dh);  // 0 + term: +0 for a -0 term, as the reference
          dge[blk + k] = static_cast<scalar_t>(part.dg);
        }
        if (gi != nullptr) {
          const SitePartGrad<acc_t> part = site_implicit_grad<acc_t>(b, static_cast<acc_t>(gi[blk + k]), eta[k], hv);
          d = add_rn(d, part.dh);
          dgi[blk + k] = static_cast<scalar_t>(part.dg);
        }
        dh[blk + k] = static_cast<scalar_t>(d);
      }
    }
  });
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
  double sums[2];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "site_penalty_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    penalty_kernel<scalar_t, acc_t>(h.const_data_ptr<scalar_t>(), const_ptr_or_null<scalar_t>(ge),
                                    const_ptr_or_null<scalar_t>(gi), h.numel(), np, sums);
  });
  return at::tensor({sums[0], sums[1]}, h.options().dtype(at::kDouble)).to(acc_type(h));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> site_penalty_backward_cpu(
    const at::Tensor& grad, const at::Tensor& h_in, const std::optional<at::Tensor>& g_e,
    const std::optional<at::Tensor>& g_i, double q, c10::string_view noise, const at::Tensor& rng) {
  const NoiseKind kind = check_site_args(h_in, g_e, g_i, q, std::string(noise), rng);
  check_site_output_grad(grad, h_in);
  const NoiseParams np = noise_params(q, kind, rng);
  const at::Tensor h = h_in.contiguous();
  const at::Tensor ge = contiguous_or_undefined(g_e);
  const at::Tensor gi = contiguous_or_undefined(g_i);
  at::Tensor dh = at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor dge = empty_like_or_none(ge, h);
  at::Tensor dgi = empty_like_or_none(gi, h);
  const at::Tensor g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "site_penalty_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* ab = g.const_data_ptr<acc_t>();
    penalty_backward_kernel<scalar_t, acc_t>(
        ab[0], ab[1], h.const_data_ptr<scalar_t>(), const_ptr_or_null<scalar_t>(ge), const_ptr_or_null<scalar_t>(gi),
        h.numel(), np, dh.data_ptr<scalar_t>(), ge.defined() ? dge.data_ptr<scalar_t>() : nullptr,
        gi.defined() ? dgi.data_ptr<scalar_t>() : nullptr);
  });
  return {dh, dge, dgi};
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  m.impl("site_penalty", &site_penalty_cpu);
  m.impl("site_penalty_backward", &site_penalty_backward_cpu);
}

}  // namespace dropreg
