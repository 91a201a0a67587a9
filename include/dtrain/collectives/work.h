#pragma once
// Work: the handle every Communicator op returns.
//
// An op is queued when the call returns; its Work completes once the op has
// finished, successfully or not. Ops issued on one communicator complete in
// issue order. Work is shared between the caller and the backend
// (std::shared_ptr) and can be neither copied nor moved.
//
// Thread-safety: every method may be called from any thread.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <optional>
#include <string>

#include "dtrain/collectives/types.h"

namespace dtrain::collectives {

class Work {
 public:
  /// `description` names the op in errors, e.g. "all_reduce(1024 x float32) on 'world'".
  explicit Work(std::string description);
  virtual ~Work() = default;
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;
  Work(Work&&) = delete;
  Work& operator=(Work&&) = delete;

  /// True once the op has finished (successfully or with an error). Never blocks.
  bool is_completed() const noexcept;

  /// Blocks until the op has finished; rethrows the op's error (TimeoutError,
  /// CommError, ...) if it failed. With `timeout`, throws TimeoutError if the op
  /// is still running after that long; the op itself keeps running (its own
  /// timeout, from the op's options, still ends it).
  virtual void wait(std::optional<Timeout> timeout = std::nullopt);

  /// When the op was issued and when it completed (system clock, so that
  /// traces of different processes share a time line). completed_at() is
  /// meaningful once is_completed().
  std::chrono::system_clock::time_point issued_at() const noexcept { return issued_at_; }
  std::chrono::system_clock::time_point completed_at() const;

  /// The op's error, or nullptr if it succeeded or is still running.
  std::exception_ptr error() const;

  /// Names the op in errors, e.g. "all_reduce(ring, sum, 1024 x float32) on
  /// communicator 'world'". Backends may build it lazily.
  virtual std::string description() const { return description_; }

  /// Backend side: marks the op finished, with `error` if it failed, and wakes
  /// waiters. Called exactly once, by the thread that ran the op.
  void complete(std::exception_ptr error = nullptr) noexcept;

 protected:
  /// For backends that override description().
  Work() = default;

 private:
  std::string description_;
  std::atomic<bool> completed_{false};
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::exception_ptr error_;
  std::chrono::system_clock::time_point issued_at_ = std::chrono::system_clock::now();
  std::chrono::system_clock::time_point completed_at_;
};

}  // namespace dtrain::collectives
