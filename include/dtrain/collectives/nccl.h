#pragma once
// The NCCL backend of Communicator: collectives on CUDA tensors.
//
// Available when this build of dtrain contains it: `DTRAIN_HAVE_NCCL` in
// "dtrain/config.h" is 1, and the program links `dtrain::nccl`. The MPI
// backend (Runtime::world) stays the bootstrap and the CPU path; an NCCL
// communicator is created over an existing MPI communicator:
//
//   dtrain::Runtime runtime(&argc, &argv);
//   auto world = runtime.world();
//   NcclOptions options;
//   options.name = "gpu-world";
//   auto gpu = make_nccl_communicator(*world, options);  // one GPU per rank
//   gpu->all_reduce(grads)->wait();  // grads: a CUDA tensor on gpu's device
//
// Everything in communicator.h holds, with these differences:
//
// Tensors
//  * Only CUDA tensors on the communicator's device (NcclOptions::device),
//    dense and contiguous: the backend does not stage non-contiguous tensors
//    (call .contiguous() first). A CPU tensor, a tensor on another GPU or a
//    non-contiguous one throws InvalidArgument from the call. (The MPI
//    backend, conversely, rejects CUDA tensors.)
//  * dtypes float32, float16, bfloat16, float64, int32, int64, uint8; every
//    ReduceOp; ReduceOp::kAvg on floating dtypes only (NCCL's ncclAvg).
//  * send/recv/batch_send_recv: messages between a pair of ranks match in
//    issue order only (NCCL has no tags): the k-th send from rank a to rank
//    b matches the k-th recv on b from a, over all of the communicator's
//    point-to-point ops. Tags must be 0. A batch is one NCCL group
//    (ncclGroupStart, a ncclSend/ncclRecv per op in list order,
//    ncclGroupEnd). No header is exchanged: a dtype, shape or size mismatch
//    between send and recv is not detected (NCCL's contract). Batches have
//    been tested against mocks only, not on a GPU.
//
// Stream contract (the point of this backend: the host never waits)
//  * Each communicator owns one CUDA stream on its device (the "comm
//    stream"). An op first makes the comm stream wait, through a CUDA event,
//    for everything already queued on the caller's current stream of that
//    device, then queues the NCCL kernel on the comm stream, then records a
//    completion event there. The call returns as soon as that is queued.
//    The caller's current stream is c10::cuda::getCurrentCUDAStream(device)
//    when dtrain_nccl is built against a CUDA-enabled LibTorch, and the
//    device's default (legacy) stream otherwise.
//  * Work::wait() (NcclOptions::blocking_wait = false, the default) does not
//    block the host: it makes the caller's current stream wait for the op's
//    completion event, so kernels queued afterwards on that stream see the
//    result. It rethrows the op's error if the op is already known to have
//    failed. Its `timeout` argument is unused in this mode.
//  * With blocking_wait = true, Work::wait() blocks the host until the op
//    has finished on the GPU (polling its completion event, never longer
//    than the given timeout), and rethrows its error. barrier()'s Work
//    always waits on the host, like MPI's.
//  * Work::is_completed() turns true once a watchdog thread has seen the
//    completion event (it polls every few milliseconds).
//  * The Work keeps the tensors alive until the op has finished on the GPU,
//    so freeing them right after the call is safe.
//
// Failures
//  * A watchdog thread per communicator polls ncclCommGetAsyncError and the
//    deadline (issue time + timeout) of every op in flight. An op past its
//    deadline aborts the NCCL communicator (ncclCommAbort) and fails with
//    TimeoutError naming the op, its element count and the communicator
//    (NCCL cannot tell which rank is missing); an asynchronous NCCL error
//    fails the ops with CommError carrying NCCL's message. Either way the
//    communicator is failed: later ops fail with CommError. End the job
//    (Runtime::abort_job) and restart from a checkpoint.
//  * Creation and split also run under the timeout (the NCCL communicators
//    are created non-blocking so that a rank that never joins cannot hang
//    the others forever).
//
// Thread-safety: as communicator.h. Create communicators (make_nccl_communicator,
// split) from one thread at a time: the all-reduce algorithm is handed to
// NCCL through the process environment (see NcclOptions::algorithm).

#include <memory>
#include <string>

#include "dtrain/collectives/communicator.h"
#include "dtrain/collectives/types.h"

namespace dtrain::collectives {

/// Configuration of an NCCL communicator. Plain struct with documented
/// defaults; validate() throws InvalidArgument on nonsense.
struct NcclOptions {
  /// Name used in logs and error messages; also NCCL's commName.
  std::string name = "world";
  /// CUDA device index of this rank. -1: the process's local rank on its
  /// node (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, ...; see
  /// dtrain::detect_launch), the usual one-process-per-GPU layout.
  int device = -1;
  /// All-reduce algorithm: kAuto (NCCL's own choice), kRing or kTree; kRhd,
  /// kNative and kShm are CPU algorithms and rejected. Applied once, when the
  /// communicator is created, by setting NCCL_ALGO=allreduce:<ring|tree>
  /// around NCCL's initialization (ncclConfig_t has no such field); needs
  /// NCCL >= 2.24. If NCCL_ALGO is already set in the environment, only
  /// kAuto is accepted (the environment then decides). Per-op
  /// AllReduceOptions::algorithm may only repeat this choice or say kAuto.
  /// Other collectives keep NCCL's choice.
  Algorithm algorithm = Algorithm::kAuto;
  /// Default timeout of every op, and of creation and split. DTRAIN_TIMEOUT_MS
  /// overrides it, as for MPI communicators.
  Timeout timeout = std::chrono::minutes(5);
  /// false: Work::wait() orders the caller's stream after the op (no host
  /// blocking). true: Work::wait() blocks the host until the op finished.
  bool blocking_wait = false;

  void validate() const;
};

/// Number of CUDA devices this process can use; 0 if CUDA reports none or
/// any error (no driver, no device, CUDA_VISIBLE_DEVICES empty). Never throws.
int visible_cuda_device_count() noexcept;

/// Creates an NCCL communicator over the same ranks as `bootstrap`, with the
/// same rank numbering. Collective over `bootstrap` (every rank must call it,
/// in the same order as the bootstrap's other ops) and blocking, under
/// options.timeout. Rank 0 creates NCCL's unique id and broadcasts it over
/// `bootstrap` (a CPU communicator, normally Runtime::world()). `bootstrap`
/// is used only during this call.
///
/// Throws InvalidArgument (on every rank, before NCCL is initialized) when
/// options are invalid or a rank has no usable GPU, e.g. "no CUDA device
/// visible ... use --device cpu"; CommError/TimeoutError when NCCL fails or
/// a rank does not join in time.
std::shared_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap,
                                                     NcclOptions options = {});

}  // namespace dtrain::collectives
