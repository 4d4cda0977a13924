// Warp-contiguous tiles of the elementwise kernels (dropout, the site penalty): 16-byte accesses
// that fill whole 32-byte sectors, with each Philox call computed once (CUDA only). The index maps
// (which elements and which Philox words a lane takes) are warp_tile_map.h's, tested on the CPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_utils.cuh"
#include "philox.h"
#include "warp_tile_map.h"

namespace dropreg {
namespace cuda {

template <typename scalar_t, int kCalls>
struct WarpTile : WarpTileMap<static_cast<int>(sizeof(scalar_t)), kCalls> {
  static constexpr uintptr_t kAlign = 16;
};

// One 16-byte global store (st.global.v4): NVVM splits the stores of some of a tile's vectors into
// 2-, 4- and 8-byte pieces when written as a struct store.
template <typename Vec>
__device__ __forceinline__ void store16(void* dst, const Vec& v) {
  static_assert(sizeof(Vec) == 16, "a 16-byte vector");
  uint32_t w[4];
  memcpy(w, &v, sizeof(w));
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
}

// f(q, e) for element e of each of the lane's vectors q, in order.
template <typename Tile, typename F>
__device__ __forceinline__ void for_each_elem(const F& f) {
#pragma unroll
  for (int q = 0; q < Tile::kVecs; ++q) {
#pragma unroll
    for (int e = 0; e < Tile::kV; ++e) f(q, e);
  }
}

// min(max(left, 0), kV): the elements of a vector that lie below n, `left` = n - its first index.
template <typename Tile>
__device__ __forceinline__ int in_vector(int64_t left) {
  return static_cast<int>(left < 0 ? 0 : (left < Tile::kV ? left : Tile::kV));
}

// The lane's vectors of the tile at flat index base, in acc_t: 16-byte loads where kFull (the tile
// lies below n and src is 16-byte aligned), else element by element, elements at n and beyond
// reading as 0. The kernels take their full tiles and the others in separate loops, so the hot one
// holds no masks (and no masked store that NVVM could merge with a vector store).
template <bool kFull, typename Tile, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ src, int64_t base, int64_t n, int lane,
                                          acc_t (&v)[Tile::kVecs][Tile::kV]) {
  using Vec = AlignedVec<scalar_t, Tile::kV>;
  if constexpr (kFull) {
#pragma unroll
    for (int q = 0; q < Tile::kVecs; ++q) {
      const Vec x = *reinterpret_cast<const Vec*>(src + base + Tile::vec_elem(q, lane));
#pragma unroll
      for (int e = 0; e < Tile::kV; ++e) v[q][e] = static_cast<acc_t>(x.v[e]);
    }
  } else {
    for_each_elem<Tile>([&](int q, int e) {
      const int64_t i = base + Tile::vec_elem(q, lane);
      v[q][e] = e < in_vector<Tile>(n - i) ? static_cast<acc_t>(src[i + e]) : acc_t(0);
    });
  }
}

// Stores the lane's vectors of the tile at flat index base (elements below n), rounded to scalar_t,
// as load_tile loads them.
template <bool kFull, typename Tile, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_tile(scalar_t* __restrict__ dst, int64_t base, int64_t n, int lane,
                                           const acc_t (&v)[Tile::kVecs][Tile::kV]) {
  using Vec = AlignedVec<scalar_t, Tile::kV>;
  if constexpr (kFull) {
#pragma unroll
    for (int q = 0; q < Tile::kVecs; ++q) {
      Vec y;
#pragma unroll
      for (int e = 0; e < Tile::kV; ++e) y.v[e] = static_cast<scalar_t>(v[q][e]);
      store16(dst + base + Tile::vec_elem(q, lane), y);
    }
  } else {
    for_each_elem<Tile>([&](int q, int e) {
      const int64_t i = base + Tile::vec_elem(q, lane);
      if (e < in_vector<Tile>(n - i)) dst[i + e] = static_cast<scalar_t>(v[q][e]);
    });
  }
}

// A warp's Philox words in shared memory: `calls` calls of 4 words, call k at words 4k .. 4k + 3.
// put() by every lane, then sync(); reads until the next sync(), after which the table may be
// overwritten. kCalls: the calls a lane puts.
template <int kCalls>
struct WarpWords {
  uint4 call[kWarpSize * kCalls];

  // The call at `slot` (WarpTileMap::tile_call, SiteRunMap's lane).
  __device__ __forceinline__ void put(int slot, const Philox4& r) { call[slot] = make_uint4(r.x[0], r.x[1], r.x[2], r.x[3]); }
  __device__ __forceinline__ static void sync() { __syncwarp(); }
  __device__ __forceinline__ uint32_t word(int k) const { return reinterpret_cast<const uint32_t*>(call)[k]; }
  __device__ __forceinline__ uint2 words2(int k) const { return reinterpret_cast<const uint2*>(call)[k / 2]; }
};

// The u16 words of each of the lane's vectors (w[q][k]: word k of vector q; element e of vector q
// has u16 half e & 1 of w[q][e >> 1]) from the lane's calls r, through `table` where a call spans
// several lanes' vectors. Every lane of the warp must call it.
template <typename Tile>
__device__ __forceinline__ void tile_u16_words(const Philox4 (&r)[Tile::kCalls], WarpWords<Tile::kCalls>& table,
                                               int lane, uint32_t (&w)[Tile::kVecs][Tile::kVecWords]) {
  if constexpr (Tile::kOwnCalls) {
#pragma unroll
    for (int q = 0; q < Tile::kVecs; ++q) {
#pragma unroll
      for (int k = 0; k < Tile::kVecWords; ++k) w[q][k] = r[q].x[k];
    }
  } else {
#pragma unroll
    for (int c = 0; c < Tile::kCalls; ++c) table.put(Tile::tile_call(c, lane), r[c]);
    table.sync();
#pragma unroll
    for (int q = 0; q < Tile::kVecs; ++q) {
      const int k = Tile::vec_word(q, lane);
      if constexpr (Tile::kVecWords == 2) {
        const uint2 v = table.words2(k);
        w[q][0] = v.x;
        w[q][1] = v.y;
      } else {
        w[q][0] = table.word(k);
      }
    }
    table.sync();
  }
}

}  // namespace cuda
}  // namespace dropreg
