// Raw Philox4x32-10 on the CPU, for known-answer tests and for users who want the counter-based
// stream itself. Words are uint32 values carried in int64 tensors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "philox.h"

namespace dropreg {
namespace {

at::Tensor philox_cpu(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* cp = c.const_data_ptr<int64_t>();
  const int64_t* kp = k.const_data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, c.size(0), 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const Philox4 w = philox4x32_10(
          static_cast<uint32_t>(cp[4 * r]), static_cast<uint32_t>(cp[4 * r + 1]),
          static_cast<uint32_t>(cp[4 * r + 2]), static_cast<uint32_t>(cp[4 * r + 3]),
          static_cast<uint32_t>(kp[2 * r]), static_cast<uint32_t>(kp[2 * r + 1]));
      for (int j = 0; j < 4; ++j) op[4 * r + j] = static_cast<int64_t>(w.x[j]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CPU, m) { m.impl("philox", &philox_cpu); }

}  // namespace dropreg
