#pragma once
// The blocks that make up a flat range of a row-major block. Private to
// dtrain (placements, checkpoints).

#include <cstdint>
#include <vector>

namespace dtrain::parallel::detail {

/// One block of a flat range: its offset and shape inside the block the
/// range was taken from, and where its elements start in the range.
struct FlatBlock {
  std::vector<std::int64_t> offset;
  std::vector<std::int64_t> shape;
  std::int64_t flat_offset = 0;
};

/// Elements [begin, end) of a row-major block of `shape`, as at most
/// 2 * rank - 1 blocks, in order; each is contiguous in the flat order.
/// Example: shape [4, 3], elements [2, 10) are [0, 2:3) (1 element),
/// [1:3, 0:3) (6 elements) and [3, 0:1) (1 element).
std::vector<FlatBlock> flat_range_blocks(const std::vector<std::int64_t>& shape, std::int64_t begin,
                                         std::int64_t end);

}  // namespace dtrain::parallel::detail
