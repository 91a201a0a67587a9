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

void ProgressEngine::loop() {
  while (true) {
    Item item;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and everything queued has run
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    std::exception_ptr error;
    try {
      item.task();
    } catch (...) {
      error = std::current_exception();
    }
    item.task = nullptr;  // release captured tensors before waking the waiter
    item.work->complete(error);
  }
}

}  // namespace dtrain::collectives::detail
