#pragma once
// ProcessGrid: the world as a dp x pp x tp grid of ranks.
//
// world_size = dp * pp * tp. Tensor-parallel (tp) is the fastest-varying
// coordinate, then pipeline (pp), then data-parallel (dp):
//
//   rank = (dp_rank * pp + pp_rank) * tp + tp_rank
//   tp_rank = rank % tp,  pp_rank = (rank / tp) % pp,  dp_rank = rank / (tp * pp)
//
// so the ranks of one tensor-parallel group are neighbours (same node, fast
// links), then pipeline stages, then data-parallel replicas.
//
// Worked example: 16 ranks, tp = 2, pp = 2, dp = 4.
//
//   rank:     0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
//   tp_rank:  0  1  0  1  0  1  0  1  0  1  0  1  0  1  0  1
//   pp_rank:  0  0  1  1  0  0  1  1  0  0  1  1  0  0  1  1
//   dp_rank:  0  0  0  0  1  1  1  1  2  2  2  2  3  3  3  3
//
//   tp groups (same dp, pp): {0,1} {2,3} {4,5} ... {14,15}
//   pp groups (same dp, tp): {0,2} {1,3} {4,6} {5,7} ... {13,15}
//   dp groups (same pp, tp): {0,4,8,12} {1,5,9,13} {2,6,10,14} {3,7,11,15}
//
// Rank 6 is (dp 1, pp 1, tp 0); its dp group is {2,6,10,14}, in which it is
// dp rank 1.

#include <memory>
#include <string>

#include "dtrain/collectives/communicator.h"

namespace dtrain::collectives {

/// Sizes of the three grid dimensions.
struct GridShape {
  int dp = 1;
  int pp = 1;
  int tp = 1;

  int world_size() const noexcept { return dp * pp * tp; }
  /// Factorizes `world_size` with the given tp and pp (dp = the rest). Throws
  /// InvalidArgument if tp or pp is < 1 or tp * pp does not divide world_size.
  static GridShape from_world(int world_size, int tp, int pp);
};

/// Coordinates of one rank in the grid.
struct GridCoord {
  int dp = 0;
  int pp = 0;
  int tp = 0;
  bool operator==(const GridCoord& other) const noexcept {
    return dp == other.dp && pp == other.pp && tp == other.tp;
  }
};

/// Pure rank arithmetic (no communication). Throws InvalidArgument on
/// out-of-range ranks or coordinates.
GridCoord grid_coord(const GridShape& shape, int rank);
int grid_rank(const GridShape& shape, const GridCoord& coord);

class ProcessGrid {
 public:
  /// Collective over `world`: splits it into the dp, pp and tp communicators.
  /// Throws InvalidArgument (on every rank, before any split) if tp * pp does
  /// not divide world->size().
  ProcessGrid(std::shared_ptr<Communicator> world, int tp = 1, int pp = 1);

  const GridShape& shape() const noexcept { return shape_; }
  /// This rank's coordinates.
  const GridCoord& coord() const noexcept { return coord_; }

  Communicator& world() const noexcept { return *world_; }
  /// Ranks with the same (pp, tp): gradients are averaged here.
  Communicator& dp() const noexcept { return *dp_; }
  /// Ranks with the same (dp, tp): the stages of one pipeline.
  Communicator& pp() const noexcept { return *pp_; }
  /// Ranks with the same (dp, pp): one tensor-parallel group.
  Communicator& tp() const noexcept { return *tp_; }

  std::shared_ptr<Communicator> world_ptr() const noexcept { return world_; }
  std::shared_ptr<Communicator> dp_ptr() const noexcept { return dp_; }
  std::shared_ptr<Communicator> pp_ptr() const noexcept { return pp_; }
  std::shared_ptr<Communicator> tp_ptr() const noexcept { return tp_; }

 private:
  std::shared_ptr<Communicator> world_;
  GridShape shape_;
  GridCoord coord_;
  std::shared_ptr<Communicator> dp_;
  std::shared_ptr<Communicator> pp_;
  std::shared_ptr<Communicator> tp_;
};

}  // namespace dtrain::collectives
