// NcclCommunicator's ops: validation on the caller's thread (device, dtype,
// shapes, peers), the dtype/op mapping to NCCL, and the NCCL call each op
// queues through enqueue(). Lifecycle, queueing and the watchdog are in
// nccl_queue.cpp.

#include "src/collectives/nccl/nccl_communicator.h"
#include "src/collectives/p2p_checks.h"
#include "src/collectives/shape_checks.h"

#include <sstream>

#include "dtrain/error.h"

namespace dtrain::collectives::detail {
namespace {

using Clock = std::chrono::steady_clock;

const char* dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kByte:
      return "uint8";
    default:
      return c10::toString(dtype);
  }
}

std::string describe(const char* op, const std::string& detail, std::size_t count,
                     at::ScalarType dtype) {
  std::ostringstream os;
  os << op << "(";
  if (!detail.empty()) os << detail << ", ";
  os << count << " x " << dtype_name(dtype) << ")";
  return os.str();
}

}  // namespace

DeviceBuffer describe_tensor(const at::Tensor& tensor) {
  DeviceBuffer buffer;
  buffer.defined = tensor.defined();
  if (!buffer.defined) return buffer;
  buffer.device = tensor.device();
  buffer.dtype = tensor.scalar_type();
  buffer.count = static_cast<std::size_t>(tensor.numel());
  buffer.strided = tensor.layout() == at::kStrided;
  buffer.contiguous = buffer.strided && tensor.is_contiguous();
  if (buffer.strided) buffer.data = tensor.data_ptr();
  return buffer;
}

NcclDataType nccl_data_type(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kFloat:
      return NcclDataType::kFloat32;
    case at::kHalf:
      return NcclDataType::kFloat16;
    case at::kBFloat16:
      return NcclDataType::kBfloat16;
    case at::kDouble:
      return NcclDataType::kFloat64;
    case at::kInt:
      return NcclDataType::kInt32;
    case at::kLong:
      return NcclDataType::kInt64;
    case at::kByte:
      return NcclDataType::kUint8;
    default:
      DTRAIN_THROW(InvalidArgument, op, ": dtype ", dtype,
                   " is not supported by the NCCL backend (supported: float32, float16, "
                   "bfloat16, float64, int32, int64, uint8)");
  }
}

NcclRedOp nccl_red_op(ReduceOp reduce, at::ScalarType dtype, const char* op) {
  switch (reduce) {
    case ReduceOp::kSum:
      return NcclRedOp::kSum;
    case ReduceOp::kAvg:
      DTRAIN_CHECK_ARG(at::isFloatingType(dtype), op,
                       ": ReduceOp::kAvg needs a floating dtype, got ", dtype_name(dtype),
                       "; reduce with kSum and divide");
      return NcclRedOp::kAvg;
    case ReduceOp::kMin:
      return NcclRedOp::kMin;
    case ReduceOp::kMax:
      return NcclRedOp::kMax;
    case ReduceOp::kProduct:
      return NcclRedOp::kProd;
  }
  DTRAIN_THROW(InvalidArgument, op, ": unknown ReduceOp ", static_cast<int>(reduce));
}

// --- the Communicator interface: tensor -> DeviceBuffer --------------------

std::shared_ptr<Work> NcclCommunicator::all_reduce(const at::Tensor& tensor,
                                                   const AllReduceOptions& options) {
  return all_reduce_buffer(describe_tensor(tensor), options, {tensor});
}

std::shared_ptr<Work> NcclCommunicator::broadcast(const at::Tensor& tensor,
                                                  const BroadcastOptions& options) {
  return broadcast_buffer(describe_tensor(tensor), options, {tensor});
}

std::shared_ptr<Work> NcclCommunicator::all_gather(const at::Tensor& output,
                                                   const at::Tensor& input,
                                                   const AllGatherOptions& options) {
  return all_gather_buffer(describe_tensor(output), describe_tensor(input), options,
                           {output, input});
}

std::shared_ptr<Work> NcclCommunicator::reduce_scatter(const at::Tensor& output,
                                                       const at::Tensor& input,
                                                       const ReduceScatterOptions& options) {
  return reduce_scatter_buffer(describe_tensor(output), describe_tensor(input), options,
                               {output, input});
}

std::shared_ptr<Work> NcclCommunicator::send(const at::Tensor& tensor, int dst,
                                             const PointToPointOptions& options) {
  return send_buffer(describe_tensor(tensor), dst, options, {tensor});
}

std::shared_ptr<Work> NcclCommunicator::recv(const at::Tensor& tensor, int src,
                                             const PointToPointOptions& options) {
  return recv_buffer(describe_tensor(tensor), src, options, {tensor});
}

std::shared_ptr<Work> NcclCommunicator::batch_send_recv(const std::vector<P2POp>& ops,
                                                        const BatchSendRecvOptions& options) {
  std::vector<P2PBufferOp> buffers;
  KeepAlive keep;
  buffers.reserve(ops.size());
  keep.reserve(ops.size());
  for (const P2POp& op : ops) {
    buffers.push_back(
        P2PBufferOp{op.kind == P2POp::Kind::kRecv, describe_tensor(op.tensor), op.peer, op.tag});
    keep.push_back(op.tensor);
  }
  return batch_send_recv_buffers(buffers, options, std::move(keep));
}

// --- validation -------------------------------------------------------------

void NcclCommunicator::check_buffer(const DeviceBuffer& buffer, const char* op,
                                    const char* which) const {
  DTRAIN_CHECK_ARG(buffer.defined, op, ": ", which, " tensor is undefined");
  DTRAIN_CHECK_ARG(buffer.device.is_cuda(), op, ": ", which, " tensor is on ", buffer.device,
                   "; the NCCL backend takes CUDA tensors on cuda:", device_,
                   " (move it with .to(at::Device(at::kCUDA, ", device_,
                   ")), or use an MPI communicator such as Runtime::world() for CPU tensors)");
  DTRAIN_CHECK_ARG(buffer.device.index() == device_, op, ": ", which, " tensor is on ",
                   buffer.device, " but NCCL communicator '", options_.name,
                   "' runs on cuda:", device_);
  DTRAIN_CHECK_ARG(buffer.strided, op, ": ", which, " tensor must be dense (strided)");
  DTRAIN_CHECK_ARG(buffer.contiguous, op, ": ", which,
                   " tensor is not contiguous; the NCCL backend does not stage tensors: pass "
                   "tensor.contiguous() (and copy the result back if you need it in place)");
}

void NcclCommunicator::check_algorithm(const std::optional<Algorithm>& requested) const {
  if (!requested || *requested == Algorithm::kAuto || *requested == nccl_options_.algorithm) {
    return;
  }
  DTRAIN_THROW(InvalidArgument, "all_reduce: algorithm '", to_string(*requested),
               "' was requested, but NCCL fixes its all-reduce algorithm when a communicator is "
               "created (communicator '",
               options_.name, "' uses '", to_string(nccl_options_.algorithm),
               "'); set NcclOptions::algorithm instead");
}

void NcclCommunicator::check_no_algorithm(const char* op,
                                          const std::optional<Algorithm>& requested) {
  DTRAIN_CHECK_ARG(!requested || *requested == Algorithm::kAuto, op, ": algorithm '",
                   to_string(requested.value_or(Algorithm::kAuto)),
                   "' was requested, but the NCCL backend lets NCCL choose how to run ", op,
                   "; leave the algorithm unset or pass auto");
}

WaitMode NcclCommunicator::default_wait_mode() const noexcept {
  return nccl_options_.blocking_wait ? WaitMode::kHost : WaitMode::kStream;
}

// --- ops ------------------------------------------------------------------

std::shared_ptr<Work> NcclCommunicator::all_reduce_buffer(const DeviceBuffer& buffer,
                                                          const AllReduceOptions& options,
                                                          KeepAlive keep) {
  constexpr const char* kOp = "all_reduce";
  check_buffer(buffer, kOp, "the");
  const NcclDataType type = nccl_data_type(buffer.dtype, kOp);
  const NcclRedOp op = nccl_red_op(options.op, buffer.dtype, kOp);
  check_algorithm(options.algorithm);
  return enqueue(describe(kOp, to_string(options.op), buffer.count, buffer.dtype), options.timeout,
                 default_wait_mode(), std::move(keep), [&](CudaStream stream) {
                   api_->all_reduce(buffer.data, buffer.data, buffer.count, type, op, comm_,
                                    stream);
                 });
}

std::shared_ptr<Work> NcclCommunicator::broadcast_buffer(const DeviceBuffer& buffer,
                                                         const BroadcastOptions& options,
                                                         KeepAlive keep) {
  constexpr const char* kOp = "broadcast";
  check_buffer(buffer, kOp, "the");
  const NcclDataType type = nccl_data_type(buffer.dtype, kOp);
  DTRAIN_CHECK_ARG(options.root >= 0 && options.root < size_, kOp, ": root ", options.root,
                   " is not a rank of communicator '", options_.name, "' (size ", size_, ")");
  const int root = options.root;
  return enqueue(describe(kOp, "root " + std::to_string(root), buffer.count, buffer.dtype),
                 options.timeout, default_wait_mode(), std::move(keep), [&](CudaStream stream) {
                   api_->broadcast(buffer.data, buffer.data, buffer.count, type, root, comm_,
                                   stream);
                 });
}

std::shared_ptr<Work> NcclCommunicator::all_gather_buffer(const DeviceBuffer& output,
                                                          const DeviceBuffer& input,
                                                          const AllGatherOptions& options,
                                                          KeepAlive keep) {
  constexpr const char* kOp = "all_gather";
  check_buffer(input, kOp, "input");
  check_buffer(output, kOp, "output");
  const NcclDataType type = nccl_data_type(input.dtype, kOp);
  DTRAIN_CHECK_ARG(output.dtype == input.dtype, kOp, ": output dtype ", dtype_name(output.dtype),
                   " differs from input dtype ", dtype_name(input.dtype));
  const std::size_t count = input.count;
  check_rank_major_counts(kOp, "output", output.count, "input", count, size_);
  check_no_algorithm(kOp, options.algorithm);
  return enqueue(describe(kOp, "", count, input.dtype), options.timeout, default_wait_mode(),
                 std::move(keep), [&](CudaStream stream) {
                   api_->all_gather(input.data, output.data, count, type, comm_, stream);
                 });
}

std::shared_ptr<Work> NcclCommunicator::reduce_scatter_buffer(const DeviceBuffer& output,
                                                              const DeviceBuffer& input,
                                                              const ReduceScatterOptions& options,
                                                              KeepAlive keep) {
  constexpr const char* kOp = "reduce_scatter";
  check_buffer(input, kOp, "input");
  check_buffer(output, kOp, "output");
  const NcclDataType type = nccl_data_type(input.dtype, kOp);
  DTRAIN_CHECK_ARG(output.dtype == input.dtype, kOp, ": output dtype ", dtype_name(output.dtype),
                   " differs from input dtype ", dtype_name(input.dtype));
  const NcclRedOp op = nccl_red_op(options.op, input.dtype, kOp);
  const std::size_t count = output.count;
  check_rank_major_counts(kOp, "input", input.count, "output", count, size_);
  check_no_algorithm(kOp, options.algorithm);
  return enqueue(describe(kOp, to_string(options.op), count, output.dtype), options.timeout,
                 default_wait_mode(), std::move(keep), [&](CudaStream stream) {
                   api_->reduce_scatter(input.data, output.data, count, type, op, comm_, stream);
                 });
}

std::shared_ptr<Work> NcclCommunicator::send_buffer(const DeviceBuffer& buffer, int dst,
                                                    const PointToPointOptions& options,
                                                    KeepAlive keep) {
  return point_to_point("send", buffer, dst, options, /*is_recv=*/false, std::move(keep));
}

std::shared_ptr<Work> NcclCommunicator::recv_buffer(const DeviceBuffer& buffer, int src,
                                                    const PointToPointOptions& options,
                                                    KeepAlive keep) {
  return point_to_point("recv", buffer, src, options, /*is_recv=*/true, std::move(keep));
}

std::shared_ptr<Work> NcclCommunicator::point_to_point(const char* op, const DeviceBuffer& buffer,
                                                       int peer, const PointToPointOptions& options,
                                                       bool is_recv, KeepAlive keep) {
  check_buffer(buffer, op, "the");
  const NcclDataType type = nccl_data_type(buffer.dtype, op);
  DTRAIN_CHECK_ARG(peer >= 0 && peer < size_ && peer != rank_, op, ": peer rank ", peer,
                   " is not another rank of communicator '", options_.name, "' (size ", size_,
                   ", this rank ", rank_, ")");
  DTRAIN_CHECK_ARG(options.tag >= 0 && options.tag < kMaxUserTag, op, ": tag ", options.tag,
                   " is outside [0, ", kMaxUserTag, ")");
  DTRAIN_CHECK_ARG(options.tag == 0, op, ": tag ", options.tag,
                   " given, but the NCCL backend matches point-to-point messages between two "
                   "ranks by issue order only; use tag 0 and issue sends and recvs in the same "
                   "order on both ranks");
  const std::string detail = std::string(is_recv ? "from" : "to") + " rank " +
                             std::to_string(peer) + ", tag " + std::to_string(options.tag);
  return enqueue_p2p_group(describe(op, detail, buffer.count, buffer.dtype),
                           {P2PBufferOp{is_recv, buffer, peer, options.tag}}, {type},
                           options.timeout, std::move(keep));
}

std::shared_ptr<Work> NcclCommunicator::batch_send_recv_buffers(const std::vector<P2PBufferOp>& ops,
                                                                const BatchSendRecvOptions& options,
                                                                KeepAlive keep) {
  constexpr const char* kOp = "batch_send_recv";
  std::vector<NcclDataType> types;
  std::vector<P2PCheckItem> items;
  types.reserve(ops.size());
  items.reserve(ops.size());
  int sends = 0;
  for (const P2PBufferOp& op : ops) {
    check_buffer(op.buffer, kOp, op.is_recv ? "a received" : "a sent");
    types.push_back(nccl_data_type(op.buffer.dtype, kOp));
    P2PCheckItem item;
    item.is_recv = op.is_recv;
    item.peer = op.peer;
    item.tag = op.tag;
    if (op.buffer.count > 0) {
      item.begin = reinterpret_cast<std::uintptr_t>(op.buffer.data);
      item.end = item.begin + op.buffer.count * c10::elementSize(op.buffer.dtype);
    }
    items.push_back(item);
    sends += op.is_recv ? 0 : 1;
  }
  check_p2p_batch(kOp, items, rank_, size_, options_.name);
  for (std::size_t i = 0; i < items.size(); ++i) {
    DTRAIN_CHECK_ARG(items[i].tag == 0, kOp, ": ", describe_p2p_item(items[i], i),
                     ": the NCCL backend has no tags; it matches the sends and recvs between two "
                     "ranks in issue order. Use tag 0 and issue them in the same order on both "
                     "ranks");
  }
  const std::string what = ::dtrain::detail::str_cat(
      kOp, "(", sends, " sends, ", ops.size() - static_cast<std::size_t>(sends), " recvs)");
  return enqueue_p2p_group(what, ops, types, options.timeout, std::move(keep));
}

std::shared_ptr<Work> NcclCommunicator::enqueue_p2p_group(const std::string& what,
                                                          const std::vector<P2PBufferOp>& ops,
                                                          const std::vector<NcclDataType>& types,
                                                          std::optional<Timeout> timeout,
                                                          KeepAlive keep) {
  return enqueue(what, timeout, default_wait_mode(), std::move(keep), [&](CudaStream stream) {
    // One group, even for one op: NCCL's idiom for point-to-point. Inside
    // a group NCCL starts every send and receive together, so ranks that
    // send to each other in one group never deadlock.
    api_->group_start();
    try {
      for (std::size_t i = 0; i < ops.size(); ++i) {
        const P2PBufferOp& op = ops[i];
        if (op.is_recv) {
          api_->recv(op.buffer.data, op.buffer.count, types[i], op.peer, comm_, stream);
        } else {
          api_->send(op.buffer.data, op.buffer.count, types[i], op.peer, comm_, stream);
        }
      }
    } catch (...) {
      try {
        api_->group_end();
      } catch (...) {
        // The first error is the one to report.
      }
      throw;
    }
    api_->group_end();
  });
}

std::shared_ptr<Work> NcclCommunicator::barrier(const BarrierOptions& options) {
  // NCCL has no barrier: all-reduce one byte (max, so that the buffer's
  // contents never matter). Its Work waits on the host, like MPI's barrier.
  return enqueue("barrier()", options.timeout, WaitMode::kHost, {}, [&](CudaStream stream) {
    if (barrier_buffer_ == nullptr) barrier_buffer_ = api_->device_malloc(1);
    api_->all_reduce(barrier_buffer_, barrier_buffer_, 1, NcclDataType::kUint8, NcclRedOp::kMax,
                     comm_, stream);
  });
}

std::shared_ptr<Communicator> NcclCommunicator::split(int color, int key,
                                                      const SplitOptions& options) {
  const Timeout timeout = options.timeout.value_or(options_.timeout);
  DTRAIN_CHECK_ARG(timeout.count() > 0, "split: timeout must be positive, got ", timeout.count(),
                   " ms");
  NcclOptions child = nccl_options_;
  child.timeout = timeout;
  child.name = options.name.empty() ? options_.name + "/" + std::to_string(color) : options.name;
  const std::string what = ::dtrain::detail::str_cat(
      "split(color ", color, ", key ", key, ") of NCCL communicator '", options_.name, "'");
  NcclComm child_comm = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    DTRAIN_CHECK_T(CommError, !failed_.load(), what,
                   " was not run: the communicator failed earlier: ", failure_);
    try {
      DeviceGuard guard(*api_, device_);
      ScopedNcclAlgo algo(nccl_options_.algorithm);
      NcclCommConfig config;
      config.name = child.name;
      const NcclSplit pending =
          api_->comm_split(comm_, color < 0 ? kNcclSplitNoColor : color, key, config);
      // Non-blocking: the parent settles, the child's handle appears and the
      // child settles when every rank has joined; a rank that never calls
      // split ends here, not in a hang.
      const auto deadline = Clock::now() + timeout;
      bool settled = wait_settled(*api_, comm_, deadline);
      if (settled && pending != nullptr) {
        settled = wait_for_child(*api_, pending, deadline, &child_comm) &&
                  wait_settled(*api_, child_comm, deadline);
      }
      if (!settled) {
        DTRAIN_THROW(TimeoutError, what, " did not complete within ", timeout.count(),
                     " ms (did every rank call split?); the NCCL communicator was aborted");
      }
    } catch (const std::exception& e) {
      if (child_comm != nullptr) {
        try {
          api_->comm_abort(child_comm);
        } catch (...) {
          // Report the first error.
        }
      }
      fail_locked(e.what(), nullptr, nullptr);
      throw;
    }
  }
  if (child_comm == nullptr) return nullptr;
  int child_rank = 0;
  int child_size = 0;
  try {
    child_size = api_->comm_count(child_comm);
    child_rank = api_->comm_user_rank(child_comm);
  } catch (...) {
    try {
      api_->comm_abort(child_comm);
    } catch (...) {
      // Report the first error.
    }
    throw;
  }
  return std::make_shared<NcclCommunicator>(child_comm, child_rank, child_size, device_,
                                            std::move(child), hooks_);
}

}  // namespace dtrain::collectives::detail
