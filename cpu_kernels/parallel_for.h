// ParallelFor over XLA's intra-op thread pool, shared by the CPU kernels.
#ifndef PENSIEVE_CPU_KERNELS_PARALLEL_FOR_H_
#define PENSIEVE_CPU_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace pensieve {

// Runs fn(i) for i in [0, n) on the caller and on the pool's threads and returns when all are
// done. Items are claimed from a counter, so the caller never waits for a task that has not
// started: no deadlock when the pool is busy or has no threads.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < n) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
}

}  // namespace pensieve

#endif  // PENSIEVE_CPU_KERNELS_PARALLEL_FOR_H_
