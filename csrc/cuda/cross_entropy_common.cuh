// What the cross-entropy kernels share (cross_entropy.cu launches them): the chunks, the row
// layout and the arithmetic that maps a work item to its chunks, written once.
//
// Chunks. Elements are taken in chunks of consecutive flat indices i = r·C + c, aligned to
// multiples of the chunk size: one or two 16-byte vector loads when the chunk lies inside the row
// and the tensors are aligned, else element by element (the rows' edge chunks: the alignment shift
// of Apex's xentropy). The sample's chunks are 8 elements (4 for double), i.e. a whole Philox call
// of the Gumbel stream's filter bits (group i >> 3; half of one for double); ce_grad_backward's
// are one 16-byte vector.
//
// Row layout (RowPlan): a function of C and the dtype only, never of N or of the device, so the
// reduction trees, and every result, are the same bits on every GPU and batch size.
//   group mode  rows that touch at most 32 times kGroupThreadBytes of chunks: L = 1, 2, ..., 32
//               lanes a row (the fewest that take at most kGroupThreadBytes each), 256 / L rows
//               a 256-thread block; xor-shuffle reductions only.
//   block mode  a 512-thread block a row. A sample row whose chunks exceed kOnChipBytes is split
//               into `splits` parts of kSplitThreadBytes a thread, one block each;
//               cross_entropy_merge_kernel merges their states in split order.
// Lane t of a row (or split) takes the chunks t, t + L, ... in order: a sequential sum, then a
// fixed tree (xor butterfly over the lanes or the warp, the warps in index order, the splits in
// order). Rows (or splits) are visited in a grid-stride loop over a grid of one resident wave.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "cuda_utils.cuh"

namespace dropreg {
namespace ce {

using cuda::kFullMask;
using cuda::kWarpSize;

// Group mode: 256-thread blocks of L-lane rows. Block mode: a 512-thread block a row.
constexpr int kGroupThreads = 256;
constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / kWarpSize;

constexpr int block_threads(bool block_mode) { return block_mode ? kRowThreads : kGroupThreads; }

// The blocks a row kernel's registers are planned for (__launch_bounds__'s minimum per SM): two
// 512-thread blocks (their stashes share an SM: kOnChipBytes) or three of 256, and half as many
// for double, whose values take register pairs: each fits without spilling to local memory.
template <typename acc_t, bool kBlockMode>
constexpr int row_kernel_min_blocks() {
  return (kBlockMode ? 2 : 3) / (sizeof(acc_t) == 8 ? 2 : 1);
}

// Bytes of its row's chunks a thread takes at most in group mode.
constexpr int64_t kGroupThreadBytes = 256;
// Shared memory a block-mode row may keep on chip (the fused gradient's z, the backward's z and
// u): two such 512-thread blocks share an H100/H200 SM (228 KB). For the fused gradient 24.5k
// float or 53k bfloat16 columns (GPT-2's 50257 in bfloat16); for the backward 12k / 24k.
constexpr int64_t kOnChipBytes = 104 * 1024;
// Bytes of a split a thread takes: N = 32 rows of 128k floats make 512 blocks, enough for every SM.
constexpr int64_t kSplitThreadBytes = 64;

// ---------------------------------------------------------------------------------------------
// Chunks and row plans (host and device)
// ---------------------------------------------------------------------------------------------

// A chunk of kElems consecutive flat indices, as 16-byte vectors (kVecs of kV elements).
template <typename scalar_t, int kElemsArg>
struct Chunk {
  using scalar = scalar_t;
  static constexpr int kElems = kElemsArg;
  static constexpr int kV = cuda::vec_elems<scalar_t, kElems>();
  static constexpr int kVecs = kElems / kV;
  static constexpr int64_t kBytes = kElems * static_cast<int64_t>(sizeof(scalar_t));
  using Vec = cuda::AlignedVec<scalar_t, kV>;
};

// The sample kernel's chunk (and ce_grad's, which visits rows the same way): one Philox call of the
// filter bits (8 elements, one or two vectors) for 2- and 4-byte types, so the per-chunk work (the
// bound, the share, the loop) is spread over 8 elements; half a call for double (whose 8 elements
// would not fit the register budget).
template <typename scalar_t>
using SampleChunk = Chunk<scalar_t, sizeof(scalar_t) == 8 ? 4 : 8>;

// ce_grad_backward's chunk: one 16-byte vector (two for double), keeping two arrays' chunks in
// registers and on chip.
template <typename scalar_t>
using BackwardChunk = Chunk<scalar_t, cuda::ChunkShape<scalar_t>::kElems>;

// How the rows of an (N, C) problem are spread over threads (see the top of the file).
struct RowPlan {
  bool block_mode;  // one block a row (or split); else `lanes` lanes a row
  int lanes;        // threads a row: 1, 2, ..., 32 (group mode) or kRowThreads
  int64_t splits;   // blocks a row (block mode, cross_entropy_sample only), 1 otherwise
  int iters;        // chunks a thread takes of a row (of a split): the loops' uniform trip count
};

inline int plan_threads(const RowPlan& plan) { return block_threads(plan.block_mode); }

// Blocks that cover the plan's work items (rows, or splits of rows) of `rows` rows.
inline int64_t plan_blocks(const RowPlan& plan, int64_t rows) {
  const int64_t items_per_block = plan_threads(plan) / plan.lanes;
  return (rows * plan.splits + items_per_block - 1) / items_per_block;
}

// `arrays` tensors kept on chip (1: z, 2: z and u); `split`: long rows may be split across blocks.
template <typename C>
RowPlan plan_rows(int64_t cols, int64_t arrays, bool split) {
  // The most chunks a row touches: rows start at r·C, i.e. at multiples of C's lowest set bit
  // (up to kElems) inside a chunk.
  const int64_t step = std::min<int64_t>(C::kElems, cols & -cols);
  const int64_t chunks = (C::kElems - step + cols - 1) / C::kElems + 1;
  const int64_t group_iters = kGroupThreadBytes / (arrays * C::kBytes);
  if (chunks <= kWarpSize * group_iters) {
    int lanes = 1;
    while (lanes * group_iters < chunks) lanes *= 2;
    return {false, lanes, 1, static_cast<int>((chunks + lanes - 1) / lanes)};
  }
  const int64_t iters = (chunks + kRowThreads - 1) / kRowThreads;
  if (!split || iters * kRowThreads * arrays * C::kBytes <= kOnChipBytes) {
    return {true, kRowThreads, 1, static_cast<int>(iters)};
  }
  const int64_t split_iters = std::max<int64_t>(1, kSplitThreadBytes / C::kBytes);
  const int64_t splits = (iters + split_iters - 1) / split_iters;
  const int64_t per_split = (chunks + splits - 1) / splits;
  return {true, kRowThreads, splits, static_cast<int>((per_split + kRowThreads - 1) / kRowThreads)};
}

// Shared memory of a block that keeps its rows' chunks: every thread its own `iters` chunks.
template <typename C>
size_t stash_bytes(const RowPlan& plan, int64_t arrays) {
  return static_cast<size_t>(plan.iters) * plan_threads(plan) * arrays * C::kBytes;
}

// ---------------------------------------------------------------------------------------------
// A work item's chunks (device)
// ---------------------------------------------------------------------------------------------

// a / b for non-negative a and b: a 32-bit division when both fit (the int64 one is a long
// subroutine, paid per row).
__device__ __forceinline__ int64_t div_index(int64_t a, int64_t b) {
  if ((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) <= 0xFFFFFFFFu) {
    return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  }
  return a / b;
}

// How a row kernel's block takes the plan's work items: kThreads threads, `count` lanes an item
// (the whole block in block mode), per_block items a block. At each step of the grid-stride loop
// over item0 = blockIdx.x·per_block, + gridDim.x·per_block, ..., this thread is lane t of item
// item0 + threadIdx.x / count.
template <bool kBlockMode>
struct RowLanes {
  static constexpr int kThreads = block_threads(kBlockMode);
  int count;
  int per_block;
  int t;

  __device__ __forceinline__ explicit RowLanes(const RowPlan& plan)
      : count(kBlockMode ? kThreads : plan.lanes), per_block(kThreads / count), t(threadIdx.x % count) {}

  __device__ __forceinline__ int64_t first_step() const { return static_cast<int64_t>(blockIdx.x) * per_block; }
  __device__ __forceinline__ int64_t stride() const { return static_cast<int64_t>(gridDim.x) * per_block; }
  __device__ __forceinline__ int64_t item(int64_t item0) const { return item0 + threadIdx.x / count; }
};

// Work item `item` of a plan that cuts each row into `splits` splits: split `split` of row `row`
// (the whole row when splits is 1).
struct WorkItem {
  int64_t row;
  int64_t split;

  __device__ __forceinline__ WorkItem(int64_t item, int64_t splits)
      : row(splits == 1 ? item : div_index(item, splits)), split(item - row * splits) {}
};

// The chunks of a work item: k_begin + j, j in [0, n) (n = 0 for an item past the last,
// `in_range` false); the full ones (in the row, and aligned tensors: `vec`) are j in
// [full_lo, full_hi). The splits cut the row's chunks into segments of equal length, the last
// one shorter.
template <int kElems>
struct RowChunks {
  int64_t begin;    // the row's flat indices are [begin, end)
  int64_t end;
  int64_t k_begin;  // chunk j is at flat index (k_begin + j)·kElems
  int n;
  int full_lo;
  int full_hi;

  __device__ __forceinline__ RowChunks(const WorkItem& w, bool in_range, int64_t cols, int64_t splits, bool vec) {
    begin = w.row * cols;
    end = begin + cols;
    const int64_t first = begin / kElems;
    const int64_t chunks = (end - 1) / kElems - first + 1;
    const int64_t seg = splits == 1 ? chunks : div_index(chunks + splits - 1, splits);
    k_begin = first + w.split * seg;
    n = in_range ? static_cast<int>(std::min(seg, (end - 1) / kElems + 1 - k_begin)) : 0;
    full_lo = static_cast<int>(std::max<int64_t>(0, (begin + kElems - 1) / kElems - k_begin));
    full_hi = vec ? static_cast<int>(std::max<int64_t>(full_lo, std::min<int64_t>(end / kElems - k_begin, n))) : full_lo;
  }

  __device__ __forceinline__ bool full(int j) const { return j >= full_lo && j < full_hi; }
  __device__ __forceinline__ int64_t base(int j) const { return (k_begin + j) * kElems; }
};

// ---------------------------------------------------------------------------------------------
// Chunk and row helpers (device)
// ---------------------------------------------------------------------------------------------

// A thread's own chunks in shared memory, laid out (iteration, vector, thread) so that the
// 16-byte accesses of a warp are consecutive (no bank conflicts), and no thread reads another's:
// vector w of its chunk `it` is mine[(it·kVecs + w)·kThreads], mine = stash + threadIdx.x.
template <typename C, int kThreads>
__device__ __forceinline__ typename C::Vec* stash_slot(typename C::Vec* mine, int it, int w) {
  return mine + (it * C::kVecs + w) * kThreads;
}

// `mine` of stash_slot: the block's dynamic shared memory, from this thread's first vector.
template <typename C>
__device__ __forceinline__ typename C::Vec* thread_stash() {
  extern __shared__ __align__(16) unsigned char smem[];
  return reinterpret_cast<typename C::Vec*>(smem) + threadIdx.x;
}

// d as the place of an element in a chunk of kElems (d: its flat index less the chunk's base), -1
// when it lies outside: the per-element one-hot test is then a 32-bit compare.
template <int kElems>
__device__ __forceinline__ int place_in_chunk(int64_t d) {
  return d >= 0 && d < kElems ? static_cast<int>(d) : -1;
}

// x[e] from a chunk's vectors.
template <typename C, typename acc_t>
__device__ __forceinline__ void unpack(const typename C::Vec (&v)[C::kVecs], acc_t (&x)[C::kElems]) {
#pragma unroll
  for (int w = 0; w < C::kVecs; ++w) {
#pragma unroll
    for (int e = 0; e < C::kV; ++e) x[w * C::kV + e] = static_cast<acc_t>(v[w].v[e]);
  }
}

// Stores y as the chunk at flat index base: whole vectors when `full`, else its elements in [begin, end).
template <typename C, typename acc_t>
__device__ __forceinline__ void store_chunk_vecs(typename C::scalar* __restrict__ dst, int64_t base, int64_t begin,
                                                 int64_t end, bool full, const acc_t (&y)[C::kElems]) {
  using scalar_t = typename C::scalar;
  if (full) {
#pragma unroll
    for (int w = 0; w < C::kVecs; ++w) {
      typename C::Vec v;
#pragma unroll
      for (int e = 0; e < C::kV; ++e) v.v[e] = static_cast<scalar_t>(y[w * C::kV + e]);
      *reinterpret_cast<typename C::Vec*>(dst + base + w * C::kV) = v;
    }
  } else {
#pragma unroll
    for (int e = 0; e < C::kElems; ++e) {
      if (base + e >= begin && base + e < end) dst[base + e] = static_cast<scalar_t>(y[e]);
    }
  }
}

// A row's lse, label and scale, for ce_grad and ce_grad_backward.
template <typename acc_t>
struct RowParams {
  acc_t lse;
  acc_t scale;
  int64_t label;
  bool valid;
};

template <typename acc_t>
__device__ __forceinline__ RowParams<acc_t> load_row_params(
    const acc_t* __restrict__ lse, const int64_t* __restrict__ label,
    const acc_t* __restrict__ row_scale, int64_t row, int64_t cols, int64_t ignore_index) {
  RowParams<acc_t> p;
  p.label = label[row];
  p.valid = p.label != ignore_index;
  CUDA_KERNEL_ASSERT((!p.valid || (p.label >= 0 && p.label < cols)) &&
                     "label out of bounds");
  p.lse = lse[row];
  p.scale = row_scale[row];
  return p;
}

}  // namespace ce
}  // namespace dropreg
