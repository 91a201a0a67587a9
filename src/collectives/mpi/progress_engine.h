#pragma once
// ProgressEngine: the thread that runs one communicator's ops, in the order
// they were queued (Horovod's background-thread idea: the training thread
// only queues work and keeps computing; one thread per communicator owns all
// of that communicator's MPI traffic, so ops never interleave).

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "dtrain/collectives/work.h"

namespace dtrain::collectives::detail {

class ProgressEngine {
 public:
  /// Runs `task`; a thrown exception fails the op's Work with it.
  using Task = std::function<void()>;

  ProgressEngine();
  /// Runs what is still queued, then joins the thread. Never throws.
  ~ProgressEngine();
  ProgressEngine(const ProgressEngine&) = delete;
  ProgressEngine& operator=(const ProgressEngine&) = delete;

  /// Queues `task`; `work` completes when it has run. Tasks run one at a
  /// time, in the order queued.
  void enqueue(std::shared_ptr<Work> work, Task task);

  /// If nothing is queued or running, reserves the engine for the calling
  /// thread and returns true: the caller runs its op itself, then calls
  /// end_inline(). Otherwise returns false (the op must be queued, to keep
  /// issue order).
  bool try_begin_inline();
  void end_inline();

 private:
  struct Item {
    std::shared_ptr<Work> work;
    Task task;
  };
  void loop();
  static void run(Work& work, Task& task);

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool stopping_ = false;
  bool busy_ = false;  // a task is running (on the engine thread or inline)
  std::thread thread_;
};

}  // namespace dtrain::collectives::detail
