// Philox4x32-10 (Salmon et al., SC'11; Random123 constants) and the project's counter layout.
//
// Written once here for the C++ CPU and CUDA kernels; the Triton twin is
// triton_kernels/philox.py and the int64-arithmetic twin is dropreg_ext/reference.py::philox4x32_10.
// All three are tested against the Random123 known-answer vectors and against each other.
//
// Counter layout (the random-number contract v2, v3 for the Gumbel streams: docs/design.md §3 and
// reference.py's docstring):
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(g), hi32(g), lo32(s), hi32(s)),  s = offset + stream  (mod 2^64)
// one call (group g) gives four words, read at each stream's density by the logical (row-major)
// element index i of the tensor the stream is drawn for:
//   mask, dropout-kind site noise:  u16(i) = half i & 1 (low first) of word (i >> 1) & 3, g = i >> 3
//   Rademacher site noise:          bit(i) = bit i & 31 of word (i >> 5) & 3,            g = i >> 7
//   Gumbel filter bits:             h(i) = u16(i), the mask's layout
//   Gumbel refinement:              u32(i) = word i & 3,                                  g = i >> 2
// Nothing depends on threads, grids, tiling or memory layout.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DROPREG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DROPREG_HOST_DEVICE inline
#endif

namespace dropreg {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Independent streams of one call: they differ in counter words 2-3, so they never share counters.
enum Stream : uint64_t {
  kStreamDropoutMask = 0,
  kStreamSiteNoise = 1,
  kStreamGumbel = 2,
  kStreamGumbelRefine = 3,
};

struct Philox4 {
  uint32_t x[4];
};

DROPREG_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// One Philox round with round key (k0, k1).
DROPREG_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                      uint32_t k0, uint32_t k1) {
  const uint32_t hi0 = mulhi32(kPhiloxM0, c0);
  const uint32_t lo0 = kPhiloxM0 * c0;
  const uint32_t hi1 = mulhi32(kPhiloxM1, c2);
  const uint32_t lo1 = kPhiloxM1 * c2;
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// The round keys of key (k0, k1): round r (0-based) uses (k0 + r·W0, k1 + r·W1). They depend on
// the seed only, so a kernel computes them once per thread and every call under that seed reuses
// them (ten rounds and no key additions a call).
struct PhiloxKey {
  uint32_t k0[10];
  uint32_t k1[10];
};

DROPREG_HOST_DEVICE PhiloxKey philox_key(uint32_t k0, uint32_t k1) {
  PhiloxKey key;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    key.k0[round] = k0;
    key.k1[round] = k1;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return key;
}

DROPREG_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                          const PhiloxKey& key) {
#pragma unroll
  for (int round = 0; round < 10; ++round) philox_round(c0, c1, c2, c3, key.k0[round], key.k1[round]);
  return Philox4{{c0, c1, c2, c3}};
}

DROPREG_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                          uint32_t k0, uint32_t k1) {
  return philox4x32_10(c0, c1, c2, c3, philox_key(k0, k1));
}

// The calls of stream `stream` under (seed, offset): the round keys and counter words 2-3 are
// computed once, a call (group g: elements 4g .. 4g+3 at the u32 density) then costs its rounds.
struct PhiloxStream {
  PhiloxKey key;
  uint32_t c2;
  uint32_t c3;

  DROPREG_HOST_DEVICE PhiloxStream(uint64_t seed, uint64_t offset, uint64_t stream)
      : key(philox_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32))),
        c2(static_cast<uint32_t>(offset + stream)),
        c3(static_cast<uint32_t>((offset + stream) >> 32)) {}

  DROPREG_HOST_DEVICE Philox4 operator()(uint64_t group) const {
    return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), c2, c3, key);
  }
};

// The four 32-bit draws for elements 4g .. 4g+3 of stream `stream` under (seed, offset).
DROPREG_HOST_DEVICE Philox4 philox_group(uint64_t seed, uint64_t offset, uint64_t stream,
                                         uint64_t group) {
  return PhiloxStream(seed, offset, stream)(group);
}

// Elements per call of each density, and the draws of element e of a group's words.
constexpr int kU16PerGroup = 8;
constexpr int kBitsPerGroup = 128;
constexpr int kU32PerGroup = 4;

DROPREG_HOST_DEVICE uint32_t group_u16(const Philox4& r, int e) {
  return (r.x[(e >> 1) & 3] >> ((e & 1) * 16)) & 0xFFFFu;
}

DROPREG_HOST_DEVICE uint32_t group_bit(const Philox4& r, int e) { return (r.x[(e >> 5) & 3] >> (e & 31)) & 1u; }

// Keep test on integers: an element is dropped iff u16 < threshold, threshold = round(q * 2^16)
// in [0, 2^16]. q = 0 gives 0 (keep all) and q = 1 gives 2^16 (drop all), with no special case.
DROPREG_HOST_DEVICE bool keep(uint32_t u16, uint32_t threshold) { return u16 >= threshold; }

}  // namespace dropreg
