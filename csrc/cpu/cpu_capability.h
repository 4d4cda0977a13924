// Which vector loops the CPU kernels run: AVX-512 (AVX512F/BW/DQ/VL + F16C), AVX2 (AVX2 + FMA +
// F16C), or the portable ones. Read once per process, like ATen's ATEN_CPU_CAPABILITY:
// DROPREG_CPU_CAPABILITY=avx2 or =default caps the path below what the CPU has, to compare the
// paths or to test a lower one on a machine that has the higher.
#pragma once

#include <cstdlib>
#include <string_view>

namespace dropreg {
namespace cpu {

enum class CpuPath : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuPath detect_cpu_path() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  CpuPath cap = CpuPath::kAvx512;
  if (const char* asked = std::getenv("DROPREG_CPU_CAPABILITY")) {
    if (std::string_view(asked) == "default") cap = CpuPath::kDefault;
    if (std::string_view(asked) == "avx2") cap = CpuPath::kAvx2;
  }
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("f16c");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx512 && cap >= CpuPath::kAvx512) return CpuPath::kAvx512;
  if (avx2 && cap >= CpuPath::kAvx2) return CpuPath::kAvx2;
#endif
  return CpuPath::kDefault;
}

inline CpuPath cpu_path() {
  static const CpuPath path = detect_cpu_path();
  return path;
}

inline bool cpu_has_avx512() { return cpu_path() == CpuPath::kAvx512; }
inline bool cpu_has_avx2() { return cpu_path() >= CpuPath::kAvx2; }

inline const char* cpu_path_name() {
  switch (cpu_path()) {
    case CpuPath::kAvx512:
      return "avx512";
    case CpuPath::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace cpu
}  // namespace dropreg
