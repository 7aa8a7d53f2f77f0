// Which kernel table runs: the widest instruction set that CPUID reports, or the one the user set.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace fastlora {

// "intel", "amd" or "other": which vendor's CPU this is (x86 only; "other" elsewhere).
std::string cpu_vendor();
// Names of the instruction sets this CPU and this build both support, narrowest first.
std::vector<std::string> supported_isas();
// The kernel table in use.
const Kernels& active_kernels();
// Selects a table by name; throws std::invalid_argument if this CPU or build lacks it.
void set_isa(const std::string& name);

}  // namespace fastlora
