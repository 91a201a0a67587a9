#include "dtrain/collectives/counting_communicator.h"

#include <ATen/core/Tensor.h>

#include <utility>

#include "dtrain/error.h"

namespace dtrain::collectives {

namespace {

std::int64_t bytes_of(const at::Tensor& tensor) {
  return tensor.defined() ? static_cast<std::int64_t>(tensor.numel() * tensor.element_size()) : 0;
}

// (k-1)/k x bytes, rounded down: what a ring moves out of each of k ranks.
std::int64_t ring_share(std::int64_t bytes, int ranks) {
  return ranks > 1 ? bytes * (ranks - 1) / ranks : 0;
}

constexpr std::size_t kKinds = static_cast<std::size_t>(OpKind::kSplit) + 1;

bool moves_data(OpKind kind) { return kind != OpKind::kBarrier && kind != OpKind::kSplit; }

}  // namespace

struct CountingCommunicator::TreeTotals {
  std::mutex mutex;
  OpTally data;
};

const char* to_string(OpKind kind) {
  switch (kind) {
    case OpKind::kAllReduce:
      return "all_reduce";
    case OpKind::kBroadcast:
      return "broadcast";
    case OpKind::kAllGather:
      return "all_gather";
    case OpKind::kReduceScatter:
      return "reduce_scatter";
    case OpKind::kSend:
      return "send";
    case OpKind::kRecv:
      return "recv";
    case OpKind::kBatchSendRecv:
      return "batch_send_recv";
    case OpKind::kBarrier:
      return "barrier";
    case OpKind::kSplit:
      return "split";
  }
  return "?";
}

CountingCommunicator::CountingCommunicator(std::shared_ptr<Communicator> inner, bool keep_records)
    : CountingCommunicator(std::move(inner), keep_records, std::make_shared<TreeTotals>()) {}

CountingCommunicator::CountingCommunicator(std::shared_ptr<Communicator> inner, bool keep_records,
                                           std::shared_ptr<TreeTotals> totals)
    : inner_(std::move(inner)),
      keep_records_(keep_records),
      totals_(std::move(totals)),
      by_kind_(kKinds) {
  DTRAIN_CHECK_ARG(inner_ != nullptr, "CountingCommunicator: the inner communicator is null");
}

void CountingCommunicator::record(OpKind kind, std::int64_t bytes, std::int64_t sent_bytes) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (keep_records_) records_.push_back(OpRecord{kind, bytes, sent_bytes});
    OpTally& t = by_kind_[static_cast<std::size_t>(kind)];
    ++t.calls;
    t.bytes += bytes;
    t.sent_bytes += sent_bytes;
  }
  if (!moves_data(kind)) return;
  std::lock_guard<std::mutex> lock(totals_->mutex);
  ++totals_->data.calls;
  totals_->data.bytes += bytes;
  totals_->data.sent_bytes += sent_bytes;
}

std::vector<OpRecord> CountingCommunicator::records() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return records_;
}

OpTally CountingCommunicator::tally(OpKind kind) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return by_kind_[static_cast<std::size_t>(kind)];
}

OpTally CountingCommunicator::data_ops() const {
  std::lock_guard<std::mutex> lock(mutex_);
  OpTally out;
  for (std::size_t k = 0; k < kKinds; ++k) {
    if (!moves_data(static_cast<OpKind>(k))) continue;
    out.calls += by_kind_[k].calls;
    out.bytes += by_kind_[k].bytes;
    out.sent_bytes += by_kind_[k].sent_bytes;
  }
  return out;
}

OpTally CountingCommunicator::tree_data_ops() const {
  std::lock_guard<std::mutex> lock(totals_->mutex);
  return totals_->data;
}

void CountingCommunicator::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  records_.clear();
  by_kind_.assign(kKinds, OpTally{});
}

// Each op is forwarded first and recorded once the inner call has accepted
// it, so an op rejected with InvalidArgument leaves no record.

std::shared_ptr<Work> CountingCommunicator::all_reduce(const at::Tensor& tensor,
                                                       const AllReduceOptions& options) {
  auto work = inner_->all_reduce(tensor, options);
  record(OpKind::kAllReduce, bytes_of(tensor), 2 * ring_share(bytes_of(tensor), size()));
  return work;
}

std::shared_ptr<Work> CountingCommunicator::broadcast(const at::Tensor& tensor,
                                                      const BroadcastOptions& options) {
  auto work = inner_->broadcast(tensor, options);
  record(OpKind::kBroadcast, bytes_of(tensor), size() > 1 ? bytes_of(tensor) : 0);
  return work;
}

std::shared_ptr<Work> CountingCommunicator::all_gather(const at::Tensor& output,
                                                       const at::Tensor& input,
                                                       const AllGatherOptions& options) {
  auto work = inner_->all_gather(output, input, options);
  record(OpKind::kAllGather, bytes_of(output), ring_share(bytes_of(output), size()));
  return work;
}

std::shared_ptr<Work> CountingCommunicator::reduce_scatter(const at::Tensor& output,
                                                           const at::Tensor& input,
                                                           const ReduceScatterOptions& options) {
  auto work = inner_->reduce_scatter(output, input, options);
  record(OpKind::kReduceScatter, bytes_of(input), ring_share(bytes_of(input), size()));
  return work;
}

std::shared_ptr<Work> CountingCommunicator::send(const at::Tensor& tensor, int dst,
                                                 const PointToPointOptions& options) {
  auto work = inner_->send(tensor, dst, options);
  record(OpKind::kSend, bytes_of(tensor), bytes_of(tensor));
  return work;
}

std::shared_ptr<Work> CountingCommunicator::recv(const at::Tensor& tensor, int src,
                                                 const PointToPointOptions& options) {
  auto work = inner_->recv(tensor, src, options);
  record(OpKind::kRecv, bytes_of(tensor), 0);
  return work;
}

std::shared_ptr<Work> CountingCommunicator::batch_send_recv(const std::vector<P2POp>& ops,
                                                            const BatchSendRecvOptions& options) {
  auto work = inner_->batch_send_recv(ops, options);
  std::int64_t bytes = 0, sent = 0;
  for (const P2POp& op : ops) {
    bytes += bytes_of(op.tensor);
    if (op.kind == P2POp::Kind::kSend) sent += bytes_of(op.tensor);
  }
  record(OpKind::kBatchSendRecv, bytes, sent);
  return work;
}

std::shared_ptr<Work> CountingCommunicator::barrier(const BarrierOptions& options) {
  auto work = inner_->barrier(options);
  record(OpKind::kBarrier, 0, 0);
  return work;
}

std::shared_ptr<Communicator> CountingCommunicator::split(int color, int key,
                                                          const SplitOptions& options) {
  std::shared_ptr<Communicator> child = inner_->split(color, key, options);
  record(OpKind::kSplit, 0, 0);
  if (child == nullptr) return nullptr;
  return std::shared_ptr<CountingCommunicator>(
      new CountingCommunicator(std::move(child), keep_records_, totals_));
}

}  // namespace dtrain::collectives
