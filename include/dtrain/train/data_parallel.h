#pragma once
// DataParallel: the trainer's data-parallel Strategy (dtrain/train/strategy.h).
// Every rank holds the whole model and a share of each global batch; the
// gradients are averaged by DistributedDataParallel (bucketed all-reduce,
// overlapped with backward), or, with `zero`, by the ZeroRedundancyOptimizer
// (ZeRO-1: reduce-scatter, a step on this rank's shard of the optimizer
// state, all-gather).
//
//   auto model = make_my_model();  // on the training device
//   train::DataParallelOptions o;
//   o.zero = false;
//   o.ddp.bucket_cap_bytes = 25 << 20;
//   auto strategy = std::make_unique<train::DataParallel>(
//       model.ptr(), [m = model.ptr()](const at::Tensor& x) { return m->forward(x); },
//       run.train_comm,
//       [](std::vector<torch::Tensor> params) {
//         return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1));
//       },
//       train::classification(), o);
//
// A step: zero the gradients, forward, the objective's loss, backward,
// DDP's synchronize (its wait is "comm_exposed_s"), the optimizer step. The
// train line gets forward_s, backward_s, sync_s, comm_exposed_s and
// optimizer_s (under ZeRO-1 the gradient reduce-scatter and the parameter
// all-gather run in the optimizer step and count as optimizer time); a
// trace gets forward, backward, synchronize with each bucket's all-reduce
// (thread 1), and optimizer.
//
// Checkpoints: the module, the optimizer (or ZeRO's shards, stored per
// parameter, so either kind resumes the other at any dp size) and the rank's
// RNG state (dtrain/checkpoint/state.h). Construction is collective over
// `comm` (DDP and ZeRO check or copy the parameters).
//
// Under tensor parallelism (a model of dtrain/parallel/tensor_parallel.h
// layers) the same strategy runs on the dp axis of a ParallelContext: `comm`
// is context.dp() (the ranks that hold the same shards), the objective scores
// the tp group's logits (its collectives run on every tp rank), and
// DataParallelOptions says what a checkpoint needs of the layout:
//
//   train::DataParallelOptions o;
//   o.layout = parallel::tensor_parallel_layout(*model);  // global shapes, tp blocks
//   o.rng = rng;                                          // RngStreams, by coordinates
//   o.report = ctx.tp_rank() == 0;                        // the tp ranks share one loss
//   DataParallel strategy(model, forward, ctx.dp(), make_optimizer, objective, o);
//
// The model and the optimizer state are then stored by global name and
// placement, so a checkpoint written at one tp size loads at any other.

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/parallel/distributed_data_parallel.h"
#include "dtrain/parallel/placement.h"
#include "dtrain/parallel/rng.h"
#include "dtrain/train/strategy.h"

namespace dtrain::parallel {
class ZeroRedundancyOptimizer;
}

namespace dtrain::train {

struct DataParallelOptions {
  /// ZeRO-1 instead of DDP (`ddp` is then unused).
  bool zero = false;
  /// Buckets, overlap and compression of DDP.
  parallel::DdpOptions ddp;
  /// Global names and placements of the module's tensors in checkpoints
  /// (tensor-parallel blocks: parallel::tensor_parallel_layout). Empty: every
  /// tensor whole, under its own name. Not with `zero` (InvalidArgument).
  parallel::ModuleLayout layout;
  /// RNG streams to store and restore by grid coordinates (all three,
  /// dtrain/parallel/rng.h); unset: the default generator, keyed by the
  /// rank of `comm`.
  std::shared_ptr<parallel::RngStreams> rng;
  /// False: this rank's report sums are zeros, because another rank reports
  /// the same samples (the ranks of a tensor-parallel group all hold the
  /// loss; one of them reports it, so that it is counted once).
  bool report = true;
};

class DataParallel : public Strategy {
 public:
  /// The model's forward over a batch's inputs.
  using Forward = std::function<at::Tensor(const at::Tensor& inputs)>;
  /// Builds the optimizer over the given parameters (the whole model, or
  /// ZeRO's shard).
  using OptimizerFactory =
      std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

  /// `module`: the model, already on the training device; `forward` runs it.
  /// `comm`: where gradients and buffers travel (the world on CPU, an NCCL
  /// communicator over the same ranks on GPUs); its rank and size key the
  /// RNG state in checkpoints.
  DataParallel(std::shared_ptr<torch::nn::Module> module, Forward forward,
               std::shared_ptr<collectives::Communicator> comm,
               const OptimizerFactory& make_optimizer, Objective objective,
               DataParallelOptions options = {});
  ~DataParallel() override;
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  std::string name() const override;
  void set_lr(double lr) override;
  StepResult train_step(Batch& batch, const StepInfo& info) override;
  void set_training(bool training) override;
  ReportSums eval_step(Batch& batch) override;
  checkpoint::StateDict state_dict() const override;
  void load_state(const checkpoint::Checkpoint& checkpoint) override;

  /// The optimizer that updates the parameters (ZeRO's wraps this rank's shard).
  torch::optim::Optimizer& optimizer();

 private:
  std::shared_ptr<torch::nn::Module> module_;
  Forward forward_;
  Objective objective_;
  DataParallelOptions options_;
  int rank_ = 0;
  int world_size_ = 1;
  std::unique_ptr<parallel::DistributedDataParallel> ddp_;
  std::unique_ptr<parallel::ZeroRedundancyOptimizer> zero_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;  // with DDP
};

}  // namespace dtrain::train
