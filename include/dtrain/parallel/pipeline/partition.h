#pragma once
// Cutting a model into pipeline stages.
//
// A model is an ordered list of layers (Layer: a global name and a module
// that maps one tensor to one tensor), taken from a torch::nn::Sequential
// (layers_of) or written by hand. A StagePartition cuts the list into S
// contiguous, non-empty runs of layers, S = p * v (schedule.h numbers the
// stages the same way). It is made
//  * at explicit cut points                      partition_at
//  * uniformly by layer count                    partition_uniform
//  * balanced by parameter count                 partition_balanced(parameter_counts(...))
//  * balanced by measured forward+backward time  partition_by_time
// "Balanced" minimises the largest per-stage sum of the layers' weights.
//
// Names stay global. PipelineStage(layers, partition, s) is a module that
// holds stage s's layers (the same module objects, not copies) registered
// under their global names, so its named_parameters() are the names the
// whole model has: layer "7" of a Sequential gives "7.weight", the layers
// of layers_of(seq, "layers") give "layers.7.weight", and a layer named
// "blocks.3" gives "blocks.3.fc.weight". A checkpoint stores those names,
// so it loads under any other split (or none).
//
// Tied weights. A parameter that two layers share (the same tensor, e.g. an
// embedding and the output projection) and whose layers fall into
// different stages is reported by find_tied_parameters. Each of those
// stages holds its own copy on its rank. The runtime keeps the copies
// equal: (1) before training it copies the first stage's value to the
// others (a broadcast over the pipeline ranks that hold it); (2) in every
// step, at each holding stage's reduce action (schedule.h), it sums the
// copies' gradients over those ranks (an all-reduce of the sum), before the
// data-parallel reduction, so every copy gets the gradient one process
// would compute and the same optimizer update. The sum is exact in value,
// but the order of additions differs from one process's autograd, so the
// gradient matches it within float rounding, not bitwise. Within one stage,
// autograd sums the uses itself and nothing is reported.
//
// Thread-safety: none; measure_layer_times runs the layers.

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace dtrain::parallel::pipeline {

/// One layer of a model: its global name (what its parameters' names start
/// with) and the module, which maps one tensor to one tensor.
struct Layer {
  std::string name;
  torch::nn::AnyModule module;
};

/// The top-level layers of `model`, named by their index ("0", "1", ...) or
/// "<prefix>.<index>" when the Sequential sits in a larger model under
/// `prefix`. The modules are shared with `model`, not copied.
std::vector<Layer> layers_of(torch::nn::Sequential model, const std::string& prefix = "");

/// Where a model is cut: stage s holds layers [bounds[s], bounds[s+1]).
struct StagePartition {
  /// bounds.front() == 0, bounds.back() == the number of layers, strictly
  /// increasing (no empty stage).
  std::vector<int> bounds;

  int num_stages() const noexcept { return static_cast<int>(bounds.size()) - 1; }
  int num_layers() const noexcept { return bounds.empty() ? 0 : bounds.back(); }
  int first_layer(int stage) const;
  int end_layer(int stage) const;
  /// The stage holding `layer`; throws InvalidArgument when out of range.
  int stage_of_layer(int layer) const;
  /// Throws InvalidArgument unless the bounds describe >= 1 non-empty stage.
  void validate() const;
  /// "[0,3) [3,6) [6,8)".
  std::string to_string() const;

  bool operator==(const StagePartition& other) const { return bounds == other.bounds; }
};

/// Cut before each of `cut_points` (the first layer of stages 1 .. S-1,
/// strictly increasing, each in 1 .. num_layers-1): {3, 6} on 8 layers gives
/// [0,3) [3,6) [6,8). Throws InvalidArgument naming the bad cut point.
StagePartition partition_at(int num_layers, const std::vector<int>& cut_points);

/// num_stages stages whose layer counts differ by at most one; the later
/// stages get the extra layers (under 1F1B the earlier stages store more
/// microbatches). Throws InvalidArgument if num_layers < num_stages.
StagePartition partition_uniform(int num_layers, int num_stages);

/// Contiguous stages minimising the largest sum of `layer_weights` (>= 0,
/// finite) over a stage; among the best partitions, the one whose later
/// stages hold as many layers as possible. Exact (dynamic programming,
/// O(S * n^2)). Throws InvalidArgument if there are fewer layers than
/// stages or a weight is negative or not finite.
StagePartition partition_balanced(const std::vector<double>& layer_weights, int num_stages);

/// The number of parameter elements of each layer (each tensor once per
/// layer; a tensor shared by two layers counts in both, as both stages store
/// it).
std::vector<double> parameter_counts(const std::vector<Layer>& layers);

struct LayerTimingOptions {
  /// Untimed runs of each layer before the timed ones.
  int warmup_runs = 1;
  /// Timed runs of each layer per sample microbatch; the median counts.
  int timed_runs = 3;
  /// Measures one run: calls `run` (the layer's forward and backward on one
  /// microbatch) and returns its duration in seconds. Unset: the wall clock
  /// (synchronizing the device around `run` for CUDA inputs). Tests pass a
  /// stub that returns fixed costs.
  std::function<double(int layer, const std::function<void()>& run)> timer;

  /// Throws InvalidArgument unless warmup_runs >= 0 and timed_runs >= 1.
  void validate() const;
};

/// Forward+backward time of each layer: every sample microbatch goes through
/// the layers in order, each layer's output feeding the next; each layer
/// runs its forward and then a backward of its output against a gradient of
/// ones (torch::autograd::grad, so no .grad is touched). A layer's time is
/// the mean over the samples of the median of its timed runs. The layers'
/// buffers (BatchNorm's running statistics) and the CPU random generator are
/// restored afterwards. Throws InvalidArgument if there are no layers or no
/// samples.
std::vector<double> measure_layer_times(const std::vector<Layer>& layers,
                                        const std::vector<torch::Tensor>& sample_microbatches,
                                        const LayerTimingOptions& options = {});

/// partition_balanced(measure_layer_times(layers, samples, options), num_stages).
StagePartition partition_by_time(const std::vector<Layer>& layers,
                                 const std::vector<torch::Tensor>& sample_microbatches,
                                 int num_stages, const LayerTimingOptions& options = {});

/// A parameter shared by layers in different stages.
struct TiedParameter {
  /// Its global name in each layer that holds it, in layer order.
  std::vector<std::string> names;
  /// The stages that hold it, ascending, at least two.
  std::vector<int> stages;
};

/// The parameters shared across stages of `partition` (see above), in the
/// order of their first layer.
std::vector<TiedParameter> find_tied_parameters(const std::vector<Layer>& layers,
                                                const StagePartition& partition);

/// One stage of a partitioned model: its layers, registered under their
/// global names, run in order by forward().
class PipelineStageImpl : public torch::nn::Module {
 public:
  /// Stage `stage` of `partition` over `layers` (the same modules, shared).
  /// Throws InvalidArgument if the partition does not cover exactly
  /// layers.size() layers, the stage is out of range, or a layer name is
  /// empty or has an empty part ("a..b").
  PipelineStageImpl(const std::vector<Layer>& layers, const StagePartition& partition, int stage);

  /// Runs the stage's layers in order.
  torch::Tensor forward(torch::Tensor input);

  int stage() const noexcept { return stage_; }
  int first_layer() const noexcept { return first_layer_; }
  int end_layer() const noexcept { return end_layer_; }
  /// The global names of the stage's layers, in order.
  const std::vector<std::string>& layer_names() const noexcept { return layer_names_; }

 private:
  int stage_;
  int first_layer_;
  int end_layer_;
  std::vector<std::string> layer_names_;
  std::vector<torch::nn::AnyModule> layers_;
};
TORCH_MODULE(PipelineStage);

}  // namespace dtrain::parallel::pipeline
