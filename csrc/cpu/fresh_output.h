// Kernels that write a fresh output tensor. A fresh tensor's pages are mapped on their first write,
// one page fault per 4 KiB, and those faults can cost more than the writes themselves. So one
// thread maps the output's pages ahead of the others (MADV_POPULATE_WRITE: mapped, not written, so
// it never races with a task's writes; one call per ~1 MiB instead of a trap per page), in task
// order, while the others compute the tasks behind it; a thread that catches up maps the next pages
// too instead of waiting; the mapping thread computes tasks once everything is mapped. The faults
// overlap the compute instead of adding to it. Without MADV_POPULATE_WRITE (Linux < 5.14, not
// Linux), with one thread, or with DROPREG_CPU_PREFAULT=0, the tasks are computed in order and fault
// as they go. docs/cpu_backend.md has the measurements behind this.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string_view>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dropreg {
namespace cpu {

constexpr int64_t kPageBytes = 4096;
constexpr int64_t kMapChunkBytes = int64_t{1} << 20;  // mapped per call: ~256 faults, one syscall

// Whether fresh outputs are mapped ahead of their writers: DROPREG_CPU_PREFAULT=1 (the default) or
// =0, read once per process like DROPREG_CPU_CAPABILITY. Another value is an error at first use.
inline bool prefault_enabled() {
  static const bool enabled = [] {
    const char* asked = std::getenv("DROPREG_CPU_PREFAULT");
    if (asked == nullptr || *asked == '\0') return true;
    const std::string_view value(asked);
    TORCH_CHECK(value == "0" || value == "1", "environment variable DROPREG_CPU_PREFAULT must be 0 or 1, got '",
                value, "'");
    return value == "1";
  }();
  return enabled;
}

// The bytes map_pages has populated since the process started (dropreg_ext._C.cpu_prefaulted_bytes).
inline std::atomic<int64_t> g_prefaulted_bytes{0};

// Maps the whole pages of [begin, end) writable without writing them; false where the kernel
// cannot (then nothing was done). Where the range's last page is mapped already, the range is
// taken to be memory the allocator reused (an output below glibc's mmap threshold, up to 32 MiB,
// usually is) and left alone: populating mapped pages still walks them one by one, which costs
// more than it saves. A page that is not mapped after all faults when it is written.
inline bool map_pages(char* begin, char* end) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  const auto first = (reinterpret_cast<uintptr_t>(begin) + kPageBytes - 1) & ~uintptr_t(kPageBytes - 1);
  const auto last = reinterpret_cast<uintptr_t>(end) & ~uintptr_t(kPageBytes - 1);
  if (last <= first) return true;
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(last - kPageBytes), kPageBytes, &resident) == 0 && (resident & 1) != 0) {
    return true;
  }
  if (madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE) != 0) return false;
  g_prefaulted_bytes.fetch_add(static_cast<int64_t>(last - first), std::memory_order_relaxed);
  return true;
#else
  (void)begin;
  (void)end;
  return false;
#endif
}

// A fresh contiguous CPU tensor for an op's output: what at::empty's CPU kernel makes, without a
// second trip through the dispatcher (~2k instructions less per tensor, which small calls feel).
inline at::Tensor fresh_cpu(c10::IntArrayRef sizes, c10::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, std::nullopt);
}

// Tasks [0, T) of a kernel writing fresh outputs, task t writing bytes [offset(t), offset(t + 1))
// of each output in `outs` (offset nondecreasing, offset(T) the bytes of the whole output), claimed
// in order by every thread in chunks of tasks_per_chunk. The outputs' pages are mapped group by
// group (a group: the chunks of ~1 MiB of output, one madvise call per output), in order, by
// thread 0 ahead of the others (see above); a thread whose next chunk is not mapped yet maps the
// next unmapped group itself rather than wait: where the kernel populates in parallel the mapping
// is shared, where it serializes the helper was idle anyway.
// make_worker() is called once per thread and returns its `void(int64_t t0, int64_t t1)` (so a
// thread can keep its own scratch buffers).
template <typename Offset, typename MakeWorker>
void parallel_tasks_fresh(int64_t T, int64_t tasks_per_chunk, const std::vector<char*>& outs, const Offset& offset,
                          const MakeWorker& make_worker) {
  if (T <= 0) return;
  const int64_t chunks = (T + tasks_per_chunk - 1) / tasks_per_chunk;
  if (chunks == 1) {  // what one thread would do, without the scheduling (small calls: host cost)
    make_worker()(0, T);
    return;
  }
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  const int64_t chunk_bytes = std::max<int64_t>(1, offset(T) / chunks);  // on average
  const int64_t chunks_per_group = std::max<int64_t>(1, kMapChunkBytes / chunk_bytes);
  const int64_t groups = (chunks + chunks_per_group - 1) / chunks_per_group;
  std::atomic<int64_t> next{0};        // the next chunk to compute
  std::atomic<int64_t> next_group{0};  // the next group to map
  std::atomic<bool> mapping{prefault_enabled() && threads > 1 && chunk_bytes >= kPageBytes};
  std::unique_ptr<std::atomic<bool>[]> mapped(new std::atomic<bool>[groups]);
  for (int64_t g = 0; g < groups; ++g) mapped[g].store(false, std::memory_order_relaxed);
  // Claims the next unmapped group and maps it; false when every group is claimed or the kernel
  // cannot map (then mapping stops for all threads: tasks fault as they write).
  auto map_next_group = [&]() {
    const int64_t g = next_group.fetch_add(1);
    if (g >= groups) return false;
    const int64_t begin = offset(g * chunks_per_group * tasks_per_chunk);
    const int64_t end = offset(std::min(T, (g + 1) * chunks_per_group * tasks_per_chunk));
    for (char* out : outs) {
      if (!map_pages(out + begin, out + end)) {
        mapping.store(false, std::memory_order_release);
        return false;
      }
    }
    mapped[g].store(true, std::memory_order_release);
    return true;
  };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t == 0) {
        while (mapping.load(std::memory_order_relaxed) && map_next_group()) {
        }
      }
      auto work = make_worker();
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
        const int64_t g = c / chunks_per_group;
        while (!mapped[g].load(std::memory_order_acquire) && mapping.load(std::memory_order_acquire)) {
          if (!map_next_group()) std::this_thread::yield();  // every group claimed: g is being mapped
        }
        work(c * tasks_per_chunk, std::min(T, (c + 1) * tasks_per_chunk));
      }
    }
  });
}

// The same for rows [0, N) of row_bytes each: row r at out + r·row_bytes.
template <typename MakeWorker>
void parallel_rows_fresh(int64_t N, int64_t rows_per_chunk, const std::vector<char*>& outs, int64_t row_bytes,
                         const MakeWorker& make_worker) {
  parallel_tasks_fresh(N, rows_per_chunk, outs, [row_bytes](int64_t r) { return r * row_bytes; }, make_worker);
}

}  // namespace cpu
}  // namespace dropreg
