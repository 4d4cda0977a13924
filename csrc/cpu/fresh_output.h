// Row kernels that write a fresh output tensor. A fresh tensor's pages are mapped on their first
// write, one page fault per 4 KiB; on the VMs this project is measured on, those faults cost more
// than the writes themselves and do not run in parallel (two threads populate an output no faster
// than one: the kernel serializes them). So one thread maps the output's pages ahead of the others
// (MADV_POPULATE_WRITE: mapped, not written, so it never races with a row being written), chunk by
// chunk in row order, while the others compute the rows behind it; then it computes rows too. The
// faults overlap the compute instead of adding to it; where faults are cheap the mapping thread is
// soon done and joins the compute. Without MADV_POPULATE_WRITE (Linux < 5.14, not Linux) or with
// one thread, the rows are computed in order and fault as they go.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dropreg {
namespace cpu {

constexpr int64_t kPageBytes = 4096;
constexpr int64_t kMapChunkBytes = int64_t{1} << 20;  // mapped per call: ~256 faults, one syscall

// Maps the whole pages of [begin, end) writable without writing them; false where the kernel
// cannot (then nothing was done).
inline bool map_pages(char* begin, char* end) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  const auto first = (reinterpret_cast<uintptr_t>(begin) + kPageBytes - 1) & ~uintptr_t(kPageBytes - 1);
  const auto last = reinterpret_cast<uintptr_t>(end) & ~uintptr_t(kPageBytes - 1);
  if (last <= first) return true;
  return madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE) == 0;
#else
  (void)begin;
  (void)end;
  return false;
#endif
}

// Rows [0, N) of a kernel writing row r of each fresh output at out + r·row_bytes, in chunks of rows
// claimed in order by every thread; thread 0 first maps the outputs' pages ahead of the others
// (see above). make_worker() is called once per thread and returns its `void(int64_t r0, int64_t r1)`
// (so a thread can keep its own scratch buffers).
template <typename MakeWorker>
void parallel_rows_fresh(int64_t N, int64_t rows_per_chunk, const std::vector<char*>& outs, int64_t row_bytes,
                         const MakeWorker& make_worker) {
  if (N <= 0) return;
  const int64_t chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  std::atomic<int64_t> next{0};       // the next chunk to compute
  std::atomic<int64_t> mapped{0};     // chunks [0, mapped) have their pages mapped
  std::atomic<bool> mapping{threads > 1 && row_bytes * rows_per_chunk >= kPageBytes};
  // Mapping runs ahead by whole MiB calls: chunks are grouped so that each call covers ~1 MiB.
  const int64_t chunks_per_call = std::max<int64_t>(1, kMapChunkBytes / std::max<int64_t>(1, row_bytes * rows_per_chunk));
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t == 0 && mapping.load()) {
        for (int64_t c = 0; c < chunks && mapping.load(std::memory_order_relaxed); c += chunks_per_call) {
          const int64_t c_end = std::min(chunks, c + chunks_per_call);
          const int64_t r_end = std::min(N, c_end * rows_per_chunk);
          bool done = true;
          for (char* out : outs) {
            if (c < next.load(std::memory_order_relaxed)) break;
            done = map_pages(out + c * rows_per_chunk * row_bytes, out + r_end * row_bytes);
            if (!done) break;
          }
          if (!done) break;  // no MADV_POPULATE_WRITE here: rows fault as they are written
          mapped.store(c_end, std::memory_order_release);
        }
        mapping.store(false, std::memory_order_release);
      }
      auto work = make_worker();
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
        // Behind the mapping thread, wait for it: two threads faulting contend, and it is faster.
        while (c >= mapped.load(std::memory_order_acquire) && mapping.load(std::memory_order_acquire)) {
          std::this_thread::yield();
        }
        work(c * rows_per_chunk, std::min(N, (c + 1) * rows_per_chunk));
      }
    }
  });
}

}  // namespace cpu
}  // namespace dropreg
