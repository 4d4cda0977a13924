// Walks a whole grid of the CUDA elementwise kernels on the CPU with their index maps
// (csrc/include/warp_tile_map.h), as each lane of each warp would, and writes for every element
// below n how many times it was taken and the draw it read (u16 or bit). tests/test_warp_tile_map.py
// compares the draws with reference.py's and checks that each element is taken exactly once.
//
//   warp_tile_walk dropout         BYTES N ALIGNED WARPS SEED OFFSET   (dropout.cu)
//   warp_tile_walk site_forward    BYTES N RAD MAX_SLABS SEED OFFSET   (stage 1 of site_penalty.cu)
//   warp_tile_walk site_backward   BYTES N RAD WARPS SEED OFFSET       (its backward)
//   warp_tile_walk plan            N                                   (SlabPlan::of: runs slabs)
//
// Output (stdout, native-endian uint32): counts[N], then draws[N].
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "philox.h"
#include "warp_tile_map.h"

using namespace dropreg;

namespace {

struct Walk {
  int64_t n;
  std::vector<uint32_t> count;
  std::vector<uint32_t> draw;

  explicit Walk(int64_t n) : n(n), count(n, 0), draw(n, 0) {}
  void take(int64_t i, uint32_t value) {
    if (i < n) {  // the kernels mask the elements at n and beyond
      ++count[i];
      draw[i] = value;
    }
  }
};

uint32_t table_word(const std::vector<Philox4>& table, int k) { return table[k / 4].x[k % 4]; }

// One tile of u16 draws (tile t of Tile, elements from base), as warp_tile.cuh's tile_u16_words
// hands the words to the lanes: the lane's own call, or the warp's table of all lanes' calls.
template <typename Tile>
void u16_tile(const PhiloxStream& philox, int64_t t, int64_t base, Walk& walk) {
  std::vector<Philox4> table(Tile::kTileCalls);
  std::vector<Philox4> own(kTileLanes * Tile::kCalls);
  for (int lane = 0; lane < kTileLanes; ++lane) {
    for (int c = 0; c < Tile::kCalls; ++c) {
      const Philox4 r = philox(Tile::group(t, c, lane));
      own[lane * Tile::kCalls + c] = r;
      table[Tile::tile_call(c, lane)] = r;
    }
  }
  for (int lane = 0; lane < kTileLanes; ++lane) {
    for (int q = 0; q < Tile::kVecs; ++q) {
      uint32_t w[Tile::kVecWords];
      for (int k = 0; k < Tile::kVecWords; ++k) {
        w[k] = Tile::kOwnCalls ? own[lane * Tile::kCalls + q].x[k] : table_word(table, Tile::vec_word(q, lane) + k);
      }
      for (int e = 0; e < Tile::kV; ++e) walk.take(base + Tile::vec_elem(q, lane) + e, vec_u16(w, e));
    }
  }
}

template <int kBytes>
void dropout(int64_t n, bool aligned, int64_t warps, const PhiloxStream& philox, Walk& walk) {
  using Tile = WarpTileMap<kBytes, kDropoutTileCalls>;
  const int64_t tiles = Tile::tiles(n);
  const int64_t full_tiles = aligned ? Tile::full_tiles(n) : 0;
  for (int64_t warp = 0; warp < warps; ++warp) {
    for (int64_t t = warp; t < full_tiles; t += warps) u16_tile<Tile>(philox, t, t * Tile::kElems, walk);
    for (int64_t t = full_tiles + warp; t < tiles; t += warps) u16_tile<Tile>(philox, t, t * Tile::kElems, walk);
  }
}

// Run r of the site kernels: its Rademacher calls into the table (lanes < kBitCalls), then its steps.
template <int kBytes>
void site_run(int64_t r, bool rad, const PhiloxStream& philox, Walk& walk) {
  using Step = SiteRunMap::Step<kBytes>;
  const int64_t run_base = r * SiteRunMap::kRunElems;
  std::vector<Philox4> table(kTileLanes);
  if (rad) {
    for (int lane = 0; lane < SiteRunMap::kBitCalls; ++lane) table[lane] = philox(SiteRunMap::bit_group(r, lane));
  }
  for (int s = 0; s < SiteRunMap::kRunSteps; ++s) {
    if (!rad) {
      const int64_t base = run_base + SiteRunMap::run_elem(s, 0);
      u16_tile<Step>(philox, base / Step::kElems, base, walk);
      continue;
    }
    for (int lane = 0; lane < kTileLanes; ++lane) {
      for (int q = 0; q < Step::kVecs; ++q) {
        const int at = SiteRunMap::run_elem(s, Step::vec_elem(q, lane));
        const uint32_t bits = table_word(table, SiteRunMap::bit_word(at)) >> SiteRunMap::bit_shift(at);
        for (int e = 0; e < Step::kV; ++e) walk.take(run_base + at + e, (bits >> e) & 1u);
      }
    }
  }
}

template <int kBytes>
void site_forward(int64_t n, bool rad, int64_t max_slabs, const PhiloxStream& philox, Walk& walk) {
  const SlabPlan plan = SlabPlan::of(n, max_slabs);
  for (int64_t slab = 0; slab < plan.slabs; ++slab) {
    for (int warp = 0; warp < SlabPlan::kSlabWarps; ++warp) {
      const int64_t first = plan.first_run(slab, warp);
      for (int64_t r = first; r < first + plan.runs && r * SiteRunMap::kRunElems < n; ++r) {
        site_run<kBytes>(r, rad, philox, walk);
      }
    }
  }
}

template <int kBytes>
void site_backward(int64_t n, bool rad, int64_t warps, const PhiloxStream& philox, Walk& walk) {
  const int64_t runs = SiteRunMap::runs(n);
  for (int64_t warp = 0; warp < warps; ++warp) {
    for (int64_t r = warp; r < runs; r += warps) site_run<kBytes>(r, rad, philox, walk);
  }
}

template <template <int> class Op>
bool by_bytes(int bytes, Walk& walk, int64_t a, int64_t b, const PhiloxStream& philox) {
  switch (bytes) {
    case 8: Op<8>::run(walk.n, a, b, philox, walk); return true;
    case 4: Op<4>::run(walk.n, a, b, philox, walk); return true;
    case 2: Op<2>::run(walk.n, a, b, philox, walk); return true;
    default: return false;
  }
}

template <int kBytes>
struct DropoutOp {
  static void run(int64_t n, int64_t a, int64_t b, const PhiloxStream& p, Walk& w) { dropout<kBytes>(n, a, b, p, w); }
};
template <int kBytes>
struct SiteForwardOp {
  static void run(int64_t n, int64_t a, int64_t b, const PhiloxStream& p, Walk& w) {
    site_forward<kBytes>(n, a, b, p, w);
  }
};
template <int kBytes>
struct SiteBackwardOp {
  static void run(int64_t n, int64_t a, int64_t b, const PhiloxStream& p, Walk& w) {
    site_backward<kBytes>(n, a, b, p, w);
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "plan") == 0) {
    const SlabPlan plan = SlabPlan::of(std::strtoll(argv[2], nullptr, 10));
    std::printf("%lld %lld\n", static_cast<long long>(plan.runs), static_cast<long long>(plan.slabs));
    return 0;
  }
  if (argc != 8) {
    std::fprintf(stderr, "usage: see the header of warp_tile_walk.cpp\n");
    return 2;
  }
  const std::string op = argv[1];
  const int bytes = std::atoi(argv[2]);
  Walk walk(std::strtoll(argv[3], nullptr, 10));
  const int64_t a = std::strtoll(argv[4], nullptr, 10);
  const int64_t b = std::strtoll(argv[5], nullptr, 10);
  const uint64_t seed = std::strtoull(argv[6], nullptr, 10);
  const uint64_t offset = std::strtoull(argv[7], nullptr, 10);
  bool ok = false;
  if (op == "dropout") {
    ok = by_bytes<DropoutOp>(bytes, walk, a, b, PhiloxStream(seed, offset, kStreamDropoutMask));
  } else if (op == "site_forward") {
    ok = by_bytes<SiteForwardOp>(bytes, walk, a, b, PhiloxStream(seed, offset, kStreamSiteNoise));
  } else if (op == "site_backward") {
    ok = by_bytes<SiteBackwardOp>(bytes, walk, a, b, PhiloxStream(seed, offset, kStreamSiteNoise));
  }
  if (!ok) {
    std::fprintf(stderr, "unknown op %s or element size %d\n", op.c_str(), bytes);
    return 2;
  }
  std::fwrite(walk.count.data(), sizeof(uint32_t), walk.count.size(), stdout);
  std::fwrite(walk.draw.data(), sizeof(uint32_t), walk.draw.size(), stdout);
  return 0;
}
