#pragma once
// NcclWork: the Work of an NCCL op, and the pool of CUDA events it borrows
// its completion event from.

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "dtrain/collectives/work.h"
#include "src/collectives/nccl/current_stream.h"
#include "src/collectives/nccl/nccl_api.h"

namespace dtrain::collectives::detail {

/// Reuses CUDA events of one device: creating one per op would allocate on
/// the hot path. Thread-safe. Outlives the communicator when Works do.
class EventPool {
 public:
  EventPool(std::shared_ptr<CudaNcclApi> api, int device);
  ~EventPool();  // destroys the pooled events; never throws
  EventPool(const EventPool&) = delete;
  EventPool& operator=(const EventPool&) = delete;

  /// A free event, created if none is pooled. The caller's current device
  /// must be the pool's (events belong to a device).
  CudaEvent acquire();
  /// Gives `event` back; it may still be pending on the GPU.
  void release(CudaEvent event) noexcept;

 private:
  std::shared_ptr<CudaNcclApi> api_;
  int device_;
  std::mutex mutex_;
  std::vector<CudaEvent> free_;
};

/// How Work::wait() waits. See the stream contract in dtrain/collectives/nccl.h.
enum class WaitMode {
  kStream,  ///< the caller's current stream waits for the completion event
  kHost,    ///< the host polls until the op has finished
};

class NcclWork final : public Work {
 public:
  /// `done` (may be null for a Work that failed before it was queued) is
  /// recorded on the comm stream after the op and given back to `pool` when
  /// the Work is destroyed. `poll` advances the communicator (completion,
  /// errors, deadlines) and returns false once the communicator is gone.
  NcclWork(std::string description, std::shared_ptr<CudaNcclApi> api,
           std::shared_ptr<CurrentStreamProvider> streams, std::shared_ptr<EventPool> pool,
           CudaEvent done, int device, WaitMode mode, std::function<bool()> poll);
  ~NcclWork() override;

  void wait(std::optional<Timeout> timeout = std::nullopt) override;

  CudaEvent done_event() const noexcept { return done_; }

 private:
  void wait_on_stream();
  void wait_on_host(std::optional<Timeout> timeout);

  std::shared_ptr<CudaNcclApi> api_;
  std::shared_ptr<CurrentStreamProvider> streams_;
  std::shared_ptr<EventPool> pool_;
  CudaEvent done_;
  int device_;
  WaitMode mode_;
  std::function<bool()> poll_;
};

}  // namespace dtrain::collectives::detail
