#include "src/collectives/nccl/nccl_work.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "dtrain/error.h"

namespace dtrain::collectives::detail {

EventPool::EventPool(std::shared_ptr<CudaNcclApi> api, int device)
    : api_(std::move(api)), device_(device) {}

EventPool::~EventPool() {
  for (CudaEvent event : free_) {
    try {
      api_->event_destroy(event);
    } catch (...) {
      // Never throw from a destructor; the event leaks.
    }
  }
}

CudaEvent EventPool::acquire() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_.empty()) {
      CudaEvent event = free_.back();
      free_.pop_back();
      return event;
    }
  }
  return api_->event_create();
}

void EventPool::release(CudaEvent event) noexcept {
  if (event == nullptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  try {
    free_.push_back(event);
  } catch (...) {
    // Out of memory: let the event leak rather than throw.
  }
}

NcclWork::NcclWork(std::string description, std::shared_ptr<CudaNcclApi> api,
                   std::shared_ptr<CurrentStreamProvider> streams, std::shared_ptr<EventPool> pool,
                   CudaEvent done, int device, WaitMode mode, std::function<bool()> poll)
    : Work(std::move(description)),
      api_(std::move(api)),
      streams_(std::move(streams)),
      pool_(std::move(pool)),
      done_(done),
      device_(device),
      mode_(mode),
      poll_(std::move(poll)) {}

NcclWork::~NcclWork() {
  if (pool_) pool_->release(done_);
}

void NcclWork::wait(std::optional<Timeout> timeout) {
  if (mode_ == WaitMode::kStream) {
    wait_on_stream();
  } else {
    wait_on_host(timeout);
  }
}

void NcclWork::wait_on_stream() {
  if (!is_completed() && done_ != nullptr) {
    // Order the caller's stream after the op. The legacy default stream
    // (nullptr) means the current device's, hence the guard.
    DeviceGuard guard(*api_, device_);
    api_->stream_wait_event(streams_->current_stream(device_), done_);
  }
  if (std::exception_ptr e = error()) std::rethrow_exception(e);
}

void NcclWork::wait_on_host(std::optional<Timeout> timeout) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  // Poll with a growing sleep: small ops finish within microseconds, and a
  // long wait should not burn a core.
  auto sleep = std::chrono::microseconds(5);
  while (!is_completed()) {
    const bool communicator_alive = poll_ && poll_();
    if (is_completed()) break;
    const auto waited = std::chrono::duration_cast<Timeout>(Clock::now() - start);
    if (timeout && waited >= *timeout) {
      DTRAIN_THROW(TimeoutError, "Work::wait: ", description(), " still running after ",
                   timeout->count(), " ms");
    }
    if (!communicator_alive) {
      // The communicator is gone; its destructor completed or will complete
      // every Work, so the plain wait ends.
      Work::wait(timeout ? std::optional<Timeout>(*timeout - waited) : std::nullopt);
      return;
    }
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::microseconds(1000));
  }
  if (std::exception_ptr e = error()) std::rethrow_exception(e);
}

}  // namespace dtrain::collectives::detail
