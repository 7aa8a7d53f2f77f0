// Parallel loops on the OpenMP runtime PyTorch brings (see parallel.cpp).
#pragma once

#include <functional>

namespace fastlora {

// Runs task(t) for every t in [0, n), on n threads of the shared OpenMP runtime (inline when
// n == 1). Tasks must not throw.
void parallel_run(int n, const std::function<void(int)>& task);

}  // namespace fastlora
