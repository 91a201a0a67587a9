#pragma once
// Batched point-to-point of the MPI backend (Communicator::batch_send_recv;
// plain send and recv are batches of one).
//
// A batch runs as one op on the communicator's progress thread: every send
// and receive of it is posted nonblocking (MPI_Isend/MPI_Irecv) before any
// is waited for, so two ranks that send to each other in one batch each
// never deadlock, whatever the message size and MPI's eager limit.
//
// Channels and headers. The messages from rank a to rank b with tag t form
// the channel (a -> b, t); each end keeps the dtype and shape of its side
// of the channel (its "signature"), declared by the first op that uses it.
// That first op is preceded by a two-way header exchange: the sender sends
// its signature to the receiver and the receiver sends its own to the
// sender, both nonblocking, on tags of their own (kMaxUserTag + 2t, +2t+1)
// so that they never match payload messages. Both ends then compare the two
// signatures; if they differ, both fail the batch with CommError naming both
// shapes and dtypes, before any payload of the batch is posted. Once a
// channel is set up on both ends, later ops must keep its signature (checked
// at the call, InvalidArgument), so every later message is known to match
// without a header.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "src/collectives/algorithms/algorithms.h"
#include "src/collectives/algorithms/element_type.h"
#include "src/collectives/mpi/mpi_transport.h"
#include "src/collectives/mpi/tensor_graveyard.h"

namespace dtrain::collectives::detail {

/// The dtype and shape of one side of a channel.
struct P2PSignature {
  ElementType type = ElementType::kUInt8;
  std::vector<std::int64_t> shape;

  bool operator==(const P2PSignature& other) const {
    return type == other.type && shape == other.shape;
  }
  bool operator!=(const P2PSignature& other) const { return !(*this == other); }
  /// e.g. "[4, 8] float32".
  std::string str() const;
};

/// One op of a batch, validated, as the progress thread runs it.
struct P2PBatchOp {
  bool is_recv = false;
  int peer = -1;
  int tag = 0;
  at::Tensor tensor;
  P2PSignature signature;
  std::size_t bytes = 0;
  bool first_of_channel = false;  ///< preceded by the header exchange
  /// Index (in the batch) of the op that opens this op's channel in the same
  /// batch, or -1: this op's message must follow that one's.
  int follows = -1;
};

class BatchedPointToPoint {
 public:
  /// Tensors may have at most this many dimensions (the header's size).
  static constexpr int kMaxDims = 12;

  /// `comm` is the communicator the messages travel on (its MPI_TAG_UB
  /// bounds the header tags); `comm_name` names it in errors.
  BatchedPointToPoint(MPI_Comm comm, std::string comm_name, int rank, int size);

  /// Caller's thread. Hold this from prepare() until the batch is queued:
  /// batches must run in the order their channels were declared.
  std::mutex& issue_mutex() { return issue_mutex_; }

  /// Caller's thread, under issue_mutex(). Checks the batch (see
  /// Communicator::batch_send_recv; `types` are the ops' element types,
  /// already checked by the backend), declares the channels it opens and
  /// returns the ops to run. Throws InvalidArgument, declaring nothing, on
  /// any mistake.
  std::vector<P2PBatchOp> prepare(const char* op, const std::vector<P2POp>& ops,
                                  const std::vector<ElementType>& types);

  /// Progress thread: runs a prepared batch as the op `what` under the
  /// transport's current op (deadline, roll call). Throws CommError on a
  /// header mismatch, TimeoutError past the deadline; after a failure the
  /// batch's tensors are kept alive for good (MPI may still write them).
  void run(MpiTransport& transport, const OpDescriptor& what, std::vector<P2PBatchOp>& ops);

  /// After a failure, when the communicator goes away: gives up the buffers
  /// without freeing them (MPI may still hold requests into them). The
  /// failed batches' tensors are never freed in any case (TensorGraveyard).
  void leak() noexcept;

 private:
  using ChannelKey = std::tuple<int, int, bool>;  // (peer, tag, this end receives)

  int header_tag(int tag, bool from_receiver) const {
    return kHeaderTagBase + 2 * tag + (from_receiver ? 1 : 0);
  }
  static constexpr int kHeaderTagBase = 1'000'000;  // = kMaxUserTag

  std::string comm_name_;
  int rank_ = 0;
  int size_ = 1;
  int tag_ub_ = 32767;

  std::mutex issue_mutex_;
  std::map<ChannelKey, P2PSignature> channels_;  // guarded by issue_mutex_

  // Progress thread only.
  Scratch headers_;               // outgoing and incoming headers of a batch
  std::vector<Scratch> staging_;  // per op: non-contiguous tensors
  TensorGraveyard graveyard_;     // tensors of failed batches, never freed
};

}  // namespace dtrain::collectives::detail
