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

 private:
  struct Item {
    std::shared_ptr<Work> work;
    Task task;
  };
  void loop();

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace dtrain::collectives::detail
