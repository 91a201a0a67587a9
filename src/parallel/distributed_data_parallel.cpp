// DistributedDataParallel: buckets, autograd hooks and ordered launches.
//
// Readiness comes from post-hooks on each parameter's AccumulateGrad node,
// which run after the gradient has been added into the parameter's .grad
// (a view into its bucket). The first hook of a backward queues an
// end-of-backward callback on the autograd engine; it handles parameters
// that got no gradient, then the step's state is reset in synchronize().

#include "dtrain/parallel/distributed_data_parallel.h"

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <ATen/ATen.h>

#include <chrono>
#include <cstring>
#include <limits>
#include <mutex>
#include <sstream>

#include "dtrain/error.h"
#include "src/parallel/buffers.h"

namespace dtrain::parallel {

using collectives::AllReduceOptions;
using collectives::Communicator;
using collectives::ReduceOp;
using collectives::Work;

void DdpOptions::validate() const {
  DTRAIN_CHECK_ARG(first_bucket_cap_bytes > 0, "DdpOptions::first_bucket_cap_bytes must be > 0");
  DTRAIN_CHECK_ARG(bucket_cap_bytes > 0, "DdpOptions::bucket_cap_bytes must be > 0");
}

struct DistributedDataParallel::State {
  std::unique_ptr<detail::BufferBroadcast> buffer_broadcast;  // made at the first synchronize()
  struct Slot {
    std::string name;
    at::Tensor param;
    int bucket = -1;
    bool ready = false;
    std::shared_ptr<torch::autograd::Node> accumulator;
    std::uintptr_t hook_key = 0;
  };
  struct Bucket {
    at::Tensor flat;
    at::Tensor wire;  // 16-bit copy sent instead of `flat` under compression
    std::vector<int> slots;
    int pending = 0;
    std::shared_ptr<Work> work;
  };

  std::mutex mutex;
  std::vector<Slot> slots;
  std::vector<Bucket> buckets;
  Communicator* dp = nullptr;
  bool overlap = true;
  bool find_unused = false;
  bool sync_enabled = true;
  bool in_backward = false;
  bool backward_seen = false;  // a synced backward ran since the last synchronize()
  int next_to_launch = 0;
  std::vector<int> launch_order;
  std::vector<int> last_launch_order;

  // Called with `mutex` held. Starts every bucket that is ready, in order.
  void launch_ready() {
    while (next_to_launch < static_cast<int>(buckets.size()) &&
           buckets[next_to_launch].pending == 0) {
      Bucket& b = buckets[next_to_launch];
      AllReduceOptions options;
      if (b.wire.defined()) {
        // Pre-divide, then sum: float16 sums of N full gradients could overflow.
        // Divided in float32 and rounded once by the copy. In place, because
        // `flat` is overwritten by the result anyway, and LibTorch 2.x's
        // div_out with a scalar rejects an output of another dtype.
        b.flat.div_(static_cast<double>(dp->size()));
        b.wire.copy_(b.flat);
        options.op = ReduceOp::kSum;
        b.work = dp->all_reduce(b.wire, options);
      } else {
        options.op = ReduceOp::kAvg;
        b.work = dp->all_reduce(b.flat, options);
      }
      launch_order.push_back(next_to_launch);
      ++next_to_launch;
    }
  }

  void mark_ready(int index, const std::shared_ptr<State>& self) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!sync_enabled) return;
    if (!in_backward) {
      in_backward = true;
      backward_seen = true;
      std::weak_ptr<State> weak = self;
      torch::autograd::Engine::get_default_engine().queue_callback([weak] {
        if (auto state = weak.lock()) state->finish_backward();
      });
    }
    Slot& slot = slots[index];
    if (slot.ready) return;
    slot.ready = true;
    if (--buckets[slot.bucket].pending == 0 && overlap) launch_ready();
  }

  // End of a synced backward: parameters that got no gradient.
  void finish_backward() {
    std::lock_guard<std::mutex> lock(mutex);
    in_backward = false;
    for (Slot& slot : slots) {
      if (slot.ready) continue;
      if (!find_unused) {
        reset_readiness();
        DTRAIN_THROW(Error, "DistributedDataParallel: parameter '", slot.name,
                     "' got no gradient in this backward pass, so its bucket can never be "
                     "all-reduced. Set DdpOptions::find_unused_parameters = true if some "
                     "parameters are legitimately unused in a step, or use every parameter.");
      }
      slot.ready = true;  // its gradient view holds zeros (or what no_sync accumulated)
      --buckets[slot.bucket].pending;
    }
    if (overlap) launch_ready();
  }

  void reset_readiness() {
    for (Slot& slot : slots) slot.ready = false;
    for (Bucket& b : buckets) {
      b.pending = static_cast<int>(b.slots.size());
      b.work.reset();
    }
    next_to_launch = 0;
    launch_order.clear();
    backward_seen = false;
  }
};

namespace {

class ReadyHook final : public torch::autograd::FunctionPostHook {
 public:
  ReadyHook(std::weak_ptr<DistributedDataParallel::State> state, int index)
      : state_(std::move(state)), index_(index) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    if (auto state = state_.lock()) state->mark_ready(index_, state);
    return outputs;
  }

 private:
  std::weak_ptr<DistributedDataParallel::State> state_;
  int index_;
};

std::string describe(const std::string& name, const at::Tensor& t) {
  std::ostringstream os;
  os << name << " " << t.sizes() << " " << t.scalar_type();
  return os.str();
}

// Checks that every rank has the same parameter list as dp rank 0; every
// rank throws the same error naming the first difference. The exchanged
// tensors live on `device`, the parameters' device, since a communicator
// takes tensors of one kind only (CPU for MPI, CUDA for NCCL).
void check_same_parameters(Communicator& dp, const std::vector<std::string>& mine,
                           const at::Device& device) {
  std::string joined;
  for (const std::string& d : mine) joined += d + '\n';
  const auto on_device = at::TensorOptions().device(device);
  at::Tensor length =
      at::full({1}, static_cast<std::int64_t>(joined.size()), on_device.dtype(at::kLong));
  dp.broadcast(length)->wait();
  at::Tensor bytes = at::empty({length.cpu().item<std::int64_t>()}, at::kByte);
  if (dp.rank() == 0) std::memcpy(bytes.data_ptr(), joined.data(), joined.size());
  bytes = bytes.to(device);
  dp.broadcast(bytes)->wait();
  bytes = bytes.cpu();
  const std::string theirs(static_cast<const char*>(bytes.data_ptr()),
                           static_cast<std::size_t>(bytes.numel()));
  std::vector<std::string> reference;
  std::istringstream in(theirs);
  for (std::string line; std::getline(in, line);) reference.push_back(line);

  std::int64_t first = std::numeric_limits<std::int64_t>::max();
  const std::size_t n = std::max(reference.size(), mine.size());
  for (std::size_t i = 0; i < n; ++i) {
    if (i >= reference.size() || i >= mine.size() || reference[i] != mine[i]) {
      first = static_cast<std::int64_t>(i);
      break;
    }
  }
  at::Tensor agreed = at::full({1}, first, on_device.dtype(at::kLong));
  collectives::AllReduceOptions min;
  min.op = ReduceOp::kMin;
  dp.all_reduce(agreed, min)->wait();
  const std::int64_t k = agreed.cpu().item<std::int64_t>();
  if (k == std::numeric_limits<std::int64_t>::max()) return;
  const auto at_index = [k](const std::vector<std::string>& list) {
    return static_cast<std::size_t>(k) < list.size() ? "'" + list[k] + "'" : std::string("nothing");
  };
  DTRAIN_THROW(InvalidArgument, "DistributedDataParallel: the ranks' models differ at parameter #",
               k, ": dp rank 0 has ", at_index(reference), ", dp rank ", dp.rank(), " has ",
               at_index(mine),
               " (parameters listed as name, shape, dtype in registration order; "
               "every rank must build the same model)");
}

}  // namespace

DistributedDataParallel::DistributedDataParallel(std::shared_ptr<torch::nn::Module> module,
                                                 std::shared_ptr<Communicator> dp,
                                                 DdpOptions options)
    : module_(std::move(module)), dp_(std::move(dp)), options_(options) {
  DTRAIN_CHECK_ARG(module_ != nullptr, "DistributedDataParallel needs a module");
  DTRAIN_CHECK_ARG(dp_ != nullptr, "DistributedDataParallel needs a communicator");
  options_.validate();
  state_ = std::make_shared<State>();
  State& s = *state_;
  s.dp = dp_.get();
  s.overlap = options_.overlap;
  s.find_unused = options_.find_unused_parameters;

  std::vector<std::string> descriptions;
  at::Device device = at::kCPU;
  for (const auto& item : module_->named_parameters(/*recurse=*/true)) {
    if (descriptions.empty()) device = item.value().device();
    descriptions.push_back(describe(item.key(), item.value()));
    if (!item.value().requires_grad()) continue;
    State::Slot slot;
    slot.name = item.key();
    slot.param = item.value();
    s.slots.push_back(std::move(slot));
  }
  check_same_parameters(*dp_, descriptions, device);

  // Every replica starts from rank 0's weights and buffers.
  {
    torch::NoGradGuard no_grad;
    for (const auto& p : module_->parameters(true)) dp_->broadcast(p.detach())->wait();
    for (const auto& b : module_->buffers(true)) dp_->broadcast(b.detach())->wait();
  }

  // Buckets in reverse registration order; a bucket holds one dtype.
  std::size_t cap = options_.first_bucket_cap_bytes;
  std::size_t filled = 0;
  for (int i = static_cast<int>(s.slots.size()) - 1; i >= 0; --i) {
    const at::Tensor& p = s.slots[i].param;
    const std::size_t bytes = static_cast<std::size_t>(p.numel()) * p.element_size();
    const bool dtype_change =
        !s.buckets.empty() &&
        s.slots[s.buckets.back().slots.front()].param.scalar_type() != p.scalar_type();
    if (s.buckets.empty() || dtype_change || (filled > 0 && filled + bytes > cap)) {
      if (!s.buckets.empty()) cap = options_.bucket_cap_bytes;
      s.buckets.emplace_back();
      filled = 0;
    }
    s.buckets.back().slots.push_back(i);
    s.slots[i].bucket = static_cast<int>(s.buckets.size()) - 1;
    filled += bytes;
  }
  for (State::Bucket& b : s.buckets) {
    std::int64_t numel = 0;
    for (int i : b.slots) numel += s.slots[i].param.numel();
    const at::Tensor& first = s.slots[b.slots.front()].param;
    b.flat = at::zeros({numel}, first.options().requires_grad(false));
    std::int64_t offset = 0;
    for (int i : b.slots) {
      at::Tensor& p = s.slots[i].param;
      p.mutable_grad() = b.flat.narrow(0, offset, p.numel()).view(p.sizes());
      offset += p.numel();
    }
    b.pending = static_cast<int>(b.slots.size());
    if (options_.compression != GradientCompression::kNone && first.scalar_type() == at::kFloat) {
      b.wire = at::zeros(
          {numel},
          first.options().requires_grad(false).dtype(
              options_.compression == GradientCompression::kBFloat16 ? at::kBFloat16 : at::kHalf));
    }
  }
  for (std::size_t i = 0; i < s.slots.size(); ++i) {
    State::Slot& slot = s.slots[i];
    slot.accumulator = torch::autograd::impl::grad_accumulator(slot.param);
    DTRAIN_CHECK(slot.accumulator != nullptr, "parameter ", slot.name, " has no grad accumulator");
    slot.hook_key =
        slot.accumulator->add_post_hook(std::make_unique<ReadyHook>(state_, static_cast<int>(i)));
  }
}

DistributedDataParallel::~DistributedDataParallel() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  for (State::Slot& slot : state_->slots) {
    if (slot.accumulator) slot.accumulator->del_post_hook(slot.hook_key);
  }
  for (State::Bucket& b : state_->buckets) {
    if (!b.work) continue;
    try {
      b.work->wait();  // buckets must not be freed under a running all-reduce
    } catch (...) {
    }
  }
}

void DistributedDataParallel::zero_grad() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  for (State::Bucket& b : state_->buckets) b.flat.zero_();
}

void DistributedDataParallel::synchronize() {
  State& s = *state_;
  std::vector<std::shared_ptr<Work>> works;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (!s.sync_enabled) return;  // inside no_sync(): gradients stay local
    DTRAIN_CHECK(s.backward_seen,
                 "DistributedDataParallel::synchronize() called without a "
                 "backward pass since the last synchronize()");
    if (!s.overlap) s.launch_ready();
    DTRAIN_CHECK(s.next_to_launch == static_cast<int>(s.buckets.size()),
                 "DistributedDataParallel: ", s.buckets.size() - s.next_to_launch,
                 " bucket(s) were not ready after backward");
    for (State::Bucket& b : s.buckets) works.push_back(b.work);
  }
  const auto start = std::chrono::steady_clock::now();
  for (auto& w : works) w->wait();
  stats_.exposed_comm_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (State::Bucket& b : s.buckets) {
    if (b.wire.defined()) b.flat.copy_(b.wire);  // back to float32
  }
  stats_.buckets = static_cast<int>(works.size());
  stats_.bucket_timings.resize(works.size());
  for (std::size_t i = 0; i < works.size(); ++i) {
    const State::Bucket& b = s.buckets[i];
    stats_.bucket_timings[i] = {static_cast<int>(i), (b.wire.defined() ? b.wire : b.flat).nbytes(),
                                works[i]->issued_at(), works[i]->completed_at()};
  }
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.last_launch_order = s.launch_order;
    s.reset_readiness();
  }
  if (options_.broadcast_buffers) {
    if (!s.buffer_broadcast)
      s.buffer_broadcast = std::make_unique<detail::BufferBroadcast>(*module_);
    s.buffer_broadcast->run(*dp_);
  }
}

void DistributedDataParallel::start_reduction() {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  for (State::Slot& slot : s.slots) {
    if (slot.ready) continue;
    slot.ready = true;  // what the step's backward passes accumulated, zeros if none
    --s.buckets[slot.bucket].pending;
  }
  s.backward_seen = true;
  s.launch_ready();
}

DistributedDataParallel::NoSyncGuard::NoSyncGuard(DistributedDataParallel& ddp) : ddp_(ddp) {
  std::lock_guard<std::mutex> lock(ddp_.state_->mutex);
  previous_ = ddp_.state_->sync_enabled;
  ddp_.state_->sync_enabled = false;
}

DistributedDataParallel::NoSyncGuard::~NoSyncGuard() {
  std::lock_guard<std::mutex> lock(ddp_.state_->mutex);
  ddp_.state_->sync_enabled = previous_;
}

std::vector<std::vector<std::string>> DistributedDataParallel::bucket_layout() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  std::vector<std::vector<std::string>> out;
  for (const State::Bucket& b : state_->buckets) {
    out.emplace_back();
    for (int i : b.slots) out.back().push_back(state_->slots[i].name);
  }
  return out;
}

const std::vector<int>& DistributedDataParallel::last_launch_order() const {
  return state_->last_launch_order;
}

}  // namespace dtrain::parallel
