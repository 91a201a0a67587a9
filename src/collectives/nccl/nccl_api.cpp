// RealCudaNcclApi: CudaNcclApi over libcudart and libnccl. The only file of
// dtrain that includes the vendor headers, and the one place where their
// status codes become dtrain errors.

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "src/collectives/nccl/nccl_api.h"

namespace dtrain::collectives::detail {

// Our mirrors of NCCL's enums and handles must match NCCL's, value for value.
static_assert(static_cast<int>(NcclDataType::kUint8) == ncclUint8);
static_assert(static_cast<int>(NcclDataType::kInt32) == ncclInt32);
static_assert(static_cast<int>(NcclDataType::kInt64) == ncclInt64);
static_assert(static_cast<int>(NcclDataType::kFloat16) == ncclFloat16);
static_assert(static_cast<int>(NcclDataType::kFloat32) == ncclFloat32);
static_assert(static_cast<int>(NcclDataType::kFloat64) == ncclFloat64);
static_assert(static_cast<int>(NcclDataType::kBfloat16) == ncclBfloat16);
static_assert(static_cast<int>(NcclRedOp::kSum) == ncclSum);
static_assert(static_cast<int>(NcclRedOp::kProd) == ncclProd);
static_assert(static_cast<int>(NcclRedOp::kMax) == ncclMax);
static_assert(static_cast<int>(NcclRedOp::kMin) == ncclMin);
static_assert(static_cast<int>(NcclRedOp::kAvg) == ncclAvg);
static_assert(kNcclSplitNoColor == NCCL_SPLIT_NOCOLOR);
static_assert(sizeof(NcclUniqueId) == sizeof(ncclUniqueId));
static_assert(std::is_same_v<CudaStream, cudaStream_t>);
static_assert(std::is_same_v<CudaEvent, cudaEvent_t>);
static_assert(std::is_same_v<NcclComm, ncclComm_t>);

CommError nccl_error(int code, const char* call, const std::string& detail) {
  std::string message = ::dtrain::detail::str_cat(
      call, " failed: ", ncclGetErrorString(static_cast<ncclResult_t>(code)));
  if (!detail.empty()) message += ": " + detail;
  return CommError(message);
}

CommError cuda_error(int code, const char* call) {
  const auto error = static_cast<cudaError_t>(code);
  return CommError(::dtrain::detail::str_cat(call, " failed: ", cudaGetErrorString(error), " (",
                                             cudaGetErrorName(error), ")"));
}

const char* to_string(NcclDataType type) {
  switch (type) {
    case NcclDataType::kUint8:
      return "ncclUint8";
    case NcclDataType::kInt32:
      return "ncclInt32";
    case NcclDataType::kInt64:
      return "ncclInt64";
    case NcclDataType::kFloat16:
      return "ncclFloat16";
    case NcclDataType::kFloat32:
      return "ncclFloat32";
    case NcclDataType::kFloat64:
      return "ncclFloat64";
    case NcclDataType::kBfloat16:
      return "ncclBfloat16";
  }
  return "unknown";
}

const char* to_string(NcclRedOp op) {
  switch (op) {
    case NcclRedOp::kSum:
      return "ncclSum";
    case NcclRedOp::kProd:
      return "ncclProd";
    case NcclRedOp::kMax:
      return "ncclMax";
    case NcclRedOp::kMin:
      return "ncclMin";
    case NcclRedOp::kAvg:
      return "ncclAvg";
  }
  return "unknown";
}

DeviceGuard::DeviceGuard(CudaNcclApi& api, int device) : api_(api) {
  previous_ = api_.get_device();
  if (previous_ != device) {
    api_.set_device(device);
    changed_ = true;
  }
}

DeviceGuard::~DeviceGuard() {
  if (!changed_) return;
  try {
    api_.set_device(previous_);
  } catch (...) {
    // Destructors never throw; the thread stays on our device.
  }
}

namespace {

// ncclInProgress is not a failure: the communicators are non-blocking, and
// the backend polls comm_check_async_error() until they settle.
void check_nccl(ncclResult_t result, const char* call, ncclComm_t comm = nullptr) {
  if (result == ncclSuccess || result == ncclInProgress) return;
  const char* last = ncclGetLastError(comm);
  throw nccl_error(result, call, last != nullptr ? last : "");
}

void check_cuda(cudaError_t result, const char* call) {
  if (result == cudaSuccess) return;
  (void)cudaGetLastError();  // reset CUDA's last error so that later calls do not report it
  throw cuda_error(result, call);
}

// Where NCCL puts a new communicator. A non-blocking ncclCommInitRankConfig
// or ncclCommSplit stores the handle into the caller's ncclComm_t* once more
// when it completes, from NCCL's own thread (init.cc: `__atomic_store_n(
// job->newcomm, comm, ...)`): a local variable would be written after its
// frame is gone (seen as "stack smashing" in a split on an H200). So the
// handle, and the name the config points to, live in a slot that is kept
// until the communicator is destroyed or aborted.
struct CommSlot {
  ncclComm_t comm = nullptr;
  std::string name;
};

ncclConfig_t make_config(const NcclCommConfig& config, const CommSlot& slot) {
  ncclConfig_t c = NCCL_CONFIG_INITIALIZER;
  c.blocking = config.blocking ? 1 : 0;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 27, 0)
  c.commName = slot.name.empty() ? nullptr : slot.name.c_str();
#else
  (void)slot;
#endif
  return c;
}

class RealCudaNcclApi final : public CudaNcclApi {
 public:
  int device_count() override {
    int count = 0;
    check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    return count;
  }
  int get_device() override {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    return device;
  }
  void set_device(int device) override { check_cuda(cudaSetDevice(device), "cudaSetDevice"); }
  CudaStream stream_create() override {
    cudaStream_t stream = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
               "cudaStreamCreateWithFlags");
    return stream;
  }
  void stream_destroy(CudaStream stream) override {
    check_cuda(cudaStreamDestroy(stream), "cudaStreamDestroy");
  }
  CudaEvent event_create() override {
    cudaEvent_t event = nullptr;
    check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
               "cudaEventCreateWithFlags");
    return event;
  }
  void event_destroy(CudaEvent event) override {
    check_cuda(cudaEventDestroy(event), "cudaEventDestroy");
  }
  void event_record(CudaEvent event, CudaStream stream) override {
    check_cuda(cudaEventRecord(event, stream), "cudaEventRecord");
  }
  bool event_query(CudaEvent event) override {
    const cudaError_t result = cudaEventQuery(event);
    if (result == cudaErrorNotReady) return false;
    check_cuda(result, "cudaEventQuery");
    return true;
  }
  void stream_wait_event(CudaStream stream, CudaEvent event) override {
    check_cuda(cudaStreamWaitEvent(stream, event, 0), "cudaStreamWaitEvent");
  }
  void* device_malloc(std::size_t bytes) override {
    void* pointer = nullptr;
    check_cuda(cudaMalloc(&pointer, bytes), "cudaMalloc");
    return pointer;
  }
  void device_free(void* pointer) override { check_cuda(cudaFree(pointer), "cudaFree"); }

  int nccl_version() override {
    int version = 0;
    check_nccl(ncclGetVersion(&version), "ncclGetVersion");
    return version;
  }
  int nccl_header_version() override { return NCCL_VERSION_CODE; }
  NcclUniqueId get_unique_id() override {
    ncclUniqueId id;
    check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    NcclUniqueId out;
    std::memcpy(out.bytes.data(), &id, sizeof(id));
    return out;
  }
  NcclComm comm_init_rank(int nranks, const NcclUniqueId& id, int rank,
                          const NcclCommConfig& config) override {
    ncclUniqueId nccl_id;
    std::memcpy(&nccl_id, id.bytes.data(), sizeof(nccl_id));
    CommSlot* slot = new_slot(config);
    ncclConfig_t c = make_config(config, *slot);
    const ncclResult_t result = ncclCommInitRankConfig(&slot->comm, nranks, nccl_id, rank, &c);
    return settle_slot(slot, result, "ncclCommInitRankConfig");
  }
  NcclSplit comm_split(NcclComm comm, int color, int key, const NcclCommConfig& config) override {
    CommSlot* slot = new_slot(config);
    ncclConfig_t c = make_config(config, *slot);
    const ncclResult_t result = ncclCommSplit(comm, color, key, &slot->comm, &c);
    // Without a color NCCL starts no job that could write the slot later.
    if (color == NCCL_SPLIT_NOCOLOR || (result != ncclSuccess && result != ncclInProgress)) {
      release_slot(slot);
    }
    check_nccl(result, "ncclCommSplit", comm);
    return color == NCCL_SPLIT_NOCOLOR ? nullptr : reinterpret_cast<NcclSplit>(slot);
  }
  NcclComm split_child(NcclSplit split) override {
    // The slot stays alive until the child is destroyed or aborted, or for
    // good if the split never completes (NCCL may still write it then).
    return __atomic_load_n(&reinterpret_cast<CommSlot*>(split)->comm, __ATOMIC_ACQUIRE);
  }
  int comm_count(NcclComm comm) override {
    int count = 0;
    check_nccl(ncclCommCount(comm, &count), "ncclCommCount", comm);
    return count;
  }
  int comm_user_rank(NcclComm comm) override {
    int rank = 0;
    check_nccl(ncclCommUserRank(comm, &rank), "ncclCommUserRank", comm);
    return rank;
  }
  bool comm_check_async_error(NcclComm comm) override {
    ncclResult_t state = ncclSuccess;
    check_nccl(ncclCommGetAsyncError(comm, &state), "ncclCommGetAsyncError", comm);
    if (state == ncclInProgress) return true;
    if (state != ncclSuccess) {
      const char* last = ncclGetLastError(comm);
      throw nccl_error(state, "NCCL communicator (asynchronous error)",
                       last != nullptr ? last : "");
    }
    return false;
  }
  void comm_finalize(NcclComm comm) override {
    check_nccl(ncclCommFinalize(comm), "ncclCommFinalize", comm);
  }
  void comm_destroy(NcclComm comm) override {
    const ncclResult_t result = ncclCommDestroy(comm);
    release_slot_of(comm);
    check_nccl(result, "ncclCommDestroy");
  }
  void comm_abort(NcclComm comm) override {
    const ncclResult_t result = ncclCommAbort(comm);
    release_slot_of(comm);
    check_nccl(result, "ncclCommAbort");
  }

  void all_reduce(const void* send, void* recv, std::size_t count, NcclDataType type, NcclRedOp op,
                  NcclComm comm, CudaStream stream) override {
    check_nccl(ncclAllReduce(send, recv, count, nccl_type(type), nccl_op(op), comm, stream),
               "ncclAllReduce", comm);
  }
  void broadcast(const void* send, void* recv, std::size_t count, NcclDataType type, int root,
                 NcclComm comm, CudaStream stream) override {
    check_nccl(ncclBroadcast(send, recv, count, nccl_type(type), root, comm, stream),
               "ncclBroadcast", comm);
  }
  void all_gather(const void* send, void* recv, std::size_t send_count, NcclDataType type,
                  NcclComm comm, CudaStream stream) override {
    check_nccl(ncclAllGather(send, recv, send_count, nccl_type(type), comm, stream),
               "ncclAllGather", comm);
  }
  void reduce_scatter(const void* send, void* recv, std::size_t recv_count, NcclDataType type,
                      NcclRedOp op, NcclComm comm, CudaStream stream) override {
    check_nccl(
        ncclReduceScatter(send, recv, recv_count, nccl_type(type), nccl_op(op), comm, stream),
        "ncclReduceScatter", comm);
  }
  void send(const void* data, std::size_t count, NcclDataType type, int peer, NcclComm comm,
            CudaStream stream) override {
    check_nccl(ncclSend(data, count, nccl_type(type), peer, comm, stream), "ncclSend", comm);
  }
  void recv(void* data, std::size_t count, NcclDataType type, int peer, NcclComm comm,
            CudaStream stream) override {
    check_nccl(ncclRecv(data, count, nccl_type(type), peer, comm, stream), "ncclRecv", comm);
  }
  void group_start() override { check_nccl(ncclGroupStart(), "ncclGroupStart"); }
  void group_end() override { check_nccl(ncclGroupEnd(), "ncclGroupEnd"); }

 private:
  CommSlot* new_slot(const NcclCommConfig& config) {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    slots_.push_back(std::make_unique<CommSlot>());
    slots_.back()->name = config.name;
    return slots_.back().get();
  }
  // The handle an initialization returned at once (NCCL stores it again when
  // the initialization completes); the slot stays while NCCL may write it.
  NcclComm settle_slot(CommSlot* slot, ncclResult_t result, const char* call) {
    ncclComm_t comm = __atomic_load_n(&slot->comm, __ATOMIC_ACQUIRE);
    if (result != ncclSuccess && result != ncclInProgress) {
      if (comm == nullptr) release_slot(slot);
      check_nccl(result, call, comm);
    }
    return comm;
  }
  void release_slot(CommSlot* slot) {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    slots_.erase(std::remove_if(slots_.begin(), slots_.end(),
                                [slot](const auto& s) { return s.get() == slot; }),
                 slots_.end());
  }
  void release_slot_of(ncclComm_t comm) {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    slots_.erase(std::remove_if(slots_.begin(), slots_.end(),
                                [comm](const auto& s) {
                                  return __atomic_load_n(&s->comm, __ATOMIC_ACQUIRE) == comm;
                                }),
                 slots_.end());
  }

  std::mutex slots_mutex_;
  std::vector<std::unique_ptr<CommSlot>> slots_;

  static ncclDataType_t nccl_type(NcclDataType type) {
    return static_cast<ncclDataType_t>(static_cast<int>(type));
  }
  static ncclRedOp_t nccl_op(NcclRedOp op) {
    return static_cast<ncclRedOp_t>(static_cast<int>(op));
  }
};

}  // namespace

std::shared_ptr<CudaNcclApi> make_real_cuda_nccl_api() {
  return std::make_shared<RealCudaNcclApi>();
}

}  // namespace dtrain::collectives::detail
