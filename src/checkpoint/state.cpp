// LibTorch modules, optimizers, ZeRO-1 shards and RNG state <-> StateDict.

#include "dtrain/checkpoint/state.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>

#include <mutex>
#include <set>

#include "dtrain/error.h"
#include "dtrain/parallel/zero_optimizer.h"
#include "src/common/torch_compat.h"
#include "src/parallel/flat_range.h"

namespace dtrain::checkpoint {

namespace {

using Fields = std::vector<std::pair<std::string, at::Tensor>>;

template <typename State, typename Add>
void add_adam_fields(const State& s, const Add& add) {
  add("step", at::scalar_tensor(s.step(), at::kLong));
  add("exp_avg", s.exp_avg());
  add("exp_avg_sq", s.exp_avg_sq());
  add("max_exp_avg_sq", s.max_exp_avg_sq());
}

// The optimizer's state tensors for `param` (empty before its first step).
Fields param_state(const torch::optim::Optimizer& optimizer, const at::Tensor& param) {
  Fields out;
  const auto& states = optimizer.state();
  auto it = states.find(dtrain::detail::optimizer_state_key(param));
  if (it == states.end()) return out;
  const torch::optim::OptimizerParamState* s = it->second.get();
  auto add = [&](const char* name, const at::Tensor& t) {
    if (t.defined()) out.emplace_back(name, t);
  };
  if (const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(s)) {
    add("momentum_buffer", sgd->momentum_buffer());
  } else if (const auto* adam = dynamic_cast<const torch::optim::AdamParamState*>(s)) {
    add_adam_fields(*adam, add);
  } else if (const auto* adamw = dynamic_cast<const torch::optim::AdamWParamState*>(s)) {
    add_adam_fields(*adamw, add);
  } else {
    DTRAIN_THROW(InvalidArgument,
                 "checkpoints support the state of SGD, Adam and AdamW optimizers only");
  }
  return out;
}

at::Tensor field(const std::map<std::string, at::Tensor>& fields, const char* name,
                 const at::Tensor& like) {
  auto it = fields.find(name);
  if (it == fields.end()) return {};
  return it->second.to(like.options()).contiguous().clone();
}

// Adam's and AdamW's per-parameter state (the same fields, distinct types).
template <typename State>
std::unique_ptr<State> adam_state(const std::map<std::string, at::Tensor>& fields,
                                  const at::Tensor& like, std::int64_t step) {
  auto s = std::make_unique<State>();
  s->step(step);
  s->exp_avg(field(fields, "exp_avg", like));
  s->exp_avg_sq(field(fields, "exp_avg_sq", like));
  s->max_exp_avg_sq(field(fields, "max_exp_avg_sq", like));
  return s;
}

// Replaces the optimizer's state for `param` by `fields` (nothing if empty).
void set_param_state(torch::optim::Optimizer& optimizer, const at::Tensor& param,
                     const std::map<std::string, at::Tensor>& fields) {
  auto& states = optimizer.state();
  const auto key = dtrain::detail::optimizer_state_key(param);
  if (fields.empty()) {
    states.erase(key);
    return;
  }
  const auto like = param.detach();
  auto step = [&]() -> std::int64_t {
    auto it = fields.find("step");
    return it == fields.end() ? 0 : it->second.item<std::int64_t>();
  };
  if (dynamic_cast<torch::optim::SGD*>(&optimizer) != nullptr) {
    auto s = std::make_unique<torch::optim::SGDParamState>();
    s->momentum_buffer(field(fields, "momentum_buffer", like));
    states[key] = std::move(s);
  } else if (dynamic_cast<torch::optim::AdamW*>(&optimizer) != nullptr) {
    states[key] = adam_state<torch::optim::AdamWParamState>(fields, like, step());
  } else if (dynamic_cast<torch::optim::Adam*>(&optimizer) != nullptr) {
    states[key] = adam_state<torch::optim::AdamParamState>(fields, like, step());
  } else {
    DTRAIN_THROW(InvalidArgument,
                 "checkpoints support the state of SGD, Adam and AdamW optimizers only");
  }
}

// The fields stored under each "<prefix><param>/" of a checkpoint, found in
// one pass over its tensor names: param -> field names.
class FieldIndex {
 public:
  FieldIndex(const Checkpoint& checkpoint, const std::string& prefix) {
    for (const std::string& name : checkpoint.tensor_names()) {
      if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
      const std::size_t slash = name.rfind('/');
      if (slash < prefix.size() || slash == std::string::npos) continue;
      fields_[name.substr(prefix.size(), slash - prefix.size())].push_back(name.substr(slash + 1));
    }
  }
  const std::vector<std::string>& of(const std::string& param) const {
    static const std::vector<std::string> kNone;
    auto it = fields_.find(param);
    return it == fields_.end() ? kNone : it->second;
  }

 private:
  std::map<std::string, std::vector<std::string>> fields_;
};

// Names in `checkpoint` of the form "<prefix><field>" (no further '/').
std::vector<std::string> fields_under(const Checkpoint& checkpoint, const std::string& prefix) {
  std::vector<std::string> out;
  for (const std::string& name : checkpoint.tensor_names()) {
    if (name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0 &&
        name.find('/', prefix.size()) == std::string::npos) {
      out.push_back(name.substr(prefix.size()));
    }
  }
  return out;
}

std::string shape_text(at::IntArrayRef shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The region of stored tensor `name` that `placement` asks for, after
// checking its global shape and (if `dtype` is given) its dtype.
at::Tensor read_placed(const Checkpoint& checkpoint, const std::string& name,
                       const parallel::Placement& placement, const char* whose) {
  const TensorInfo& info = checkpoint.info(name);
  DTRAIN_CHECK_T(CheckpointError, info.global_shape == placement.global_shape,
                 "checkpoint tensor '", name, "' has global shape ", shape_text(info.global_shape),
                 " but ", whose, " is ", placement.to_string());
  return checkpoint.read(name, placement.offset, placement.shape);
}

const parallel::ModuleLayout kWhole{};

// The part of a flat ZeRO shard [shard_begin, shard_end) that a parameter at
// [offset, offset + numel) of the flat buffer covers: [lo, hi), or lo >= hi.
std::pair<std::int64_t, std::int64_t> overlap(std::int64_t offset, std::int64_t numel,
                                              std::int64_t shard_begin, std::int64_t shard_end) {
  return {std::max(offset, shard_begin), std::min(offset + numel, shard_end)};
}

// [offset, offset + length): this rank's range of the unpadded flat buffer.
std::pair<std::int64_t, std::int64_t> shard_range(const parallel::ZeroRedundancyOptimizer& zero) {
  const std::int64_t offset = zero.shard_offset();
  const std::int64_t length =
      std::max<std::int64_t>(0, std::min(zero.shard_numel(), zero.total_numel() - offset));
  return {offset, offset + length};
}

// ZeRO state of format versions 1-2: flat tensors "zero/<field>" of the
// unpadded global length.
void load_flat_zero_optimizer(const Checkpoint& checkpoint, parallel::ZeroRedundancyOptimizer& zero,
                              const std::string& prefix) {
  const std::int64_t total = zero.total_numel();
  const auto [begin, end] = shard_range(zero);
  std::map<std::string, at::Tensor> fields;
  for (const std::string& name : fields_under(checkpoint, prefix)) {
    const TensorInfo& info = checkpoint.info(prefix + name);
    if (info.global_shape.empty()) {
      fields[name] = checkpoint.read(prefix + name);
      continue;
    }
    DTRAIN_CHECK_T(CheckpointError, info.global_shape == std::vector<std::int64_t>{total},
                   "checkpoint tensor '", prefix, name, "' holds ", shape_text(info.global_shape),
                   " elements but the model has ", total, " trainable parameters");
    at::Tensor shard = at::zeros({zero.shard_numel()}, at::TensorOptions().dtype(info.dtype));
    if (end > begin)
      shard.narrow(0, 0, end - begin).copy_(checkpoint.read(prefix + name, {begin}, {end - begin}));
    fields[name] = shard;
  }
  zero.reload_shard_from_parameters();
  set_param_state(zero.optimizer(), zero.shard(), fields);
}

// RNG stream storage: "rng/<stream>/<device>" of global shape [extent of each
// axis the stream is not shared over..., state bytes].
std::string rng_name(parallel::RngStream stream, at::DeviceType device) {
  return std::string("rng/") + parallel::rng_stream_name(stream) + "/" +
         at::DeviceTypeName(device, /*lower_case=*/true);
}

void add_rng_stream(StateDict& state, const std::string& name, const at::Tensor& generator_state,
                    const collectives::GridShape& shape, const collectives::GridCoord& coord,
                    parallel::AxisSet shared_over) {
  parallel::Placement p;
  const std::pair<int, int> axes[] = {
      {shape.dp, coord.dp}, {shape.pp, coord.pp}, {shape.tp, coord.tp}};
  const parallel::Axis ids[] = {parallel::Axis::kData, parallel::Axis::kPipeline,
                                parallel::Axis::kTensor};
  for (int a = 0; a < 3; ++a) {
    if (shared_over.contains(ids[a])) continue;
    p.global_shape.push_back(axes[a].first);
    p.offset.push_back(axes[a].second);
    p.shape.push_back(1);
  }
  const std::int64_t bytes = generator_state.numel();
  p.global_shape.push_back(bytes);
  p.offset.push_back(0);
  p.shape.push_back(bytes);
  p.replicated_over = shared_over;
  // Reshaped before the placement is moved into add() (argument order is unspecified).
  const at::Tensor block = generator_state.reshape(p.shape);
  state.add(name, block, std::move(p));
}

// The stored state of the stream at `coord` (each coordinate modulo the
// stored extent), or undefined if the checkpoint does not have it.
at::Tensor read_rng_stream(const Checkpoint& checkpoint, const std::string& name,
                           const collectives::GridCoord& coord, parallel::AxisSet shared_over) {
  if (!checkpoint.contains(name)) return {};
  const TensorInfo& info = checkpoint.info(name);
  std::vector<std::int64_t> row;
  const int coords[] = {coord.dp, coord.pp, coord.tp};
  const parallel::Axis ids[] = {parallel::Axis::kData, parallel::Axis::kPipeline,
                                parallel::Axis::kTensor};
  for (int a = 0; a < 3; ++a) {
    if (!shared_over.contains(ids[a])) row.push_back(coords[a]);
  }
  DTRAIN_CHECK_T(CheckpointError,
                 info.global_shape.size() == row.size() + 1 && info.dtype == at::kByte,
                 "checkpoint tensor '", name, "' has an unexpected shape ",
                 shape_text(info.global_shape), " or dtype ", info.dtype);
  std::vector<std::int64_t> offset, shape;
  for (std::size_t d = 0; d < row.size(); ++d) {
    DTRAIN_CHECK_T(CheckpointError, info.global_shape[d] > 0, "checkpoint tensor '", name,
                   "' is empty");
    offset.push_back(row[d] % info.global_shape[d]);
    shape.push_back(1);
  }
  offset.push_back(0);
  shape.push_back(info.global_shape.back());
  return checkpoint.read(name, offset, shape).reshape({-1});
}

// LibTorch's default CPU generator: row `rank` of "rng/cpu" (format versions
// 1-2), or undefined.
at::Tensor read_legacy_rng(const Checkpoint& checkpoint, int rank) {
  if (!checkpoint.contains("rng/cpu")) return {};
  const TensorInfo& info = checkpoint.info("rng/cpu");
  DTRAIN_CHECK_T(CheckpointError, info.global_shape.size() == 2 && info.global_shape[0] > 0,
                 "checkpoint tensor 'rng/cpu' has an unexpected shape ",
                 shape_text(info.global_shape));
  const std::int64_t row = rank % info.global_shape[0];
  return checkpoint.read("rng/cpu", {row, 0}, {1, info.global_shape[1]}).squeeze(0);
}

at::Tensor default_cpu_state() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_default_cpu_state(const at::Tensor& state, const std::string& source) {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  try {
    gen.set_state(state);
  } catch (const c10::Error& e) {
    DTRAIN_THROW(CheckpointError, "cannot restore the CPU generator from ", source, ": ",
                 e.what_without_backtrace());
  }
}

// The module's parameters, each tensor once, under the first name the module
// gives it: a weight that two submodules register (tied input and output
// embeddings) is one tensor, stored and restored once.
torch::OrderedDict<std::string, at::Tensor> distinct_parameters(const torch::nn::Module& module) {
  torch::OrderedDict<std::string, at::Tensor> out;
  std::set<const void*> seen;
  for (const auto& item : module.named_parameters(true)) {
    if (seen.insert(item.value().unsafeGetTensorImpl()).second) {
      out.insert(item.key(), item.value());
    }
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------
// Modules

void add_module(StateDict& state, const torch::nn::Module& module,
                const parallel::ModuleLayout& layout, const std::string& prefix) {
  for (const auto& item : distinct_parameters(module)) {
    state.add(prefix + layout.global(item.key()), item.value().detach(),
              layout.placement(item.key(), item.value()));
  }
  for (const auto& item : module.named_buffers(true)) {
    state.add(prefix + layout.global(item.key()), item.value().detach(),
              layout.placement(item.key(), item.value()));
  }
}

void add_module(StateDict& state, const torch::nn::Module& module, const std::string& prefix) {
  add_module(state, module, kWhole, prefix);
}

void load_module(const Checkpoint& checkpoint, torch::nn::Module& module,
                 const parallel::ModuleLayout& layout, const std::string& prefix) {
  struct Target {
    at::Tensor tensor;
    std::string name;  // global, with the prefix
    parallel::Placement placement;
  };
  std::vector<Target> targets;
  for (const auto& item : distinct_parameters(module)) {
    targets.push_back({item.value(), prefix + layout.global(item.key()),
                       layout.placement(item.key(), item.value())});
  }
  for (const auto& item : module.named_buffers(true)) {
    targets.push_back({item.value(), prefix + layout.global(item.key()),
                       layout.placement(item.key(), item.value())});
  }
  // Check everything before changing anything.
  for (const Target& t : targets) {
    DTRAIN_CHECK_T(CheckpointError, checkpoint.contains(t.name), "checkpoint ",
                   checkpoint.directory(), " has no tensor '", t.name,
                   "' (was it written for a different model?)");
    const TensorInfo& info = checkpoint.info(t.name);
    DTRAIN_CHECK_T(
        CheckpointError,
        info.global_shape == t.placement.global_shape && info.dtype == t.tensor.scalar_type(),
        "checkpoint tensor '", t.name, "' is ", shape_text(info.global_shape), " ", info.dtype,
        " but the model's is ", shape_text(t.placement.global_shape), " ", t.tensor.scalar_type());
    DTRAIN_CHECK_ARG(!t.placement.is_flat() && t.placement.shape == t.tensor.sizes().vec(),
                     "tensor '", t.name, "' has shape ", shape_text(t.tensor.sizes()),
                     " but its placement is ", t.placement.to_string());
  }
  std::vector<at::Tensor> values;
  for (const Target& t : targets) {
    values.push_back(checkpoint.read(t.name, t.placement.offset, t.placement.shape));
  }
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < targets.size(); ++i) targets[i].tensor.copy_(values[i]);
}

void load_module(const Checkpoint& checkpoint, torch::nn::Module& module,
                 const std::string& prefix) {
  load_module(checkpoint, module, kWhole, prefix);
}

// ---------------------------------------------------------------------------
// Optimizers

void add_optimizer(StateDict& state, const torch::optim::Optimizer& optimizer,
                   const torch::nn::Module& module, const parallel::ModuleLayout& layout,
                   const std::string& prefix) {
  for (const auto& item : distinct_parameters(module)) {
    const std::string base = prefix + layout.global(item.key()) + "/";
    const parallel::Placement placement = layout.placement(item.key(), item.value());
    for (const auto& [name, tensor] : param_state(optimizer, item.value())) {
      state.add(base + name, tensor.detach(),
                tensor.dim() == 0 ? parallel::Placement::replicated({}) : placement);
    }
  }
}

void add_optimizer(StateDict& state, const torch::optim::Optimizer& optimizer,
                   const torch::nn::Module& module, const std::string& prefix) {
  add_optimizer(state, optimizer, module, kWhole, prefix);
}

void load_optimizer(const Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                    const torch::nn::Module& module, const parallel::ModuleLayout& layout,
                    const std::string& prefix) {
  const FieldIndex index(checkpoint, prefix);
  for (const auto& item : distinct_parameters(module)) {
    const std::string param = layout.global(item.key());
    const parallel::Placement placement = layout.placement(item.key(), item.value());
    std::map<std::string, at::Tensor> fields;
    for (const std::string& name : index.of(param)) {
      const std::string full = prefix + param + "/" + name;
      fields[name] = checkpoint.info(full).global_shape.empty()
                         ? checkpoint.read(full)
                         : read_placed(checkpoint, full, placement, "the parameter's placement");
    }
    set_param_state(optimizer, item.value(), fields);
  }
}

void load_optimizer(const Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                    const torch::nn::Module& module, const std::string& prefix) {
  load_optimizer(checkpoint, optimizer, module, kWhole, prefix);
}

// ---------------------------------------------------------------------------
// ZeRO-1

void add_zero_optimizer(StateDict& state, const parallel::ZeroRedundancyOptimizer& zero,
                        const parallel::ModuleLayout& layout, const std::string& prefix) {
  const auto [begin, end] = shard_range(zero);
  const Fields fields = param_state(zero.optimizer(), zero.shard());
  for (const auto& p : zero.flat_parameters()) {
    const auto [lo, hi] = overlap(p.offset, p.parameter.numel(), begin, end);
    if (lo >= hi) continue;
    const std::string base = prefix + layout.global(p.name) + "/";
    const parallel::Placement placement =
        layout.placement(p.name, p.parameter).flat_range(lo - p.offset, hi - p.offset);
    for (const auto& [name, tensor] : fields) {
      if (tensor.dim() == 0) {  // e.g. Adam's step: the same for every parameter of the shard
        state.add(base + name, tensor.detach(), parallel::Placement::replicated({}));
      } else {
        state.add(base + name, tensor.detach().narrow(0, lo - begin, hi - lo), placement);
      }
    }
  }
}

void add_zero_optimizer(StateDict& state, const parallel::ZeroRedundancyOptimizer& zero,
                        const std::string& prefix) {
  add_zero_optimizer(state, zero, kWhole, prefix);
}

void load_zero_optimizer(const Checkpoint& checkpoint, parallel::ZeroRedundancyOptimizer& zero,
                         const parallel::ModuleLayout& layout, const std::string& prefix) {
  const FieldIndex index(checkpoint, prefix);
  bool per_parameter = false;
  for (const auto& p : zero.flat_parameters()) {
    per_parameter = per_parameter || !index.of(layout.global(p.name)).empty();
  }
  if (!per_parameter && !fields_under(checkpoint, "zero/").empty()) {
    load_flat_zero_optimizer(checkpoint, zero, "zero/");  // format versions 1-2
    return;
  }
  const auto [begin, end] = shard_range(zero);
  std::map<std::string, at::Tensor> fields;
  for (const auto& p : zero.flat_parameters()) {
    const auto [lo, hi] = overlap(p.offset, p.parameter.numel(), begin, end);
    if (lo >= hi) continue;
    const std::string param = layout.global(p.name);
    const parallel::Placement placement = layout.placement(p.name, p.parameter);
    for (const std::string& name : index.of(param)) {
      const std::string full = prefix + param + "/" + name;
      const TensorInfo& info = checkpoint.info(full);
      if (info.global_shape.empty()) {  // a scalar (step): the first parameter's
        if (fields.count(name) == 0) fields[name] = checkpoint.read(full);
        continue;
      }
      DTRAIN_CHECK_T(CheckpointError, info.global_shape == placement.global_shape,
                     "checkpoint tensor '", full, "' has global shape ",
                     shape_text(info.global_shape), " but the parameter is ",
                     placement.to_string());
      at::Tensor& shard = fields[name];
      if (!shard.defined()) {
        shard = at::zeros({zero.shard_numel()}, at::TensorOptions().dtype(info.dtype));
      }
      // The blocks of the parameter's block that [lo, hi) covers, each read
      // from wherever the writers put it.
      for (const auto& b :
           parallel::detail::flat_range_blocks(placement.shape, lo - p.offset, hi - p.offset)) {
        std::vector<std::int64_t> offset = placement.offset;
        std::int64_t count = 1;
        for (std::size_t d = 0; d < offset.size(); ++d) {
          offset[d] += b.offset[d];
          count *= b.shape[d];
        }
        shard.narrow(0, lo - begin + b.flat_offset, count)
            .copy_(checkpoint.read(full, offset, b.shape).reshape({-1}));
      }
    }
  }
  zero.reload_shard_from_parameters();
  set_param_state(zero.optimizer(), zero.shard(), fields);
}

void load_zero_optimizer(const Checkpoint& checkpoint, parallel::ZeroRedundancyOptimizer& zero,
                         const std::string& prefix) {
  load_zero_optimizer(checkpoint, zero, kWhole, prefix);
}

// ---------------------------------------------------------------------------
// RNG

void add_rng_streams(StateDict& state, const parallel::RngStreams& rng) {
  for (parallel::RngStream stream : {parallel::RngStream::kRank, parallel::RngStream::kTensorShared,
                                     parallel::RngStream::kTensorDistinct}) {
    add_rng_stream(state, rng_name(stream, rng.device().type()), rng.state(stream), rng.shape(),
                   rng.coord(), parallel::RngStreams::shared_over(stream));
  }
}

void load_rng_streams(const Checkpoint& checkpoint, parallel::RngStreams& rng) {
  for (parallel::RngStream stream : {parallel::RngStream::kRank, parallel::RngStream::kTensorShared,
                                     parallel::RngStream::kTensorDistinct}) {
    const std::string name = rng_name(stream, rng.device().type());
    at::Tensor state =
        read_rng_stream(checkpoint, name, rng.coord(), parallel::RngStreams::shared_over(stream));
    if (!state.defined() && stream == parallel::RngStream::kRank && rng.device().is_cpu()) {
      state = read_legacy_rng(checkpoint, collectives::grid_rank(rng.shape(), rng.coord()));
    }
    if (!state.defined()) continue;
    try {
      rng.set_state(stream, state);
    } catch (const InvalidArgument& e) {
      DTRAIN_THROW(CheckpointError, "checkpoint ", checkpoint.directory(), " tensor '", name,
                   "': ", e.what());
    }
  }
}

void add_rng_state(StateDict& state, int rank, int world_size) {
  DTRAIN_CHECK_ARG(rank >= 0 && rank < world_size, "rank ", rank, " is not in [0, ", world_size,
                   ")");
  add_rng_stream(state, rng_name(parallel::RngStream::kRank, at::kCPU), default_cpu_state(),
                 {world_size, 1, 1}, {rank, 0, 0}, parallel::AxisSet::none());
}

void load_rng_state(const Checkpoint& checkpoint, int rank) {
  const std::string name = rng_name(parallel::RngStream::kRank, at::kCPU);
  at::Tensor state = read_rng_stream(checkpoint, name, {rank, 0, 0}, parallel::AxisSet::none());
  if (!state.defined()) state = read_legacy_rng(checkpoint, rank);
  DTRAIN_CHECK_T(CheckpointError, state.defined(), "checkpoint ", checkpoint.directory(),
                 " has no CPU generator state ('", name, "' or 'rng/cpu')");
  set_default_cpu_state(state, checkpoint.directory() + " tensor '" + name + "'");
}

}  // namespace dtrain::checkpoint
