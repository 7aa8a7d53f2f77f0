// The portable kernels: the baseline instruction set of the build (SSE2 on x86-64, NEON on aarch64).
#include "kernels.h"

namespace fastlora {
namespace portable {
static const char kName[] = "portable";
constexpr int kVectorFloats = 4;  // SSE2 or NEON
constexpr int kVectorRegisters = 16;
#include "kernels_impl.inc"
}  // namespace portable

const Kernels* const portable_kernels = &portable::table;
}  // namespace fastlora
