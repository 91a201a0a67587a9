#pragma once
// Placement: where a tensor that one rank holds sits in the global tensor it
// is part of, and who else holds the same elements.
//
// Every tensor a strategy owns has one:
//  * the global shape (the tensor as one process would hold it);
//  * the block this rank holds: its offset in the global tensor and its
//    shape. Tensor parallelism splits one dimension (split_dim) over the tp
//    ranks; a whole tensor is the block at offset 0;
//  * the pipeline stage that owns it (the stages hold different tensors);
//  * the axes over which other ranks hold identical copies of the block
//    (weights: dp; a tensor every rank holds whole: all axes);
//  * for ZeRO, a flat range [flat_begin, flat_end) of the block in row-major
//    order: the rank holds only those elements (a 1-D tensor), and the
//    range is no longer replicated over dp (each dp rank holds another).
//
// Checkpoints store pieces by global name and placement, so any layout reads
// what any other layout wrote (docs/parallel.md).
//
// Example, 2-way tensor parallelism, rank with tp rank 1: a column-parallel
// linear layer's weight of global shape [1024, 256] split along dimension 0:
//
//   Placement::split({1024, 256}, 0, ctx)   // block rows [512, 1024)
//     global_shape {1024, 256}, offset {512, 0}, shape {512, 256},
//     split_dim 0, replicated_over {dp}
//
// and ZeRO over 2 dp ranks keeping elements [65536, 131072) of that block
// (the second half: rows [768, 1024) of the global weight):
//
//   p.flat_range(65536, 131072)              // replicated_over {}

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "dtrain/parallel/parallel_context.h"

namespace dtrain::parallel {

struct Placement {
  std::vector<std::int64_t> global_shape;
  /// The block this rank holds, one entry per dimension of global_shape.
  std::vector<std::int64_t> offset;
  std::vector<std::int64_t> shape;
  /// The dimension split over the tensor-parallel ranks; -1: not split.
  int split_dim = -1;
  /// The pipeline stage that owns the tensor; -1: not owned by one stage.
  int stage = -1;
  /// Axes along which other ranks hold the same elements.
  AxisSet replicated_over = AxisSet::all();
  /// >= 0: the rank holds only elements [flat_begin, flat_end) of the block,
  /// in row-major order, as a 1-D tensor (ZeRO). -1: the whole block.
  std::int64_t flat_begin = -1;
  std::int64_t flat_end = -1;

  bool is_flat() const noexcept { return flat_begin >= 0; }
  /// Elements of the block.
  std::int64_t block_numel() const;
  /// Elements this rank holds: the block, or its flat range.
  std::int64_t numel() const;
  /// The shape of the tensor this rank holds ([flat_end - flat_begin] when
  /// flat, the block's shape otherwise).
  std::vector<std::int64_t> local_shape() const;

  /// The whole tensor of `shape`, identical on every rank that holds it.
  static Placement replicated(std::vector<std::int64_t> shape);
  /// The block at `offset` of `shape`, held by this rank only.
  static Placement block(std::vector<std::int64_t> global_shape, std::vector<std::int64_t> offset,
                         std::vector<std::int64_t> shape);
  /// Dimension `dim` split evenly over `parts` ranks; this rank holds part
  /// `index`; replicated over dp. InvalidArgument unless `parts` divides the
  /// dimension.
  static Placement split(std::vector<std::int64_t> global_shape, int dim, int index, int parts);
  /// The same over the context's tp group (index = tp rank, parts = tp size).
  static Placement split(std::vector<std::int64_t> global_shape, int dim,
                         const ParallelContext& ctx);

  /// This placement owned by pipeline stage `s`.
  Placement on_stage(int s) const;
  /// Elements [begin, end) of this placement's block (of its flat range, if
  /// it already has one), no longer replicated over dp: ZeRO's share of it.
  Placement flat_range(std::int64_t begin, std::int64_t end) const;

  /// InvalidArgument naming `name` unless the placement is consistent (the
  /// block inside the global shape, the flat range inside the block) and
  /// `tensor` has local_shape().
  void check(const std::string& name, const at::Tensor& tensor) const;
  /// "[512, 1024) x [0, 256) of [1024, 256], replicated over {dp}".
  std::string to_string() const;
};

/// How the tensors of one module (a whole model, a pipeline stage, a
/// tensor-parallel shard) map to the global model.
struct ModuleLayout {
  /// The global name of a local parameter or buffer name; unset: the same.
  /// Global names must not depend on the pipeline split (use the names of
  /// the whole, one-stage model, e.g. "layers.7.mlp.fc1.weight"), so that a
  /// checkpoint written with one split loads with another.
  std::function<std::string(const std::string&)> global_name;
  /// Placements by local name. A tensor not listed is whole and identical on
  /// every rank that holds it (Placement::replicated).
  std::map<std::string, Placement> placements;

  std::string global(const std::string& local_name) const;
  /// The listed placement, or Placement::replicated(tensor's shape).
  Placement placement(const std::string& local_name, const at::Tensor& tensor) const;
};

}  // namespace dtrain::parallel
