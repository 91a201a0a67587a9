#pragma once
// Copies rank 0's module buffers (BatchNorm's running statistics) to every
// rank: one broadcast per dtype, of the buffers packed into a flat tensor,
// rather than one small broadcast per buffer (ResNet-20 has 57). Used by
// DistributedDataParallel and ZeroRedundancyOptimizer. Private to src/parallel.

#include <torch/nn/module.h>

#include <memory>
#include <vector>

#include "dtrain/collectives/communicator.h"

namespace dtrain::parallel::detail {

void broadcast_buffers(torch::nn::Module& module, collectives::Communicator& comm);

}  // namespace dtrain::parallel::detail
