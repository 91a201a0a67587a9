#pragma once
// The NCCL backend of Communicator (CUDA tensors). Private: users get one from
// make_nccl_communicator() (dtrain/collectives/nccl.h) or split().
//
// Layers, each testable without a GPU:
//  * describe_tensor(): at::Tensor -> DeviceBuffer (pointer, count, dtype,
//    device, contiguity). The only place the backend looks at a tensor.
//  * NcclCommunicator::*_buffer(): the backend proper, on DeviceBuffers:
//    validation, dtype/op mapping, stream ordering, the in-flight queue and
//    the watchdog, all through CudaNcclApi (nccl_api.h).
//  * create_nccl_communicator(): bootstrap over a CPU communicator, with the
//    vendor API, stream provider and launch info injected.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/collectives/nccl.h"
#include "dtrain/env.h"  // LaunchInfo, ScopedEnvSetting
#include "src/collectives/nccl/current_stream.h"
#include "src/collectives/nccl/nccl_api.h"
#include "src/collectives/nccl/nccl_work.h"

namespace dtrain::collectives::detail {

/// What the backend needs to know of a tensor. Tests build these directly
/// (any pointer, any device index) to exercise the backend without CUDA.
struct DeviceBuffer {
  bool defined = true;
  void* data = nullptr;
  std::size_t count = 0;  ///< elements
  at::ScalarType dtype = at::kFloat;
  c10::Device device{c10::kCPU};
  bool strided = true;  ///< dense layout (not sparse, not mkldnn)
  bool contiguous = true;
};

/// One send or receive of NcclCommunicator::batch_send_recv_buffers.
struct P2PBufferOp {
  bool is_recv = false;
  DeviceBuffer buffer;
  int peer = -1;
  int tag = 0;
};

/// Reads a DeviceBuffer off `tensor` (metadata only: no kernel, no copy).
DeviceBuffer describe_tensor(const at::Tensor& tensor);

/// dtype -> NCCL type; InvalidArgument naming `op` and the supported dtypes.
NcclDataType nccl_data_type(at::ScalarType dtype, const char* op);
/// ReduceOp -> NCCL op; kAvg on an integer dtype is InvalidArgument.
NcclRedOp nccl_red_op(ReduceOp reduce, at::ScalarType dtype, const char* op);

/// Everything the backend takes from its surroundings, injectable.
struct NcclBackendHooks {
  std::shared_ptr<CudaNcclApi> api;
  std::shared_ptr<CurrentStreamProvider> streams;
  LaunchInfo launch;  ///< for NcclOptions::device = -1 and messages
  /// How often the watchdog checks completion events, async errors and
  /// deadlines while ops are in flight.
  std::chrono::microseconds watchdog_interval{2000};
};

/// Tensors an op keeps alive until it has finished on the GPU.
using KeepAlive = std::vector<at::Tensor>;

/// Polls comm_check_async_error() until the communicator's last
/// non-blocking call has settled. False if `deadline` passed first; throws
/// the API's CommError if the communicator failed.
bool wait_settled(CudaNcclApi& api, NcclComm comm, std::chrono::steady_clock::time_point deadline);

/// Polls `split` until NCCL publishes the child's handle (into *child, true)
/// or the deadline passes (false).
bool wait_for_child(CudaNcclApi& api, NcclSplit split,
                    std::chrono::steady_clock::time_point deadline, NcclComm* child);

/// Sets NCCL_ALGO for NCCL's initialization of a communicator (see
/// NcclOptions::algorithm); restores the previous value (or unsets it) when
/// destroyed. Does nothing for kAuto.
class ScopedNcclAlgo {
 public:
  explicit ScopedNcclAlgo(Algorithm algorithm);
  ScopedNcclAlgo(const ScopedNcclAlgo&) = delete;
  ScopedNcclAlgo& operator=(const ScopedNcclAlgo&) = delete;

  /// The NCCL_ALGO value for `algorithm`, nullptr for kAuto.
  static const char* value(Algorithm algorithm);

 private:
  std::optional<ScopedEnvSetting> setting_;  ///< dtrain/env.h
};

class NcclCommunicator final : public Communicator,
                               public std::enable_shared_from_this<NcclCommunicator> {
 public:
  /// Takes over `comm`, an initialized (settled) NCCL communicator on
  /// `device`: aborts it if construction fails, finalizes or aborts it when
  /// destroyed. Create with std::make_shared (Works hold weak references).
  NcclCommunicator(NcclComm comm, int rank, int size, int device, NcclOptions options,
                   NcclBackendHooks hooks);
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return options_.name; }
  const CommunicatorOptions& options() const override { return options_; }
  bool failed() const override { return failed_.load(); }

  std::shared_ptr<Work> all_reduce(const at::Tensor& tensor,
                                   const AllReduceOptions& options) override;
  std::shared_ptr<Work> broadcast(const at::Tensor& tensor,
                                  const BroadcastOptions& options) override;
  std::shared_ptr<Work> all_gather(const at::Tensor& output, const at::Tensor& input,
                                   const AllGatherOptions& options) override;
  std::shared_ptr<Work> reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                       const ReduceScatterOptions& options) override;
  std::shared_ptr<Work> send(const at::Tensor& tensor, int dst,
                             const PointToPointOptions& options) override;
  std::shared_ptr<Work> recv(const at::Tensor& tensor, int src,
                             const PointToPointOptions& options) override;
  std::shared_ptr<Work> batch_send_recv(const std::vector<P2POp>& ops,
                                        const BatchSendRecvOptions& options) override;
  std::shared_ptr<Work> barrier(const BarrierOptions& options) override;
  std::shared_ptr<Communicator> split(int color, int key, const SplitOptions& options) override;

  // The same ops on buffer descriptors; `keep` lives until the op finished.
  std::shared_ptr<Work> all_reduce_buffer(const DeviceBuffer& buffer,
                                          const AllReduceOptions& options, KeepAlive keep = {});
  std::shared_ptr<Work> broadcast_buffer(const DeviceBuffer& buffer,
                                         const BroadcastOptions& options, KeepAlive keep = {});
  std::shared_ptr<Work> all_gather_buffer(const DeviceBuffer& output, const DeviceBuffer& input,
                                          const AllGatherOptions& options, KeepAlive keep = {});
  std::shared_ptr<Work> reduce_scatter_buffer(const DeviceBuffer& output, const DeviceBuffer& input,
                                              const ReduceScatterOptions& options,
                                              KeepAlive keep = {});
  std::shared_ptr<Work> send_buffer(const DeviceBuffer& buffer, int dst,
                                    const PointToPointOptions& options, KeepAlive keep = {});
  std::shared_ptr<Work> recv_buffer(const DeviceBuffer& buffer, int src,
                                    const PointToPointOptions& options, KeepAlive keep = {});
  std::shared_ptr<Work> batch_send_recv_buffers(const std::vector<P2PBufferOp>& ops,
                                                const BatchSendRecvOptions& options,
                                                KeepAlive keep = {});

  int device() const noexcept { return device_; }
  /// The comm stream (for tests and diagnostics).
  CudaStream stream() const noexcept { return stream_; }
  const NcclOptions& nccl_options() const noexcept { return nccl_options_; }

  /// Advances the ops in flight once: completes those whose event fired;
  /// fails the communicator on an asynchronous NCCL error or a passed
  /// deadline. The watchdog calls it; so does a host-blocking Work::wait.
  void poll();

 private:
  struct InFlight {
    std::shared_ptr<NcclWork> work;
    std::chrono::steady_clock::time_point deadline;
    Timeout timeout;
    KeepAlive keep;
  };

  void check_buffer(const DeviceBuffer& buffer, const char* op, const char* which) const;
  void check_algorithm(const std::optional<Algorithm>& requested) const;
  /// reduce_scatter and all_gather: NCCL picks their algorithm; only unset
  /// or kAuto is accepted.
  static void check_no_algorithm(const char* op, const std::optional<Algorithm>& requested);
  std::shared_ptr<Work> point_to_point(const char* op, const DeviceBuffer& buffer, int peer,
                                       const PointToPointOptions& options, bool is_recv,
                                       KeepAlive keep);
  // Queues `ops` as one NCCL group (ncclGroupStart, a ncclSend/ncclRecv per
  // op in list order, ncclGroupEnd); `types` are the ops' NCCL dtypes.
  std::shared_ptr<Work> enqueue_p2p_group(const std::string& what,
                                          const std::vector<P2PBufferOp>& ops,
                                          const std::vector<NcclDataType>& types,
                                          std::optional<Timeout> timeout, KeepAlive keep);
  WaitMode default_wait_mode() const noexcept;
  std::shared_ptr<NcclWork> make_work(std::string description, CudaEvent done, WaitMode mode);
  // Queues an op: comm stream waits for the caller's stream, `launch` queues
  // the NCCL call on the comm stream, a completion event is recorded.
  std::shared_ptr<Work> enqueue(const std::string& what, std::optional<Timeout> timeout,
                                WaitMode mode, KeepAlive keep,
                                const std::function<void(CudaStream)>& launch);
  void progress_locked();
  void fail_locked(const std::string& reason, const NcclWork* culprit,
                   std::exception_ptr culprit_error);
  void abort_comm_locked() noexcept;
  void release_cuda_resources() noexcept;
  void watchdog_loop();

  std::shared_ptr<CudaNcclApi> api_;
  std::shared_ptr<CurrentStreamProvider> streams_;
  NcclBackendHooks hooks_;
  NcclOptions nccl_options_;
  CommunicatorOptions options_;
  int rank_;
  int size_;
  int device_;

  mutable std::mutex mutex_;  // guards everything below but failed_
  NcclComm comm_;             // nullptr once aborted or destroyed
  CudaStream stream_ = nullptr;
  CudaEvent ready_event_ = nullptr;  // reused: recorded on the caller's stream per op
  std::shared_ptr<EventPool> events_;
  void* barrier_buffer_ = nullptr;
  std::deque<InFlight> in_flight_;  // issue order = completion order
  std::atomic<bool> failed_{false};
  std::string failure_;
  std::vector<KeepAlive> graveyard_;  // tensors of aborted ops: never freed
  bool stop_ = false;
  std::condition_variable watchdog_cv_;
  std::thread watchdog_;  // last: started when everything else exists
};

/// make_nccl_communicator() with injected hooks (tests pass fakes).
std::shared_ptr<Communicator> create_nccl_communicator(Communicator& bootstrap, NcclOptions options,
                                                       NcclBackendHooks hooks);

}  // namespace dtrain::collectives::detail
