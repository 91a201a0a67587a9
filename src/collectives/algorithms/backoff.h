#pragma once
// How the progress thread waits for a peer: a tight loop first (small
// messages complete in a few microseconds), then it yields the core, then it
// sleeps briefly: a rank waiting for a slow peer must not compete with its
// own training thread. The first polls do not read the clock at all: most
// waits of small messages end within them.

#include <sched.h>

#include <chrono>
#include <cstdint>
#include <thread>

namespace dtrain::collectives::detail {

class Backoff {
 public:
  void pause() {
    if (++polls_ < kSpinPolls) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#elif defined(__aarch64__)
      asm volatile("yield" ::: "memory");
#endif
      return;
    }
    if (polls_ == kSpinPolls) start_ = Clock::now();
    if (Clock::now() - start_ < std::chrono::milliseconds(2)) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr std::uint32_t kSpinPolls = 2000;
  std::uint32_t polls_ = 0;
  Clock::time_point start_;
};

}  // namespace dtrain::collectives::detail
