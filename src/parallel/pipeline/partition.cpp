// Cutting a model into pipeline stages (partition.h).

#include "dtrain/parallel/pipeline/partition.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <torch/autograd.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "dtrain/error.h"

namespace dtrain::parallel::pipeline {

std::vector<Layer> layers_of(torch::nn::Sequential model, const std::string& prefix) {
  std::vector<Layer> layers;
  layers.reserve(model->size());
  std::size_t index = 0;
  for (const torch::nn::AnyModule& module : *model) {
    const std::string name = std::to_string(index++);
    layers.push_back({prefix.empty() ? name : prefix + "." + name, module});
  }
  return layers;
}

int StagePartition::first_layer(int stage) const {
  DTRAIN_CHECK_ARG(stage >= 0 && stage < num_stages(), "stage ", stage,
                   " is out of range: the partition has ", num_stages(), " stages");
  return bounds[static_cast<std::size_t>(stage)];
}

int StagePartition::end_layer(int stage) const {
  DTRAIN_CHECK_ARG(stage >= 0 && stage < num_stages(), "stage ", stage,
                   " is out of range: the partition has ", num_stages(), " stages");
  return bounds[static_cast<std::size_t>(stage) + 1];
}

int StagePartition::stage_of_layer(int layer) const {
  DTRAIN_CHECK_ARG(layer >= 0 && layer < num_layers(), "layer ", layer,
                   " is out of range: the partition covers ", num_layers(), " layers");
  const auto it = std::upper_bound(bounds.begin(), bounds.end(), layer);
  return static_cast<int>(it - bounds.begin()) - 1;
}

void StagePartition::validate() const {
  DTRAIN_CHECK_ARG(bounds.size() >= 2 && bounds.front() == 0,
                   "a stage partition needs bounds 0, ..., <layers> for at least one stage, got ",
                   to_string());
  for (std::size_t i = 1; i < bounds.size(); ++i) {
    DTRAIN_CHECK_ARG(bounds[i] > bounds[i - 1], "stage ", i - 1, " of the partition ", to_string(),
                     " is empty; every stage needs at least one layer");
  }
}

std::string StagePartition::to_string() const {
  std::ostringstream out;
  for (std::size_t s = 0; s + 1 < bounds.size(); ++s) {
    out << (s ? " " : "") << '[' << bounds[s] << ',' << bounds[s + 1] << ')';
  }
  if (bounds.size() < 2) out << "(no stages)";
  return out.str();
}

StagePartition partition_at(int num_layers, const std::vector<int>& cut_points) {
  DTRAIN_CHECK_ARG(num_layers >= 1, "cannot partition a model of ", num_layers, " layers");
  StagePartition partition;
  partition.bounds.push_back(0);
  for (std::size_t i = 0; i < cut_points.size(); ++i) {
    const int cut = cut_points[i];
    DTRAIN_CHECK_ARG(cut >= 1 && cut < num_layers, "cut point ", cut,
                     " is out of range: a cut is the first layer of a stage after the first, "
                     "1 .. ",
                     num_layers - 1, " for ", num_layers, " layers");
    DTRAIN_CHECK_ARG(cut > partition.bounds.back(), "cut point ", cut, " does not follow ",
                     partition.bounds.back(),
                     ": cut points must be strictly increasing (no empty stage)");
    partition.bounds.push_back(cut);
  }
  partition.bounds.push_back(num_layers);
  return partition;
}

StagePartition partition_uniform(int num_layers, int num_stages) {
  DTRAIN_CHECK_ARG(num_stages >= 1, "the number of stages must be at least 1, got ", num_stages);
  DTRAIN_CHECK_ARG(num_layers >= num_stages, "cannot cut ", num_layers, " layers into ", num_stages,
                   " stages: every stage needs at least one layer");
  StagePartition partition;
  partition.bounds.push_back(0);
  const int base = num_layers / num_stages;
  const int extra = num_layers % num_stages;  // the last `extra` stages get one more
  for (int s = 0; s < num_stages; ++s) {
    partition.bounds.push_back(partition.bounds.back() + base + (s >= num_stages - extra ? 1 : 0));
  }
  return partition;
}

// best[j][i]: the smallest possible largest stage sum when the first i
// layers form j stages. The bottleneck B* = best[S][n] is then laid out from
// the back: each stage, last first, takes as many layers as fit under B*
// while leaving one layer for each stage before it. Taking the most at the
// back leaves the least to the front, so if any layout fits under B*, this
// one does. Sums are differences of the same prefix sums the table used, so
// the comparisons with B* are exact.
StagePartition partition_balanced(const std::vector<double>& layer_weights, int num_stages) {
  const int n = static_cast<int>(layer_weights.size());
  DTRAIN_CHECK_ARG(num_stages >= 1, "the number of stages must be at least 1, got ", num_stages);
  DTRAIN_CHECK_ARG(n >= num_stages, "cannot cut ", n, " layers into ", num_stages,
                   " stages: every stage needs at least one layer");
  std::vector<double> prefix(static_cast<std::size_t>(n) + 1, 0.0);
  for (int i = 0; i < n; ++i) {
    const double w = layer_weights[static_cast<std::size_t>(i)];
    DTRAIN_CHECK_ARG(std::isfinite(w) && w >= 0.0, "the weight of layer ", i, " is ", w,
                     "; layer weights must be finite and >= 0");
    prefix[static_cast<std::size_t>(i) + 1] = prefix[static_cast<std::size_t>(i)] + w;
  }
  const auto sum = [&](int begin, int end) {
    return prefix[static_cast<std::size_t>(end)] - prefix[static_cast<std::size_t>(begin)];
  };
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const auto width = static_cast<std::size_t>(n) + 1;
  std::vector<double> best(static_cast<std::size_t>(num_stages + 1) * width, kInf);
  const auto at = [&](int j, int i) -> double& {
    return best[static_cast<std::size_t>(j) * width + static_cast<std::size_t>(i)];
  };
  for (int i = 1; i <= n; ++i) at(1, i) = sum(0, i);
  for (int j = 2; j <= num_stages; ++j) {
    for (int i = j; i <= n; ++i) {
      double value = kInf;
      for (int t = j - 1; t < i; ++t) value = std::min(value, std::max(at(j - 1, t), sum(t, i)));
      at(j, i) = value;
    }
  }
  const double bottleneck = at(num_stages, n);
  StagePartition partition;
  partition.bounds.assign(static_cast<std::size_t>(num_stages) + 1, 0);
  partition.bounds.back() = n;
  int end = n;
  for (int s = num_stages - 1; s >= 1; --s) {
    int begin = end - 1;  // at least one layer
    while (begin - 1 >= s && sum(begin - 1, end) <= bottleneck) --begin;
    partition.bounds[static_cast<std::size_t>(s)] = begin;
    end = begin;
  }
  DTRAIN_CHECK(sum(0, end) <= bottleneck,
               "partition_balanced: the first stage exceeds the optimum ", bottleneck);
  return partition;
}

namespace {

// The distinct parameter tensors of a layer, with their names inside it.
std::vector<std::pair<std::string, torch::Tensor>> distinct_parameters(const Layer& layer) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::unordered_set<const void*> seen;
  for (const auto& item : layer.module.ptr()->named_parameters(/*recurse=*/true)) {
    if (seen.insert(item.value().unsafeGetTensorImpl()).second) {
      out.emplace_back(item.key(), item.value());
    }
  }
  return out;
}

std::string global_name(const Layer& layer, const std::string& local) {
  return layer.name + "." + local;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

double wall_clock_timer(const torch::Tensor& input, const std::function<void()>& run) {
  const bool cuda = input.is_cuda();
  if (cuda) torch::cuda::synchronize();
  const auto start = std::chrono::steady_clock::now();
  run();
  if (cuda) torch::cuda::synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Saves the layers' buffers and the CPU generator; puts them back when it
// goes out of scope.
class StateGuard {
 public:
  explicit StateGuard(const std::vector<Layer>& layers)
      : generator_(at::detail::getDefaultCPUGenerator()) {
    for (const Layer& layer : layers) {
      for (auto& buffer : layer.module.ptr()->buffers(/*recurse=*/true)) {
        if (buffer.defined()) buffers_.emplace_back(buffer, buffer.clone());
      }
    }
    std::lock_guard<std::mutex> lock(generator_.mutex());
    generator_state_ = generator_.get_state();
  }
  ~StateGuard() {
    try {
      torch::NoGradGuard no_grad;
      for (auto& [buffer, saved] : buffers_) buffer.copy_(saved);
      std::lock_guard<std::mutex> lock(generator_.mutex());
      generator_.set_state(generator_state_);
    } catch (...) {
      // Destructors never throw; the measurement's own error, if any, is
      // already on its way.
    }
  }
  StateGuard(const StateGuard&) = delete;
  StateGuard& operator=(const StateGuard&) = delete;

 private:
  at::Generator generator_;
  at::Tensor generator_state_;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> buffers_;
};

}  // namespace

std::vector<double> parameter_counts(const std::vector<Layer>& layers) {
  std::vector<double> counts;
  counts.reserve(layers.size());
  for (const Layer& layer : layers) {
    double count = 0.0;
    for (const auto& item : distinct_parameters(layer))
      count += static_cast<double>(item.second.numel());
    counts.push_back(count);
  }
  return counts;
}

void LayerTimingOptions::validate() const {
  DTRAIN_CHECK_ARG(warmup_runs >= 0, "warmup_runs must be >= 0, got ", warmup_runs);
  DTRAIN_CHECK_ARG(timed_runs >= 1, "timed_runs must be >= 1, got ", timed_runs);
}

std::vector<double> measure_layer_times(const std::vector<Layer>& layers,
                                        const std::vector<torch::Tensor>& sample_microbatches,
                                        const LayerTimingOptions& options) {
  options.validate();
  DTRAIN_CHECK_ARG(!layers.empty(), "measure_layer_times: the model has no layers");
  DTRAIN_CHECK_ARG(
      !sample_microbatches.empty(),
      "measure_layer_times: give at least one sample microbatch to time the layers on");
  StateGuard restore(layers);
  const std::size_t n = layers.size();
  std::vector<double> total(n, 0.0);
  for (const torch::Tensor& sample : sample_microbatches) {
    torch::Tensor x = sample.detach();
    for (std::size_t i = 0; i < n; ++i) {
      const Layer& layer = layers[i];
      torch::Tensor input = x.is_floating_point() ? x.detach().requires_grad_(true) : x.detach();
      std::vector<torch::Tensor> wrt;
      if (input.requires_grad()) wrt.push_back(input);
      for (const auto& item : distinct_parameters(layer)) {
        if (item.second.requires_grad()) wrt.push_back(item.second);
      }
      torch::Tensor output;
      torch::nn::AnyModule module = layer.module;  // shares the module; forward() is not const
      const auto run = [&] {
        output = module.forward(input);
        if (output.requires_grad() && !wrt.empty()) {
          torch::autograd::grad({output}, wrt, {torch::ones_like(output)},
                                /*retain_graph=*/false, /*create_graph=*/false,
                                /*allow_unused=*/true);
        }
      };
      for (int w = 0; w < options.warmup_runs; ++w) run();
      std::vector<double> runs;
      runs.reserve(static_cast<std::size_t>(options.timed_runs));
      for (int t = 0; t < options.timed_runs; ++t) {
        const double seconds =
            options.timer ? options.timer(static_cast<int>(i), run) : wall_clock_timer(input, run);
        DTRAIN_CHECK_ARG(std::isfinite(seconds) && seconds >= 0.0, "the timer returned ", seconds,
                         " seconds for layer ", i, " (", layer.name, "); it must be >= 0");
        runs.push_back(seconds);
      }
      DTRAIN_CHECK_ARG(output.defined(), "layer ", i, " (", layer.name,
                       ") was never run: the timer must call the function it is given");
      total[i] += median(std::move(runs));
      x = output.detach();
    }
  }
  for (double& t : total) t /= static_cast<double>(sample_microbatches.size());
  return total;
}

StagePartition partition_by_time(const std::vector<Layer>& layers,
                                 const std::vector<torch::Tensor>& sample_microbatches,
                                 int num_stages, const LayerTimingOptions& options) {
  return partition_balanced(measure_layer_times(layers, sample_microbatches, options), num_stages);
}

std::vector<TiedParameter> find_tied_parameters(const std::vector<Layer>& layers,
                                                const StagePartition& partition) {
  partition.validate();
  DTRAIN_CHECK_ARG(partition.num_layers() == static_cast<int>(layers.size()), "the partition ",
                   partition.to_string(), " covers ", partition.num_layers(),
                   " layers but the model has ", layers.size());
  // Each tensor's uses, in layer order.
  std::vector<const void*> order;
  std::unordered_map<const void*, TiedParameter> uses;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const int stage = partition.stage_of_layer(static_cast<int>(i));
    for (const auto& [local, tensor] : distinct_parameters(layers[i])) {
      const void* key = tensor.unsafeGetTensorImpl();
      auto [it, inserted] = uses.try_emplace(key);
      if (inserted) order.push_back(key);
      it->second.names.push_back(global_name(layers[i], local));
      if (it->second.stages.empty() || it->second.stages.back() != stage) {
        it->second.stages.push_back(stage);
      }
    }
  }
  std::vector<TiedParameter> tied;
  for (const void* key : order) {
    TiedParameter& t = uses[key];
    if (t.stages.size() >= 2) tied.push_back(std::move(t));
  }
  return tied;
}

namespace {

// Registers `module` on `root` under a dotted name, creating plain holder
// modules for the leading parts ("blocks.3" -> root.blocks.3).
void register_dotted(torch::nn::Module& root, const std::string& name,
                     const std::shared_ptr<torch::nn::Module>& module) {
  torch::nn::Module* parent = &root;
  std::size_t begin = 0;
  while (true) {
    const std::size_t dot = name.find('.', begin);
    const std::string part =
        name.substr(begin, dot == std::string::npos ? std::string::npos : dot - begin);
    DTRAIN_CHECK_ARG(!part.empty(), "layer name '", name,
                     "' has an empty part; use names like '7' or 'blocks.3'");
    if (dot == std::string::npos) {
      DTRAIN_CHECK_ARG(parent->named_children().find(part) == nullptr, "two layers are named '",
                       name, "'; layer names must be unique");
      parent->register_module(part, module);
      return;
    }
    auto children = parent->named_children();
    std::shared_ptr<torch::nn::Module>* existing = children.find(part);
    if (existing != nullptr) {
      parent = existing->get();
    } else {
      parent = parent->register_module(part, std::make_shared<torch::nn::Module>()).get();
    }
    begin = dot + 1;
  }
}

}  // namespace

PipelineStageImpl::PipelineStageImpl(const std::vector<Layer>& layers,
                                     const StagePartition& partition, int stage)
    : stage_(stage) {
  partition.validate();
  DTRAIN_CHECK_ARG(partition.num_layers() == static_cast<int>(layers.size()), "the partition ",
                   partition.to_string(), " covers ", partition.num_layers(),
                   " layers but the model has ", layers.size());
  first_layer_ = partition.first_layer(stage);
  end_layer_ = partition.end_layer(stage);
  for (int i = first_layer_; i < end_layer_; ++i) {
    const Layer& layer = layers[static_cast<std::size_t>(i)];
    DTRAIN_CHECK_ARG(!layer.name.empty(), "layer ", i, " has no name");
    register_dotted(*this, layer.name, layer.module.ptr());
    layer_names_.push_back(layer.name);
    layers_.push_back(layer.module);
  }
}

torch::Tensor PipelineStageImpl::forward(torch::Tensor input) {
  for (torch::nn::AnyModule& layer : layers_) input = layer.forward(std::move(input));
  return input;
}

}  // namespace dtrain::parallel::pipeline
