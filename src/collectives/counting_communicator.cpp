#include "dtrain/collectives/counting_communicator.h"

#include <ATen/core/Tensor.h>

#include <utility>

#include "dtrain/error.h"

namespace dtrain::collectives {

namespace {

std::int64_t bytes_of(const at::Tensor& tensor) {
  return tensor.defined() ? static_cast<std::int64_t>(tensor.numel() * tensor.element_size()) : 0;
}

}  // namespace

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

CountingCommunicator::CountingCommunicator(std::shared_ptr<Communicator> inner)
    : inner_(std::move(inner)) {
  DTRAIN_CHECK_ARG(inner_ != nullptr, "CountingCommunicator: the inner communicator is null");
}

void CountingCommunicator::record(OpKind kind, std::int64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  records_.push_back(OpRecord{kind, bytes});
}

std::vector<OpRecord> CountingCommunicator::records() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return records_;
}

OpTally CountingCommunicator::tally(OpKind kind) const {
  std::lock_guard<std::mutex> lock(mutex_);
  OpTally out;
  for (const OpRecord& r : records_) {
    if (r.kind != kind) continue;
    ++out.calls;
    out.bytes += r.bytes;
  }
  return out;
}

OpTally CountingCommunicator::data_ops() const {
  std::lock_guard<std::mutex> lock(mutex_);
  OpTally out;
  for (const OpRecord& r : records_) {
    if (r.kind == OpKind::kBarrier || r.kind == OpKind::kSplit) continue;
    ++out.calls;
    out.bytes += r.bytes;
  }
  return out;
}

void CountingCommunicator::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  records_.clear();
}

// Each op is forwarded first and recorded once the inner call has accepted
// it, so an op rejected with InvalidArgument leaves no record.

std::shared_ptr<Work> CountingCommunicator::all_reduce(const at::Tensor& tensor,
                                                       const AllReduceOptions& options) {
  auto work = inner_->all_reduce(tensor, options);
  record(OpKind::kAllReduce, bytes_of(tensor));
  return work;
}

std::shared_ptr<Work> CountingCommunicator::broadcast(const at::Tensor& tensor,
                                                      const BroadcastOptions& options) {
  auto work = inner_->broadcast(tensor, options);
  record(OpKind::kBroadcast, bytes_of(tensor));
  return work;
}

std::shared_ptr<Work> CountingCommunicator::all_gather(const at::Tensor& output,
                                                       const at::Tensor& input,
                                                       const AllGatherOptions& options) {
  auto work = inner_->all_gather(output, input, options);
  record(OpKind::kAllGather, bytes_of(output));
  return work;
}

std::shared_ptr<Work> CountingCommunicator::reduce_scatter(const at::Tensor& output,
                                                           const at::Tensor& input,
                                                           const ReduceScatterOptions& options) {
  auto work = inner_->reduce_scatter(output, input, options);
  record(OpKind::kReduceScatter, bytes_of(input));
  return work;
}

std::shared_ptr<Work> CountingCommunicator::send(const at::Tensor& tensor, int dst,
                                                 const PointToPointOptions& options) {
  auto work = inner_->send(tensor, dst, options);
  record(OpKind::kSend, bytes_of(tensor));
  return work;
}

std::shared_ptr<Work> CountingCommunicator::recv(const at::Tensor& tensor, int src,
                                                 const PointToPointOptions& options) {
  auto work = inner_->recv(tensor, src, options);
  record(OpKind::kRecv, bytes_of(tensor));
  return work;
}

std::shared_ptr<Work> CountingCommunicator::batch_send_recv(const std::vector<P2POp>& ops,
                                                            const BatchSendRecvOptions& options) {
  auto work = inner_->batch_send_recv(ops, options);
  std::int64_t bytes = 0;
  for (const P2POp& op : ops) bytes += bytes_of(op.tensor);
  record(OpKind::kBatchSendRecv, bytes);
  return work;
}

std::shared_ptr<Work> CountingCommunicator::barrier(const BarrierOptions& options) {
  auto work = inner_->barrier(options);
  record(OpKind::kBarrier, 0);
  return work;
}

std::shared_ptr<Communicator> CountingCommunicator::split(int color, int key,
                                                          const SplitOptions& options) {
  std::shared_ptr<Communicator> child = inner_->split(color, key, options);
  record(OpKind::kSplit, 0);
  if (child == nullptr) return nullptr;
  return std::make_shared<CountingCommunicator>(std::move(child));
}

}  // namespace dtrain::collectives
