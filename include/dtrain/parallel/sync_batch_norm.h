#pragma once
// SyncBatchNorm: batch normalization whose batch statistics are computed
// over the whole data-parallel group, so N ranks with per-rank batch b train
// like one process with batch N*b (plain BatchNorm would normalize each
// rank's b samples on their own).
//
// Training forward all-reduces per-channel sums (mean, then centred squares
// for the variance); backward all-reduces the per-channel sums of the
// gradient and of gradient x normalized input, as PyTorch's SyncBatchNorm
// does. Evaluation uses the running statistics and communicates nothing.
//
// Layout-independent: every per-channel sum is accumulated in double and
// rounded to the input's dtype once, and the elementwise part rounds once
// per operation. So for the same global input (and output gradient), the
// output, the input gradient and the running statistics are bitwise the same
// on one rank as on k ranks holding consecutive slices of the batch. (All but
// certainly: only a double sum that lands within ~1e-16 of a float rounding
// boundary can round differently in another order.) The affine parameters'
// gradients are per-rank sums, which DDP adds in float. Use it on one rank
// too (`comm` null or of size 1) when a run may continue on another number of
// ranks: torch::nn::BatchNorm2d rounds differently, and a few ulps at an
// activation next to 0 flip a ReLU (docs/ddp.md, "SyncBatchNorm").
//
// Parameter and buffer names match torch::nn::BatchNorm2d (weight, bias,
// running_mean, running_var, num_batches_tracked), so state carries over.
//
// Give it a communicator of its own over the dp ranks (for example
// `dp->split(0, dp->rank())`), not the one DistributedDataParallel uses:
// its all-reduces run inside forward and backward, interleaved with DDP's
// bucket all-reduces in an order that need not match across ranks.
// Input: [N, C, ...] (any number of trailing dimensions).

#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <memory>

#include "dtrain/collectives/communicator.h"

namespace dtrain::parallel {

struct SyncBatchNormOptions {
  int64_t num_features = 0;
  double eps = 1e-5;
  double momentum = 0.1;  ///< weight of the new batch in the running statistics
  bool affine = true;
};

class SyncBatchNormImpl : public torch::nn::Cloneable<SyncBatchNormImpl> {
 public:
  /// `comm` may be null (or have one rank): then it is plain BatchNorm.
  SyncBatchNormImpl(SyncBatchNormOptions options, std::shared_ptr<collectives::Communicator> comm);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& input);

  SyncBatchNormOptions options;
  std::shared_ptr<collectives::Communicator> comm;
  torch::Tensor weight;
  torch::Tensor bias;
  torch::Tensor running_mean;
  torch::Tensor running_var;
  torch::Tensor num_batches_tracked;
};

TORCH_MODULE(SyncBatchNorm);

}  // namespace dtrain::parallel
