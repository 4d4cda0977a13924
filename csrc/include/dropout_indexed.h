// Dropout whose mask is read at an affine logical index (reference.dropout_indexed): the element at
// position (i_0, .., i_{n-1}) of x reads the mask of index base + Σ_k i_k·stride_k. The box of a larger
// row-major tensor (a shard) is the case strides = its row-major strides, base = Σ_k offset_k·stride_k:
// each element then gets the mask the whole tensor gives it. Shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "dropout.h"
#include "philox.h"

namespace dropreg {

constexpr int kMaxIndexDims = 8;

// The positions of a contiguous x, dims merged where the index runs on (size-1 dims dropped), so
// that most maps have one or two dims: position p (row-major over sizes) has index base + Σ_k i_k·strides_k.
struct IndexMap {
  int dims = 0;
  int64_t sizes[kMaxIndexDims] = {};
  int64_t strides[kMaxIndexDims] = {};
  uint64_t base = 0;

  // The index of flat position p (row-major over sizes). The loops run over every slot with the
  // unused ones skipped, so that a GPU reads sizes and strides at constant places (a loop to `dims`
  // would index them at run time: local memory).
  DROPREG_HOST_DEVICE uint64_t index_of(int64_t p) const {
    uint64_t index = base;
#pragma unroll
    for (int k = kMaxIndexDims - 1; k >= 0; --k) {
      if (k < dims) {
        index += static_cast<uint64_t>((p % sizes[k]) * strides[k]);
        p /= sizes[k];
      }
    }
    return index;
  }

  // The size and the index stride of the innermost merged dim ({1, 1} without dims).
  DROPREG_HOST_DEVICE int64_t inner_size() const { return dims > 0 ? slot(sizes, dims - 1) : 1; }
  DROPREG_HOST_DEVICE int64_t inner_stride() const { return dims > 0 ? slot(strides, dims - 1) : 1; }

 private:
  DROPREG_HOST_DEVICE static int64_t slot(const int64_t (&values)[kMaxIndexDims], int k) {
    int64_t value = 0;
#pragma unroll
    for (int j = 0; j < kMaxIndexDims; ++j) value = j == k ? values[j] : value;
    return value;
  }
};

// The mask's u16 at a logical index, with one Philox call per group reused for the next indices of
// the same group: a run of consecutive indices costs one call per 8, as the contiguous kernels.
struct MaskReader {
  uint64_t seed, offset;
  uint64_t group = ~uint64_t{0};
  Philox4 words{};

  DROPREG_HOST_DEVICE uint32_t u16(uint64_t index) {
    const uint64_t g = index >> 3;
    if (g != group) {
      words = philox_group(seed, offset, kStreamDropoutMask, g);
      group = g;
    }
    // group_u16 with the word chosen by selects: a run-time index into the words would put them in
    // local memory on a GPU.
    const uint32_t w = static_cast<uint32_t>(index >> 1) & 3u;
    const uint32_t word = w == 0 ? words.x[0] : w == 1 ? words.x[1] : w == 2 ? words.x[2] : words.x[3];
    return (word >> ((index & 1) * 16)) & 0xFFFFu;
  }
};

}  // namespace dropreg
