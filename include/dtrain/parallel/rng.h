#pragma once
// RngStreams: random-number streams keyed by grid coordinates.
//
// Three streams, after Megatron-LM's RNG tracker:
//
//   kRank            distinct on every rank: LibTorch's default generator of
//                    the device itself (torch::rand, init, dropout outside
//                    any fork draw from it); the caller seeds it.
//   kTensorShared    the same on every rank of one tensor-parallel group,
//                    distinct across (dp, pp): dropout on activations that
//                    every tp rank holds whole must draw the same mask.
//   kTensorDistinct  distinct on every rank, also within a tp group: dropout
//                    on a tensor split over tp draws independent masks.
//
// The two tensor-parallel streams are seeded from (seed, dp, pp) and
// (seed, dp, pp, tp), never from the world rank, so a rank keeps its streams
// when the number of dp replicas changes, and checkpoints store them by
// coordinate (checkpoint::add_rng_streams): a job restarted with another dp
// size restores each coordinate's stream; a coordinate the checkpoint did
// not have takes the one at (dp mod stored dp, ...), so runs stay
// deterministic.
//
// Drawing from a stream: LibTorch's ops (dropout, rand) take the default
// generator, so fork() swaps the stream's state into it for a scope and
// swaps it back out at the end (the stream keeps what was drawn):
//
//   RngStreams rng(ctx, /*seed=*/1234);
//   {
//     auto scope = rng.fork(RngStream::kTensorDistinct);
//     x = torch::dropout(x, 0.1, /*train=*/true);   // a different mask on each tp rank
//   }
//   y = torch::dropout(y, 0.1, true);                // the rank stream again
//
// Forks of different streams nest; forking a stream that is already forked
// is an InvalidArgument. Not thread-safe: one thread forks, and no other
// thread draws from the device's default generator meanwhile.

#include <ATen/ATen.h>

#include <cstdint>
#include <map>

#include "dtrain/collectives/process_grid.h"
#include "dtrain/parallel/parallel_context.h"

namespace dtrain::parallel {

enum class RngStream { kRank, kTensorShared, kTensorDistinct };

/// "rank", "tensor_shared", "tensor_distinct" (also their checkpoint names).
const char* rng_stream_name(RngStream stream);

class RngStreams {
 public:
  /// Seeds kTensorShared and kTensorDistinct from `seed` and this rank's
  /// coordinates, as generators of `device`'s type (CPU, or CUDA when
  /// LibTorch has it). Leaves kRank, the device's default generator, as it is.
  RngStreams(const ParallelContext& ctx, std::uint64_t seed, at::Device device = at::kCPU);

  /// While alive, the device's default generator draws from `stream`.
  class Fork {
   public:
    Fork(Fork&& other) noexcept;
    Fork& operator=(Fork&&) = delete;
    Fork(const Fork&) = delete;
    Fork& operator=(const Fork&) = delete;
    /// Stores the stream's advanced state and restores the default state.
    ~Fork();

   private:
    friend class RngStreams;
    Fork(RngStreams* owner, RngStream stream);
    RngStreams* owner_ = nullptr;
    RngStream stream_ = RngStream::kRank;
    at::Tensor saved_;  // the default generator's state before the fork
  };
  /// Switches the default generator to `stream` until the Fork ends. kRank:
  /// a no-op scope.
  [[nodiscard]] Fork fork(RngStream stream);

  /// The stream's generator state (a uint8 tensor, as Generator::get_state),
  /// and setting it (InvalidArgument if the state does not fit the
  /// generator). Not while the stream is forked.
  at::Tensor state(RngStream stream) const;
  void set_state(RngStream stream, const at::Tensor& state);

  /// The grid the streams are keyed by, and this rank's coordinates in it.
  const collectives::GridShape& shape() const noexcept { return shape_; }
  const collectives::GridCoord& coord() const noexcept { return coord_; }
  at::Device device() const noexcept { return device_; }
  /// The axes along which a stream is the same: kTensorShared {tp}; the
  /// others none.
  static AxisSet shared_over(RngStream stream);

 private:
  collectives::GridShape shape_;
  collectives::GridCoord coord_;
  at::Device device_;
  std::map<RngStream, at::Tensor> states_;  // kTensorShared, kTensorDistinct
  std::map<RngStream, bool> forked_;
};

}  // namespace dtrain::parallel
