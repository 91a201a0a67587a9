#pragma once
// PipelineParallel: the trainer's pipeline-parallel Strategy
// (dtrain/train/strategy.h), over the PipelineEngine
// (dtrain/parallel/pipeline/engine.h).
//
// Every rank builds the whole model as a list of layers with the global
// names of the unsplit model (partition.h), and the strategy keeps the
// stages of its pipeline rank. The ranks of one pipeline (the context's pp
// group) read the same samples; the first stage feeds the images in, the
// last one scores them against the labels. With dp > 1, each stage is wrapped
// in DistributedDataParallel over the dp communicator, and its all-reduce
// starts at the stage's reduce action (its last backward of the step); or,
// with `zero`, each stage has a ZeroRedundancyOptimizer over the dp
// communicator (ZeRO-1: the stage's optimizer state sharded over its
// replicas), which reduces the stage's gradients in the optimizer step.
//
//   auto layers = model->layers();   // global names: "stem.0", "layer1.0", ..., "fc"
//   train::PipelineParallelOptions o;
//   o.schedule.kind = parallel::pipeline::ScheduleKind::kOneFOneB;
//   o.schedule.num_microbatches = 4;
//   auto strategy = std::make_unique<train::PipelineParallel>(
//       layers, parallel::pipeline::partition_uniform(layers.size(), run.context->pp_size()),
//       torch::zeros({1, 3, 32, 32}), run.context, make_optimizer, train::classification(), o);
//
// A step: the batch (this replica's share of the global batch) is cut into
// the schedule's m microbatches (microbatch_sizes), the engine runs this
// rank's action list (forward, backward, sends and receives, the stages'
// gradient reduction), then the optimizer steps over this rank's
// parameters. Each microbatch's loss is the Objective's mean over the
// microbatch, scaled by its share of the batch, so the gradients and the
// step's loss are those of the batch's mean; the gradients accumulate in
// microbatch order, so any pp split trains bitwise like pp = 1 running the
// same microbatches (not like one forward over the whole batch: BatchNorm
// sees microbatches, and sums round differently).
//
// Report sums are counted once: only the rank that holds the last stage
// (of tp rank 0 when the stages are split over tp) reports the loss,
// correct predictions and samples; the others report zeros (and
// local_loss 0). The train line gets pipeline_s (the engine's
// step, its gradient reduction included), compute_s (this rank's F/B/I/W
// time), input_wait_s (time actions waited for their input),
// idle_fraction (1 - compute_s / pipeline_s, this rank) and optimizer_s. A
// trace gets one span per compute action, named "F", "B", "I" or "W" with
// args {stage, microbatch, step, wait_s} on thread 0, the posted sends and
// receives and the reduce actions as instants on thread 1, and the
// optimizer; scripts/pipeline_timeline.py draws them.
//
// Evaluation runs the stages forward over the whole batch, one message per
// stage boundary (on a communicator of its own, split from the pp one), and
// the last stage scores it.
//
// Checkpoints: each stage's parameters and buffers under their global
// names, placed on their stage (Placement::on_stage), the optimizer state
// per global parameter (checkpoint/state.h), and the RNG streams by grid
// coordinate; load_state reads them for this rank's stages whatever split
// (or DataParallel run) wrote them.
//
// Tensor parallelism: with tp > 1 every rank builds its tp shard of the
// layers (the tensor-parallel layers of dtrain/parallel/tensor_parallel.h,
// over the context's tp communicator); the stages of one tp group run
// together, their collectives inside the stages' forward and backward.
// Checkpoints place the tp blocks as the layers say (stage_layout).
//
// Under ZeRO-1 the checkpoint holds each rank's share of the optimizer state
// per global parameter (checkpoint::add_zero_optimizer), so it resumes at
// another dp size, under DDP, or another split, like the DDP one.
//
// Limits: messages go over the context's pp communicator, which is MPI, so
// the stages run on CPU tensors; ZeRO-1 with tp > 1 is refused
// (InvalidArgument), as in DataParallel.
//
// Construction is collective over the context's pp communicator and, with
// dp > 1, its dp communicator. Calls come from one thread.

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/parallel/distributed_data_parallel.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/pipeline/engine.h"
#include "dtrain/parallel/pipeline/generators.h"
#include "dtrain/parallel/pipeline/partition.h"
#include "dtrain/parallel/placement.h"
#include "dtrain/parallel/rng.h"
#include "dtrain/parallel/zero_optimizer.h"
#include "dtrain/train/strategy.h"

namespace dtrain::train {

struct PipelineParallelOptions {
  /// The schedule's kind, microbatches (m) and stages per rank (v, above 1
  /// only for interleaved); num_ranks is the context's pp size.
  parallel::pipeline::ScheduleOptions schedule;
  /// DDP of each stage over the dp axis (dp > 1).
  parallel::DdpOptions ddp;
  /// ZeRO-1 per stage instead of DDP: one ZeroRedundancyOptimizer per stage
  /// of this rank over the dp communicator (any dp size).
  bool zero = false;
  /// Seed of the tensor-parallel RNG streams (RngStreams), checkpointed
  /// with the rank stream.
  std::uint64_t seed = 0;
  /// dtype of the activations and gradients sent between stages (and of the
  /// evaluation's messages): the model's floating dtype.
  at::ScalarType activation_dtype = at::kFloat;
  /// How the gradients of weights tied across stages' ranks are summed: per
  /// step (one all-reduce) or per microbatch (bitwise pp = 1's gradients;
  /// parallel::pipeline::TiedGradientSum).
  parallel::pipeline::TiedGradientSum tied_gradients =
      parallel::pipeline::TiedGradientSum::kPerStep;

  /// InvalidArgument naming the bad value (the schedule's own checks).
  void validate(int pp_size) const;
};

class PipelineParallel : public Strategy {
 public:
  /// Builds the optimizer over this rank's parameters.
  using OptimizerFactory =
      std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

  /// `layers`: the whole model (every rank builds it alike), on the training
  /// device; `partition`: its cut into pp * v stages; `sample_input`: a
  /// batch of any size of the model's input, to learn each stage's input
  /// shape (stage_input_shapes). InvalidArgument before any communication
  /// when the options, schedule and partition do not fit.
  PipelineParallel(std::vector<parallel::pipeline::Layer> layers,
                   const parallel::pipeline::StagePartition& partition,
                   const at::Tensor& sample_input,
                   std::shared_ptr<const parallel::ParallelContext> context,
                   const OptimizerFactory& make_optimizer, Objective objective,
                   PipelineParallelOptions options = {});
  ~PipelineParallel() override;
  PipelineParallel(const PipelineParallel&) = delete;
  PipelineParallel& operator=(const PipelineParallel&) = delete;

  /// "pipeline 1f1b (pp 2, m 4) + DDP" and the like.
  std::string name() const override;
  void set_lr(double lr) override;
  StepResult train_step(Batch& batch, const StepInfo& info) override;
  void set_training(bool training) override;
  ReportSums eval_step(Batch& batch) override;
  checkpoint::StateDict state_dict() const override;
  void load_state(const checkpoint::Checkpoint& checkpoint) override;

  /// The optimizer; under ZeRO-1, the wrapped optimizer of this rank's
  /// first stage (each stage has its own).
  torch::optim::Optimizer& optimizer();
  parallel::pipeline::PipelineEngine& engine() { return *engine_; }

 private:
  std::vector<parallel::pipeline::Layer> layers_;
  std::shared_ptr<const parallel::ParallelContext> context_;
  Objective objective_;
  PipelineParallelOptions options_;
  std::vector<std::vector<std::int64_t>> stage_input_shapes_;
  std::vector<parallel::pipeline::TiedParameter> tied_;
  std::unique_ptr<parallel::pipeline::PipelineEngine> engine_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;  // DDP (or dp = 1)
  // ZeRO-1: one per stage of this rank, in stage_ids() order.
  std::vector<std::unique_ptr<parallel::ZeroRedundancyOptimizer>> zero_;
  std::unique_ptr<parallel::RngStreams> rng_;
  std::shared_ptr<collectives::Communicator> eval_comm_;  // forward-only messages
  // One tag per (stage boundary, batch size): a channel carries one shape.
  std::map<std::pair<int, std::int64_t>, int> eval_tags_;
  bool holds_last_stage_ = false;
  bool reports_ = false;     // the last stage's rank of tp rank 0 reports the sums
  double step_correct_ = 0;  // correct predictions of the step's microbatches
};

/// The placements of a pipeline stage's tensors for checkpoint/state.h:
/// tensor-parallel blocks as the stage's tensor-parallel layers give them
/// (tensor_parallel_layout), every other parameter and buffer whole; owned
/// by stage `stage_index`, under its own (global) name. A tied parameter
/// (`tied`, find_tied_parameters of the same partition) takes the name of
/// its first layer in every stage that holds it and is replicated over the
/// pipeline axis: the copies are equal, the first stage's rank writes it and
/// every holder reads it.
parallel::ModuleLayout stage_layout(
    const torch::nn::Module& stage, int stage_index,
    const std::vector<parallel::pipeline::TiedParameter>& tied = {});

}  // namespace dtrain::train
