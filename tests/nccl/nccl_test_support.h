#pragma once
// Fakes for testing the NCCL backend without a GPU: a GoogleMock CudaNcclApi
// with working defaults, a stream provider, a scripted bootstrap
// communicator, and CUDA-looking tensors at fake addresses (metadata only:
// the backend never dereferences them, and no ATen kernel runs on them).

#include <gmock/gmock.h>

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "src/collectives/nccl/nccl_api.h"
#include "src/collectives/nccl/nccl_communicator.h"
#include "tests/nccl/cuda_tensor_view.h"

namespace dtrain::collectives::testing {

using detail::CudaEvent;
using detail::CudaStream;
using detail::NcclComm;
using detail::NcclCommConfig;
using detail::NcclDataType;
using detail::NcclRedOp;
using detail::NcclSplit;
using detail::NcclUniqueId;

template <typename T>
T fake_handle(std::uintptr_t value) {
  return reinterpret_cast<T>(value);
}

inline const CudaStream kCommStream = fake_handle<CudaStream>(0x5000);
inline const CudaStream kCallerStream = fake_handle<CudaStream>(0xA000);
inline const NcclComm kComm = fake_handle<NcclComm>(0xC000);
inline const NcclComm kChildComm = fake_handle<NcclComm>(0xC100);
/// The split whose child is kChildComm (see split_child's default).
inline const NcclSplit kChildSplit = fake_handle<NcclSplit>(0xC100);

inline NcclUniqueId unique_id_filled_with(char value) {
  NcclUniqueId id;
  id.bytes.fill(value);
  return id;
}

class MockCudaNcclApi : public detail::CudaNcclApi {
 public:
  MOCK_METHOD(int, device_count, (), (override));
  MOCK_METHOD(int, get_device, (), (override));
  MOCK_METHOD(void, set_device, (int), (override));
  MOCK_METHOD(CudaStream, stream_create, (), (override));
  MOCK_METHOD(void, stream_destroy, (CudaStream), (override));
  MOCK_METHOD(CudaEvent, event_create, (), (override));
  MOCK_METHOD(void, event_destroy, (CudaEvent), (override));
  MOCK_METHOD(void, event_record, (CudaEvent, CudaStream), (override));
  MOCK_METHOD(bool, event_query, (CudaEvent), (override));
  MOCK_METHOD(void, stream_wait_event, (CudaStream, CudaEvent), (override));
  MOCK_METHOD(void*, device_malloc, (std::size_t), (override));
  MOCK_METHOD(void, device_free, (void*), (override));
  MOCK_METHOD(int, nccl_version, (), (override));
  MOCK_METHOD(int, nccl_header_version, (), (override));
  MOCK_METHOD(NcclUniqueId, get_unique_id, (), (override));
  MOCK_METHOD(NcclComm, comm_init_rank, (int, const NcclUniqueId&, int, const NcclCommConfig&),
              (override));
  MOCK_METHOD(NcclSplit, comm_split, (NcclComm, int, int, const NcclCommConfig&), (override));
  MOCK_METHOD(NcclComm, split_child, (NcclSplit), (override));
  MOCK_METHOD(int, comm_count, (NcclComm), (override));
  MOCK_METHOD(int, comm_user_rank, (NcclComm), (override));
  MOCK_METHOD(bool, comm_check_async_error, (NcclComm), (override));
  MOCK_METHOD(void, comm_finalize, (NcclComm), (override));
  MOCK_METHOD(void, comm_destroy, (NcclComm), (override));
  MOCK_METHOD(void, comm_abort, (NcclComm), (override));
  MOCK_METHOD(void, all_reduce,
              (const void*, void*, std::size_t, NcclDataType, NcclRedOp, NcclComm, CudaStream),
              (override));
  MOCK_METHOD(void, broadcast,
              (const void*, void*, std::size_t, NcclDataType, int, NcclComm, CudaStream),
              (override));
  MOCK_METHOD(void, all_gather,
              (const void*, void*, std::size_t, NcclDataType, NcclComm, CudaStream), (override));
  MOCK_METHOD(void, reduce_scatter,
              (const void*, void*, std::size_t, NcclDataType, NcclRedOp, NcclComm, CudaStream),
              (override));
  MOCK_METHOD(void, send, (const void*, std::size_t, NcclDataType, int, NcclComm, CudaStream),
              (override));
  MOCK_METHOD(void, recv, (void*, std::size_t, NcclDataType, int, NcclComm, CudaStream),
              (override));
  MOCK_METHOD(void, group_start, (), (override));
  MOCK_METHOD(void, group_end, (), (override));

  /// Defaults of a healthy machine with `devices` GPUs, where every op
  /// completes at once unless `gpu_done` is cleared.
  void install_defaults(int devices = 2) {
    using ::testing::_;
    using ::testing::Return;
    ON_CALL(*this, device_count()).WillByDefault(Return(devices));
    ON_CALL(*this, get_device()).WillByDefault([this] { return current_device.load(); });
    ON_CALL(*this, set_device(_)).WillByDefault([this](int d) { current_device.store(d); });
    ON_CALL(*this, stream_create()).WillByDefault(Return(kCommStream));
    ON_CALL(*this, event_create()).WillByDefault([this] {
      std::lock_guard<std::mutex> lock(mutex);
      created_events.push_back(fake_handle<CudaEvent>(0xE000 + 16 * created_events.size()));
      return created_events.back();
    });
    ON_CALL(*this, event_query(_)).WillByDefault([this](CudaEvent) { return gpu_done.load(); });
    ON_CALL(*this, device_malloc(_)).WillByDefault(Return(fake_handle<void*>(0xB000)));
    ON_CALL(*this, nccl_version()).WillByDefault(Return(22809));
    ON_CALL(*this, nccl_header_version()).WillByDefault(Return(22809));
    // A split's token is its child's handle, published at once by default.
    ON_CALL(*this, split_child(_)).WillByDefault([](NcclSplit split) {
      return reinterpret_cast<NcclComm>(split);
    });
    ON_CALL(*this, get_unique_id()).WillByDefault(Return(unique_id_filled_with('r')));
    ON_CALL(*this, comm_init_rank(_, _, _, _)).WillByDefault(Return(kComm));
    ON_CALL(*this, comm_check_async_error(_)).WillByDefault(Return(false));
  }

  std::vector<CudaEvent> events() {
    std::lock_guard<std::mutex> lock(mutex);
    return created_events;
  }

  std::atomic<int> current_device{0};
  std::atomic<bool> gpu_done{true};
  std::mutex mutex;
  std::vector<CudaEvent> created_events;
};

class FakeStreamProvider : public detail::CurrentStreamProvider {
 public:
  CudaStream current_stream(int device) override {
    last_device = device;
    return kCallerStream;
  }
  std::atomic<int> last_device{-1};
};

/// A bootstrap communicator that answers the two ops the NCCL bootstrap
/// uses, as the other ranks would: the failure-flag all_reduce (max) and the
/// unique-id broadcast from rank 0.
class FakeBootstrap : public Communicator {
 public:
  FakeBootstrap(int rank, int size) : rank_(rank), size_(size) { options_.name = "bootstrap"; }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return options_.name; }
  const CommunicatorOptions& options() const override { return options_; }
  bool failed() const override { return false; }

  std::shared_ptr<Work> all_reduce(const at::Tensor& tensor,
                                   const AllReduceOptions& options) override {
    ++all_reduce_calls;
    EXPECT_EQ(options.op, ReduceOp::kMax);
    flag_sent = *tensor.data_ptr<int>();
    if (another_rank_failed) *tensor.data_ptr<int>() = 1;
    return done();
  }
  std::shared_ptr<Work> broadcast(const at::Tensor& tensor,
                                  const BroadcastOptions& options) override {
    ++broadcast_calls;
    EXPECT_EQ(options.root, 0);
    EXPECT_TRUE(tensor.device().is_cpu());
    EXPECT_EQ(tensor.scalar_type(), at::kByte);
    EXPECT_EQ(static_cast<std::size_t>(tensor.numel()), sizeof(NcclUniqueId));
    std::memcpy(broadcast_sent.bytes.data(), tensor.data_ptr(), sizeof(NcclUniqueId));
    if (rank_ != 0) std::memcpy(tensor.data_ptr(), root_id.bytes.data(), sizeof(NcclUniqueId));
    return done();
  }
  std::shared_ptr<Work> all_gather(const at::Tensor&, const at::Tensor&,
                                   const AllGatherOptions&) override {
    return unused();
  }
  std::shared_ptr<Work> reduce_scatter(const at::Tensor&, const at::Tensor&,
                                       const ReduceScatterOptions&) override {
    return unused();
  }
  std::shared_ptr<Work> send(const at::Tensor&, int, const PointToPointOptions&) override {
    return unused();
  }
  std::shared_ptr<Work> recv(const at::Tensor&, int, const PointToPointOptions&) override {
    return unused();
  }
  std::shared_ptr<Work> batch_send_recv(const std::vector<P2POp>&,
                                        const BatchSendRecvOptions&) override {
    return unused();
  }
  std::shared_ptr<Work> barrier(const BarrierOptions&) override { return unused(); }
  std::shared_ptr<Communicator> split(int, int, const SplitOptions&) override {
    ADD_FAILURE() << "the NCCL bootstrap must not split";
    return nullptr;
  }

  bool another_rank_failed = false;
  NcclUniqueId root_id = unique_id_filled_with('0');  ///< what "rank 0" broadcasts
  NcclUniqueId broadcast_sent;                        ///< what this rank passed in
  int flag_sent = -1;
  int all_reduce_calls = 0;
  int broadcast_calls = 0;

 private:
  static std::shared_ptr<Work> done() {
    auto work = std::make_shared<Work>("fake bootstrap op");
    work->complete();
    return work;
  }
  static std::shared_ptr<Work> unused() {
    ADD_FAILURE() << "the NCCL bootstrap uses only all_reduce and broadcast";
    return done();
  }

  int rank_;
  int size_;
  CommunicatorOptions options_;
};

/// A CUDA-looking tensor at a fake address (see cuda_tensor_view.h).
inline at::Tensor fake_cuda_tensor(void* data, std::vector<std::int64_t> sizes,
                                   at::ScalarType dtype = at::kFloat, int device = 0,
                                   std::vector<std::int64_t> strides = {}) {
  return cuda_tensor_view(data, std::move(sizes), dtype, device, std::move(strides));
}

/// A descriptor of a CUDA buffer at a fake address.
inline detail::DeviceBuffer fake_buffer(std::uintptr_t address, std::size_t count,
                                        at::ScalarType dtype = at::kFloat, int device = 0) {
  detail::DeviceBuffer buffer;
  buffer.data = fake_handle<void*>(address);
  buffer.count = count;
  buffer.dtype = dtype;
  buffer.device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device));
  return buffer;
}

/// Hooks over `api` and `streams`, with a fast watchdog.
inline detail::NcclBackendHooks fake_hooks(std::shared_ptr<MockCudaNcclApi> api,
                                           std::shared_ptr<FakeStreamProvider> streams,
                                           int local_rank = 0) {
  detail::NcclBackendHooks hooks;
  hooks.api = std::move(api);
  hooks.streams = std::move(streams);
  hooks.launch.local_rank = local_rank;
  hooks.watchdog_interval = std::chrono::microseconds(200);
  return hooks;
}

/// Substring check with the full message on failure.
#define EXPECT_MESSAGE_HAS(message, needle) \
  EXPECT_NE(std::string(message).find(needle), std::string::npos) << (message)

}  // namespace dtrain::collectives::testing
