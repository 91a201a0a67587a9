// Every collective of the MPI backend on real processes, parameterised over
// algorithm x dtype x op x count (0, 1, 7, not divisible by the world size,
// 16 MiB), plus non-contiguous and overlapping tensors and argument errors.

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::collectives {
namespace {

using dtrain::testing::large_message_bytes;
using dtrain::testing::world;

// Small integers, exact in every dtype; sums over <= 4 ranks stay exact.
// Every pattern repeats with period 10, so it (and the expected reduction)
// is computed on one period and tiled: the 16 MiB cases stay cheap.
constexpr std::int64_t kPeriod = 10;

at::Tensor tile(const at::Tensor& period, std::int64_t count) {
  if (count == 0) return period.narrow(0, 0, 0);
  return period.repeat({(count + kPeriod - 1) / kPeriod}).narrow(0, 0, count);
}

at::Tensor pattern_period(ReduceOp op, int rank) {
  at::Tensor i = at::arange(kPeriod, at::kInt);
  return op == ReduceOp::kProduct ? (i + rank).remainder_(2).add_(1)
                                  : i.mul_(3).add_(rank * 7).remainder_(5).add_(1);
}

at::Tensor pattern(ReduceOp op, int rank, std::int64_t count, at::ScalarType dtype) {
  return tile(pattern_period(op, rank).to(dtype), count);
}

at::Tensor expected(ReduceOp op, int world_size, std::int64_t count, at::ScalarType dtype) {
  at::Tensor acc = pattern_period(op, 0);
  for (int r = 1; r < world_size; ++r) {
    at::Tensor v = pattern_period(op, r);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg:
        acc.add_(v);
        break;
      case ReduceOp::kProduct:
        acc.mul_(v);
        break;
      case ReduceOp::kMin:
        acc = at::minimum(acc, v);
        break;
      case ReduceOp::kMax:
        acc = at::maximum(acc, v);
        break;
    }
  }
  at::Tensor period =
      op == ReduceOp::kAvg ? (acc.to(at::kDouble) / world_size).to(dtype) : acc.to(dtype);
  return tile(period, count);
}

void expect_equal(const at::Tensor& got, const at::Tensor& want) {
  ASSERT_EQ(got.numel(), want.numel());
  ASSERT_EQ(got.scalar_type(), want.scalar_type());
  if (at::isFloatingType(want.scalar_type()) && want.element_size() == 2) {
    EXPECT_TRUE(at::allclose(got.to(at::kFloat), want.to(at::kFloat), 1e-2, 1e-6))
        << "max difference "
        << (got.to(at::kFloat) - want.to(at::kFloat)).abs().max().item<float>();
  } else if (at::isFloatingType(want.scalar_type())) {
    EXPECT_TRUE(at::allclose(got, want, 1e-6, 1e-6))
        << "max difference " << (got - want).abs().max().item<double>();
  } else {
    EXPECT_TRUE(at::equal(got, want));
  }
}

const at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf,
                                  at::kInt,   at::kLong,   at::kByte};

std::int64_t not_divisible(int world_size) { return world_size * 100 + 1; }

// A large message of the dtype: 16 MiB, or --large-bytes.
std::int64_t sixteen_mib(at::ScalarType dtype) {
  return static_cast<std::int64_t>(large_message_bytes()) /
         static_cast<std::int64_t>(c10::elementSize(dtype));
}

enum class CountKind { kZero, kOne, kSeven, kNotDivisible, kSixteenMiB };

std::int64_t count_of(CountKind kind, int world_size, at::ScalarType dtype) {
  switch (kind) {
    case CountKind::kZero:
      return 0;
    case CountKind::kOne:
      return 1;
    case CountKind::kSeven:
      return 7;
    case CountKind::kNotDivisible:
      return not_divisible(world_size);
    case CountKind::kSixteenMiB:
      return sixteen_mib(dtype);
  }
  return 0;
}

const char* count_name(CountKind kind) {
  switch (kind) {
    case CountKind::kZero:
      return "0";
    case CountKind::kOne:
      return "1";
    case CountKind::kSeven:
      return "7";
    case CountKind::kNotDivisible:
      return "ndiv";
    case CountKind::kSixteenMiB:
      return "large";
  }
  return "?";
}

using AllReduceCase = std::tuple<Algorithm, at::ScalarType, ReduceOp, CountKind>;

class AllReduceTest : public ::testing::TestWithParam<AllReduceCase> {};

TEST_P(AllReduceTest, MatchesTheSequentialReduction) {
  const auto [algorithm, dtype, op, kind] = GetParam();
  Communicator& comm = world();
  const std::int64_t count = count_of(kind, comm.size(), dtype);
  at::Tensor tensor = pattern(op, comm.rank(), count, dtype);
  AllReduceOptions options;
  options.op = op;
  options.algorithm = algorithm;
  if (op == ReduceOp::kAvg && !at::isFloatingType(dtype)) {
    EXPECT_THROW(comm.all_reduce(tensor, options), InvalidArgument);
    return;
  }
  comm.all_reduce(tensor, options)->wait();
  expect_equal(tensor, expected(op, comm.size(), count, dtype));
}

std::string all_reduce_name(const ::testing::TestParamInfo<AllReduceCase>& info) {
  const auto [algorithm, dtype, op, kind] = info.param;
  return std::string(to_string(algorithm)) + "_" + c10::toString(dtype) + "_" + to_string(op) +
         "_" + count_name(kind);
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, AllReduceTest,
    ::testing::Combine(::testing::Values(Algorithm::kRing, Algorithm::kTree, Algorithm::kRhd,
                                         Algorithm::kNative, Algorithm::kShm, Algorithm::kHier,
                                         Algorithm::kAuto),
                       ::testing::ValuesIn(kDtypes),
                       ::testing::Values(ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin,
                                         ReduceOp::kMax, ReduceOp::kProduct),
                       ::testing::Values(CountKind::kZero, CountKind::kOne, CountKind::kSeven,
                                         CountKind::kNotDivisible, CountKind::kSixteenMiB)),
    all_reduce_name);

class AllReduceLayoutTest : public ::testing::TestWithParam<Algorithm> {};

TEST_P(AllReduceLayoutTest, NonContiguousTensorsAreReducedInPlace) {
  Communicator& comm = world();
  at::Tensor base = pattern(ReduceOp::kSum, comm.rank(), 37 * 11, at::kFloat).reshape({37, 11});
  at::Tensor transposed = base.t();  // non-contiguous view into `base`
  ASSERT_FALSE(transposed.is_contiguous());
  AllReduceOptions options;
  options.algorithm = GetParam();
  comm.all_reduce(transposed, options)->wait();
  expect_equal(base.flatten(), expected(ReduceOp::kSum, comm.size(), 37 * 11, at::kFloat));
}

INSTANTIATE_TEST_SUITE_P(Algorithms, AllReduceLayoutTest,
                         ::testing::Values(Algorithm::kRing, Algorithm::kTree, Algorithm::kRhd,
                                           Algorithm::kNative, Algorithm::kShm, Algorithm::kHier));

class BroadcastTest : public ::testing::TestWithParam<std::tuple<at::ScalarType, CountKind>> {};

TEST_P(BroadcastTest, EveryRootReachesEveryRank) {
  const auto [dtype, kind] = GetParam();
  Communicator& comm = world();
  const std::int64_t count = count_of(kind, comm.size(), dtype);
  for (int root = 0; root < comm.size(); ++root) {
    at::Tensor tensor = comm.rank() == root ? pattern(ReduceOp::kSum, root, count, dtype)
                                            : at::zeros({count}, dtype);
    BroadcastOptions options;
    options.root = root;
    comm.broadcast(tensor, options)->wait();
    expect_equal(tensor, pattern(ReduceOp::kSum, root, count, dtype));
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, BroadcastTest,
                         ::testing::Combine(::testing::ValuesIn(kDtypes),
                                            ::testing::Values(CountKind::kZero, CountKind::kOne,
                                                              CountKind::kNotDivisible,
                                                              CountKind::kSixteenMiB)));

// Elements per rank of reduce_scatter and all_gather: 0, 1, 7, n*100+1 (not
// divisible by the world size), and 16 MiB in all.
std::int64_t block_of(CountKind kind, int world_size, at::ScalarType dtype) {
  const std::int64_t count = count_of(kind, world_size, dtype);
  return kind == CountKind::kSixteenMiB ? count / world_size : count;
}

// reduce_scatter and all_gather run ring and shm (auto picks one of them).
const Algorithm kScatterGatherAlgorithms[] = {Algorithm::kRing, Algorithm::kShm, Algorithm::kAuto};

const auto kAllCounts = ::testing::Values(CountKind::kZero, CountKind::kOne, CountKind::kSeven,
                                          CountKind::kNotDivisible, CountKind::kSixteenMiB);

using AllGatherCase = std::tuple<Algorithm, at::ScalarType, CountKind>;

class AllGatherTest : public ::testing::TestWithParam<AllGatherCase> {};

TEST_P(AllGatherTest, OutputIsRankMajor) {
  const auto [algorithm, dtype, kind] = GetParam();
  Communicator& comm = world();
  const std::int64_t count = block_of(kind, comm.size(), dtype);
  at::Tensor input = pattern(ReduceOp::kSum, comm.rank(), count, dtype);
  at::Tensor output = at::full({comm.size() * count}, 99, dtype);
  AllGatherOptions options;
  options.algorithm = algorithm;
  comm.all_gather(output, input, options)->wait();
  for (int r = 0; r < comm.size(); ++r) {
    expect_equal(output.narrow(0, r * count, count), pattern(ReduceOp::kSum, r, count, dtype));
  }
}

std::string all_gather_name(const ::testing::TestParamInfo<AllGatherCase>& info) {
  const auto [algorithm, dtype, kind] = info.param;
  return std::string(to_string(algorithm)) + "_" + c10::toString(dtype) + "_" + count_name(kind);
}

INSTANTIATE_TEST_SUITE_P(Matrix, AllGatherTest,
                         ::testing::Combine(::testing::ValuesIn(kScatterGatherAlgorithms),
                                            ::testing::ValuesIn(kDtypes), kAllCounts),
                         all_gather_name);

using ReduceScatterCase = std::tuple<Algorithm, at::ScalarType, ReduceOp, CountKind>;

class ReduceScatterTest : public ::testing::TestWithParam<ReduceScatterCase> {};

TEST_P(ReduceScatterTest, EachRankGetsItsBlock) {
  const auto [algorithm, dtype, op, kind] = GetParam();
  Communicator& comm = world();
  const std::int64_t block = block_of(kind, comm.size(), dtype);
  const std::int64_t total = block * comm.size();
  at::Tensor input = pattern(op, comm.rank(), total, dtype);
  at::Tensor input_copy = input.clone();
  at::Tensor output = at::zeros({block}, dtype);
  ReduceScatterOptions options;
  options.op = op;
  options.algorithm = algorithm;
  if (op == ReduceOp::kAvg && !at::isFloatingType(dtype)) {
    EXPECT_THROW(comm.reduce_scatter(output, input, options), InvalidArgument);
    return;
  }
  comm.reduce_scatter(output, input, options)->wait();
  expect_equal(output,
               expected(op, comm.size(), total, dtype).narrow(0, comm.rank() * block, block));
  EXPECT_TRUE(at::equal(input, input_copy)) << "reduce_scatter changed its input";
}

std::string reduce_scatter_name(const ::testing::TestParamInfo<ReduceScatterCase>& info) {
  const auto [algorithm, dtype, op, kind] = info.param;
  return std::string(to_string(algorithm)) + "_" + c10::toString(dtype) + "_" + to_string(op) +
         "_" + count_name(kind);
}

INSTANTIATE_TEST_SUITE_P(Matrix, ReduceScatterTest,
                         ::testing::Combine(::testing::ValuesIn(kScatterGatherAlgorithms),
                                            ::testing::ValuesIn(kDtypes),
                                            ::testing::Values(ReduceOp::kSum, ReduceOp::kAvg,
                                                              ReduceOp::kMin, ReduceOp::kMax,
                                                              ReduceOp::kProduct),
                                            kAllCounts),
                         reduce_scatter_name);

class ScatterGatherLayoutTest : public ::testing::TestWithParam<Algorithm> {};

TEST_P(ScatterGatherLayoutTest, NonContiguousAndOverlappingTensors) {
  Communicator& comm = world();
  const int n = comm.size();
  const std::int64_t block = 37 * 11;
  const at::Tensor want = expected(ReduceOp::kSum, n, block * n, at::kFloat);
  const at::Tensor mine = want.narrow(0, comm.rank() * block, block);
  ReduceScatterOptions scatter;
  scatter.algorithm = GetParam();
  AllGatherOptions gather;
  gather.algorithm = GetParam();

  // Non-contiguous input and output of reduce_scatter.
  at::Tensor input_base = pattern(ReduceOp::kSum, comm.rank(), block * n, at::kFloat);
  at::Tensor input = input_base.reshape({11, 37 * n}).t();  // a view, not contiguous
  ASSERT_FALSE(input.is_contiguous());
  at::Tensor output_base = at::zeros({11, 37});
  at::Tensor output = output_base.t();
  comm.reduce_scatter(output, input, scatter)->wait();
  // Block r of the input is the r-th slice of its flattened (transposed) view.
  const at::Tensor want_t = expected(ReduceOp::kSum, n, block * n, at::kFloat)
                                .reshape({11, 37 * n})
                                .t()
                                .flatten()
                                .narrow(0, comm.rank() * block, block);
  expect_equal(output.flatten(), want_t);

  // The output is this rank's block of the input itself (in place).
  at::Tensor flat = pattern(ReduceOp::kSum, comm.rank(), block * n, at::kFloat);
  at::Tensor own_block = flat.narrow(0, comm.rank() * block, block);
  comm.reduce_scatter(own_block, flat, scatter)->wait();
  expect_equal(own_block, mine);

  // all_gather into a non-contiguous output from a non-contiguous input.
  at::Tensor gathered_base = at::zeros({block, n});
  at::Tensor gathered = gathered_base.t();  // rank-major rows of a transposed buffer
  at::Tensor piece_base = pattern(ReduceOp::kSum, comm.rank(), block, at::kFloat).reshape({11, 37});
  comm.all_gather(gathered, piece_base.t(), gather)->wait();
  for (int r = 0; r < n; ++r) {
    expect_equal(gathered[r],
                 pattern(ReduceOp::kSum, r, block, at::kFloat).reshape({11, 37}).t().flatten());
  }

  // In place: the input is this rank's block of the output.
  at::Tensor all = at::full({block * n}, -1.0f);
  all.narrow(0, comm.rank() * block, block)
      .copy_(pattern(ReduceOp::kSum, comm.rank(), block, at::kFloat));
  comm.all_gather(all, all.narrow(0, comm.rank() * block, block), gather)->wait();
  for (int r = 0; r < n; ++r) {
    expect_equal(all.narrow(0, r * block, block), pattern(ReduceOp::kSum, r, block, at::kFloat));
  }
}

INSTANTIATE_TEST_SUITE_P(Algorithms, ScatterGatherLayoutTest,
                         ::testing::ValuesIn(kScatterGatherAlgorithms));

TEST(ArgumentTest, WrongShapesDtypesAndRanksAreRejectedBeforeAnythingRuns) {
  Communicator& comm = world();
  at::Tensor input = at::ones({10}, at::kFloat);
  EXPECT_THROW(comm.all_gather(at::zeros({10 * comm.size() + 1}, at::kFloat), input),
               InvalidArgument);
  EXPECT_THROW(comm.all_gather(at::zeros({10 * comm.size()}, at::kDouble), input), InvalidArgument);
  EXPECT_THROW(comm.reduce_scatter(at::zeros({3}, at::kFloat), input), InvalidArgument);
  // reduce_scatter and all_gather run auto, ring and shm only.
  for (Algorithm algorithm : {Algorithm::kTree, Algorithm::kRhd, Algorithm::kNative}) {
    ReduceScatterOptions scatter;
    scatter.algorithm = algorithm;
    EXPECT_THROW(comm.reduce_scatter(at::zeros({10}), at::zeros({10 * comm.size()}), scatter),
                 InvalidArgument)
        << to_string(algorithm);
    AllGatherOptions gather;
    gather.algorithm = algorithm;
    try {
      comm.all_gather(at::zeros({10 * comm.size()}), input, gather);
      ADD_FAILURE() << "expected InvalidArgument for " << to_string(algorithm);
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("runs auto, ring or shm"), std::string::npos)
          << e.what();
    }
  }
  EXPECT_THROW(comm.all_reduce(at::ones({4}, at::kBool)), InvalidArgument);
  EXPECT_THROW(comm.all_reduce(at::Tensor()), InvalidArgument);
  BroadcastOptions bad_root;
  bad_root.root = comm.size();
  EXPECT_THROW(comm.broadcast(input, bad_root), InvalidArgument);
  EXPECT_THROW(comm.send(input, comm.rank()), InvalidArgument);
  EXPECT_THROW(comm.recv(input, -1), InvalidArgument);
  PointToPointOptions bad_tag;
  bad_tag.tag = -3;
  EXPECT_THROW(comm.send(input, (comm.rank() + 1) % comm.size(), bad_tag), InvalidArgument);
  try {
    comm.all_reduce(at::ones({4}, at::kComplexFloat));
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("float32"), std::string::npos) << e.what();
  }
  // The communicator is still healthy: argument errors never reach it.
  EXPECT_FALSE(comm.failed());
  at::Tensor ok = at::ones({3});
  comm.all_reduce(ok)->wait();
  EXPECT_TRUE(at::equal(ok, at::full({3}, static_cast<float>(comm.size()))));
}

}  // namespace
}  // namespace dtrain::collectives
