#pragma once
// PipelineEngine: runs a pipeline schedule (schedule.h) on real ranks.
//
// One engine per rank. Every rank of the job builds the whole model as a
// list of layers (partition.h), cuts it with the same StagePartition, and
// constructs the engine with the same options; the engine keeps the stages
// of its pipeline rank (ParallelContext::pp_rank(); with v stages per rank,
// Schedule::stages_of_rank) and runs its action list in every step():
//
//   auto model = make_model();                      // same seed on every rank
//   auto layers = layers_of(model);
//   PipelineOptions options;
//   options.schedule.kind = ScheduleKind::kOneFOneB;
//   options.schedule.num_microbatches = 8;
//   options.stage_input_shapes = stage_input_shapes(layers, partition, sample);
//   PipelineEngine engine(layers, partition, context, options);
//   torch::optim::SGD sgd(engine.parameters(), 0.1);
//   for (...) {
//     auto result = engine.step(x, y, loss_fn);     // x, y: this replica's batch
//     sgd.step();                                    // gradients are ready
//     if (context.is_last_stage()) log(result.loss);
//   }
//
// Execution (the model of schedule.h):
//  * The schedule is validated (simulator.h) in the constructor: a list the
//    simulator rejects is refused before anything runs, with its reasons.
//  * F runs the stage's layers on the microbatch (stage 0) or on the
//    received activation, which becomes a leaf that requires grad; on the
//    last stage the loss function follows, scaled (LossScaling). B calls
//    autograd on the stage's output with the received gradient and sends
//    the gradient of the input. I computes only the input's gradient
//    (torch::autograd::grad, keeping the graph); W then accumulates the
//    stage parameters' gradients (autograd backward restricted to them).
//    Backward passes of a stage follow the schedule's microbatch order, so
//    gradients accumulate exactly as in one process that runs the same
//    microbatches in that order with gradient accumulation (bitwise).
//  * Consecutive send/recv actions are posted as one batch_send_recv on the
//    pp communicator, without waiting; a compute action waits only for the
//    batch that brings its input. Sends overlap with the following compute;
//    all batches are waited at the end of the step. Every received tensor
//    gets a fresh buffer (autograd may save it).
//  * Messages: activations travel as [microbatch size] + the next stage's
//    per-sample input shape (stage_input_shapes), gradients the same shape
//    backwards. Each (neighbouring stage pair, direction, microbatch size)
//    is its own channel (tag), so an uneven last microbatch is its own
//    shape. A stage whose output differs from what the next stage declared
//    fails the step with CommError naming both shapes, on both ranks (the
//    channel's first message carries a shape header), not a hang.
//  * Deallocation (Megatron-LM): once a stage's output has been handed to
//    its send, the output's storage is released if nothing but the send
//    and the output hold it (autograd did not save it); the graph stays, and
//    the memory returns once the send completes. last_stats() counts the
//    bytes. A send completes once the receiver has posted its receive: the
//    receiver posts receives of activations ahead (receive_ahead), each
//    its own batch in list order, so that the sender's memory returns as
//    soon as the message has arrived.
//  * Tied weights (find_tied_parameters): at construction the first holding
//    stage's value is copied to the other holders; in each step, once every
//    holding stage of a rank has passed its reduce action, the copies'
//    gradients are summed over the holding ranks (their own communicator),
//    before the data-parallel average, per step or, for results bitwise
//    equal to pp = 1, per microbatch (PipelineOptions::tied_gradients). The
//    copies stay bitwise equal.
//  * Data parallel: with dp > 1 (and dp_reduction kDdp, the default) each
//    stage is wrapped in DistributedDataParallel over the dp communicator. All backward passes
//    run under no_sync(); the stage's all-reduce starts at its reduce action
//    (its last backward of the step is done) and is waited at the end of
//    step(), which leaves the averaged gradients in .grad.
//
// Gradients: step() zeroes the gradients of this rank's stages first and
// leaves them ready for the optimizer. Do not call the optimizer's
// zero_grad() (under DDP gradients are views into its buckets).
//
// Errors: bad options, a rejected schedule, a partition with another number
// of stages, a batch with the wrong number of microbatches: InvalidArgument
// before anything runs. A communication failure (CommError, TimeoutError)
// leaves the engine unusable; later steps throw.
//
// Thread-safety: none; one training thread drives the engine.

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dtrain/parallel/distributed_data_parallel.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/pipeline/generators.h"
#include "dtrain/parallel/pipeline/partition.h"
#include "dtrain/parallel/pipeline/schedule.h"

namespace dtrain::parallel::pipeline {

/// Loss of one microbatch: the last stage's output and the microbatch's
/// target give a scalar.
using LossFunction =
    std::function<torch::Tensor(const torch::Tensor& output, const torch::Tensor& target)>;

/// How microbatch losses make the step's loss.
enum class LossScaling {
  /// The loss function is a mean over its microbatch: each microbatch's loss
  /// is multiplied by (its size / the batch size) before backward, so the
  /// gradients and the returned loss are those of the batch's mean.
  kMean,
  /// Used as it is (a sum, or a loss already scaled by the caller).
  kNone,
};

/// How the engine reduces each stage's gradients over the dp axis (dp > 1).
enum class DataParallelReduction {
  /// Each stage in DistributedDataParallel; its all-reduce starts at the
  /// stage's reduce action and step() returns averaged gradients.
  kDdp,
  /// None: step() returns this replica's gradients (its microbatches summed,
  /// tied copies summed over their stages) for the caller to reduce, e.g.
  /// a ZeroRedundancyOptimizer per stage over the dp communicator.
  kNone,
};

/// How the gradients of a weight tied across ranks' stages (an embedding
/// and the output layer) are combined.
enum class TiedGradientSum {
  /// Each copy accumulates its own stage's gradient over the step's
  /// microbatches; at the end of the step the copies' sums are all-reduced.
  /// One all-reduce of the weight per step. The result equals the one-stage
  /// model's up to the order of the floating-point additions.
  kPerStep,
  /// Each copy keeps its stage's gradient of every microbatch; at the end of
  /// the step they are all-gathered and added as one stage holding every use
  /// adds them: per microbatch the uses' gradients (the latest stage's
  /// first), then the microbatches in the order in which the first holding
  /// stage ran their backward. The gradients are then bitwise those of the
  /// same model at pp = 1 with the same microbatches. Costs m copies of the
  /// weight's gradient on each holding rank and an all-gather of them. Each
  /// holding rank must hold one of the weight's stages.
  kPerMicrobatch,
};

struct PipelineOptions {
  /// The generated schedule (num_ranks is taken from the context's pp size
  /// and may be left at 1). Ignored when custom_schedule is set.
  ScheduleOptions schedule;
  /// Any schedule, e.g. read by parse_schedule(); its num_ranks must equal
  /// the pp size.
  std::optional<Schedule> custom_schedule;
  /// Per stage (size S), the shape of one sample of the stage's input
  /// without the batch dimension; entry 0 is not used. Receive buffers are
  /// [microbatch size] + this. See stage_input_shapes().
  std::vector<std::vector<std::int64_t>> stage_input_shapes;
  /// dtype of activations and their gradients on the wire.
  at::ScalarType activation_dtype = at::kFloat;
  LossScaling loss_scaling = LossScaling::kMean;
  /// Release a sent output's storage when nothing else holds it.
  bool deallocate_sent_outputs = true;
  /// Post the receives of activations ahead of their place in the list:
  /// the batches that only receive activations, up to the next batch that
  /// sends or receives a gradient, as long as the stored activations and
  /// the received ones not yet consumed stay within the schedule's peak
  /// (the simulator's peak_stored for this rank). The previous stage's
  /// sends then complete when their messages arrive, not when this rank
  /// reaches the receive, so their outputs are released sooner.
  bool receive_ahead = true;
  /// Record the heap bytes in use (glibc mallinfo2) after each action.
  bool record_memory = false;
  /// For DistributedDataParallel, used when dp > 1 with kDdp.
  DdpOptions ddp;
  DataParallelReduction dp_reduction = DataParallelReduction::kDdp;
  TiedGradientSum tied_gradients = TiedGradientSum::kPerStep;

  /// Throws InvalidArgument naming the bad value.
  void validate() const;
};

/// What one action of the last step did, for traces.
struct ActionRecord {
  Action action;
  /// Steady clock, in seconds (the same clock for every process of a
  /// machine). Compute: the computation itself (waits for its input
  /// excluded). Send/recv: when its batch was posted (start == end).
  /// Reduce: when it was reached.
  double start_seconds = 0;
  double end_seconds = 0;
  /// Seconds the action waited for its input's batch before starting.
  double wait_seconds = 0;
  /// Heap bytes in use after the action (record_memory), else 0.
  std::size_t heap_bytes = 0;
};

struct PipelineStepStats {
  /// Bytes of the outputs this rank sent to another rank.
  std::size_t sent_output_bytes = 0;
  /// Of those, the bytes whose storage was released after the send.
  std::size_t deallocated_bytes = 0;
  /// Most heap bytes in use after any action (record_memory), and before
  /// the step's first action.
  std::size_t peak_heap_bytes = 0;
  std::size_t heap_bytes_at_start = 0;
};

struct PipelineStepResult {
  /// The step's loss (sum of the scaled microbatch losses), a detached
  /// scalar on the rank that holds the last stage; undefined elsewhere.
  torch::Tensor loss;
  /// Each microbatch's scaled loss, in microbatch order (last stage only).
  std::vector<torch::Tensor> microbatch_losses;
};

class PipelineEngine {
 public:
  /// Collective over the context's pp communicator (tied weights) and, with
  /// dp > 1, its dp communicator (DDP copies dp rank 0's stage weights).
  /// Throws InvalidArgument if the options, the schedule or the partition
  /// do not fit (a partition with another number of stages than the
  /// schedule, a schedule for another pp size, a shape list of the wrong
  /// size), before any communication.
  PipelineEngine(const std::vector<Layer>& layers, const StagePartition& partition,
                 ParallelContext context, PipelineOptions options);
  ~PipelineEngine();
  PipelineEngine(const PipelineEngine&) = delete;
  PipelineEngine& operator=(const PipelineEngine&) = delete;

  /// One training step on the microbatches (every rank of a pipeline passes
  /// the same microbatches: stage 0 reads the inputs, the last stage the
  /// targets, every rank the sizes). Their number must be the schedule's m;
  /// dimension 0 is the batch.
  PipelineStepResult step(const std::vector<torch::Tensor>& inputs,
                          const std::vector<torch::Tensor>& targets, const LossFunction& loss);
  /// The same on a batch cut into m microbatches (microbatch_sizes: an
  /// uneven batch gets shorter last microbatches).
  PipelineStepResult step(const torch::Tensor& input, const torch::Tensor& target,
                          const LossFunction& loss);

  const Schedule& schedule() const noexcept { return schedule_; }
  const ParallelContext& context() const noexcept { return context_; }
  /// The stages of this rank, ascending.
  const std::vector<int>& stage_ids() const noexcept { return stage_ids_; }
  /// The module of one of this rank's stages (its parameters have global
  /// names).
  PipelineStage stage(int stage) const;
  /// This rank's trainable parameters, stage by stage, each tensor once.
  std::vector<torch::Tensor> parameters() const;
  /// The same with their global names.
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const;

  /// The last step's actions, in this rank's list order.
  const std::vector<ActionRecord>& last_trace() const noexcept { return trace_; }
  const PipelineStepStats& last_stats() const noexcept { return stats_; }

  struct Impl;

 private:
  ParallelContext context_;
  PipelineOptions options_;
  Schedule schedule_;
  std::vector<int> stage_ids_;
  std::vector<ActionRecord> trace_;
  PipelineStepStats stats_;
  std::unique_ptr<Impl> impl_;
};

/// The shape of one sample of each stage's input (PipelineOptions::
/// stage_input_shapes): runs `sample_input` (a batch of any size, dimension
/// 0 the batch) through all layers without autograd, in eval mode (each
/// layer's mode is restored afterwards), and records the shape in front of
/// each stage without the batch dimension.
std::vector<std::vector<std::int64_t>> stage_input_shapes(const std::vector<Layer>& layers,
                                                          const StagePartition& partition,
                                                          const torch::Tensor& sample_input);

/// The trace as CSV rows "rank,kind,stage,microbatch,start,end,wait,heap"
/// (kind F/B/I/W/sendF/recvF/sendB/recvB/reduce), with a header line when
/// `header`, for scripts/pipeline_timeline.py.
std::string trace_to_csv(const std::vector<ActionRecord>& trace, int rank, bool header = true);

}  // namespace dtrain::parallel::pipeline
