#include "src/collectives/mpi/progress_engine.h"

#include <utility>

namespace dtrain::collectives::detail {

ProgressEngine::ProgressEngine() : thread_([this] { loop(); }) {}

ProgressEngine::~ProgressEngine() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void ProgressEngine::enqueue(std::shared_ptr<Work> work, Task task) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(Item{std::move(work), std::move(task)});
  }
  cv_.notify_one();
}

void ProgressEngine::run(Work& work, Task& task) {
  std::exception_ptr error;
  try {
    task();
  } catch (...) {
    error = std::current_exception();
  }
  task = nullptr;  // release captured tensors before waking the waiter
  work.complete(error);
}

bool ProgressEngine::try_begin_inline() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (busy_ || !queue_.empty() || stopping_) return false;
  busy_ = true;
  return true;
}

void ProgressEngine::end_inline() {
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    busy_ = false;
    wake = !queue_.empty();
  }
  if (wake) cv_.notify_all();  // ops queued meanwhile by other threads
}

void ProgressEngine::loop() {
  while (true) {
    Item item;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [this] { return (stopping_ || !queue_.empty()) && !busy_; });
      if (queue_.empty()) return;  // stopping, and everything queued has run
      item = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    run(*item.work, item.task);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      busy_ = false;
    }
  }
}

}  // namespace dtrain::collectives::detail
