#pragma once
// Copies rank 0's module buffers (BatchNorm's running statistics) to every
// rank: one broadcast per dtype, of the buffers packed into a flat tensor,
// rather than one small broadcast per buffer (ResNet-20 has 57). The flat
// tensors are allocated once. Used by DistributedDataParallel and
// ZeroRedundancyOptimizer. Private to src/parallel.

#include <torch/nn/module.h>

#include <vector>

#include "dtrain/collectives/communicator.h"

namespace dtrain::parallel::detail {

class BufferBroadcast {
 public:
  /// Packs `module`'s buffers (as they are now: the set must not change).
  explicit BufferBroadcast(const torch::nn::Module& module);
  /// Collective over `comm`: every rank ends with rank 0's buffer values.
  void run(collectives::Communicator& comm);

 private:
  struct Group {
    torch::Tensor flat;
    std::vector<torch::Tensor> buffers;
  };
  std::vector<Group> groups_;  // one per dtype
};

}  // namespace dtrain::parallel::detail
