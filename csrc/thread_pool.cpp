// The pool behind parallel_run: workers block on a condition variable after a short spin.
#include "thread_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastlora {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__)
    _mm_pause();
#endif
}

// Spinning this long before blocking lets back-to-back calls skip the futex wake-up.
constexpr std::chrono::microseconds kSpin{20};

// Waits until ready() holds: spins for kSpin, then yields the core to whoever needs it.
template <class Ready>
void spin_then_yield(Ready ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (!ready()) {
        if (std::chrono::steady_clock::now() < until)
            cpu_relax();
        else
            std::this_thread::yield();
    }
}

// Spins for kSpin waiting for ready(); returns whether it came true.
template <class Ready>
bool spin(Ready ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (!ready()) {
        if (std::chrono::steady_clock::now() >= until) return false;
        cpu_relax();
    }
    return true;
}

class Pool {
public:
    // Runs the job on the caller and n-1 workers; false (and nothing run) if the pool is busy.
    bool try_run(int n, const std::function<void(int)>& task) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock()) return false;
        grow(n - 1);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            task_ = &task;
            wanted_ = n - 1;
            pending_.store(n - 1);
            generation_.fetch_add(1);
        }
        wake_.notify_all();
        task(0);
        spin_then_yield([this] { return pending_.load(std::memory_order_acquire) == 0; });
        return true;
    }

private:
    void grow(int count) {
        while (static_cast<int>(workers_.size()) < count) {
            const int index = static_cast<int>(workers_.size()) + 1;
            workers_.emplace_back([this, index] { work(index); });
        }
    }

    void work(int index) {
        unsigned seen = 0;
        for (;;) {
            if (!spin([&] { return generation_.load(std::memory_order_acquire) != seen; })) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_.load() != seen; });
            }
            seen = generation_.load();
            const std::function<void(int)>* task;
            int wanted;
            {
                std::lock_guard<std::mutex> lock(mutex_);
                task = task_;
                wanted = wanted_;
            }
            if (index <= wanted) {
                (*task)(index);
                pending_.fetch_sub(1, std::memory_order_release);
            }
        }
    }

    std::mutex busy_;   // held by the caller whose job the pool runs
    std::mutex mutex_;  // guards task_, wanted_ and the wake-up
    std::condition_variable wake_;
    std::vector<std::thread> workers_;
    std::atomic<unsigned> generation_{0};
    std::atomic<int> pending_{0};
    const std::function<void(int)>* task_ = nullptr;
    int wanted_ = 0;
};

// Never destroyed: workers stay parked until the process exits. A forked child, which has no
// workers, starts from a fresh pool.
Pool* instance = nullptr;
std::once_flag created;

Pool& pool() {
    std::call_once(created, [] {
        instance = new Pool();
        pthread_atfork(nullptr, nullptr, [] { instance = new Pool(); });
    });
    return *instance;
}

}  // namespace

void parallel_run(int n, const std::function<void(int)>& task) {
    if (n > 1 && pool().try_run(n, task)) return;
    for (int t = 0; t < n; ++t) task(t);
}

}  // namespace fastlora
