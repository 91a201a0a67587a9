// Placements: tensor-parallel splits, ZeRO's flat ranges and the blocks a
// flat range covers, checked against a brute-force walk of the elements.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "dtrain/error.h"
#include "dtrain/parallel/placement.h"
#include "src/parallel/flat_range.h"

namespace dtrain::parallel {
namespace {

// Every flat range of every block of a few shapes: the blocks cover exactly
// the range's elements, in order, each contiguous.
TEST(FlatRangeBlocks, CoverExactlyTheRangeInOrder) {
  const std::vector<std::vector<std::int64_t>> shapes = {{7},    {4, 6},    {3, 4, 5}, {2, 1, 3, 2},
                                                         {1, 1}, {5, 1, 3}, {}};
  for (const auto& shape : shapes) {
    const at::Tensor block =
        torch::arange(Placement::replicated(shape).block_numel(), torch::kLong).reshape(shape);
    const std::int64_t n = block.numel();
    for (std::int64_t begin = 0; begin <= n; ++begin) {
      for (std::int64_t end = begin; end <= n; ++end) {
        const auto blocks = detail::flat_range_blocks(shape, begin, end);
        EXPECT_LE(blocks.size(), shape.empty() ? 1u : 2 * shape.size() - 1);
        std::int64_t next = begin;
        for (const auto& b : blocks) {
          at::Tensor region = block;
          for (std::size_t d = 0; d < shape.size(); ++d) {
            region = region.narrow(static_cast<std::int64_t>(d), b.offset[d], b.shape[d]);
          }
          const at::Tensor values = region.reshape({-1});
          ASSERT_GT(values.numel(), 0);
          EXPECT_EQ(b.flat_offset, next - begin);
          EXPECT_TRUE(
              torch::equal(values, torch::arange(next, next + values.numel(), torch::kLong)))
              << "shape " << shape.size() << "-d, range [" << begin << ", " << end << ")";
          next += values.numel();
        }
        EXPECT_EQ(next, end) << "range [" << begin << ", " << end << ")";
      }
    }
  }
  EXPECT_THROW(detail::flat_range_blocks({4}, 2, 5), InvalidArgument);
}

TEST(PlacementTest, SplitFlatRangeAndChecks) {
  const Placement p = Placement::split({1024, 256}, 0, 1, 2);
  EXPECT_EQ(p.offset, (std::vector<std::int64_t>{512, 0}));
  EXPECT_EQ(p.shape, (std::vector<std::int64_t>{512, 256}));
  EXPECT_EQ(p.split_dim, 0);
  EXPECT_EQ(p.replicated_over, AxisSet({Axis::kData}));
  EXPECT_NO_THROW(p.check("w", torch::zeros({512, 256})));
  EXPECT_THROW(p.check("w", torch::zeros({256, 512})), InvalidArgument);
  EXPECT_THROW(Placement::split({1000, 3}, 1, 0, 2), InvalidArgument);  // 3 rows over 2 ranks

  const Placement z = p.flat_range(65536, 131072);  // ZeRO's second half
  EXPECT_TRUE(z.is_flat());
  EXPECT_EQ(z.numel(), 65536);
  EXPECT_EQ(z.local_shape(), (std::vector<std::int64_t>{65536}));
  EXPECT_TRUE(z.replicated_over.empty());
  EXPECT_NO_THROW(z.check("w", torch::zeros({65536})));
  // A range of a range stays inside the first.
  const Placement zz = z.flat_range(10, 20);
  EXPECT_EQ(zz.flat_begin, 65546);
  EXPECT_EQ(zz.flat_end, 65556);
  EXPECT_THROW(z.flat_range(0, 65537), InvalidArgument);

  const Placement whole = Placement::replicated({3, 4});
  EXPECT_EQ(whole.replicated_over, AxisSet::all());
  EXPECT_EQ(whole.flat_range(0, 6).replicated_over, AxisSet({Axis::kPipeline, Axis::kTensor}));
  Placement outside = Placement::block({4}, {3}, {2});
  EXPECT_THROW(outside.check("b", torch::zeros({2})), InvalidArgument);
  EXPECT_EQ(p.on_stage(3).stage, 3);
  EXPECT_NE(p.to_string().find("[512, 1024)"), std::string::npos) << p.to_string();
}

TEST(PlacementTest, ModuleLayoutNamesAndDefaults) {
  ModuleLayout layout;
  layout.global_name = [](const std::string& local) { return "layers.2." + local; };
  layout.placements["weight"] = Placement::split({8, 4}, 0, 0, 2);
  EXPECT_EQ(layout.global("weight"), "layers.2.weight");
  EXPECT_EQ(layout.placement("weight", torch::zeros({4, 4})).shape,
            (std::vector<std::int64_t>{4, 4}));
  const Placement bias = layout.placement("bias", torch::zeros({8}));
  EXPECT_EQ(bias.global_shape, (std::vector<std::int64_t>{8}));
  EXPECT_EQ(bias.replicated_over, AxisSet::all());
  EXPECT_EQ(ModuleLayout{}.global("x"), "x");
}

}  // namespace
}  // namespace dtrain::parallel
