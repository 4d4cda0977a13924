// The block geometry the CPU loops share, and the portable Philox block.
#pragma once

#include <cstdint>

#include "isa.h"
#include "philox.h"

namespace dropreg {
namespace cpu {

constexpr int64_t kBlockGroups = 32;                // Philox calls per block
constexpr int64_t kBlockWords = 4 * kBlockGroups;   // 32-bit words per block (128)
constexpr int64_t kBlockElems = kBlockWords;        // elements per block at the u32 density
// How far ahead a streamed input is prefetched by hand, where the loop between its loads is long
// enough that the hardware prefetcher falls behind (dropout's short rows, the CE loops' z).
constexpr int64_t kPrefetchBytes = 8192;
// Partial sums of the fixed-order reductions (cross-entropy's Σ exp, the site penalty's chunks):
// element k of a block adds to partial k % kSumLanes, one AVX-512 register of floats.
constexpr int kSumLanes = 16;

// u[w] = word w % 4 of group first_group + w / 4 of `stream`, w < 4·groups (groups <= kBlockGroups;
// at the u32 density, u32 of element 4·first_group + w). The rounds run over structure-of-arrays
// counters with the group loop innermost, so the compiler vectorizes across groups (they share the
// key schedule); the four words are then interleaved.
DROPREG_INLINE_BODY void philox_calls_body(uint64_t seed, uint64_t offset, uint64_t stream, uint64_t first_group,
                                           int64_t groups, uint32_t* __restrict__ u) {
  uint32_t c0[kBlockGroups], c1[kBlockGroups], c2[kBlockGroups], c3[kBlockGroups];
  const uint64_t s = offset + stream;
  for (int64_t j = 0; j < groups; ++j) {
    const uint64_t g = first_group + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(g);
    c1[j] = static_cast<uint32_t>(g >> 32);
    c2[j] = static_cast<uint32_t>(s);
    c3[j] = static_cast<uint32_t>(s >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t j = 0; j < groups; ++j) philox_round(c0[j], c1[j], c2[j], c3[j], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int64_t j = 0; j < groups; ++j) {
    u[4 * j] = c0[j];
    u[4 * j + 1] = c1[j];
    u[4 * j + 2] = c2[j];
    u[4 * j + 3] = c3[j];
  }
}

// The whole block's kBlockGroups calls (a constant trip count, as the dropout and site loops want).
DROPREG_INLINE_BODY void philox_block_body(uint64_t seed, uint64_t offset, uint64_t stream, uint64_t first_group,
                                           uint32_t* __restrict__ u) {
  philox_calls_body(seed, offset, stream, first_group, kBlockGroups, u);
}

// philox_block_body compiled for isa: the Philox of the portable loops of isa's row.
template <Isa isa>
void philox_block(uint64_t seed, uint64_t offset, uint64_t stream, uint64_t first_group, uint32_t* u) {
  compiled_for<isa, &philox_block_body>(seed, offset, stream, first_group, u);
}

// philox_calls_body compiled for isa: the calls of a block that a partial row needs.
template <Isa isa>
void philox_calls(uint64_t seed, uint64_t offset, uint64_t stream, uint64_t first_group, int64_t groups, uint32_t* u) {
  compiled_for<isa, &philox_calls_body>(seed, offset, stream, first_group, groups, u);
}

}  // namespace cpu
}  // namespace dropreg
