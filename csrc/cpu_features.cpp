// CPUID-based choice of the kernel table, overridable at run time.
#include "cpu_features.h"

#include <atomic>
#include <stdexcept>

namespace fastlora {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
}

// Tables usable here, narrowest first.
std::vector<const Kernels*> usable_tables() {
    std::vector<const Kernels*> tables{portable_kernels};
    if (avx2_kernels && cpu_has_avx2()) tables.push_back(avx2_kernels);
    if (avx512_kernels && cpu_has_avx512()) tables.push_back(avx512_kernels);
    return tables;
}

std::atomic<const Kernels*> active{usable_tables().back()};

}  // namespace

std::string cpu_vendor() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_is("intel")) return "intel";
    if (__builtin_cpu_is("amd")) return "amd";
#endif
    return "other";
}

std::vector<std::string> supported_isas() {
    std::vector<std::string> names;
    for (const Kernels* table : usable_tables()) names.emplace_back(table->name);
    return names;
}

const Kernels& active_kernels() { return *active.load(std::memory_order_relaxed); }

void set_isa(const std::string& name) {
    for (const Kernels* table : usable_tables()) {
        if (name == table->name) {
            active.store(table, std::memory_order_relaxed);
            return;
        }
    }
    std::string known;
    for (const std::string& isa : supported_isas()) known += (known.empty() ? "" : ", ") + isa;
    throw std::invalid_argument("instruction set '" + name + "' is not available here; choose one of: " + known);
}

}  // namespace fastlora
