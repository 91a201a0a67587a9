#include "dtrain/collectives/process_grid.h"

#include <string>

#include "dtrain/error.h"

namespace dtrain::collectives {

GridShape GridShape::from_world(int world_size, int tp, int pp) {
  DTRAIN_CHECK_ARG(world_size >= 1, "world size must be at least 1, got ", world_size);
  DTRAIN_CHECK_ARG(tp >= 1 && pp >= 1,
                   "tensor- and pipeline-parallel sizes must be >= 1, got tp=", tp, " pp=", pp);
  DTRAIN_CHECK_ARG(world_size % (tp * pp) == 0, "world size ", world_size,
                   " is not divisible by tp * pp = ", tp, " * ", pp, " = ", tp * pp,
                   "; choose tp and pp whose product divides the number of ranks");
  return GridShape{world_size / (tp * pp), pp, tp};
}

GridCoord grid_coord(const GridShape& shape, int rank) {
  DTRAIN_CHECK_ARG(rank >= 0 && rank < shape.world_size(), "rank ", rank, " is outside a grid of ",
                   shape.world_size(), " ranks");
  GridCoord c;
  c.tp = rank % shape.tp;
  c.pp = (rank / shape.tp) % shape.pp;
  c.dp = rank / (shape.tp * shape.pp);
  return c;
}

int grid_rank(const GridShape& shape, const GridCoord& c) {
  DTRAIN_CHECK_ARG(
      c.dp >= 0 && c.dp < shape.dp && c.pp >= 0 && c.pp < shape.pp && c.tp >= 0 && c.tp < shape.tp,
      "grid coordinate (dp ", c.dp, ", pp ", c.pp, ", tp ", c.tp, ") is outside a grid of dp ",
      shape.dp, " x pp ", shape.pp, " x tp ", shape.tp);
  return (c.dp * shape.pp + c.pp) * shape.tp + c.tp;
}

ProcessGrid::ProcessGrid(std::shared_ptr<Communicator> world, int tp, int pp)
    : world_(std::move(world)) {
  DTRAIN_CHECK_ARG(world_ != nullptr, "ProcessGrid needs a world communicator");
  shape_ = GridShape::from_world(world_->size(), tp, pp);
  coord_ = grid_coord(shape_, world_->rank());
  // Colors identify the group (the two other coordinates); keys order the
  // ranks inside it by the group's own coordinate.
  const std::string base = world_->name();
  tp_ = world_->split(coord_.dp * shape_.pp + coord_.pp, coord_.tp, {base + "/tp", std::nullopt});
  pp_ = world_->split(coord_.dp * shape_.tp + coord_.tp, coord_.pp, {base + "/pp", std::nullopt});
  dp_ = world_->split(coord_.pp * shape_.tp + coord_.tp, coord_.dp, {base + "/dp", std::nullopt});
}

}  // namespace dtrain::collectives
