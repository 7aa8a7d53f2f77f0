// parallel_run on OpenMP. The extension links libgomp.so.1 and is imported after torch, so it
// shares the OpenMP runtime (and the worker threads) that PyTorch already loaded: no second
// pool competes with PyTorch's threads for the cores, and no wake-up is paid between their ops.
#include "parallel.h"

namespace fastlora {

void parallel_run(int n, const std::function<void(int)>& task) {
    if (n <= 1) {  // inline: even an if(false) parallel region costs a call into the runtime
        if (n == 1) task(0);
        return;
    }
#pragma omp parallel for num_threads(n) schedule(static, 1)
    for (int t = 0; t < n; ++t) task(t);
}

}  // namespace fastlora
