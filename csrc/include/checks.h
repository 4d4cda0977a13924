// Host-side argument checks shared by the CPU and CUDA launchers. User errors name the argument
// and what is allowed (flash-attention's CHECK_* style); internal invariants use TORCH_INTERNAL_ASSERT.
#pragma once

#include <ATen/ATen.h>
#include <cmath>

namespace dropreg {

// The accumulation dtype of a tensor's ops: float64 for float64, float32 otherwise. The run-time
// twin of at::opmath_type<scalar_t> (what the kernels compute in) and of reference.acc_dtype.
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace dropreg

#define DROPREG_CHECK_FLOATING(x)                                                            \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()) &&                                       \
                  ((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble ||    \
                   (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16),    \
              "argument '" #x "' must be a float64, float32, float16 or bfloat16 tensor, got ", \
              (x).scalar_type())

#define DROPREG_CHECK_PROB(p)                                                           \
  TORCH_CHECK(std::isfinite(p) && (p) >= 0.0 && (p) <= 1.0,                             \
              "argument '" #p "' must be a probability in [0, 1], got ", (p))

// rng = int64 tensor [seed, offset] on the device of `like`: read by the kernel itself, so the
// launch never synchronizes with the host and CUDA-graph replays see the values of each replay.
#define DROPREG_CHECK_RNG(rng, like)                                                           \
  do {                                                                                         \
    TORCH_CHECK((rng).scalar_type() == at::kLong && (rng).dim() == 1 && (rng).numel() == 2,    \
                "argument '" #rng "' must be an int64 tensor [seed, offset] of shape (2,), got ", \
                (rng).scalar_type(), " of shape ", (rng).sizes());                             \
    TORCH_CHECK((rng).device() == (like).device(), "argument '" #rng                           \
                "' must be on the same device as '" #like "' (", (like).device(), "), got ",   \
                (rng).device());                                                               \
  } while (0)

#define DROPREG_CHECK_SAME_DEVICE(a, b)                                                      \
  TORCH_CHECK((a).device() == (b).device(), "arguments '" #a "' and '" #b                    \
              "' must be on the same device, got ", (a).device(), " and ", (b).device())

// counter int64 (N, 4) and key int64 (N, 2) on one device, for the raw philox op.
#define DROPREG_CHECK_PHILOX_ARGS(counter, key)                                                  \
  do {                                                                                          \
    TORCH_CHECK((counter).scalar_type() == at::kLong && (counter).dim() == 2 &&                 \
                    (counter).size(1) == 4,                                                     \
                "argument 'counter' must be an int64 tensor of shape (N, 4), got ",             \
                (counter).scalar_type(), " of shape ", (counter).sizes());                      \
    TORCH_CHECK((key).scalar_type() == at::kLong && (key).dim() == 2 && (key).size(1) == 2 &&   \
                    (key).size(0) == (counter).size(0),                                         \
                "argument 'key' must be an int64 tensor of shape (N, 2) with N = ",             \
                (counter).size(0), ", got ", (key).scalar_type(), " of shape ", (key).sizes()); \
    DROPREG_CHECK_SAME_DEVICE(counter, key);                                                    \
  } while (0)

namespace dropreg {

// The raw philox op's arguments: the macro above, out of line (checks.cpp).
void check_philox_args(const at::Tensor& counter, const at::Tensor& key);

}  // namespace dropreg
