// The one CPU instruction-set switch of guidg_fast._C.
//
// The extension is compiled for the baseline x86-64 ISA; its hot row loops are compiled a second
// and third time with AVX2 and AVX-512 enabled (GF_ISA_TARGET_*) and picked per call by cpu_isa().
// cpu_isa() is the best level this CPU runs, capped by GUIDG_FAST_CPU_ISA=avx512|avx2|baseline
// (read once, when the library loads; set_cpu_isa_cap changes it later, which the tests use to run
// every path in one process). CI runs the suite once uncapped and once with GUIDG_FAST_CPU_ISA=avx2
// (next to MKL_ENABLE_INSTRUCTIONS=AVX2), so the AVX2 paths are tested on AVX-512 machines too.
//
// A variant is written once as an always-inline body; GF_ISA_TARGET_* wrappers inline it under
// their target attribute, so the compiler vectorises the same source for each ISA.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace guidg_fast {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GF_HAVE_ISA_VARIANTS 1
#define GF_ISA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define GF_ISA_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#else
#define GF_HAVE_ISA_VARIANTS 0
#define GF_ISA_TARGET_AVX2
#define GF_ISA_TARGET_AVX512
#endif
#define GF_ISA_INLINE __attribute__((always_inline)) inline

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// "avx512" | "avx2" | "baseline" -> Isa; anything else throws (the message names the variable).
inline Isa parse_isa(const char* name) {
  if (std::strcmp(name, "avx512") == 0) return Isa::kAvx512;
  if (std::strcmp(name, "avx2") == 0) return Isa::kAvx2;
  if (std::strcmp(name, "baseline") == 0) return Isa::kBaseline;
  throw std::invalid_argument(std::string("GUIDG_FAST_CPU_ISA must be avx512, avx2 or baseline, got '") + name + "'");
}

inline Isa cpu_isa_supported() {
#if GF_HAVE_ISA_VARIANTS
  static const Isa supported = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return supported;
#else
  return Isa::kBaseline;
#endif
}

inline std::atomic<int>& cpu_isa_cap_storage() {
  // an unknown value falls back to no cap here; guidg_fast checks the variable on import and says so
  static std::atomic<int> cap{[] {
    const char* env = std::getenv("GUIDG_FAST_CPU_ISA");
    if (env == nullptr || *env == '\0') return static_cast<int>(Isa::kAvx512);
    try {
      return static_cast<int>(parse_isa(env));
    } catch (const std::invalid_argument&) {
      return static_cast<int>(Isa::kAvx512);
    }
  }()};
  return cap;
}

// The ISA the row loops use now: min(supported, cap).
inline Isa cpu_isa() {
  const int cap = cpu_isa_cap_storage().load(std::memory_order_relaxed);
  const int have = static_cast<int>(cpu_isa_supported());
  return static_cast<Isa>(cap < have ? cap : have);
}

inline void set_cpu_isa_cap(Isa cap) { cpu_isa_cap_storage().store(static_cast<int>(cap), std::memory_order_relaxed); }

}  // namespace guidg_fast

// GF_ISA_DISPATCH(ret, name, (params), (args)) defines `ret name(params)`, which runs the
// always-inline `name##_body(args)` compiled for the ISA cpu_isa() picks at each call.
#define GF_ISA_DISPATCH(ret, name, params, args)                            \
  GF_ISA_TARGET_AVX512 ret name##_avx512 params { return name##_body args; } \
  GF_ISA_TARGET_AVX2 ret name##_avx2 params { return name##_body args; }     \
  ret name##_baseline params { return name##_body args; }                    \
  inline ret name params {                                                   \
    switch (::guidg_fast::cpu_isa()) {                                       \
      case ::guidg_fast::Isa::kAvx512: return name##_avx512 args;            \
      case ::guidg_fast::Isa::kAvx2: return name##_avx2 args;                \
      default: return name##_baseline args;                                  \
    }                                                                        \
  }
