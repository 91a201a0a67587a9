#pragma once
// DistributedDataParallel: data parallelism for any torch::nn::Module, with
// gradient all-reduce overlapped with backward.
//
// Each rank holds a full replica and trains on its own part of every global
// batch. Gradients live in a few flat buckets allocated once: every
// parameter's .grad is a view into its bucket, so backward accumulates
// straight into them and nothing is copied. Buckets hold parameters in
// reverse registration order (backward produces gradients roughly in that
// order); the first bucket is small so that communication starts early.
// When backward has produced every gradient of a bucket, the bucket's
// average over the dp ranks is started at once (an async all-reduce with
// ReduceOp::kAvg), while backward goes on with earlier layers. Buckets are
// always started in bucket order on every rank, whatever order their
// gradients arrive in, so the collectives match across ranks.
//
// A training step:
//
//   DistributedDataParallel ddp(model, grid.dp_ptr());   // broadcasts rank 0's weights
//   for (...) {
//     ddp.zero_grad();                    // not optimizer.zero_grad(): see below
//     auto loss = loss_fn(model->forward(local_batch));
//     loss.backward();                    // all-reduces start during backward
//     ddp.synchronize();                  // waits for them; .grad = global average
//     optimizer.step();
//   }
//
// Gradient accumulation: backward passes inside `auto guard = ddp.no_sync();`
// only accumulate; the next backward outside it all-reduces the sum, so N
// micro-batches give the gradient of one N-times larger batch.
//
// Contract
//  * Every rank of the communicator constructs it with the same module
//    architecture; construction checks that every rank has the same
//    parameters (names, shapes, dtypes; an error names the first that
//    differs) and copies parameters and buffers from dp rank 0.
//  * Gradients are views: LibTorch's Optimizer::zero_grad() detaches them,
//    which fails on views. Use ddp.zero_grad() (zeroes the buckets).
//  * Every parameter that requires grad must get a gradient in each synced
//    backward, or the step fails at the end of backward with an error naming
//    the parameter; with find_unused_parameters they count as zero instead.
//  * Buffers (e.g. BatchNorm's running statistics) are copied from rank 0 in
//    synchronize() (broadcast_buffers), so all replicas stay identical.
//  * Same seed, same world size: bitwise identical results run to run.
//  * Not thread-safe: one training thread drives it.

#include <torch/nn/module.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"

namespace dtrain::parallel {

/// Wire format of gradient all-reduces (a communication hook).
enum class GradientCompression {
  kNone,      ///< all-reduce in the gradients' own dtype
  kBFloat16,  ///< float32 buckets travel as bfloat16: half the bytes, 8-bit mantissa
  kFloat16,   ///< float32 buckets travel as float16: half the bytes, narrower range
};

struct DdpOptions {
  /// Capacity of the first bucket (the last layers' gradients), in bytes.
  std::size_t first_bucket_cap_bytes = std::size_t{1} << 20;
  /// Capacity of the other buckets, in bytes. A parameter larger than the cap
  /// gets a bucket of its own.
  std::size_t bucket_cap_bytes = std::size_t{25} << 20;
  /// Start a bucket's all-reduce during backward as soon as it is ready.
  /// false: all buckets start in synchronize() (for measuring the overlap).
  bool overlap = true;
  /// Copy rank 0's buffers to every rank in each synchronize().
  bool broadcast_buffers = true;
  /// Parameters that got no gradient in a backward count as zero gradients
  /// instead of failing the step.
  bool find_unused_parameters = false;
  /// Send float32 gradients as 16-bit values: each bucket is divided by the
  /// dp size and cast into a 16-bit buffer (allocated once), summed across
  /// ranks, and cast back in synchronize(). Pre-dividing keeps float16 sums in
  /// range. Buckets of other dtypes are sent as they are.
  GradientCompression compression = GradientCompression::kNone;

  void validate() const;
};

/// One bucket's all-reduce in the last synced step (for traces).
struct BucketTiming {
  int bucket = 0;
  std::size_t bytes = 0;  ///< bytes on the wire
  std::chrono::system_clock::time_point issued;
  std::chrono::system_clock::time_point completed;
};

/// Timing of the last synced step, for metrics and benchmarks.
struct DdpStepStats {
  double exposed_comm_seconds = 0;  ///< time synchronize() waited for buckets
  int buckets = 0;
  std::vector<BucketTiming> bucket_timings;  ///< in launch order
};

class DistributedDataParallel {
 public:
  /// Collective over `dp`. Throws InvalidArgument if the ranks' parameters
  /// differ or the options are invalid.
  DistributedDataParallel(std::shared_ptr<torch::nn::Module> module,
                          std::shared_ptr<collectives::Communicator> dp, DdpOptions options = {});
  ~DistributedDataParallel();
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;

  /// Zeroes every gradient (the buckets).
  void zero_grad();

  /// Waits until every bucket of the last backward has been averaged over
  /// the dp ranks (starting any not yet started), then broadcasts buffers.
  /// Rethrows the collectives' errors (TimeoutError, CommError).
  void synchronize();

  /// Starts the average of every bucket not started yet, with the gradients
  /// as they are now, and returns without waiting; a later synchronize()
  /// (outside no_sync()) waits for them. For callers that accumulate every
  /// backward of a step inside no_sync() and know when the last gradient is
  /// in: a pipeline stage starts its all-reduce at its reduce action, while
  /// the rank goes on with other stages' work. Buckets start in bucket order,
  /// as always, so every rank of the communicator must call it once per step.
  void start_reduction();

  /// While the returned guard lives, backward only accumulates gradients.
  class NoSyncGuard {
   public:
    explicit NoSyncGuard(DistributedDataParallel& ddp);
    ~NoSyncGuard();
    NoSyncGuard(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;

   private:
    DistributedDataParallel& ddp_;
    bool previous_;
  };
  NoSyncGuard no_sync() { return NoSyncGuard(*this); }

  torch::nn::Module& module() const { return *module_; }
  collectives::Communicator& communicator() const { return *dp_; }
  const DdpOptions& options() const { return options_; }
  const DdpStepStats& last_step_stats() const { return stats_; }

  /// Bucket layout: parameter names per bucket, in launch order.
  std::vector<std::vector<std::string>> bucket_layout() const;
  /// The order in which buckets were started in the last synced backward
  /// (always 0, 1, 2, ...; exposed for tests).
  const std::vector<int>& last_launch_order() const;

  /// Implementation detail (shared with the autograd hooks).
  struct State;

 private:
  std::shared_ptr<torch::nn::Module> module_;
  std::shared_ptr<collectives::Communicator> dp_;
  DdpOptions options_;
  DdpStepStats stats_;
  std::shared_ptr<State> state_;  // shared with the autograd hooks
};

}  // namespace dtrain::parallel
