#pragma once
// Communicator: the one interface every parallel strategy talks to.
//
// A Communicator connects a fixed group of processes ("ranks", numbered
// 0..size()-1). Each op takes one tensor (or an output/input pair) and an
// options struct, is queued on the communicator, and returns a Work handle at
// once; the caller keeps computing while the op runs on the communicator's
// own progress thread (MPI backend) or stream (NCCL backend).
//
// Contract, for every backend:
//  * Collective ops (all_reduce, broadcast, all_gather, reduce_scatter,
//    barrier, split) must be issued by every rank of the communicator in the
//    same order with matching arguments (same dtype and element count).
//  * Ops issued on one communicator complete in the order they were issued.
//    Ops on different communicators are independent and may run concurrently.
//  * The op reads and writes the tensors it was given until its Work
//    completes; the caller must not touch them before then. The Work keeps the
//    tensors alive.
//  * Tensors may be non-contiguous; they are staged through a reused
//    contiguous buffer. The MPI backend takes CPU tensors of float32, float64,
//    bfloat16, float16, int32, int64 and uint8.
//  * Every op has a timeout (the communicator's default unless the options
//    set one). An op that cannot finish in time fails with TimeoutError naming
//    the op, its element count, the communicator and the ranks not heard from.
//    After a CommError or TimeoutError the communicator is failed: later ops
//    fail at once with CommError. Recovery is to end the job
//    (Runtime::abort_job) and restart from a checkpoint.
//  * Argument errors (wrong device, dtype, shape, rank) throw InvalidArgument
//    from the call itself, before anything is queued.
//
// Thread-safety: ops may be issued from any thread, but the order in which
// two threads' ops are queued is the order of the calls; collective order
// must still agree across ranks.

#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "dtrain/collectives/types.h"
#include "dtrain/collectives/work.h"

namespace dtrain::collectives {

/// One send or receive of Communicator::batch_send_recv (PyTorch's P2POp).
struct P2POp {
  enum class Kind : std::uint8_t { kSend, kRecv };
  Kind kind = Kind::kSend;
  /// Sent from, or received into. Kept alive by the batch's Work.
  at::Tensor tensor;
  /// Rank in the communicator; may be this rank (a message to itself, which
  /// the same batch must also receive).
  int peer = -1;
  /// In [0, 1'000'000). MPI: messages match by (peer, tag). NCCL: must be 0.
  int tag = 0;

  static P2POp send(at::Tensor tensor, int dst, int tag = 0) {
    return P2POp{Kind::kSend, std::move(tensor), dst, tag};
  }
  static P2POp recv(at::Tensor tensor, int src, int tag = 0) {
    return P2POp{Kind::kRecv, std::move(tensor), src, tag};
  }
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  /// This process's rank in the communicator, in [0, size()).
  virtual int rank() const = 0;
  /// Number of ranks.
  virtual int size() const = 0;
  /// Name used in logs and errors.
  virtual const std::string& name() const = 0;
  /// The options this communicator was created with (after environment overrides).
  virtual const CommunicatorOptions& options() const = 0;

  /// Reduces `tensor` element-wise across all ranks, in place; every rank
  /// ends with the same result (bitwise, for every algorithm but kNative).
  virtual std::shared_ptr<Work> all_reduce(const at::Tensor& tensor,
                                           const AllReduceOptions& options = {}) = 0;

  /// Copies the root's `tensor` into every other rank's `tensor`.
  virtual std::shared_ptr<Work> broadcast(const at::Tensor& tensor,
                                          const BroadcastOptions& options = {}) = 0;

  /// Gathers every rank's `input` into `output`, rank-major: `output` has
  /// size() * input.numel() elements of input's dtype, and rank i's data is
  /// output.flatten()[i*input.numel() : (i+1)*input.numel()].
  virtual std::shared_ptr<Work> all_gather(const at::Tensor& output, const at::Tensor& input,
                                           const AllGatherOptions& options = {}) = 0;

  /// Reduces `input` (size() * output.numel() elements) across ranks and
  /// leaves block `rank()` of the result, rank-major, in `output`.
  virtual std::shared_ptr<Work> reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                               const ReduceScatterOptions& options = {}) = 0;

  /// Sends `tensor` to rank `dst`; matched by a recv on `dst` with the same
  /// tag. A batch of one (see batch_send_recv, including the shape check);
  /// `dst` must be another rank.
  virtual std::shared_ptr<Work> send(const at::Tensor& tensor, int dst,
                                     const PointToPointOptions& options = {}) = 0;

  /// Receives into `tensor` from rank `src`: a batch of one, like send.
  virtual std::shared_ptr<Work> recv(const at::Tensor& tensor, int src,
                                     const PointToPointOptions& options = {}) = 0;

  /// Starts every send and receive of `ops` at once and returns one Work
  /// that completes when all of them have (PyTorch's batch_isend_irecv).
  /// Nothing in a batch waits for anything else in it, so a batch never
  /// deadlocks on its own, at any message size: two ranks that send to each
  /// other put the send and the receive into one batch each.
  ///
  /// Matching: between a pair of ranks, sends and receives with the same
  /// tag match in issue order (across batches, and with plain send/recv).
  /// The MPI backend keeps tags apart; the NCCL backend has no tags (tag
  /// must be 0) and matches every op between a pair in issue order.
  ///
  /// Shapes (MPI backend): the messages of one direction of one (peer, tag)
  /// pair form a channel that carries one dtype and shape. The first message
  /// of a channel is preceded by a two-way exchange of both ends' dtype and
  /// shape; if they differ, the batch fails with CommError naming both, on
  /// both ranks, and nothing of the batch is sent. That first message costs
  /// one extra small round trip and completes only once the receiver has
  /// posted its receive. Later messages of the channel must have the
  /// channel's dtype and shape (InvalidArgument otherwise: use another tag
  /// for another shape) and carry no header.
  ///
  /// Throws InvalidArgument before anything is queued for: an empty list,
  /// a peer outside [0, size()), a tag outside [0, 1'000'000), a tensor
  /// backend checks reject (device, dtype, layout), a tensor received into
  /// twice or received into and sent from in one batch (overlapping memory),
  /// and a message to this rank without its matching receive in the batch.
  /// Like every op, the batch is queued in issue order with the others.
  virtual std::shared_ptr<Work> batch_send_recv(const std::vector<P2POp>& ops,
                                                const BatchSendRecvOptions& options = {}) = 0;

  /// Completes once every rank has issued its barrier.
  virtual std::shared_ptr<Work> barrier(const BarrierOptions& options = {}) = 0;

  /// Collective and blocking: partitions the ranks by `color` into new
  /// communicators, ordered by (`key`, parent rank). Ranks passing a negative
  /// color take part but get nullptr. Ordered after every op already issued
  /// on this communicator. The new communicator inherits this one's options.
  virtual std::shared_ptr<Communicator> split(int color, int key,
                                              const SplitOptions& options = {}) = 0;

  /// True once an op has failed with CommError/TimeoutError.
  virtual bool failed() const = 0;

 protected:
  Communicator() = default;
};

}  // namespace dtrain::collectives
