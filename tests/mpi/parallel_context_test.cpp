// ParallelContext over every dp x pp x tp factorization of 1-4 ranks: the
// communicators and coordinates agree with the grid arithmetic, data ranks
// follow dp only, and choose_writers() picks exactly one writer per piece.

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/parallel/parallel_context.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::parallel {
namespace {

using collectives::GridCoord;
using dtrain::testing::runtime;

// (tp, pp) pairs whose product divides `world`.
std::vector<std::pair<int, int>> layouts(int world) {
  std::vector<std::pair<int, int>> out;
  for (int tp = 1; tp <= world; ++tp) {
    for (int pp = 1; tp * pp <= world; ++pp) {
      if (world % (tp * pp) == 0) out.emplace_back(tp, pp);
    }
  }
  return out;
}

std::int64_t sum_over(collectives::Communicator& comm, std::int64_t value) {
  at::Tensor t = at::full({1}, value, at::kLong);
  comm.all_reduce(t)->wait();
  return t.item<std::int64_t>();
}

TEST(ParallelContextTest, AxesCommunicatorsAndDataRanksFollowTheGrid) {
  auto world = dtrain::testing::fresh_world("ctx-axes");
  for (const auto& [tp, pp] : layouts(world->size())) {
    const ParallelContext ctx(world, tp, pp);
    const GridCoord c = ctx.coord();
    EXPECT_EQ(ctx.tp_size(), tp);
    EXPECT_EQ(ctx.pp_size(), pp);
    EXPECT_EQ(ctx.dp_size(), world->size() / (tp * pp));
    EXPECT_EQ(ctx.rank(), world->rank());
    EXPECT_EQ(ctx.rank(), (c.dp * pp + c.pp) * tp + c.tp);
    for (Axis axis : {Axis::kData, Axis::kPipeline, Axis::kTensor}) {
      EXPECT_EQ(ctx.comm(axis)->size(), ctx.size(axis)) << axis_name(axis);
      EXPECT_EQ(ctx.comm(axis)->rank(), ctx.rank(axis)) << axis_name(axis);
      // The axis's communicator holds exactly group_ranks({axis}).
      const std::vector<int> members = ctx.group_ranks({axis});
      ASSERT_EQ(static_cast<int>(members.size()), ctx.size(axis));
      at::Tensor gathered = at::empty({ctx.size(axis)}, at::kLong);
      ctx.comm(axis)->all_gather(gathered, at::full({1}, ctx.rank(), at::kLong))->wait();
      for (int i = 0; i < ctx.size(axis); ++i) {
        EXPECT_EQ(gathered[i].item<std::int64_t>(), members[static_cast<std::size_t>(i)])
            << axis_name(axis);
      }
    }
    EXPECT_EQ(ctx.data_rank(), c.dp);
    EXPECT_EQ(ctx.data_world_size(), ctx.dp_size());
    EXPECT_EQ(ctx.is_first_stage(), c.pp == 0);
    EXPECT_EQ(ctx.is_last_stage(), c.pp == pp - 1);
    EXPECT_EQ(ctx.group_ranks(AxisSet::all()).size(), static_cast<std::size_t>(world->size()));
    EXPECT_EQ(ctx.group_ranks(AxisSet::none()), std::vector<int>{ctx.rank()});
  }
  const ParallelContext dp = ParallelContext::data_parallel(world);
  EXPECT_EQ(dp.dp_size(), world->size());
  EXPECT_EQ(dp.data_rank(), world->rank());
}

TEST(ParallelContextTest, EveryPieceHasExactlyOneWriter) {
  auto world = dtrain::testing::fresh_world("ctx-writers");
  for (const auto& [tp, pp] : layouts(world->size())) {
    const ParallelContext ctx(world, tp, pp);
    const GridCoord c = ctx.coord();
    // Stage-owned tensors split over tp and replicated over dp, a tensor
    // every rank holds, a per-rank one, and one held by the first and the
    // last stage (like tied embeddings).
    std::vector<ReplicaDeclaration> mine;
    for (int layer = 0; layer < 3; ++layer) {
      mine.push_back({"stage" + std::to_string(c.pp) + "/layer" + std::to_string(layer) + "/tp" +
                          std::to_string(c.tp),
                      static_cast<std::uint64_t>(1000 * (layer + 1)),
                      {Axis::kData}});
    }
    mine.push_back({"everywhere", 64, AxisSet::all()});
    mine.push_back({"rank" + std::to_string(ctx.rank()), 8, AxisSet::none()});
    if (ctx.is_first_stage() || ctx.is_last_stage()) {
      mine.push_back({"tied/tp" + std::to_string(c.tp), 4096, {Axis::kData, Axis::kPipeline}});
    }
    const std::vector<bool> writes = ctx.choose_writers(mine);
    ASSERT_EQ(writes.size(), mine.size());
    // Each distinct key is written once over the whole world.
    std::int64_t written = 0;
    for (bool w : writes) written += w ? 1 : 0;
    const std::int64_t distinct = 3 * pp * tp + 1 + world->size() + tp;
    EXPECT_EQ(sum_over(*world, written), distinct) << "tp " << tp << " pp " << pp;
    // "everywhere" by exactly one rank; per-rank pieces by their rank.
    EXPECT_EQ(sum_over(*world, writes[3] ? 1 : 0), 1);
    EXPECT_TRUE(writes[4]);
  }
}

TEST(ParallelContextTest, CopiesThatDifferAlongANonReplicatedAxisAreRefusedOnEveryRank) {
  auto world = dtrain::testing::fresh_world("ctx-refuse");
  if (world->size() < 2) GTEST_SKIP() << "needs two ranks";
  const ParallelContext ctx(world, world->size(), 1);  // every rank in one tp group
  // Every tp rank declares the same piece, meant to be split over tp.
  std::vector<ReplicaDeclaration> mine{{"model/w", 400, {Axis::kData}}};
  try {
    ctx.choose_writers(mine);
    ADD_FAILURE() << "a piece held by every tp rank was accepted";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("model/w"), std::string::npos) << what;
    EXPECT_NE(what.find("tp"), std::string::npos) << what;
  }
  // Copies of different sizes are refused too.
  std::vector<ReplicaDeclaration> sizes{
      {"model/b", static_cast<std::uint64_t>(4 + world->rank()), AxisSet::all()}};
  EXPECT_THROW(ctx.choose_writers(sizes), InvalidArgument);
  world->barrier()->wait();
}

TEST(ParallelContextTest, CopiesAreSpreadOverTheirHolders) {
  auto world = dtrain::testing::fresh_world("ctx-spread");
  const ParallelContext ctx = ParallelContext::data_parallel(world);
  std::vector<ReplicaDeclaration> mine;
  for (int i = 0; i < 8 * world->size(); ++i) {
    mine.push_back({"w" + std::to_string(i), 1000, AxisSet::all()});
  }
  const std::vector<bool> writes = ctx.choose_writers(mine);
  std::int64_t count = 0;
  for (bool w : writes) count += w ? 1 : 0;
  EXPECT_EQ(count, 8);  // equal pieces, equal shares
  EXPECT_EQ(sum_over(*world, count), 8 * world->size());
}

}  // namespace
}  // namespace dtrain::parallel
