#include "dtrain/collectives/work.h"

#include "dtrain/error.h"

namespace dtrain::collectives {

Work::Work(std::string description) : description_(std::move(description)) {}

bool Work::is_completed() const noexcept { return completed_.load(std::memory_order_acquire); }

std::exception_ptr Work::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

void Work::wait(std::optional<Timeout> timeout) {
  // Block at once rather than spin: on a machine with as many ranks as
  // cores, a spinning caller takes the core its progress thread needs.
  std::unique_lock<std::mutex> lock(mutex_);
  if (timeout) {
    if (!cv_.wait_for(lock, *timeout, [this] { return is_completed(); })) {
      DTRAIN_THROW(TimeoutError, "Work::wait: ", description(), " still running after ",
                   timeout->count(), " ms");
    }
  } else {
    cv_.wait(lock, [this] { return is_completed(); });
  }
  if (error_) std::rethrow_exception(error_);
}

std::chrono::system_clock::time_point Work::completed_at() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return completed_at_;
}

void Work::complete(std::exception_ptr error) noexcept {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    error_ = std::move(error);
    completed_at_ = std::chrono::system_clock::now();
    completed_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

}  // namespace dtrain::collectives
