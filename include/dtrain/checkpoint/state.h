#pragma once
// Putting LibTorch training state into a checkpoint and back.
//
//   StateDict state;
//   add_module(state, *model);                    // "model/<param or buffer name>"
//   add_optimizer(state, optimizer, *model);      // "optim/<param name>/<field>" (replicated)
//   add_zero_optimizer(state, zero);              // "zero/<field>", sharded by dp rank
//   add_rng_state(state, rank, world_size);       // "rng/cpu", one row per rank
//   manager.save(step, state, metadata);
//
//   auto ckpt = Checkpoint::open(entry.directory);
//   load_module(ckpt, *model);
//   load_zero_optimizer(ckpt, zero);              // re-partitioned for this dp size
//   load_rng_state(ckpt, rank);
//
// Optimizers: SGD (momentum buffers), Adam and AdamW (step, exp_avg,
// exp_avg_sq, max_exp_avg_sq with amsgrad). Others: InvalidArgument.
// ZeRO-1 state is stored as flat tensors of the unpadded global length, each
// rank writing its shard's range; loading re-partitions it for any dp size.

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <string>

#include "dtrain/checkpoint/checkpoint.h"

namespace dtrain::parallel {
class ZeroRedundancyOptimizer;
}

namespace dtrain::checkpoint {

/// Parameters and buffers of `module` as replicated tensors "<prefix><name>".
void add_module(StateDict& state, const torch::nn::Module& module,
                const std::string& prefix = "model/");
/// Copies them back (shapes and dtypes must match). CheckpointError naming
/// the first missing or mismatched tensor; nothing is copied then.
void load_module(const Checkpoint& checkpoint, torch::nn::Module& module,
                 const std::string& prefix = "model/");

/// The state of a (non-sharded) optimizer over `module`'s parameters, as
/// replicated tensors "<prefix><param name>/<field>".
void add_optimizer(StateDict& state, const torch::optim::Optimizer& optimizer,
                   const torch::nn::Module& module, const std::string& prefix = "optim/");
void load_optimizer(const Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                    const torch::nn::Module& module, const std::string& prefix = "optim/");

/// This rank's ZeRO-1 optimizer-state shard, as pieces of "<prefix><field>".
void add_zero_optimizer(StateDict& state, const parallel::ZeroRedundancyOptimizer& zero,
                        const std::string& prefix = "zero/");
/// Reads this rank's range of the state (for the current dp size) and makes
/// the shard's parameters match the module's (load_module first).
void load_zero_optimizer(const Checkpoint& checkpoint, parallel::ZeroRedundancyOptimizer& zero,
                         const std::string& prefix = "zero/");

/// LibTorch's default CPU generator state, row `rank` of "rng/cpu".
void add_rng_state(StateDict& state, int rank, int world_size);
/// Restores row `rank`; a rank the checkpoint did not have (more ranks now)
/// uses row rank % writers, so runs stay deterministic.
void load_rng_state(const Checkpoint& checkpoint, int rank);

}  // namespace dtrain::checkpoint
