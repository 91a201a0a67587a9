#pragma once
// CountingCommunicator: a decorator over any Communicator that records every
// op issued through it, by kind and size, and otherwise forwards the op
// unchanged (same tensors, same options, the inner op's own Work).
//
// It answers "which collectives does this layer issue, and how many bytes do
// they move": tests check that a layer issues exactly the collectives it
// should and no more, and benchmarks report the bytes a strategy
// communicates per step.
//
//   auto tp = std::make_shared<CountingCommunicator>(ctx.tp());
//   ColumnParallelLinear fc(options, tp);
//   fc->forward(x).sum().backward();
//   tp->tally(OpKind::kAllReduce).calls;   // 1: the input gradient
//
// Sizes, per op, in bytes of the tensors handed to the op (the "size" of
// nccl-tests' tables):
//   all_reduce, broadcast   the tensor
//   all_gather              the output (size() x the input)
//   reduce_scatter          the input (size() x the output)
//   send, recv              the tensor
//   batch_send_recv         every send's and every receive's tensor, summed
//   barrier, split          0
// Ops the inner communicator rejects (InvalidArgument) are not recorded.
//
// Each op also records the bytes this rank sends for it, by nccl-tests'
// bus-bytes convention (what a ring algorithm sends; other algorithms move
// about as much): all_reduce 2 (k-1)/k x its size over k ranks, all_gather
// and reduce_scatter (k-1)/k x theirs, broadcast its size (k > 1), send and
// the sends of batch_send_recv their tensors, recv 0.
//
// split() records a kSplit here and returns a new CountingCommunicator over
// the inner communicator's child (nullptr for a negative color), with counts
// of its own; tree_data_ops() sums the data ops of a communicator and of
// every communicator split from it, directly or not (a trainer wraps its
// world once and reads what the whole layout sent). Without keep_records the
// per-op list is not kept (a long run issues millions of ops); the tallies
// are.
//
// Thread-safety: like the inner communicator; the counts are guarded by a
// mutex, so they may be read from any thread.

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"

namespace dtrain::collectives {

/// The kind of a recorded op.
enum class OpKind : std::uint8_t {
  kAllReduce,
  kBroadcast,
  kAllGather,
  kReduceScatter,
  kSend,
  kRecv,
  kBatchSendRecv,
  kBarrier,
  kSplit,
};

/// "all_reduce", "broadcast", "all_gather", ...
const char* to_string(OpKind kind);

/// One recorded op, in issue order.
struct OpRecord {
  OpKind kind = OpKind::kAllReduce;
  /// As the header comment defines it per kind.
  std::int64_t bytes = 0;
  /// The bytes this rank sends for it (bus bytes, above).
  std::int64_t sent_bytes = 0;
};

/// Ops of one kind: how many, and their bytes summed.
struct OpTally {
  std::int64_t calls = 0;
  std::int64_t bytes = 0;
  std::int64_t sent_bytes = 0;
};

class CountingCommunicator final : public Communicator {
 public:
  /// Forwards to `inner` (not null), which it keeps alive. keep_records:
  /// keep the list of ops (records()); communicators split from it inherit
  /// the choice.
  explicit CountingCommunicator(std::shared_ptr<Communicator> inner, bool keep_records = true);

  /// Every op recorded since construction or the last reset(), in issue order
  /// (empty without keep_records).
  std::vector<OpRecord> records() const;
  /// The ops of one kind.
  OpTally tally(OpKind kind) const;
  /// Every op but barrier and split: the ops that move data.
  OpTally data_ops() const;
  /// data_ops() of this communicator and of every one split from it,
  /// directly or not, since each was made (reset() does not change it).
  OpTally tree_data_ops() const;
  /// Forgets every record and tally of this communicator.
  void reset();

  const std::shared_ptr<Communicator>& inner() const noexcept { return inner_; }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  const std::string& name() const override { return inner_->name(); }
  const CommunicatorOptions& options() const override { return inner_->options(); }
  std::shared_ptr<Work> all_reduce(const at::Tensor& tensor,
                                   const AllReduceOptions& options = {}) override;
  std::shared_ptr<Work> broadcast(const at::Tensor& tensor,
                                  const BroadcastOptions& options = {}) override;
  std::shared_ptr<Work> all_gather(const at::Tensor& output, const at::Tensor& input,
                                   const AllGatherOptions& options = {}) override;
  std::shared_ptr<Work> reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                       const ReduceScatterOptions& options = {}) override;
  std::shared_ptr<Work> send(const at::Tensor& tensor, int dst,
                             const PointToPointOptions& options = {}) override;
  std::shared_ptr<Work> recv(const at::Tensor& tensor, int src,
                             const PointToPointOptions& options = {}) override;
  std::shared_ptr<Work> batch_send_recv(const std::vector<P2POp>& ops,
                                        const BatchSendRecvOptions& options = {}) override;
  std::shared_ptr<Work> barrier(const BarrierOptions& options = {}) override;
  std::shared_ptr<Communicator> split(int color, int key,
                                      const SplitOptions& options = {}) override;
  bool failed() const override { return inner_->failed(); }

 private:
  struct TreeTotals;
  CountingCommunicator(std::shared_ptr<Communicator> inner, bool keep_records,
                       std::shared_ptr<TreeTotals> totals);
  void record(OpKind kind, std::int64_t bytes, std::int64_t sent_bytes);

  std::shared_ptr<Communicator> inner_;
  bool keep_records_ = true;
  std::shared_ptr<TreeTotals> totals_;  // shared with the communicators split from it
  mutable std::mutex mutex_;
  std::vector<OpRecord> records_;
  std::vector<OpTally> by_kind_;  // indexed by OpKind
};

}  // namespace dtrain::collectives
