// The index maps of the CUDA elementwise kernels' warp-contiguous tiles (dropout, the site penalty;
// csrc/cuda/warp_tile.cuh does their memory accesses): which elements a lane takes, which Philox
// calls it computes and which words of which call each of its elements reads. Written for host and
// device so that tests/test_warp_tile_map.py walks a whole grid on the CPU with these functions and
// checks each element's draw against reference.py's counter layout (philox.h's header comment).
//
// A warp takes a flat tensor a tile of kCalls·256 elements at a time: lane l takes the tile's 16-byte
// vectors l, l + 32, ... (kV elements each), so that each warp instruction reads or writes 512
// contiguous bytes, and computes the tile's u16-density calls l, l + 32, ... (8 elements each). A
// call covers one vector of a 2-byte dtype (the lane's own call: kOwnCalls), or two (f32) or four
// (f64) vectors of consecutive lanes: there the calls' words pass through a per-warp table, the
// tile's words in call order (word k: call k / 4, word k % 4). Element e of the tile reads u16 half
// e & 1 of word e >> 1, so vector q's u16s are the kVecWords words from vec_word(q, lane) on.
#pragma once

#include <cstdint>

#include "philox.h"

namespace dropreg {

constexpr int kTileLanes = 32;  // a warp

template <int kElemBytes, int kCallsArg>
struct WarpTileMap {
  static constexpr int kCalls = kCallsArg;                    // u16-density calls a lane
  static constexpr int kV = 16 / kElemBytes;                  // elements a vector
  static constexpr int kLaneElems = kCalls * kU16PerGroup;    // elements a lane
  static constexpr int kVecs = kLaneElems / kV;               // vectors a lane
  static constexpr int kElems = kTileLanes * kLaneElems;      // elements a tile
  static constexpr int kTileCalls = kTileLanes * kCalls;      // calls a tile
  static constexpr bool kOwnCalls = kV == kU16PerGroup;       // vector q is the lane's call q
  static constexpr int kVecWords = kV / 2;                    // u16 words of a vector
  static_assert(kLaneElems % kV == 0 && kV % 2 == 0, "a lane takes whole vectors of whole words");

  // Vector q of `lane` (q < kVecs) starts at element vec_elem(q, lane) of the tile.
  static DROPREG_HOST_DEVICE int vec_elem(int q, int lane) { return (q * kTileLanes + lane) * kV; }
  // Call c of `lane` (c < kCalls) is call tile_call(c, lane) of the tile, its slot in the table.
  static DROPREG_HOST_DEVICE int tile_call(int c, int lane) { return c * kTileLanes + lane; }
  // The Philox group (counter) of call c of `lane` in tile t.
  static DROPREG_HOST_DEVICE uint64_t group(int64_t t, int c, int lane) {
    return static_cast<uint64_t>(t) * kTileCalls + static_cast<uint64_t>(tile_call(c, lane));
  }
  // The table word of vector q's first u16 word (not kOwnCalls).
  static DROPREG_HOST_DEVICE int vec_word(int q, int lane) { return vec_elem(q, lane) / 2; }
  // The tiles of n elements, and those of them that lie wholly below n.
  static DROPREG_HOST_DEVICE int64_t tiles(int64_t n) { return (n + kElems - 1) / kElems; }
  static DROPREG_HOST_DEVICE int64_t full_tiles(int64_t n) { return n / kElems; }
};

// The dropout kernel's tiles: two calls a lane (16 elements), both computed after the tile's loads.
constexpr int kDropoutTileCalls = 2;

// Element e's u16 from its vector's words w (element e of a vector: half e & 1 of w[e >> 1]).
template <int kWords>
DROPREG_HOST_DEVICE uint32_t vec_u16(const uint32_t (&w)[kWords], int e) {
  return (w[e >> 1] >> ((e & 1) * 16)) & 0xFFFFu;
}

// The site penalty's layout: a warp takes the elements in runs of kRunSteps steps, a step being a
// tile of one call a lane (256 elements). A run's 2048 elements are 16 Rademacher calls (128 bits
// each), computed by lanes 0 .. 15 at the start of the run into the table (call l at slot l), from
// which each lane reads the word that holds a vector's bits.
struct SiteRunMap {
  template <int kElemBytes>
  using Step = WarpTileMap<kElemBytes, 1>;
  static constexpr int kStepElems = kTileLanes * kU16PerGroup;  // Step<any>::kElems
  static constexpr int kRunSteps = 8;
  static constexpr int64_t kRunElems = kRunSteps * kStepElems;
  static constexpr int kBitCalls = static_cast<int>(kRunElems / kBitsPerGroup);
  static_assert(kBitCalls <= kTileLanes, "a lane computes at most one Rademacher call of a run");

  static DROPREG_HOST_DEVICE int64_t runs(int64_t n) { return (n + kRunElems - 1) / kRunElems; }
  // The Philox group of the Rademacher call that lane (< kBitCalls) computes for run r.
  static DROPREG_HOST_DEVICE uint64_t bit_group(int64_t r, int lane) {
    return static_cast<uint64_t>(r) * kBitCalls + static_cast<uint64_t>(lane);
  }
  // The element of its run at which a step's vector starts (elem: vec_elem of the step's tile).
  static DROPREG_HOST_DEVICE int run_elem(int step, int elem) { return step * kStepElems + elem; }
  // The table word, and the bit in it, of the element at `at` of its run (the bits of a vector lie
  // in one word: kV divides 32).
  static DROPREG_HOST_DEVICE int bit_word(int at) { return at / 32; }
  static DROPREG_HOST_DEVICE int bit_shift(int at) { return at % 32; }
};

// The forward reduction's slabs: a function of n only (deterministic, device-independent). The
// runs are cut into `slabs` slabs of kSlabWarps·runs runs; warp w of a slab sums its runs
// [slab_first_run(slab, w), + runs) below n, in order, then the slab's threads are reduced.
struct SlabPlan {
  static constexpr int kSlabWarps = 8;         // a block of 256 threads takes one slab at a time
  static constexpr int64_t kMaxSlabs = 8192;   // stage-1 partials: 8 slabs a block on a 1024-block
                                               // wave, so the last round of slabs leaves few SMs idle
  int64_t runs;  // runs a warp sums in a slab
  int64_t slabs;

  // max_slabs: kMaxSlabs in the kernels, smaller in the tests (several runs a warp at small n).
  static DROPREG_HOST_DEVICE SlabPlan of(int64_t n, int64_t max_slabs = kMaxSlabs) {
    const int64_t total = SiteRunMap::runs(n);
    const int64_t runs = (total + kSlabWarps * max_slabs - 1) / (kSlabWarps * max_slabs);
    const int64_t per_warp = runs > 1 ? runs : 1;
    return SlabPlan{per_warp, (total + kSlabWarps * per_warp - 1) / (kSlabWarps * per_warp)};
  }
  DROPREG_HOST_DEVICE int64_t first_run(int64_t slab, int warp) const { return (slab * kSlabWarps + warp) * runs; }
};

}  // namespace dropreg
