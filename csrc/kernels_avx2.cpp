// The AVX2+FMA kernels: compiled under a function-level target, used only when CPUID reports AVX2 and FMA.
#include "kernels.h"

namespace fastlora {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
static const char kName[] = "avx2";
constexpr int kVectorFloats = 8;
constexpr int kVectorRegisters = 16;
#include "kernels_impl.inc"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
const Kernels* const avx2_kernels = &avx2::table;
#else
const Kernels* const avx2_kernels = nullptr;
#endif
}  // namespace fastlora
