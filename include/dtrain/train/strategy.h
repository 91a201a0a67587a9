#pragma once
// The one interface between the trainer (dtrain/train/trainer.h) and a
// parallel strategy, and the one between the trainer and a program's data.
//
// The trainer runs the loop: it takes a Batch from a DataSource, hands it to
// Strategy::train_step, adds up the step's sums over the ranks for the
// report, and decides when to evaluate, save and stop. It knows nothing of
// the model, of how gradients travel, or of what a sample is. A strategy
// owns the model, the optimizer and the gradient sync, and reports what it
// did in a StepResult:
//
//   strategy                 one step of train_step(batch)
//   DataParallel (DDP)       forward, backward, bucketed all-reduce, step
//   DataParallel (ZeRO-1)    forward, backward, reduce-scatter, step, gather
//   PipelineParallel         splits the batch into microbatches and runs its
//                            action list; the first stage reads the inputs,
//                            the last one the targets and knows the loss
//                            (dtrain/train/pipeline_parallel.h)
//   tensor parallel (16)     a GPT over token ids: inputs [N, T] and targets
//                            [N, T], the loss over the tp group's logits
//
// The report sums (loss_sum, correct, samples) are "counted once": the
// trainer sums them over every rank of the world, so a rank that holds no
// loss (a pipeline stage before the last, or every tensor-parallel rank but
// one) reports zeros. The mean loss and accuracy of a step or an evaluation
// are then the same on every rank, whatever the layout.
//
// Checkpoints hold what state_dict() returns (model, optimizer and RNG, by
// global name and placement: dtrain/checkpoint/state.h); load_state() reads
// it back, for this rank's layout, whatever layout wrote it.

#include <torch/nn/module.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dtrain/checkpoint/checkpoint.h"

namespace dtrain::train {

using SteadyTime = std::chrono::steady_clock::time_point;
using SystemTime = std::chrono::system_clock::time_point;

/// One step's (or one evaluation batch's) data of this rank.
struct Batch {
  at::Tensor inputs;   ///< images [N, C, H, W], token ids [N, T], ...
  at::Tensor targets;  ///< labels [N], next tokens [N, T], ... (numel 0: nothing for this rank)
  std::int64_t epoch = 0;
  std::int64_t batch_in_epoch = 0;
  /// Global indices (int64) of the samples, for the sample log; may be undefined.
  at::Tensor indices;
};

/// Where batches come from, in the order every rank agrees on (a
/// dtrain::data::DataLoader behind it, say). Used by one thread.
class DataSource {
 public:
  virtual ~DataSource() = default;
  /// The next batch (blocks until it is ready: the step's data wait).
  virtual Batch next() = 0;
  /// Moves `batch` onto the training device and does there what the loader
  /// left to it (normalizing raw images, say). Called inside the step's
  /// forward time, after next(). Default: nothing.
  virtual void to_device(Batch& batch) { (void)batch; }
  /// Batches in one epoch (the last batch of an epoch ends it).
  virtual std::int64_t batches_per_epoch() const = 0;
  /// The position after the last next(), as text: stored in every checkpoint
  /// and given back to TrainingProgram::train_data on resume.
  virtual std::string position() const = 0;
};

/// A trace span the strategy measured (written when StepInfo::trace).
struct Span {
  std::string name;
  SystemTime begin;
  SystemTime end;
  int tid = 0;  ///< 0 compute, 1 communication
  nlohmann::json args = nlohmann::json::object();
};

/// What the trainer tells the strategy about the step it asks for.
struct StepInfo {
  std::int64_t step = 0;  ///< steps done before this one
  bool trace = false;     ///< fill StepResult::spans
  /// When the batch was ready (next() returned): the step's first phase
  /// (forward) is measured from here, so it includes DataSource::to_device.
  SteadyTime data_ready;
  SystemTime data_ready_wall;
};

/// Sums for the report, counted once over the world (see the top).
struct ReportSums {
  double loss_sum = 0;  ///< the loss summed over the samples
  double correct = 0;   ///< correct predictions (accuracy = correct / samples)
  double samples = 0;   ///< samples (or tokens) in the sums
};

struct StepResult {
  ReportSums sums;
  /// This rank's mean loss (the train line's "local_loss").
  double local_loss = 0;
  /// Fields added to the step's "train" metrics line (forward_s, ...).
  nlohmann::json metrics = nlohmann::json::object();
  /// With StepInfo::trace: the step's spans after the data wait, in order.
  std::vector<Span> spans;
};

/// How a model's output is scored. Each function takes the model's output
/// and the batch's targets (on the device).
struct Objective {
  /// The training loss: a scalar, the mean over the batch; backward starts here.
  std::function<at::Tensor(const at::Tensor& output, const at::Tensor& targets)> loss;
  /// The evaluation loss summed over the batch (a scalar).
  std::function<at::Tensor(const at::Tensor& output, const at::Tensor& targets)> loss_sum;
  /// Correct predictions in the batch (a scalar).
  std::function<at::Tensor(const at::Tensor& output, const at::Tensor& targets)> correct;
};

/// Cross-entropy over logits [N, classes] and labels [N]: training with
/// `label_smoothing`, evaluation without; correct = argmax over dim 1.
Objective classification(double label_smoothing = 0.0);

/// A parallel strategy, as the trainer drives it. Calls come from one
/// thread; train_step, eval_step, state_dict and load_state are collective
/// over the strategy's communicators (every rank calls them, in the same
/// order).
class Strategy {
 public:
  virtual ~Strategy() = default;
  /// "DDP", "ZeRO-1", ...: the start line names it.
  virtual std::string name() const = 0;
  /// The learning rate of the next step (every parameter group).
  virtual void set_lr(double lr) = 0;
  /// One optimizer step on `batch`: forward, backward, gradient sync, update.
  virtual StepResult train_step(Batch& batch, const StepInfo& info) = 0;
  /// Training or evaluation mode of the model (dropout, BatchNorm).
  virtual void set_training(bool training) = 0;
  /// The report sums of one evaluation batch (the trainer holds a
  /// NoGradGuard and has called set_training(false)).
  virtual ReportSums eval_step(Batch& batch) = 0;
  /// What a checkpoint holds of this rank: model, optimizer, RNG.
  virtual checkpoint::StateDict state_dict() const = 0;
  /// Restores it (CheckpointError when the checkpoint does not fit).
  virtual void load_state(const checkpoint::Checkpoint& checkpoint) = 0;
};

}  // namespace dtrain::train
