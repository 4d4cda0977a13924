// Which loops the CPU kernels run: one instruction set (ISA) per process, chosen once, for every op.
//
//   Isa::kAvx512    AVX512F/BW/DQ/VL + F16C (+ FMA)
//   Isa::kAvx2      AVX2 + FMA + F16C
//   Isa::kPortable  the loops any CPU runs, compiled for the build's baseline ("default")
//
// DROPREG_CPU_CAPABILITY=avx2 or =default caps the choice below what the CPU has (as ATen's
// ATEN_CPU_CAPABILITY does), to compare the paths or to test a lower one on a machine that has the
// higher. Each op's vector loops per ISA are its table (loops.h; SLEEF's exp/log: exp_log.h), and
// with_cpu_isa runs an op's code instantiated for the chosen row. docs/cpu_backend.md has the tables.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string_view>

// The AVX2 and AVX-512 loops use GCC's per-function target attributes and x86 intrinsics, so they
// are built by GCC for x86-64 only; elsewhere (aarch64, clang) the portable row is the only one.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DROPREG_X86_SIMD 1
// Targets are per function, never a whole translation unit's: ATen's and c10's inline functions
// compiled for AVX-512 in one file could be the copy the linker keeps for every caller.
#define DROPREG_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,fma")))
#define DROPREG_AVX2 __attribute__((target("avx2,f16c,fma")))
// Without FMA, for loops whose products and sums are each rounded (docs/numerics.md) and for
// helpers that any AVX2 loop may inline.
#define DROPREG_AVX2_NO_FMA __attribute__((target("avx2,f16c")))
#define DROPREG_COMPILED_FOR __attribute__((noipa, visibility("hidden")))  // see CompiledFor
#else
#define DROPREG_X86_SIMD 0
#define DROPREG_COMPILED_FOR
#endif

// A function whose body is inlined into every caller: the loops compiled_for compiles per ISA.
#define DROPREG_INLINE_BODY __attribute__((always_inline)) inline

namespace dropreg {
namespace cpu {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kIsaCount = 3;

// The names DROPREG_CPU_CAPABILITY takes and dropreg_ext._C reports.
constexpr const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : (isa == Isa::kAvx2 ? "avx2" : "default");
}

inline Isa detect_isa() {
#if DROPREG_X86_SIMD
  Isa cap = Isa::kAvx512;
  if (const char* asked = std::getenv("DROPREG_CPU_CAPABILITY")) {
    if (std::string_view(asked) == "default") cap = Isa::kPortable;
    if (std::string_view(asked) == "avx2") cap = Isa::kAvx2;
  }
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("f16c");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx512 && cap >= Isa::kAvx512) return Isa::kAvx512;
  if (avx2 && cap >= Isa::kAvx2) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

// This process's ISA, read once.
inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// f.template operator()<isa>() for this process's ISA: an op's code instantiated for its table's
// row. Where DROPREG_X86_SIMD is 0 only the portable row is instantiated.
template <typename F>
decltype(auto) with_cpu_isa(F&& f) {
#if DROPREG_X86_SIMD
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return f.template operator()<Isa::kAvx512>();
    case Isa::kAvx2:
      return f.template operator()<Isa::kAvx2>();
    case Isa::kPortable:
      break;
  }
#endif
  return f.template operator()<Isa::kPortable>();
}

// body(args...) compiled for an ISA: `body` (a DROPREG_INLINE_BODY function) is inlined into a
// function with that ISA's target attribute, where the compiler vectorizes its loops for that
// instruction set. This is how a table's AVX2 and AVX-512 rows run the portable loops they have no
// hand-written loop for (the target_clones("avx512f", "avx2", "default") of before, picked by the
// table rather than by the CPU alone, so that the cap holds for them too). Opaque to its callers
// (DROPREG_COMPILED_FOR: not inlined into them nor specialized for their constant arguments), as
// those clones were, and called directly (not through the shared library's PLT).

template <Isa isa>
struct CompiledFor {  // kPortable: the build's baseline
  template <auto body, typename... Args>
  DROPREG_COMPILED_FOR static void call(Args... args) { body(args...); }
};
#if DROPREG_X86_SIMD
template <>
struct CompiledFor<Isa::kAvx2> {
  template <auto body, typename... Args>
  DROPREG_COMPILED_FOR __attribute__((target("avx2"))) static void call(Args... args) { body(args...); }
};
template <>
struct CompiledFor<Isa::kAvx512> {
  template <auto body, typename... Args>
  DROPREG_COMPILED_FOR __attribute__((target("avx512f"))) static void call(Args... args) { body(args...); }
};
#endif

template <Isa isa, auto body, typename... Args>
inline void compiled_for(Args... args) {
  CompiledFor<isa>::template call<body>(args...);
}

// ---------------------------------------------------------------------------------------------
// Which rows ran: per op, a bit per ISA, set by the op for the row it runs (a relaxed load per
// call, a store the first time after a reset), read by dropreg_ext._C.cpu_entries_used().
// ---------------------------------------------------------------------------------------------

enum class CpuOp : int {
  kDropout,
  kDropoutStrided,
  kCrossEntropySample,
  kCrossEntropySampleGrad,
  kCrossEntropySampleGradBackward,
  kCeGrad,
  kCeGradBackward,
  kSitePenalty,
  kSitePenaltyBackward,
  kExpLog,  // exp_log.h's float exp/log arrays: SLEEF at the row's width, libm in the portable row
  kCount,
};

inline constexpr const char* kCpuOpNames[] = {
    "dropout", "dropout_strided", "cross_entropy_sample", "cross_entropy_sample_grad",
    "cross_entropy_sample_grad_backward", "ce_grad", "ce_grad_backward", "site_penalty", "site_penalty_backward",
    "exp_log",
};
static_assert(sizeof(kCpuOpNames) / sizeof(kCpuOpNames[0]) == static_cast<int>(CpuOp::kCount));

inline std::atomic<unsigned> g_entries_used[static_cast<int>(CpuOp::kCount)];

DROPREG_INLINE_BODY void note_entry(CpuOp op, Isa isa) {
  std::atomic<unsigned>& used = g_entries_used[static_cast<int>(op)];
  const unsigned bit = 1u << static_cast<int>(isa);
  if ((used.load(std::memory_order_relaxed) & bit) == 0) used.fetch_or(bit, std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace dropreg
