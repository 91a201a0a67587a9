// LibTorch modules, optimizers, ZeRO-1 shards and RNG state <-> StateDict.

#include "dtrain/checkpoint/state.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>

#include <mutex>

#include "dtrain/error.h"
#include "dtrain/parallel/zero_optimizer.h"
#include "src/common/torch_compat.h"

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

}  // namespace

void add_module(StateDict& state, const torch::nn::Module& module, const std::string& prefix) {
  for (const auto& item : module.named_parameters(true)) {
    state.add_replicated(prefix + item.key(), item.value().detach());
  }
  for (const auto& item : module.named_buffers(true)) {
    state.add_replicated(prefix + item.key(), item.value().detach());
  }
}

void load_module(const Checkpoint& checkpoint, torch::nn::Module& module,
                 const std::string& prefix) {
  std::vector<std::pair<at::Tensor, std::string>> targets;
  for (const auto& item : module.named_parameters(true))
    targets.emplace_back(item.value(), item.key());
  for (const auto& item : module.named_buffers(true))
    targets.emplace_back(item.value(), item.key());
  // Check everything before changing anything.
  for (const auto& [tensor, name] : targets) {
    const std::string full = prefix + name;
    DTRAIN_CHECK_T(CheckpointError, checkpoint.contains(full), "checkpoint ",
                   checkpoint.directory(), " has no tensor '", full,
                   "' (was it written for a different model?)");
    const TensorInfo& info = checkpoint.info(full);
    DTRAIN_CHECK_T(CheckpointError,
                   info.global_shape == tensor.sizes().vec() && info.dtype == tensor.scalar_type(),
                   "checkpoint tensor '", full, "' is ", shape_text(info.global_shape), " ",
                   info.dtype, " but the model's is ", shape_text(tensor.sizes()), " ",
                   tensor.scalar_type());
  }
  std::vector<at::Tensor> values;
  for (const auto& [tensor, name] : targets) values.push_back(checkpoint.read(prefix + name));
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < targets.size(); ++i) targets[i].first.copy_(values[i]);
}

void add_optimizer(StateDict& state, const torch::optim::Optimizer& optimizer,
                   const torch::nn::Module& module, const std::string& prefix) {
  for (const auto& item : module.named_parameters(true)) {
    for (const auto& [name, tensor] : param_state(optimizer, item.value())) {
      state.add_replicated(prefix + item.key() + "/" + name, tensor.detach());
    }
  }
}

void load_optimizer(const Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                    const torch::nn::Module& module, const std::string& prefix) {
  for (const auto& item : module.named_parameters(true)) {
    std::map<std::string, at::Tensor> fields;
    for (const std::string& name : fields_under(checkpoint, prefix + item.key() + "/")) {
      fields[name] = checkpoint.read(prefix + item.key() + "/" + name);
    }
    set_param_state(optimizer, item.value(), fields);
  }
}

void add_zero_optimizer(StateDict& state, const parallel::ZeroRedundancyOptimizer& zero,
                        const std::string& prefix) {
  const std::int64_t total = zero.total_numel();
  const std::int64_t offset = zero.shard_offset();
  const std::int64_t length =
      std::max<std::int64_t>(0, std::min(zero.shard_numel(), total - offset));
  for (const auto& [name, tensor] : param_state(zero.optimizer(), zero.shard())) {
    if (tensor.dim() == 0) {
      state.add_replicated(prefix + name, tensor);  // e.g. Adam's step: equal on every rank
    } else if (length > 0) {
      state.add_shard(prefix + name, tensor.detach().narrow(0, 0, length), {total}, {offset});
    }
  }
}

void load_zero_optimizer(const Checkpoint& checkpoint, parallel::ZeroRedundancyOptimizer& zero,
                         const std::string& prefix) {
  const std::int64_t total = zero.total_numel();
  const std::int64_t offset = zero.shard_offset();
  const std::int64_t length =
      std::max<std::int64_t>(0, std::min(zero.shard_numel(), total - offset));
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
    if (length > 0)
      shard.narrow(0, 0, length).copy_(checkpoint.read(prefix + name, {offset}, {length}));
    fields[name] = shard;
  }
  zero.reload_shard_from_parameters();
  set_param_state(zero.optimizer(), zero.shard(), fields);
}

void add_rng_state(StateDict& state, int rank, int world_size) {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  at::Tensor s;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    s = gen.get_state();
  }
  state.add_per_rank("rng/cpu", s, rank, world_size);
}

void load_rng_state(const Checkpoint& checkpoint, int rank) {
  const TensorInfo& info = checkpoint.info("rng/cpu");
  DTRAIN_CHECK_T(CheckpointError, info.global_shape.size() == 2 && info.global_shape[0] > 0,
                 "checkpoint tensor 'rng/cpu' has an unexpected shape ",
                 shape_text(info.global_shape));
  const std::int64_t row = rank % info.global_shape[0];
  at::Tensor s = checkpoint.read("rng/cpu", {row, 0}, {1, info.global_shape[1]}).squeeze(0);
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(s);
}

}  // namespace dtrain::checkpoint
