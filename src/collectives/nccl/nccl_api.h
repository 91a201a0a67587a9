#pragma once
// The thin vendor interface of the NCCL backend: exactly the CUDA runtime and
// NCCL calls the backend makes, one virtual method each, so that the backend
// logic (bootstrap, ordering, watchdog, error handling) runs against
// GoogleMock fakes on machines without a GPU.
//
// The real implementation (nccl_api.cpp) is the only file that includes
// <nccl.h> or <cuda_runtime.h> and the one place where ncclResult_t and
// cudaError_t become dtrain errors: every failing call throws CommError
// "<call> failed: <vendor message>". Handles are the vendor's own pointer
// types, forward-declared, so nothing here needs the vendor headers.
//
// NCCL communicators are created non-blocking (NcclCommConfig::blocking =
// false): calls may return before NCCL has finished, and the caller polls
// comm_check_async_error() until it reports the communicator settled.

#include <array>
#include <cstddef>
#include <memory>
#include <string>

#include "dtrain/collectives/types.h"
#include "dtrain/error.h"

// The vendor's opaque handle types (cudaStream_t, cudaEvent_t, ncclComm_t
// are pointers to these).
struct CUstream_st;
struct CUevent_st;
struct ncclComm;

namespace dtrain::collectives::detail {

using CudaStream = CUstream_st*;  ///< cudaStream_t; nullptr is the legacy default stream.
using CudaEvent = CUevent_st*;    ///< cudaEvent_t
using NcclComm = ncclComm*;       ///< ncclComm_t; nullptr is "no communicator".
struct NcclSplitOp;
/// A split in flight (comm_split); nullptr for a rank that gets no child.
using NcclSplit = NcclSplitOp*;

/// ncclDataType_t, with NCCL's values (checked in nccl_api.cpp).
enum class NcclDataType : int {
  kUint8 = 1,
  kInt32 = 2,
  kInt64 = 4,
  kFloat16 = 6,
  kFloat32 = 7,
  kFloat64 = 8,
  kBfloat16 = 9,
};

/// ncclRedOp_t, with NCCL's values (checked in nccl_api.cpp).
enum class NcclRedOp : int {
  kSum = 0,
  kProd = 1,
  kMax = 2,
  kMin = 3,
  kAvg = 4,
};

const char* to_string(NcclDataType type);
const char* to_string(NcclRedOp op);

/// ncclUniqueId: NCCL_UNIQUE_ID_BYTES opaque bytes (size checked in nccl_api.cpp).
struct NcclUniqueId {
  std::array<char, 128> bytes{};
};

/// NCCL_SPLIT_NOCOLOR: the rank takes part in the split but gets no communicator.
constexpr int kNcclSplitNoColor = -1;

/// What goes into ncclConfig_t.
struct NcclCommConfig {
  bool blocking = false;
  std::string name;  ///< commName, where the NCCL version has it
};

class CudaNcclApi {
 public:
  virtual ~CudaNcclApi() = default;

  // --- CUDA runtime -------------------------------------------------------
  /// cudaGetDeviceCount. Throws CommError (with CUDA's message) on any error,
  /// including "no driver"; callers that only ask "is there a GPU" catch it.
  virtual int device_count() = 0;
  virtual int get_device() = 0;                 ///< cudaGetDevice
  virtual void set_device(int device) = 0;      ///< cudaSetDevice
  virtual CudaStream stream_create() = 0;       ///< cudaStreamCreateWithFlags(NonBlocking)
  virtual void stream_destroy(CudaStream) = 0;  ///< cudaStreamDestroy
  virtual CudaEvent event_create() = 0;         ///< cudaEventCreateWithFlags(DisableTiming)
  virtual void event_destroy(CudaEvent) = 0;    ///< cudaEventDestroy
  virtual void event_record(CudaEvent event, CudaStream stream) = 0;  ///< cudaEventRecord
  /// cudaEventQuery: true once the event has completed, false while pending.
  virtual bool event_query(CudaEvent event) = 0;
  /// cudaStreamWaitEvent: work queued later on `stream` waits for `event`.
  virtual void stream_wait_event(CudaStream stream, CudaEvent event) = 0;
  virtual void* device_malloc(std::size_t bytes) = 0;  ///< cudaMalloc
  virtual void device_free(void* pointer) = 0;         ///< cudaFree

  // --- NCCL: communicators ------------------------------------------------
  virtual int nccl_version() = 0;  ///< ncclGetVersion (e.g. 22809)
  /// NCCL_VERSION_CODE of the nccl.h dtrain was compiled against.
  virtual int nccl_header_version() = 0;
  virtual NcclUniqueId get_unique_id() = 0;  ///< ncclGetUniqueId
  /// ncclCommInitRankConfig on the current device.
  virtual NcclComm comm_init_rank(int nranks, const NcclUniqueId& id, int rank,
                                  const NcclCommConfig& config) = 0;
  /// ncclCommSplit, non-blocking; `color` may be kNcclSplitNoColor (then it
  /// returns nullptr). NCCL publishes the child's handle only when the split
  /// has completed, from its own thread: poll split_child().
  virtual NcclSplit comm_split(NcclComm comm, int color, int key, const NcclCommConfig& config) = 0;
  /// The child communicator of `split`, or nullptr while NCCL has not
  /// published it yet. Never blocks.
  virtual NcclComm split_child(NcclSplit split) = 0;
  virtual int comm_count(NcclComm comm) = 0;      ///< ncclCommCount
  virtual int comm_user_rank(NcclComm comm) = 0;  ///< ncclCommUserRank
  /// ncclCommGetAsyncError: returns true while the communicator's last
  /// non-blocking call is still in progress, false when it is settled; throws
  /// CommError with NCCL's message (and ncclGetLastError) if it has failed.
  virtual bool comm_check_async_error(NcclComm comm) = 0;
  virtual void comm_finalize(NcclComm comm) = 0;  ///< ncclCommFinalize
  virtual void comm_destroy(NcclComm comm) = 0;   ///< ncclCommDestroy
  virtual void comm_abort(NcclComm comm) = 0;     ///< ncclCommAbort

  // --- NCCL: operations (queued on `stream`) ------------------------------
  virtual void all_reduce(const void* send, void* recv, std::size_t count, NcclDataType type,
                          NcclRedOp op, NcclComm comm, CudaStream stream) = 0;
  virtual void broadcast(const void* send, void* recv, std::size_t count, NcclDataType type,
                         int root, NcclComm comm, CudaStream stream) = 0;
  virtual void all_gather(const void* send, void* recv, std::size_t send_count, NcclDataType type,
                          NcclComm comm, CudaStream stream) = 0;
  virtual void reduce_scatter(const void* send, void* recv, std::size_t recv_count,
                              NcclDataType type, NcclRedOp op, NcclComm comm,
                              CudaStream stream) = 0;
  virtual void send(const void* data, std::size_t count, NcclDataType type, int peer, NcclComm comm,
                    CudaStream stream) = 0;
  virtual void recv(void* data, std::size_t count, NcclDataType type, int peer, NcclComm comm,
                    CudaStream stream) = 0;
  virtual void group_start() = 0;  ///< ncclGroupStart
  virtual void group_end() = 0;    ///< ncclGroupEnd

 protected:
  CudaNcclApi() = default;
};

/// The real implementation, over libcudart and libnccl.
std::shared_ptr<CudaNcclApi> make_real_cuda_nccl_api();

/// The error the real implementation throws for an NCCL status `code`
/// (an ncclResult_t value) returned by `call`: CommError "<call> failed:
/// <ncclGetErrorString(code)>[: <detail>]". Exposed for tests.
CommError nccl_error(int code, const char* call, const std::string& detail = {});
/// Same for a CUDA runtime status (a cudaError_t value), with cudaGetErrorString.
CommError cuda_error(int code, const char* call);

/// Sets `device` as the calling thread's current CUDA device for the scope
/// and restores the previous one afterwards (never throws from the destructor).
class DeviceGuard {
 public:
  DeviceGuard(CudaNcclApi& api, int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  CudaNcclApi& api_;
  int previous_ = -1;
  bool changed_ = false;
};

}  // namespace dtrain::collectives::detail
