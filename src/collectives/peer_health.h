#pragma once
// PeerHealth: what the job's heartbeat (src/runtime/heartbeat.h) knows about
// the other ranks, shared with every communicator of the process. Once it
// has failed, every op that waits, or starts, ends with a CommError that
// names the op and the lost ranks and hosts, whatever its timeout.
//
// Thread-safe: written by the heartbeat's thread, read by progress threads.

#include <atomic>
#include <mutex>
#include <string>

namespace dtrain::collectives::detail {

class PeerHealth {
 public:
  /// True once peers were declared lost. Cheap: polled while ops wait.
  bool failed() const noexcept { return failed_.load(std::memory_order_acquire); }

  /// What was lost, e.g. "lost contact with ranks [2, 3] on host h2 (...)";
  /// empty while failed() is false.
  std::string failure() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return failure_;
  }

  /// Declares peers lost; the first description stays.
  void fail(const std::string& failure) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_.load(std::memory_order_relaxed)) return;
    failure_ = failure;
    failed_.store(true, std::memory_order_release);
  }

 private:
  mutable std::mutex mutex_;
  std::string failure_;
  std::atomic<bool> failed_{false};
};

}  // namespace dtrain::collectives::detail
