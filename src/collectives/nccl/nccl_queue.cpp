// NcclCommunicator's lifecycle and its queue of ops in flight: creation and
// teardown of the CUDA/NCCL resources, queueing an op on the comm stream,
// completing it from its event, and failing the communicator on an NCCL
// error or a passed deadline. (The ops themselves: nccl_communicator.cpp.)
//
// Ordering, per op (all under mutex_, so ops queue in call order):
//
//   caller stream:  ... user kernels ... [record ready_event_]
//   comm stream:                     [wait ready_event_] [NCCL kernel] [record done]
//   caller stream (Work::wait):                                      [wait done] ...
//
// ready_event_ is reused for every op: cudaStreamWaitEvent captures the
// event's state when it is called, so re-recording it later is harmless.
// Completion events come from a pool and belong to the Work.
//
// The watchdog (one thread per communicator) wakes every
// hooks_.watchdog_interval while ops are in flight and runs
// progress_locked(): it completes ops whose event fired (in issue order, the
// order the stream runs them), fails everything on an asynchronous NCCL
// error, and aborts the NCCL communicator when an op outlives its deadline.
// An aborted communicator leaks the tensors of the ops it aborted (they go
// to graveyard_) rather than risk a kernel writing into reused memory.

#include <algorithm>
#include <thread>

#include "dtrain/error.h"
#include "src/collectives/nccl/nccl_communicator.h"

namespace dtrain::collectives::detail {

using Clock = std::chrono::steady_clock;

NcclCommunicator::NcclCommunicator(NcclComm comm, int rank, int size, int device,
                                   NcclOptions options, NcclBackendHooks hooks)
    : api_(hooks.api),
      streams_(hooks.streams),
      hooks_(std::move(hooks)),
      nccl_options_(std::move(options)),
      rank_(rank),
      size_(size),
      device_(device),
      comm_(comm) {
  options_.name = nccl_options_.name;
  options_.timeout = nccl_options_.timeout;
  options_.allreduce_algorithm = nccl_options_.algorithm;
  try {
    DeviceGuard guard(*api_, device_);
    stream_ = api_->stream_create();
    ready_event_ = api_->event_create();
    events_ = std::make_shared<EventPool>(api_, device_);
  } catch (...) {
    release_cuda_resources();
    abort_comm_locked();
    throw;
  }
  watchdog_ = std::thread([this] { watchdog_loop(); });
}

NcclCommunicator::~NcclCommunicator() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  watchdog_cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();

  std::unique_lock<std::mutex> lock(mutex_);
  // Ops still queued finish (or time out) first: their Works must complete,
  // and NCCL must not be torn down under a running kernel.
  while (!in_flight_.empty()) {
    progress_locked();
    if (in_flight_.empty()) break;
    lock.unlock();
    std::this_thread::sleep_for(hooks_.watchdog_interval);
    lock.lock();
  }
  if (!failed_.load() && comm_ != nullptr) {
    try {
      DeviceGuard guard(*api_, device_);
      api_->comm_finalize(comm_);
      if (!wait_settled(*api_, comm_, Clock::now() + options_.timeout)) {
        DTRAIN_THROW(TimeoutError, "ncclCommFinalize did not finish");
      }
      api_->comm_destroy(comm_);
      comm_ = nullptr;
    } catch (...) {
      abort_comm_locked();  // destructors never throw; abort frees it anyway
    }
  }
  // After an abort, kernels of the aborted ops may still reference the
  // stream and events: leave them (the job is ending anyway).
  if (!failed_.load()) release_cuda_resources();
}

void NcclCommunicator::release_cuda_resources() noexcept {
  try {
    DeviceGuard guard(*api_, device_);
    if (barrier_buffer_ != nullptr) api_->device_free(barrier_buffer_);
    if (ready_event_ != nullptr) api_->event_destroy(ready_event_);
    if (stream_ != nullptr) api_->stream_destroy(stream_);
  } catch (...) {
    // Never throw from cleanup; what was not freed leaks.
  }
  barrier_buffer_ = nullptr;
  ready_event_ = nullptr;
  stream_ = nullptr;
}

void NcclCommunicator::abort_comm_locked() noexcept {
  if (comm_ == nullptr) return;
  try {
    api_->comm_abort(comm_);
  } catch (...) {
    // Nothing more can be done for a communicator NCCL cannot abort.
  }
  comm_ = nullptr;
}

// --- queueing, completion, failure ----------------------------------------

std::shared_ptr<NcclWork> NcclCommunicator::make_work(std::string description, CudaEvent done,
                                                      WaitMode mode) {
  std::weak_ptr<NcclCommunicator> weak = weak_from_this();
  return std::make_shared<NcclWork>(std::move(description), api_, streams_, events_, done, device_,
                                    mode, [weak] {
                                      std::shared_ptr<NcclCommunicator> self = weak.lock();
                                      if (!self) return false;
                                      self->poll();
                                      return true;
                                    });
}

std::shared_ptr<Work> NcclCommunicator::enqueue(const std::string& what,
                                                std::optional<Timeout> timeout, WaitMode mode,
                                                KeepAlive keep,
                                                const std::function<void(CudaStream)>& launch) {
  const Timeout op_timeout = timeout.value_or(options_.timeout);
  DTRAIN_CHECK_ARG(op_timeout.count() > 0, what, ": timeout must be positive, got ",
                   op_timeout.count(), " ms");
  std::string description = what + " on communicator '" + options_.name + "'";
  std::unique_lock<std::mutex> lock(mutex_);
  if (failed_.load()) {
    auto work = make_work(description, nullptr, mode);
    work->complete(std::make_exception_ptr(
        CommError(::dtrain::detail::str_cat(description, " was not run: communicator '",
                                            options_.name, "' failed earlier: ", failure_))));
    return work;
  }
  const auto deadline = Clock::now() + op_timeout;
  CudaEvent done = nullptr;
  try {
    DeviceGuard guard(*api_, device_);
    api_->event_record(ready_event_, streams_->current_stream(device_));
    api_->stream_wait_event(stream_, ready_event_);
    launch(stream_);
    // A non-blocking communicator may still be connecting: the next NCCL
    // call must wait until it has settled.
    if (!wait_settled(*api_, comm_, deadline)) {
      DTRAIN_THROW(TimeoutError, "NCCL did not accept the op within ", op_timeout.count(), " ms");
    }
    done = events_->acquire();
    api_->event_record(done, stream_);
  } catch (const std::exception& e) {
    events_->release(done);
    auto work = make_work(description, nullptr, mode);
    const std::string reason = ::dtrain::detail::str_cat(description, " failed: ", e.what());
    std::exception_ptr error = dynamic_cast<const TimeoutError*>(&e) != nullptr
                                   ? std::make_exception_ptr(TimeoutError(reason))
                                   : std::make_exception_ptr(CommError(reason));
    in_flight_.push_back(InFlight{work, deadline, op_timeout, std::move(keep)});
    fail_locked(reason, work.get(), error);
    return work;
  }
  auto work = make_work(std::move(description), done, mode);
  in_flight_.push_back(InFlight{work, deadline, op_timeout, std::move(keep)});
  lock.unlock();
  watchdog_cv_.notify_one();
  return work;
}

void NcclCommunicator::poll() {
  std::lock_guard<std::mutex> lock(mutex_);
  progress_locked();
}

void NcclCommunicator::progress_locked() {
  if (failed_.load() || in_flight_.empty()) return;
  try {
    api_->comm_check_async_error(comm_);
    while (!in_flight_.empty() && api_->event_query(in_flight_.front().work->done_event())) {
      in_flight_.front().work->complete();
      in_flight_.pop_front();  // releases the tensors: the GPU is done with them
    }
  } catch (const std::exception& e) {
    fail_locked(e.what(), nullptr, nullptr);
    return;
  }
  const auto now = Clock::now();
  for (const InFlight& op : in_flight_) {
    if (now < op.deadline) continue;
    const std::string reason = ::dtrain::detail::str_cat(
        "NCCL ", op.work->description(), " (rank ", rank_, " of ", size_, ", cuda:", device_,
        ") did not complete within ", op.timeout.count(),
        " ms; the NCCL communicator was aborted. NCCL cannot tell which rank is missing: look "
        "for a rank that failed, hung, or issued a different op");
    fail_locked(reason, op.work.get(), std::make_exception_ptr(TimeoutError(reason)));
    return;
  }
}

void NcclCommunicator::fail_locked(const std::string& reason, const NcclWork* culprit,
                                   std::exception_ptr culprit_error) {
  if (failed_.load()) return;
  failure_ = reason;
  failed_.store(true);
  abort_comm_locked();
  for (InFlight& op : in_flight_) {
    graveyard_.push_back(std::move(op.keep));
    if (op.work.get() == culprit) {
      op.work->complete(culprit_error);
    } else if (culprit == nullptr) {
      op.work->complete(std::make_exception_ptr(
          CommError(::dtrain::detail::str_cat(op.work->description(), " failed: ", reason))));
    } else {
      op.work->complete(std::make_exception_ptr(CommError(::dtrain::detail::str_cat(
          op.work->description(), " was aborted with its communicator: ", reason))));
    }
  }
  in_flight_.clear();
}

void NcclCommunicator::watchdog_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    if (in_flight_.empty()) {
      watchdog_cv_.wait(lock, [this] { return stop_ || !in_flight_.empty(); });
    } else {
      watchdog_cv_.wait_for(lock, hooks_.watchdog_interval);
    }
    if (stop_) break;
    progress_locked();
  }
}

namespace {

// Polls `busy` with a growing sleep (1 us to 1 ms) until it says false (true)
// or the deadline passes (false).
template <typename Busy>
bool poll_until(Busy busy, Clock::time_point deadline) {
  auto sleep = std::chrono::microseconds(1);
  while (busy()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::microseconds(1000));
  }
  return true;
}

}  // namespace

bool wait_settled(CudaNcclApi& api, NcclComm comm, Clock::time_point deadline) {
  return poll_until([&] { return api.comm_check_async_error(comm); }, deadline);
}

bool wait_for_child(CudaNcclApi& api, NcclSplit split, Clock::time_point deadline,
                    NcclComm* child) {
  return poll_until([&] { return (*child = api.split_child(split)) == nullptr; }, deadline);
}

}  // namespace dtrain::collectives::detail
