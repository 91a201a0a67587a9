#pragma once
// Putting LibTorch training state into a checkpoint and back, by global name
// and placement, so that a checkpoint written by one layout (dp x pp x tp,
// with or without ZeRO) loads into any other.
//
//   StateDict state;
//   add_module(state, *model, layout);             // "model/<global name>"
//   add_optimizer(state, optimizer, *model, layout);  // "optim/<global name>/<field>"
//   add_zero_optimizer(state, zero, layout);       // the same names: ZeRO's share of each
//   add_rng_streams(state, rng);                   // "rng/<stream>/<device>", by coordinates
//   manager.save(step, state, metadata);
//
//   auto ckpt = Checkpoint::open(entry.directory);
//   load_module(ckpt, *model, layout);             // the region each placement asks for
//   load_optimizer(ckpt, optimizer, *model, layout);  // or:
//   load_zero_optimizer(ckpt, zero, layout);       // this rank's share, for this dp size
//   load_rng_streams(ckpt, rng);
//
// `layout` (parallel::ModuleLayout) maps the module's local tensor names to
// global ones and gives the placement of tensors that are not whole copies
// (tensor-parallel blocks); the overloads without it take every tensor as
// whole and replicated under its own name (a data-parallel job).
//
// Optimizer state is stored per global parameter, in the parameter's global
// shape: "optim/<param>/<field>" (momentum_buffer for SGD; exp_avg,
// exp_avg_sq, max_exp_avg_sq and the scalar step for Adam and AdamW). Under
// ZeRO each rank writes the part of each field that its flat shard covers
// (Placement::flat_range), so the names are the same with and without ZeRO,
// never collide between pipeline stages, and the state re-partitions for any
// dp size. Other optimizers: InvalidArgument.
//
// Older checkpoints (format versions 1 and 2) still load into a data-parallel
// layout: ZeRO state stored as flat "zero/<field>" tensors and the RNG state
// as "rng/cpu" rows by world rank.

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <string>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/parallel/placement.h"
#include "dtrain/parallel/rng.h"

namespace dtrain::parallel {
class ZeroRedundancyOptimizer;
}

namespace dtrain::checkpoint {

/// Parameters and buffers of `module` as "<prefix><global name>", each with
/// the placement `layout` gives it. A parameter that the module registers under
/// two names (a tied weight) is stored, restored and given optimizer state
/// once, under its first name (the same for the functions below).
void add_module(StateDict& state, const torch::nn::Module& module,
                const parallel::ModuleLayout& layout, const std::string& prefix = "model/");
/// Copies into each parameter and buffer the region of its global tensor
/// that its placement asks for, whatever layout wrote it. CheckpointError
/// naming the first missing tensor or one whose global shape or dtype
/// differs; nothing is copied then.
void load_module(const Checkpoint& checkpoint, torch::nn::Module& module,
                 const parallel::ModuleLayout& layout, const std::string& prefix = "model/");
/// The same with every tensor whole, under its own name.
void add_module(StateDict& state, const torch::nn::Module& module,
                const std::string& prefix = "model/");
void load_module(const Checkpoint& checkpoint, torch::nn::Module& module,
                 const std::string& prefix = "model/");

/// The state of a (non-sharded) optimizer over `module`'s parameters as
/// "<prefix><global name>/<field>", placed like the parameter (scalars whole).
void add_optimizer(StateDict& state, const torch::optim::Optimizer& optimizer,
                   const torch::nn::Module& module, const parallel::ModuleLayout& layout,
                   const std::string& prefix = "optim/");
/// Restores it from the regions of the parameters' placements (a parameter
/// without stored state gets none: a fresh start for it).
void load_optimizer(const Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                    const torch::nn::Module& module, const parallel::ModuleLayout& layout,
                    const std::string& prefix = "optim/");
void add_optimizer(StateDict& state, const torch::optim::Optimizer& optimizer,
                   const torch::nn::Module& module, const std::string& prefix = "optim/");
void load_optimizer(const Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                    const torch::nn::Module& module, const std::string& prefix = "optim/");

/// This rank's share of the ZeRO-1 optimizer state, stored per parameter like
/// add_optimizer: for each parameter its flat shard overlaps, that range of
/// each field (scalars whole, written once).
void add_zero_optimizer(StateDict& state, const parallel::ZeroRedundancyOptimizer& zero,
                        const parallel::ModuleLayout& layout, const std::string& prefix = "optim/");
/// Reads this rank's range of each field (for the current dp size; from a
/// checkpoint written with or without ZeRO, at any dp size) and makes the
/// shard's parameters match the module's (load_module first). A parameter
/// without a stored field contributes zeros to it. A checkpoint of format
/// version 1 or 2 with flat "zero/<field>" tensors is read as such.
void load_zero_optimizer(const Checkpoint& checkpoint, parallel::ZeroRedundancyOptimizer& zero,
                         const parallel::ModuleLayout& layout,
                         const std::string& prefix = "optim/");
void add_zero_optimizer(StateDict& state, const parallel::ZeroRedundancyOptimizer& zero,
                        const std::string& prefix = "optim/");
void load_zero_optimizer(const Checkpoint& checkpoint, parallel::ZeroRedundancyOptimizer& zero,
                         const std::string& prefix = "optim/");

/// The three streams of `rng` as "rng/<stream>/<device type>", global shape
/// [dp, pp, tp, state bytes] (kTensorShared: [dp, pp, state bytes], written
/// once per tp group), this rank's at its grid coordinates.
void add_rng_streams(StateDict& state, const parallel::RngStreams& rng);
/// Restores each stream from its coordinates; a coordinate beyond the stored
/// grid (more dp ranks now, say) takes the one at (dp mod stored dp, pp mod
/// stored pp, tp mod stored tp). A checkpoint without tensor-parallel streams
/// leaves them as seeded; one of version 1 or 2 restores the rank stream from
/// "rng/cpu" row (world rank mod its rows).
void load_rng_streams(const Checkpoint& checkpoint, parallel::RngStreams& rng);

/// The rank stream (LibTorch's default CPU generator) of a data-parallel job
/// without RngStreams: rank `rank` of `world_size` is coordinate (rank, 0, 0).
void add_rng_state(StateDict& state, int rank, int world_size);
void load_rng_state(const Checkpoint& checkpoint, int rank);

}  // namespace dtrain::checkpoint
