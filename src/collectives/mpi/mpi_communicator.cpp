// MpiCommunicator: validates tensors on the caller's thread, then queues
// each op on its ProgressEngine, where it runs over MpiTransport with the
// algorithms of src/collectives/algorithms.

#include "src/collectives/mpi/mpi_communicator.h"

#include <ATen/ops/from_blob.h>

#include <atomic>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "dtrain/error.h"
#include "src/collectives/algorithms/algorithms.h"
#include "src/collectives/algorithms/hier.h"
#include "src/collectives/mpi/batched_p2p.h"
#include "src/collectives/mpi/mpi_error.h"
#include "src/collectives/mpi/mpi_transport.h"
#include "src/collectives/mpi/progress_engine.h"
#include "src/collectives/mpi/shm_segment.h"
#include "src/collectives/mpi/tensor_graveyard.h"
#include "src/collectives/p2p_checks.h"
#include "src/collectives/shape_checks.h"

namespace dtrain::collectives::detail {
namespace {

using Clock = std::chrono::steady_clock;

// Point-to-point ops are not numbered in the collective order.
constexpr std::uint64_t kPointToPointSeq = ~std::uint64_t{0};
// Payload size that never qualifies for running on the caller's thread.
constexpr std::size_t kNeverInline = ~std::size_t{0};

ElementType element_type_of(const at::Tensor& tensor, const char* op) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return ElementType::kFloat32;
    case at::kDouble:
      return ElementType::kFloat64;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    case at::kHalf:
      return ElementType::kFloat16;
    case at::kInt:
      return ElementType::kInt32;
    case at::kLong:
      return ElementType::kInt64;
    case at::kByte:
      return ElementType::kUInt8;
    default:
      DTRAIN_THROW(InvalidArgument, op, ": dtype ", tensor.scalar_type(),
                   " is not supported by the MPI backend (supported: float32, float64, "
                   "bfloat16, float16, int32, int64, uint8)");
  }
}

void check_cpu_tensor(const at::Tensor& tensor, const char* op, const char* which) {
  DTRAIN_CHECK_ARG(tensor.defined(), op, ": ", which, " tensor is undefined");
  DTRAIN_CHECK_ARG(tensor.device().is_cpu(), op, ": ", which, " tensor is on ", tensor.device(),
                   "; the MPI backend takes CPU tensors (use the NCCL backend for CUDA tensors)");
  DTRAIN_CHECK_ARG(tensor.layout() == at::kStrided, op, ": ", which,
                   " tensor must be dense (strided), got layout ", tensor.layout());
}

MPI_Datatype mpi_datatype(ElementType type) {
  switch (type) {
    case ElementType::kFloat32:
      return MPI_FLOAT;
    case ElementType::kFloat64:
      return MPI_DOUBLE;
    case ElementType::kBFloat16:
    case ElementType::kFloat16:
      return MPI_UINT16_T;  // reduced by our own MPI_Op, see half_op
    case ElementType::kInt32:
      return MPI_INT32_T;
    case ElementType::kInt64:
      return MPI_INT64_T;
    case ElementType::kUInt8:
      return MPI_UINT8_T;
  }
  return MPI_DATATYPE_NULL;
}

// MPI_Op callbacks for the 16-bit floating types, which MPI cannot reduce.
template <ElementType kType, ReduceOp kOp>
void half_op_callback(void* in, void* inout, int* len, MPI_Datatype* /*type*/) {
  static const Reducer reducer = make_reducer(kType, kOp);
  reducer(inout, in, static_cast<std::size_t>(*len));
}

template <ElementType kType>
void create_half_ops(MPI_Op (&ops)[4]) {
  DTRAIN_MPI_CHECK(MPI_Op_create(&half_op_callback<kType, ReduceOp::kSum>, 1, &ops[0]));
  DTRAIN_MPI_CHECK(MPI_Op_create(&half_op_callback<kType, ReduceOp::kProduct>, 1, &ops[1]));
  DTRAIN_MPI_CHECK(MPI_Op_create(&half_op_callback<kType, ReduceOp::kMin>, 1, &ops[2]));
  DTRAIN_MPI_CHECK(MPI_Op_create(&half_op_callback<kType, ReduceOp::kMax>, 1, &ops[3]));
}

int half_op_index(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return 0;
    case ReduceOp::kProduct:
      return 1;
    case ReduceOp::kMin:
      return 2;
    case ReduceOp::kMax:
      return 3;
  }
  return 0;
}

MPI_Op builtin_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return MPI_SUM;
    case ReduceOp::kProduct:
      return MPI_PROD;
    case ReduceOp::kMin:
      return MPI_MIN;
    case ReduceOp::kMax:
      return MPI_MAX;
  }
  return MPI_OP_NULL;
}

// The groups of Algorithm::kHier, for a communicator whose ranks are on
// several hosts with the same number (>= 2) on each: this rank's host (MPI
// and shared memory) and its peers of the same local rank on the other
// hosts. Their transports name ranks by their rank in the communicator.
struct Hierarchy {
  int local_size = 0;
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm node_diag = MPI_COMM_NULL;
  MPI_Comm hosts = MPI_COMM_NULL;
  MPI_Comm hosts_diag = MPI_COMM_NULL;
  std::unique_ptr<ShmSegment> node_shm;
  std::unique_ptr<MpiTransport> node_transport;
  std::unique_ptr<MpiTransport> hosts_transport;

  // Collective over `comm`. Null, on every rank alike, unless every host
  // holds the same number (>= 2) of ranks, there are at least 2 hosts, and
  // every host got its shared memory.
  static std::unique_ptr<Hierarchy> create(MPI_Comm comm, const CommunicatorOptions& options,
                                           const std::shared_ptr<const PeerHealth>& health) {
    if (options.shm_slot_bytes == 0) return nullptr;
    int rank = 0;
    DTRAIN_MPI_CHECK(MPI_Comm_rank(comm, &rank));
    MPI_Comm node = MPI_COMM_NULL;
    DTRAIN_MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
    int local_rank = 0;
    int local_size = 0;
    DTRAIN_MPI_CHECK(MPI_Comm_rank(node, &local_rank));
    DTRAIN_MPI_CHECK(MPI_Comm_size(node, &local_size));
    // {hosts, -min local size, max local size}
    int mine[3] = {local_rank == 0 ? 1 : 0, -local_size, local_size};
    int all[3] = {0, 0, 0};
    DTRAIN_MPI_CHECK(MPI_Allreduce(&mine[0], &all[0], 1, MPI_INT, MPI_SUM, comm));
    DTRAIN_MPI_CHECK(MPI_Allreduce(&mine[1], &all[1], 2, MPI_INT, MPI_MAX, comm));
    if (all[0] < 2 || -all[1] != all[2] || local_size < 2) {
      MPI_Comm_free(&node);
      return nullptr;
    }
    auto h = std::make_unique<Hierarchy>();
    h->local_size = local_size;
    h->node = node;
    h->node_shm = ShmSegment::create(node, options.shm_slot_bytes);
    int ok = h->node_shm ? 1 : 0;
    int all_ok = 0;
    DTRAIN_MPI_CHECK(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, comm));
    if (!all_ok) return nullptr;  // the destructor frees `node`
    DTRAIN_MPI_CHECK(MPI_Comm_split(comm, local_rank, rank, &h->hosts));
    DTRAIN_MPI_CHECK(MPI_Comm_set_errhandler(h->node, MPI_ERRORS_RETURN));
    DTRAIN_MPI_CHECK(MPI_Comm_set_errhandler(h->hosts, MPI_ERRORS_RETURN));
    DTRAIN_MPI_CHECK(MPI_Comm_dup(h->node, &h->node_diag));
    DTRAIN_MPI_CHECK(MPI_Comm_dup(h->hosts, &h->hosts_diag));
    char host[MPI_MAX_PROCESSOR_NAME] = {};
    int host_len = 0;
    DTRAIN_MPI_CHECK(MPI_Get_processor_name(host, &host_len));
    h->node_transport = std::make_unique<MpiTransport>(
        h->node, h->node_diag, options.name + ": inside " + host, health, ranks_in(h->node, comm));
    h->hosts_transport =
        std::make_unique<MpiTransport>(h->hosts, h->hosts_diag, options.name + ": between hosts",
                                       health, ranks_in(h->hosts, comm));
    return h;
  }

  ~Hierarchy() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (MPI_Comm* c : {&node_diag, &hosts_diag, &hosts, &node}) {
      if (*c != MPI_COMM_NULL) MPI_Comm_free(c);
    }
  }

  // Runs `body` as part of the op that `outer` is running: the sub-groups'
  // transports share its number, deadline and description.
  template <typename Body>
  void run(MpiTransport& outer, Body&& body) {
    node_transport->begin_op(outer.op());
    hosts_transport->begin_op(outer.op());
    try {
      body(HierLinks{node_shm->group(), *node_transport, *node_transport, *hosts_transport});
    } catch (...) {
      node_transport->abandon_op();
      hosts_transport->abandon_op();
      throw;
    }
    node_transport->end_op();
    hosts_transport->end_op();
  }

  // The rank in `parent` of each rank of `sub`.
  static std::vector<int> ranks_in(MPI_Comm sub, MPI_Comm parent) {
    int n = 0;
    DTRAIN_MPI_CHECK(MPI_Comm_size(sub, &n));
    std::vector<int> mine(static_cast<std::size_t>(n));
    std::vector<int> theirs(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) mine[static_cast<std::size_t>(i)] = i;
    MPI_Group sub_group = MPI_GROUP_NULL;
    MPI_Group parent_group = MPI_GROUP_NULL;
    DTRAIN_MPI_CHECK(MPI_Comm_group(sub, &sub_group));
    DTRAIN_MPI_CHECK(MPI_Comm_group(parent, &parent_group));
    DTRAIN_MPI_CHECK(
        MPI_Group_translate_ranks(sub_group, n, mine.data(), parent_group, theirs.data()));
    MPI_Group_free(&sub_group);
    MPI_Group_free(&parent_group);
    return theirs;
  }
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, CommunicatorOptions options,
                  std::shared_ptr<const PeerHealth> health)
      : comm_(comm), options_(std::move(options)), health_(std::move(health)) {
    options_.validate();
    name_ = std::make_shared<const std::string>(options_.name);
    DTRAIN_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    DTRAIN_MPI_CHECK(MPI_Comm_dup(comm_, &p2p_comm_));
    DTRAIN_MPI_CHECK(MPI_Comm_dup(comm_, &diag_comm_));
    DTRAIN_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    DTRAIN_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    transport_ = std::make_unique<MpiTransport>(comm_, diag_comm_, options_.name, health_);
    p2p_transport_ = std::make_unique<MpiTransport>(p2p_comm_, diag_comm_, options_.name, health_);
    create_half_ops<ElementType::kBFloat16>(half_ops_[0]);
    create_half_ops<ElementType::kFloat16>(half_ops_[1]);
    shm_ = ShmSegment::create(comm_, options_.shm_slot_bytes);
    if (!shm_) hier_ = Hierarchy::create(comm_, options_, health_);
    p2p_ = std::make_unique<BatchedPointToPoint>(p2p_comm_, options_.name, rank_, size_);
    engine_ = std::make_unique<ProgressEngine>();
  }

  ~MpiCommunicator() override {
    engine_.reset();  // runs or fails what is queued, joins the thread
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (failed_.load() || finalized) {
      // MPI may still hold requests that point into our buffers or
      // communicators: leave them all allocated rather than risk a write
      // into freed memory.
      slots_.leak();
      workspace_.leak();
      (void)hier_.release();
      p2p_->leak();
      return;
    }
    for (auto& ops : half_ops_) {
      for (MPI_Op& op : ops) MPI_Op_free(&op);
    }
    MPI_Comm_free(&diag_comm_);
    MPI_Comm_free(&p2p_comm_);
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return options_.name; }
  const CommunicatorOptions& options() const override { return options_; }
  bool failed() const override { return failed_.load(); }

  std::shared_ptr<Work> all_reduce(const at::Tensor& tensor,
                                   const AllReduceOptions& opts) override {
    constexpr const char* kOp = "all_reduce";
    check_cpu_tensor(tensor, kOp, "the");
    const ElementType type = element_type_of(tensor, kOp);
    const Reducer reducer = make_reducer(type, opts.op);
    const std::size_t count = static_cast<std::size_t>(tensor.numel());
    const Algorithm algorithm = choose_all_reduce_algorithm(
        opts.algorithm, options_.allreduce_algorithm, count * reducer.element_size, size_,
        shm_ != nullptr, hier_ ? hier_->local_size : 0);
    DTRAIN_CHECK_ARG(algorithm != Algorithm::kNative || count <= static_cast<std::size_t>(INT_MAX),
                     "all_reduce: ", count,
                     " elements exceed MPI's int count limit of the native algorithm; use ring");
    OpDescriptor what = describe(kOp, count, type);
    what.algorithm = to_string(algorithm);
    what.reduce = to_string(opts.op);
    const ReduceOp op = opts.op;
    return submit(what, opts.timeout, /*collective=*/true, count * reducer.element_size, tensor,
                  at::Tensor(), [=](MpiTransport& transport) {
                    Staged staged = stage(tensor, workspace_);
                    void* data = staged.tensor.data_ptr();
                    if (algorithm == Algorithm::kNative) {
                      native_all_reduce(transport, data, count, type, op);
                    } else if (algorithm == Algorithm::kShm) {
                      shm_all_reduce(shm_->group(), data, count, reducer, transport);
                    } else if (algorithm == Algorithm::kHier) {
                      hier_->run(transport, [&](const HierLinks& links) {
                        hier_all_reduce(links, data, count, reducer, slots_, options_.chunk_bytes);
                      });
                    } else {
                      run_all_reduce(algorithm, transport, data, count, reducer, slots_,
                                     options_.chunk_bytes);
                    }
                    if (op == ReduceOp::kAvg) divide_in_place(data, count, type, size_);
                    unstage(staged, tensor);
                  });
  }

  std::shared_ptr<Work> broadcast(const at::Tensor& tensor, const BroadcastOptions& opts) override {
    constexpr const char* kOp = "broadcast";
    check_cpu_tensor(tensor, kOp, "the");
    const ElementType type = element_type_of(tensor, kOp);
    DTRAIN_CHECK_ARG(opts.root >= 0 && opts.root < size_, "broadcast: root ", opts.root,
                     " is not a rank of communicator '", options_.name, "' (size ", size_, ")");
    const std::size_t count = static_cast<std::size_t>(tensor.numel());
    const std::size_t bytes = count * element_size(type);
    const int root = opts.root;
    OpDescriptor what = describe(kOp, count, type);
    what.root = root;
    return submit(
        what, opts.timeout, true, bytes, tensor, at::Tensor(), [=](MpiTransport& transport) {
          Staged staged = stage(tensor, workspace_, /*copy_in=*/rank_ == root);
          tree_broadcast(transport, staged.tensor.data_ptr(), bytes, root, options_.chunk_bytes);
          unstage(staged, tensor);
        });
  }

  std::shared_ptr<Work> all_gather(const at::Tensor& output, const at::Tensor& input,
                                   const AllGatherOptions& opts) override {
    constexpr const char* kOp = "all_gather";
    check_cpu_tensor(input, kOp, "input");
    check_cpu_tensor(output, kOp, "output");
    const ElementType type = element_type_of(input, kOp);
    DTRAIN_CHECK_ARG(output.scalar_type() == input.scalar_type(), kOp, ": output dtype ",
                     output.scalar_type(), " differs from input dtype ", input.scalar_type());
    const std::size_t count = static_cast<std::size_t>(input.numel());
    check_rank_major_counts(kOp, "output", static_cast<std::size_t>(output.numel()), "input", count,
                            size_);
    const std::size_t es = element_size(type);
    const Algorithm algorithm = scatter_gather_algorithm(kOp, opts.algorithm, count * size_ * es);
    OpDescriptor what = describe(kOp, count, type);
    what.algorithm = to_string(algorithm);
    return submit(what, opts.timeout, true, count * size_ * es, output, input,
                  [=](MpiTransport& transport) {
                    Staged staged = stage(output, workspace_, /*copy_in=*/false);
                    char* out = static_cast<char*>(staged.tensor.data_ptr());
                    copy_into(out + rank_ * count * es, input);
                    if (algorithm == Algorithm::kShm) {
                      shm_all_gather(shm_->group(), out, count, type, transport);
                    } else {
                      ring_all_gather(transport, out, count * size_, es, options_.chunk_bytes);
                    }
                    unstage(staged, output);
                  });
  }

  std::shared_ptr<Work> reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                       const ReduceScatterOptions& opts) override {
    constexpr const char* kOp = "reduce_scatter";
    check_cpu_tensor(input, kOp, "input");
    check_cpu_tensor(output, kOp, "output");
    const ElementType type = element_type_of(input, kOp);
    DTRAIN_CHECK_ARG(output.scalar_type() == input.scalar_type(), kOp, ": output dtype ",
                     output.scalar_type(), " differs from input dtype ", input.scalar_type());
    const Reducer reducer = make_reducer(type, opts.op);
    const std::size_t count = static_cast<std::size_t>(output.numel());
    check_rank_major_counts(kOp, "input", static_cast<std::size_t>(input.numel()), "output", count,
                            size_);
    const std::size_t es = element_size(type);
    const std::size_t input_bytes = count * size_ * es;
    const Algorithm algorithm = scatter_gather_algorithm(kOp, opts.algorithm, input_bytes);
    const ReduceOp op = opts.op;
    OpDescriptor what = describe(kOp, count, type);
    what.algorithm = to_string(algorithm);
    what.reduce = to_string(op);
    return submit(
        what, opts.timeout, true, input_bytes, output, input, [=](MpiTransport& transport) {
          if (algorithm == Algorithm::kShm) {
            // Reduced straight into the output. A non-contiguous tensor, or
            // an output that overlaps the input (which later rounds still
            // read), goes through the workspace.
            const bool stage_in = !input.is_contiguous();
            const bool stage_out = !output.is_contiguous() || overlaps(output, input);
            const std::size_t staged_bytes =
                (stage_in ? input_bytes : 0) + (stage_out ? count * es : 0);
            char* staging =
                staged_bytes > 0 ? static_cast<char*>(workspace_.get(staged_bytes)) : nullptr;
            const void* in = stage_in ? staging : input.data_ptr();
            if (stage_in) copy_into(staging, input);
            char* out = stage_out ? staging + (stage_in ? input_bytes : 0)
                                  : static_cast<char*>(output.data_ptr());
            shm_reduce_scatter(shm_->group(), in, out, count, reducer, transport);
            if (op == ReduceOp::kAvg) divide_in_place(out, count, type, size_);
            if (stage_out) copy_out(output, out);
            return;
          }
          // Reduce in a reused workspace: the input must stay unchanged.
          char* work = static_cast<char*>(workspace_.get(input_bytes));
          copy_into(work, input);
          ring_reduce_scatter(transport, work, count * size_, reducer, slots_,
                              options_.chunk_bytes);
          char* mine = work + rank_ * count * es;
          if (op == ReduceOp::kAvg) divide_in_place(mine, count, type, size_);
          copy_out(output, mine);
        });
  }

  std::shared_ptr<Work> send(const at::Tensor& tensor, int dst,
                             const PointToPointOptions& opts) override {
    return point_to_point("send", tensor, dst, opts, /*is_recv=*/false);
  }

  std::shared_ptr<Work> recv(const at::Tensor& tensor, int src,
                             const PointToPointOptions& opts) override {
    return point_to_point("recv", tensor, src, opts, /*is_recv=*/true);
  }

  std::shared_ptr<Work> batch_send_recv(const std::vector<P2POp>& ops,
                                        const BatchSendRecvOptions& opts) override {
    OpDescriptor what;
    what.op = "batch_send_recv";
    what.has_tensor = false;
    what.sends = 0;
    what.recvs = 0;
    for (const P2POp& op : ops) ++(op.kind == P2POp::Kind::kRecv ? what.recvs : what.sends);
    return submit_batch(what, ops, opts.timeout);
  }

  std::shared_ptr<Work> barrier(const BarrierOptions& opts) override {
    OpDescriptor what;
    what.op = "barrier";
    what.has_tensor = false;
    return submit(what, opts.timeout, true, 0, at::Tensor(), at::Tensor(),
                  [this](MpiTransport& transport) {
                    MPI_Request request;
                    DTRAIN_MPI_CHECK(MPI_Ibarrier(comm_, &request));
                    transport.wait_native(&request);
                  });
  }

  std::shared_ptr<Communicator> split(int color, int key, const SplitOptions& opts) override {
    const Timeout timeout = opts.timeout.value_or(options_.timeout);
    MPI_Comm new_comm = MPI_COMM_NULL;
    OpDescriptor what;
    what.op = "split";
    what.has_tensor = false;
    what.color = color;
    what.key = key;
    auto work = submit(
        what, timeout, true, kNeverInline, at::Tensor(), at::Tensor(),
        [&, color, key](MpiTransport& transport) {
          // Rendezvous under the timeout first (MPI_Comm_split
          // has none): after this all-gather every rank is
          // known to be inside the split.
          auto* ids = static_cast<std::int64_t*>(workspace_.get(sizeof(std::int64_t) * size_));
          ids[rank_] = color;
          ring_all_gather(transport, ids, static_cast<std::size_t>(size_), sizeof(std::int64_t),
                          options_.chunk_bytes);
          DTRAIN_MPI_CHECK(
              MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &new_comm));
        });
    work->wait();
    if (new_comm == MPI_COMM_NULL) return nullptr;
    CommunicatorOptions child = options_;
    child.timeout = timeout;
    child.name = opts.name.empty() ? options_.name + "/" + std::to_string(color) : opts.name;
    return std::make_shared<MpiCommunicator>(new_comm, std::move(child), health_);
  }

 private:
  // The Work of an MPI op: describes itself only when asked (errors, logs).
  class MpiWork final : public Work {
   public:
    MpiWork(const OpDescriptor& what, std::shared_ptr<const std::string> comm_name)
        : what_(what), comm_name_(std::move(comm_name)) {}
    std::string description() const override {
      return what_.str() + " on communicator '" + *comm_name_ + "'";
    }

   private:
    OpDescriptor what_;
    std::shared_ptr<const std::string> comm_name_;
  };

  // A contiguous tensor to run the op on: the caller's own, or a view of the
  // reused workspace when the caller's is not contiguous.
  struct Staged {
    at::Tensor tensor;
    bool copied = false;
  };

  static OpDescriptor describe(const char* op, std::size_t count, ElementType type) {
    OpDescriptor what;
    what.op = op;
    what.count = count;
    what.type = type;
    return what;
  }

  static Staged stage(const at::Tensor& tensor, Scratch& workspace, bool copy_in = true) {
    if (tensor.is_contiguous()) return Staged{tensor, false};
    void* buffer = workspace.get(static_cast<std::size_t>(tensor.numel()) * tensor.element_size());
    at::Tensor staged = at::from_blob(buffer, tensor.sizes(), tensor.options());
    if (copy_in) staged.copy_(tensor);
    return Staged{staged, true};
  }

  static void unstage(const Staged& staged, const at::Tensor& tensor) {
    if (staged.copied) tensor.copy_(staged.tensor);
  }

  static void copy_into(void* dst, const at::Tensor& src) {
    if (src.numel() == 0) return;
    if (src.is_contiguous()) {
      std::memcpy(dst, src.data_ptr(), static_cast<std::size_t>(src.numel()) * src.element_size());
    } else {
      at::from_blob(dst, src.sizes(), src.options()).copy_(src);
    }
  }

  // Whether two tensors' memory spans share a byte (for a non-contiguous
  // tensor its whole span counts; LibTorch strides are never negative).
  static bool overlaps(const at::Tensor& a, const at::Tensor& b) {
    if (a.numel() == 0 || b.numel() == 0) return false;
    auto span = [](const at::Tensor& t) {
      const char* begin = static_cast<const char*>(t.data_ptr());
      std::size_t extent = 1;
      for (std::int64_t d = 0; d < t.dim(); ++d) {
        extent += static_cast<std::size_t>((t.size(d) - 1) * t.stride(d));
      }
      return std::make_pair(begin, begin + extent * t.element_size());
    };
    const auto [a_begin, a_end] = span(a);
    const auto [b_begin, b_end] = span(b);
    return a_begin < b_end && b_begin < a_end;
  }

  static void copy_out(const at::Tensor& dst, const void* src) {
    if (dst.numel() == 0) return;
    if (dst.is_contiguous()) {
      std::memcpy(dst.data_ptr(), src, static_cast<std::size_t>(dst.numel()) * dst.element_size());
    } else {
      dst.copy_(at::from_blob(const_cast<void*>(src), dst.sizes(), dst.options()));
    }
  }

  // What a reduce_scatter or all_gather of `bytes` (all ranks' data) runs:
  // kShm or kRing; kShm without shared memory runs as kRing.
  Algorithm scatter_gather_algorithm(const char* op, std::optional<Algorithm> requested,
                                     std::size_t bytes) const {
    const Algorithm algorithm = requested.value_or(Algorithm::kAuto);
    DTRAIN_CHECK_ARG(algorithm == Algorithm::kAuto || algorithm == Algorithm::kRing ||
                         algorithm == Algorithm::kShm,
                     op, ": algorithm '", to_string(algorithm), "' runs all_reduce only; ", op,
                     " runs auto, ring or shm");
    if (algorithm == Algorithm::kAuto) {
      return choose_scatter_gather_algorithm(bytes, size_, shm_ != nullptr);
    }
    return algorithm == Algorithm::kShm && !shm_ ? Algorithm::kRing : algorithm;
  }

  void native_all_reduce(MpiTransport& transport, void* data, std::size_t count, ElementType type,
                         ReduceOp op) {
    // MPI does not check that the ranks pass the same count and type, and a
    // mismatch can overrun buffers: agree on both first, over dtrain's own
    // size-checked transport (a 32-byte exchange). max(x) and max(-x) equal
    // x and -x on every rank only if every rank has the same x.
    const auto me = static_cast<std::int64_t>(count);
    const auto kind = static_cast<std::int64_t>(type);
    std::int64_t agreed[4] = {me, -me, kind, -kind};
    run_all_reduce(Algorithm::kRhd, transport, agreed, 4,
                   make_reducer(ElementType::kInt64, ReduceOp::kMax), slots_, options_.chunk_bytes);
    DTRAIN_CHECK_T(CommError,
                   agreed[0] == me && agreed[1] == -me && agreed[2] == kind && agreed[3] == -kind,
                   "all_reduce(native) on communicator '", options_.name,
                   "': the ranks passed tensors of different sizes or dtypes (this rank: ", count,
                   " x ", to_string(type), "); nothing was reduced");
    if (count == 0) return;
    MPI_Op mpi_op = builtin_op(op);
    if (type == ElementType::kBFloat16) mpi_op = half_ops_[0][half_op_index(op)];
    if (type == ElementType::kFloat16) mpi_op = half_ops_[1][half_op_index(op)];
    MPI_Request request;
    DTRAIN_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data, static_cast<int>(count), mpi_datatype(type),
                                    mpi_op, comm_, &request));
    transport.wait_native(&request);
  }

  std::shared_ptr<Work> point_to_point(const char* op, const at::Tensor& tensor, int peer,
                                       const PointToPointOptions& opts, bool is_recv) {
    check_cpu_tensor(tensor, op, "the");
    const ElementType type = element_type_of(tensor, op);
    DTRAIN_CHECK_ARG(peer >= 0 && peer < size_ && peer != rank_, op, ": peer rank ", peer,
                     " is not another rank of communicator '", options_.name, "' (size ", size_,
                     ", this rank ", rank_, ")");
    DTRAIN_CHECK_ARG(opts.tag >= 0 && opts.tag < kMaxUserTag, op, ": tag ", opts.tag,
                     " is outside [0, ", kMaxUserTag, ")");
    OpDescriptor what = describe(op, static_cast<std::size_t>(tensor.numel()), type);
    what.peer = peer;
    what.tag = opts.tag;
    return submit_batch(
        what, {is_recv ? P2POp::recv(tensor, peer, opts.tag) : P2POp::send(tensor, peer, opts.tag)},
        opts.timeout);
  }

  // Queues a point-to-point batch (batched_p2p.h) as one op.
  std::shared_ptr<Work> submit_batch(const OpDescriptor& what, const std::vector<P2POp>& ops,
                                     std::optional<Timeout> timeout) {
    std::vector<ElementType> types;
    types.reserve(ops.size());
    for (const P2POp& op : ops) {
      check_cpu_tensor(op.tensor, what.op, op.kind == P2POp::Kind::kRecv ? "a received" : "a sent");
      types.push_back(element_type_of(op.tensor, what.op));
    }
    const Timeout op_timeout = timeout.value_or(options_.timeout);
    DTRAIN_CHECK_ARG(op_timeout.count() > 0, what.str(), ": timeout must be positive, got ",
                     op_timeout.count(), " ms");
    // Channels are declared in issue order: hold the lock until queued.
    std::lock_guard<std::mutex> lock(p2p_->issue_mutex());
    auto batch = std::make_shared<std::vector<P2PBatchOp>>(p2p_->prepare(what.op, ops, types));
    return submit(
        what, op_timeout, /*collective=*/false, kNeverInline, at::Tensor(), at::Tensor(),
        [this, batch, what](MpiTransport& transport) { p2p_->run(transport, what, *batch); });
  }

  // Runs `body` as one op: checks that the communicator is healthy, sets the
  // op's deadline and tag, and on any failure marks the communicator failed
  // and keeps the op's tensors alive for good (MPI may still write into
  // them). Runs on the progress thread, or on the caller's for small ops.
  template <typename Body>
  void run_op(const OpDescriptor& what, Timeout timeout, bool collective, const at::Tensor& keep,
              const at::Tensor& keep_too, Body& body) {
    MpiTransport& transport = collective ? *transport_ : *p2p_transport_;
    if (failed_.load()) {
      std::lock_guard<std::mutex> lock(failure_mutex_);
      DTRAIN_THROW(CommError, what.str(), " was not run: communicator '", options_.name,
                   "' failed earlier: ", failure_);
    }
    if (health_ && health_->failed()) {
      const std::string lost = health_->failure();
      {
        std::lock_guard<std::mutex> lock(failure_mutex_);
        if (!failed_.load()) failure_ = lost;
      }
      failed_.store(true);
      DTRAIN_THROW(CommError, what.str(), " on communicator '", options_.name, "' (rank ", rank_,
                   " of ", size_, ") was not run: ", lost);
    }
    OpInfo info;
    info.seq = collective ? collective_seq_++ : kPointToPointSeq;
    info.what = what;
    info.timeout = timeout;
    info.deadline = Clock::now() + timeout;
    transport.begin_op(info);
    try {
      body(transport);
      transport.end_op();
    } catch (const std::exception& e) {
      transport.abandon_op();
      {
        std::lock_guard<std::mutex> lock(failure_mutex_);
        if (!failed_.load()) failure_ = e.what();
        graveyard_.keep(keep);
        graveyard_.keep(keep_too);
      }
      failed_.store(true);
      throw;
    }
  }

  // Issues an op and returns its Work. Collectives of at most
  // options_.inline_max_bytes (any size on a 1-rank communicator) issued
  // while the engine is idle run right here on the caller's thread;
  // everything else is queued on the engine.
  template <typename Body>
  std::shared_ptr<Work> submit(const OpDescriptor& what, std::optional<Timeout> timeout,
                               bool collective, std::size_t payload_bytes, at::Tensor keep,
                               at::Tensor keep_too, Body body) {
    const Timeout op_timeout = timeout.value_or(options_.timeout);
    DTRAIN_CHECK_ARG(op_timeout.count() > 0, what.str(), ": timeout must be positive, got ",
                     op_timeout.count(), " ms");
    auto work = std::make_shared<MpiWork>(what, name_);
    // On one rank a collective moves no data, so it runs inline at any size
    // (in order: only when nothing is queued before it).
    const bool small =
        payload_bytes <= options_.inline_max_bytes || (size_ == 1 && options_.inline_max_bytes > 0);
    if (collective && small && engine_->try_begin_inline()) {
      std::exception_ptr error;
      try {
        run_op(what, op_timeout, collective, keep, keep_too, body);
      } catch (...) {
        error = std::current_exception();
      }
      engine_->end_inline();
      work->complete(error);
      return work;
    }
    engine_->enqueue(work, [this, what, op_timeout, collective, keep = std::move(keep),
                            keep_too = std::move(keep_too), body = std::move(body)]() mutable {
      run_op(what, op_timeout, collective, keep, keep_too, body);
    });
    return work;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm p2p_comm_ = MPI_COMM_NULL;
  MPI_Comm diag_comm_ = MPI_COMM_NULL;
  CommunicatorOptions options_;
  std::shared_ptr<const PeerHealth> health_;  // the job's heartbeat; may be null
  std::shared_ptr<const std::string> name_;   // shared with every Work, for its description
  int rank_ = 0;
  int size_ = 1;
  MPI_Op half_ops_[2][4] = {};  // [bfloat16, float16][sum, product, min, max]
  std::unique_ptr<MpiTransport> transport_;
  std::unique_ptr<MpiTransport> p2p_transport_;
  std::unique_ptr<ShmSegment> shm_;  // null unless every rank is on this node
  std::unique_ptr<Hierarchy> hier_;  // null unless Algorithm::kHier can run
  std::unique_ptr<BatchedPointToPoint> p2p_;

  // Touched only by the progress thread.
  Scratch slots_;      // the algorithms' pipelining slots
  Scratch workspace_;  // staging of non-contiguous tensors, reduce-scatter input
  std::uint64_t collective_seq_ = 0;

  std::atomic<bool> failed_{false};
  std::mutex failure_mutex_;
  std::string failure_;
  // The failed op's tensors, never freed: they outlive this communicator.
  TensorGraveyard graveyard_;

  std::unique_ptr<ProgressEngine> engine_;  // last: stopped first
};

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, CommunicatorOptions options,
                                                    std::shared_ptr<const PeerHealth> health) {
  return std::make_shared<MpiCommunicator>(comm, std::move(options), std::move(health));
}

void rendezvous(MPI_Comm comm, Timeout timeout, const char* what) {
  MPI_Request request;
  DTRAIN_MPI_CHECK(MPI_Ibarrier(comm, &request));
  const auto deadline = Clock::now() + timeout;
  int flag = 0;
  while (true) {
    DTRAIN_MPI_CHECK(MPI_Test(&request, &flag, MPI_STATUS_IGNORE));
    if (flag) return;
    if (Clock::now() >= deadline) {
      DTRAIN_THROW(TimeoutError, what, ": not every rank arrived within ", timeout.count(),
                   " ms (a process did not start, or did not call it)");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

}  // namespace dtrain::collectives::detail
