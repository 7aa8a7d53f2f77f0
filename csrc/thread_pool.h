// A small persistent pool of std::threads: no second OpenMP runtime beside PyTorch's.
#pragma once

#include <functional>

namespace fastlora {

// Runs task(t) for every t in [0, n): t = 0 on the calling thread, the rest on pool workers.
// If another caller is using the pool at that moment, runs all n tasks on the calling thread
// instead, so concurrent callers never oversubscribe the cores. Tasks must not throw.
void parallel_run(int n, const std::function<void(int)>& task);

}  // namespace fastlora
