#pragma once
// ZeroRedundancyOptimizer: ZeRO stage 1. Optimizer state (momentum, Adam's
// moments) is partitioned over the data-parallel ranks, so each rank keeps
// about 1/N of it.
//
// The model's parameters and gradients become views into two flat buffers
// (padded to a multiple of the dp size). step():
//   1. reduce-scatter the flat gradient (average over the dp ranks): rank r
//      receives the averaged gradient of its shard r only;
//   2. runs the wrapped LibTorch optimizer on that shard (its state exists
//      for the shard only);
//   3. all-gathers the updated shards back into the flat parameters, so every
//      replica again holds identical weights, and copies rank 0's buffers
//      (BatchNorm running statistics) to every rank, as DDP does.
// The result equals DistributedDataParallel + the same optimizer on every
// rank (tested), with 1/N of the optimizer memory. Use it *instead of* DDP
// (it does the gradient averaging itself; gradients are reduced in step(),
// after backward, not overlapped with it).
//
//   ZeroRedundancyOptimizer opt(model, dp, [](std::vector<torch::Tensor> shard) {
//     return std::make_unique<torch::optim::AdamW>(shard, torch::optim::AdamWOptions(1e-3));
//   });
//   opt.zero_grad(); loss.backward(); opt.step();
//
// Construction is collective: it copies dp rank 0's parameters to all ranks.
// All trainable parameters must share one floating dtype.

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/parallel/parallel_context.h"

namespace dtrain::parallel {

namespace detail {
class BufferBroadcast;
}

class ZeroRedundancyOptimizer {
 public:
  /// Builds the wrapped optimizer over this rank's shard (one tensor).
  using OptimizerFactory =
      std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor> shard)>;

  ZeroRedundancyOptimizer(std::shared_ptr<torch::nn::Module> module,
                          std::shared_ptr<collectives::Communicator> dp,
                          const OptimizerFactory& make_optimizer);
  /// The same over the context's dp communicator.
  ZeroRedundancyOptimizer(std::shared_ptr<torch::nn::Module> module, const ParallelContext& context,
                          const OptimizerFactory& make_optimizer);

  /// Zeroes the flat gradient buffer (use instead of the optimizer's).
  void zero_grad();
  /// Averages gradients, updates this rank's shard, gathers all shards.
  void step();

  /// Elements of this rank's shard / of all trainable parameters.
  std::int64_t shard_numel() const { return shard_.numel(); }
  std::int64_t total_numel() const { return total_numel_; }
  /// Bytes of this rank's optimizer state, measured by serializing it.
  std::size_t optimizer_state_bytes() const;
  torch::optim::Optimizer& optimizer() { return *optimizer_; }
  const torch::optim::Optimizer& optimizer() const { return *optimizer_; }

  /// For checkpoints: this rank's shard covers elements [shard_offset(),
  /// shard_offset() + shard_numel()) of the flat parameters (the tail past
  /// total_numel() is padding). `shard()` is the tensor the wrapped
  /// optimizer steps on (its state is keyed by it).
  std::int64_t shard_offset() const { return dp_->rank() * shard_.numel(); }
  const torch::Tensor& shard() const { return shard_; }
  /// Copies the module's current parameters into the shard (after loading
  /// parameters into the module).
  void reload_shard_from_parameters();

  /// A trainable parameter's place in the flat buffers: elements
  /// [offset, offset + parameter.numel()), under its name in the module.
  struct FlatParameter {
    std::string name;
    std::int64_t offset = 0;
    torch::Tensor parameter;
  };
  /// The trainable parameters in flat order (the module's
  /// named_parameters() order), for checkpoints by parameter.
  const std::vector<FlatParameter>& flat_parameters() const { return flat_parameters_; }

 private:
  std::shared_ptr<torch::nn::Module> module_;
  std::shared_ptr<collectives::Communicator> dp_;
  std::int64_t total_numel_ = 0;
  std::vector<FlatParameter> flat_parameters_;
  torch::Tensor flat_params_;  // model parameters are views into it
  torch::Tensor flat_grads_;   // model gradients are views into it
  torch::Tensor shard_;        // this rank's slice of the parameters (what the optimizer sees)
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  std::shared_ptr<detail::BufferBroadcast> buffers_;  // rank 0's buffers to all, made once
};

}  // namespace dtrain::parallel
