// Placement arithmetic, and the blocks that make up a flat range.

#include "dtrain/parallel/placement.h"

#include "dtrain/error.h"
#include "src/parallel/flat_range.h"

namespace dtrain::parallel {

namespace {

std::int64_t volume(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Appends the blocks of elements [begin, end) of the row-major sub-block that
// starts at dimension `dim`, below the fixed coordinates `prefix`.
void collect(const std::vector<std::int64_t>& shape, std::size_t dim,
             std::vector<std::int64_t>& prefix, std::int64_t begin, std::int64_t end,
             std::int64_t flat_base, std::vector<detail::FlatBlock>& out) {
  if (begin >= end) return;
  std::int64_t stride = 1;  // elements per index of `dim`
  for (std::size_t d = dim + 1; d < shape.size(); ++d) stride *= shape[d];
  auto emit = [&](std::int64_t first, std::int64_t count, std::int64_t flat) {
    detail::FlatBlock b;
    b.offset = prefix;
    b.offset.push_back(first);
    b.shape.assign(prefix.size(), 1);
    b.shape.push_back(count);
    for (std::size_t d = dim + 1; d < shape.size(); ++d) {
      b.offset.push_back(0);
      b.shape.push_back(shape[d]);
    }
    b.flat_offset = flat;
    out.push_back(std::move(b));
  };
  if (dim + 1 == shape.size()) {  // the last dimension: one run
    emit(begin, end - begin, flat_base);
    return;
  }
  std::int64_t at = begin;
  if (at % stride != 0) {  // a partial index at the start
    const std::int64_t index = at / stride;
    const std::int64_t stop = std::min(end, (index + 1) * stride);
    prefix.push_back(index);
    collect(shape, dim + 1, prefix, at - index * stride, stop - index * stride,
            flat_base + (at - begin), out);
    prefix.pop_back();
    at = stop;
  }
  if (end / stride > at / stride) {  // whole indices
    emit(at / stride, end / stride - at / stride, flat_base + (at - begin));
    at = (end / stride) * stride;
  }
  if (at < end) {  // a partial index at the end
    const std::int64_t index = at / stride;
    prefix.push_back(index);
    collect(shape, dim + 1, prefix, 0, end - index * stride, flat_base + (at - begin), out);
    prefix.pop_back();
  }
}

}  // namespace

namespace detail {

std::vector<FlatBlock> flat_range_blocks(const std::vector<std::int64_t>& shape, std::int64_t begin,
                                         std::int64_t end) {
  DTRAIN_CHECK_ARG(begin >= 0 && begin <= end && end <= volume(shape), "flat range [", begin, ", ",
                   end, ") is outside a block of ", volume(shape), " elements");
  std::vector<FlatBlock> out;
  if (begin == end) return out;
  if (shape.empty()) {  // a scalar: one element
    out.push_back({{}, {}, 0});
    return out;
  }
  std::vector<std::int64_t> prefix;
  collect(shape, 0, prefix, begin, end, 0, out);
  return out;
}

}  // namespace detail

std::int64_t Placement::block_numel() const { return volume(shape); }

std::int64_t Placement::numel() const { return is_flat() ? flat_end - flat_begin : block_numel(); }

std::vector<std::int64_t> Placement::local_shape() const {
  if (is_flat()) return {flat_end - flat_begin};
  return shape;
}

Placement Placement::replicated(std::vector<std::int64_t> shape) {
  Placement p;
  p.offset.assign(shape.size(), 0);
  p.global_shape = shape;
  p.shape = std::move(shape);
  p.replicated_over = AxisSet::all();
  return p;
}

Placement Placement::block(std::vector<std::int64_t> global_shape, std::vector<std::int64_t> offset,
                           std::vector<std::int64_t> shape) {
  Placement p;
  p.global_shape = std::move(global_shape);
  p.offset = std::move(offset);
  p.shape = std::move(shape);
  p.replicated_over = AxisSet::none();
  return p;
}

Placement Placement::split(std::vector<std::int64_t> global_shape, int dim, int index, int parts) {
  const int rank = static_cast<int>(global_shape.size());
  DTRAIN_CHECK_ARG(dim >= 0 && dim < rank, "cannot split dimension ", dim, " of a tensor of shape ",
                   shape_text(global_shape));
  DTRAIN_CHECK_ARG(parts >= 1 && index >= 0 && index < parts, "part ", index, " of ", parts,
                   " does not exist");
  const std::int64_t extent = global_shape[static_cast<std::size_t>(dim)];
  DTRAIN_CHECK_ARG(extent % parts == 0, "dimension ", dim, " of ", shape_text(global_shape), " (",
                   extent, ") cannot be split evenly over ", parts,
                   " tensor-parallel ranks; choose a tp size that divides it");
  Placement p = replicated(std::move(global_shape));
  p.offset[static_cast<std::size_t>(dim)] = index * (extent / parts);
  p.shape[static_cast<std::size_t>(dim)] = extent / parts;
  p.split_dim = dim;
  p.replicated_over = {Axis::kData};
  return p;
}

Placement Placement::split(std::vector<std::int64_t> global_shape, int dim,
                           const ParallelContext& ctx) {
  return split(std::move(global_shape), dim, ctx.tp_rank(), ctx.tp_size());
}

Placement Placement::on_stage(int s) const {
  DTRAIN_CHECK_ARG(s >= 0, "pipeline stage ", s, " is negative");
  Placement p = *this;
  p.stage = s;
  return p;
}

Placement Placement::flat_range(std::int64_t begin, std::int64_t end) const {
  const std::int64_t available = numel();
  DTRAIN_CHECK_ARG(begin >= 0 && begin <= end && end <= available, "flat range [", begin, ", ", end,
                   ") is outside the ", available, " elements of ", to_string());
  Placement p = *this;
  const std::int64_t base = is_flat() ? flat_begin : 0;
  p.flat_begin = base + begin;
  p.flat_end = base + end;
  p.replicated_over = replicated_over.without(Axis::kData);
  return p;
}

void Placement::check(const std::string& name, const at::Tensor& tensor) const {
  const std::size_t nd = global_shape.size();
  DTRAIN_CHECK_ARG(offset.size() == nd && shape.size() == nd, "tensor '", name,
                   "': the placement's offset ", shape_text(offset), " and shape ",
                   shape_text(shape), " must have one entry per dimension of the global shape ",
                   shape_text(global_shape));
  for (std::size_t d = 0; d < nd; ++d) {
    DTRAIN_CHECK_ARG(offset[d] >= 0 && shape[d] >= 0 && offset[d] + shape[d] <= global_shape[d],
                     "tensor '", name, "': the block at ", shape_text(offset), " of shape ",
                     shape_text(shape), " leaves the global shape ", shape_text(global_shape),
                     " in dimension ", d);
  }
  DTRAIN_CHECK_ARG(split_dim >= -1 && split_dim < static_cast<int>(nd), "tensor '", name,
                   "': split dimension ", split_dim, " does not exist");
  if (is_flat()) {
    DTRAIN_CHECK_ARG(flat_begin <= flat_end && flat_end <= block_numel(), "tensor '", name,
                     "': flat range [", flat_begin, ", ", flat_end, ") leaves its block of ",
                     block_numel(), " elements");
  }
  DTRAIN_CHECK_ARG(tensor.defined(), "tensor '", name, "' is undefined");
  DTRAIN_CHECK_ARG(tensor.sizes().vec() == local_shape(), "tensor '", name, "' has shape ",
                   shape_text(tensor.sizes().vec()), " but its placement (", to_string(),
                   ") holds ", shape_text(local_shape()));
}

std::string Placement::to_string() const {
  std::string s;
  for (std::size_t d = 0; d < shape.size() && d < offset.size(); ++d) {
    s += (d ? " x [" : "[") + std::to_string(offset[d]) + ", " +
         std::to_string(offset[d] + shape[d]) + ")";
  }
  s += (s.empty() ? "" : " of ") + shape_text(global_shape);
  if (is_flat())
    s += ", elements [" + std::to_string(flat_begin) + ", " + std::to_string(flat_end) + ")";
  if (stage >= 0) s += ", stage " + std::to_string(stage);
  return s + ", replicated over " + replicated_over.to_string();
}

std::string ModuleLayout::global(const std::string& local_name) const {
  return global_name ? global_name(local_name) : local_name;
}

Placement ModuleLayout::placement(const std::string& local_name, const at::Tensor& tensor) const {
  auto it = placements.find(local_name);
  if (it != placements.end()) return it->second;
  return Placement::replicated(tensor.sizes().vec());
}

}  // namespace dtrain::parallel
