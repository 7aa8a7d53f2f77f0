// The AVX-512 kernels: compiled under a function-level target, used only when CPUID reports AVX-512 F/VL/BW/DQ.
#include "kernels.h"

namespace fastlora {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#endif
namespace avx512 {
static const char kName[] = "avx512";
constexpr int kVectorFloats = 16;
constexpr int kVectorRegisters = 32;
#include "kernels_impl.inc"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
const Kernels* const avx512_kernels = &avx512::table;
#else
const Kernels* const avx512_kernels = nullptr;
#endif
}  // namespace fastlora
