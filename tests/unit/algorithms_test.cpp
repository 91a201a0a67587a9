// The collective algorithms over an in-process transport: every algorithm x
// dtype x op x count x world size, checked against a sequential reduction,
// plus bitwise agreement across ranks.

#include <gtest/gtest.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <tuple>
#include <vector>

#include "src/collectives/algorithms/algorithms.h"
#include "src/collectives/algorithms/hier.h"
#include "src/collectives/algorithms/shm.h"
#include "tests/support/thread_transport.h"

namespace dtrain::collectives::detail {
namespace {

using dtrain::testing::Fabric;
using dtrain::testing::ThreadTransport;

// Small integers: exact in every dtype, sums of up to 8 ranks stay exact.
std::int64_t pattern(ReduceOp op, int rank, std::size_t i) {
  if (op == ReduceOp::kProduct) return 1 + static_cast<std::int64_t>((rank + i) % 2);
  return 1 + static_cast<std::int64_t>((rank * 7 + i * 3) % 5);
}

void store(ElementType type, void* base, std::size_t i, double value) {
  switch (type) {
    case ElementType::kFloat32:
      static_cast<float*>(base)[i] = static_cast<float>(value);
      break;
    case ElementType::kFloat64:
      static_cast<double*>(base)[i] = value;
      break;
    case ElementType::kBFloat16:
      static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(static_cast<float>(value));
      break;
    case ElementType::kFloat16:
      static_cast<c10::Half*>(base)[i] = c10::Half(static_cast<float>(value));
      break;
    case ElementType::kInt32:
      static_cast<std::int32_t*>(base)[i] = static_cast<std::int32_t>(value);
      break;
    case ElementType::kInt64:
      static_cast<std::int64_t*>(base)[i] = static_cast<std::int64_t>(value);
      break;
    case ElementType::kUInt8:
      static_cast<std::uint8_t*>(base)[i] =
          static_cast<std::uint8_t>(static_cast<std::int64_t>(value));
      break;
  }
}

double load(ElementType type, const void* base, std::size_t i) {
  switch (type) {
    case ElementType::kFloat32:
      return static_cast<const float*>(base)[i];
    case ElementType::kFloat64:
      return static_cast<const double*>(base)[i];
    case ElementType::kBFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    case ElementType::kFloat16:
      return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    case ElementType::kInt32:
      return static_cast<const std::int32_t*>(base)[i];
    case ElementType::kInt64:
      return static_cast<double>(static_cast<const std::int64_t*>(base)[i]);
    case ElementType::kUInt8:
      return static_cast<const std::uint8_t*>(base)[i];
  }
  return 0;
}

double expected_value(ReduceOp op, int world, std::size_t i) {
  double acc = pattern(op, 0, i);
  for (int r = 1; r < world; ++r) {
    const double v = pattern(op, r, i);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg:
        acc += v;
        break;
      case ReduceOp::kProduct:
        acc *= v;
        break;
      case ReduceOp::kMin:
        acc = std::min(acc, v);
        break;
      case ReduceOp::kMax:
        acc = std::max(acc, v);
        break;
    }
  }
  return op == ReduceOp::kAvg ? acc / world : acc;
}

// Runs `body(rank)` on `world` threads; rethrows the first failure.
void run_threads(int world, const std::function<void(int)>& body) {
  std::vector<std::exception_ptr> errors(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// Runs `body(transport, rank)` on `world` threads over one in-process fabric.
void run_ranks(int world, const std::function<void(ThreadTransport&, int)>& body,
               std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  Fabric fabric(world);
  run_threads(world, [&](int r) {
    ThreadTransport transport(fabric, r, timeout);
    body(transport, r);
  });
}

// Every rank's result equals the sequential reduction, and all ranks agree bitwise.
void expect_reduced(const std::vector<std::vector<char>>& results, ElementType type, ReduceOp op,
                    std::size_t count, int world) {
  const std::size_t es = element_size(type);
  const double tolerance = es == 2 ? 1e-2 : 1e-6;
  for (std::size_t i = 0; i < count; ++i) {
    const double want = expected_value(op, world, i);
    const double got = load(type, results[0].data(), i);
    ASSERT_NEAR(got, want, tolerance * std::max(1.0, std::abs(want)))
        << "element " << i << " of " << count;
  }
  for (int r = 1; r < world; ++r) {
    ASSERT_EQ(std::memcmp(results[r].data(), results[0].data(), count * es), 0)
        << "rank " << r << " differs bitwise from rank 0";
  }
}

const auto kAllTypes = ::testing::Values(
    ElementType::kFloat32, ElementType::kFloat64, ElementType::kBFloat16, ElementType::kFloat16,
    ElementType::kInt32, ElementType::kInt64, ElementType::kUInt8);
const auto kAllOps = ::testing::Values(ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin,
                                       ReduceOp::kMax, ReduceOp::kProduct);

using Case = std::tuple<Algorithm, ElementType, ReduceOp, std::size_t, int>;

class AllReduceAlgorithmTest : public ::testing::TestWithParam<Case> {};

TEST_P(AllReduceAlgorithmTest, MatchesSequentialReductionOnEveryRank) {
  const auto [algorithm, type, op, count, world] = GetParam();
  if (op == ReduceOp::kAvg && !is_floating(type)) {
    EXPECT_THROW(make_reducer(type, op), InvalidArgument);
    return;
  }
  const Reducer reducer = make_reducer(type, op);
  const std::size_t es = element_size(type);
  std::vector<std::vector<char>> results(world);
  run_ranks(world, [&](ThreadTransport& transport, int rank) {
    std::vector<char> data(count * es + 1);
    for (std::size_t i = 0; i < count; ++i) store(type, data.data(), i, pattern(op, rank, i));
    Scratch scratch;
    // Small chunks so that even modest counts exercise the pipelining.
    run_all_reduce(algorithm, transport, data.data(), count, reducer, scratch, 4096);
    if (op == ReduceOp::kAvg) divide_in_place(data.data(), count, type, world);
    results[rank] = std::move(data);
  });
  expect_reduced(results, type, op, count, world);
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const auto [algorithm, type, op, count, world] = info.param;
  return std::string(to_string(algorithm)) + "_" + to_string(type) + "_" + to_string(op) + "_n" +
         std::to_string(count) + "_w" + std::to_string(world);
}

INSTANTIATE_TEST_SUITE_P(DtypesAndOps, AllReduceAlgorithmTest,
                         ::testing::Combine(::testing::Values(Algorithm::kRing, Algorithm::kTree,
                                                              Algorithm::kRhd),
                                            kAllTypes, kAllOps,
                                            ::testing::Values(std::size_t{0}, std::size_t{1},
                                                              std::size_t{7}, std::size_t{1001}),
                                            ::testing::Values(2, 3)),
                         case_name);

INSTANTIATE_TEST_SUITE_P(
    WorldSizesAndCounts, AllReduceAlgorithmTest,
    ::testing::Combine(::testing::Values(Algorithm::kRing, Algorithm::kTree, Algorithm::kRhd),
                       ::testing::Values(ElementType::kFloat32),
                       ::testing::Values(ReduceOp::kSum, ReduceOp::kMax),
                       ::testing::Values(std::size_t{0}, std::size_t{1}, std::size_t{2},
                                         std::size_t{5}, std::size_t{63}, std::size_t{4097},
                                         std::size_t{100003}),
                       ::testing::Values(1, 2, 3, 4, 5, 6, 7, 8, 13)),
    case_name);

TEST(RingTest, ReduceScatterLeavesSegmentRankOnRankR) {
  for (int world : {2, 3, 5}) {
    const std::size_t count = 103;
    const Segments seg{count, static_cast<std::size_t>(world)};
    run_ranks(world, [&](ThreadTransport& transport, int rank) {
      std::vector<float> data(count);
      for (std::size_t i = 0; i < count; ++i) data[i] = static_cast<float>(rank + i);
      Scratch scratch;
      ring_reduce_scatter(transport, data.data(), count,
                          make_reducer(ElementType::kFloat32, ReduceOp::kSum), scratch, 4096);
      for (std::size_t i = seg.begin(rank); i < seg.begin(rank + 1); ++i) {
        const float want = static_cast<float>(world * i + world * (world - 1) / 2);
        ASSERT_EQ(data[i], want) << "rank " << rank << " element " << i;
      }
    });
  }
}

TEST(RingTest, AllGatherCollectsEverySegment) {
  for (int world : {1, 2, 3, 4, 7}) {
    const std::size_t per_rank = 37;
    run_ranks(world, [&](ThreadTransport& transport, int rank) {
      std::vector<std::int64_t> data(per_rank * world, -1);
      for (std::size_t i = 0; i < per_rank; ++i) data[rank * per_rank + i] = rank * 1000 + i;
      ring_all_gather(transport, data.data(), data.size(), sizeof(std::int64_t), 4096);
      for (int r = 0; r < world; ++r) {
        for (std::size_t i = 0; i < per_rank; ++i) {
          ASSERT_EQ(data[r * per_rank + i], static_cast<std::int64_t>(r * 1000 + i));
        }
      }
    });
  }
}

TEST(TreeTest, BroadcastFromEveryRoot) {
  for (int world : {1, 2, 3, 4, 6}) {
    for (int root = 0; root < world; ++root) {
      run_ranks(world, [&](ThreadTransport& transport, int rank) {
        std::vector<std::uint8_t> data(10000, static_cast<std::uint8_t>(rank == root ? 0 : 255));
        if (rank == root) {
          for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::uint8_t>(i * 7);
        }
        tree_broadcast(transport, data.data(), data.size(), root, 4096);
        for (std::size_t i = 0; i < data.size(); ++i) {
          ASSERT_EQ(data[i], static_cast<std::uint8_t>(i * 7))
              << "rank " << rank << " root " << root;
        }
      });
    }
  }
}

TEST(AlgorithmTest, SizeMismatchAcrossRanksIsACommErrorNotCorruption) {
  for (Algorithm algorithm : {Algorithm::kRing, Algorithm::kTree, Algorithm::kRhd}) {
    EXPECT_THROW(run_ranks(
                     2,
                     [&](ThreadTransport& transport, int rank) {
                       const std::size_t count = rank == 0 ? 100 : 120;
                       std::vector<float> data(count, 1.0f);
                       Scratch scratch;
                       run_all_reduce(algorithm, transport, data.data(), count,
                                      make_reducer(ElementType::kFloat32, ReduceOp::kSum), scratch,
                                      4096);
                     },
                     std::chrono::milliseconds(500)),
                 CommError)
        << to_string(algorithm);
  }
}

TEST(AlgorithmTest, MissingPeerTimesOut) {
  EXPECT_THROW(run_ranks(
                   3,
                   [&](ThreadTransport& transport, int rank) {
                     if (rank == 2) return;  // never joins
                     std::vector<float> data(10, 1.0f);
                     Scratch scratch;
                     ring_all_reduce(transport, data.data(), data.size(),
                                     make_reducer(ElementType::kFloat32, ReduceOp::kSum), scratch,
                                     4096);
                   },
                   std::chrono::milliseconds(200)),
               TimeoutError);
}

TEST(AlgorithmTest, ScratchIsReusedAcrossCalls) {
  run_ranks(2, [&](ThreadTransport& transport, int rank) {
    std::vector<float> data(1 << 16, 1.0f);
    Scratch scratch;
    const Reducer sum = make_reducer(ElementType::kFloat32, ReduceOp::kSum);
    for (Algorithm a : {Algorithm::kRing, Algorithm::kTree, Algorithm::kRhd}) {
      run_all_reduce(a, transport, data.data(), data.size(), sum, scratch, 4096);
    }
    void* first = scratch.get(1);
    const std::size_t capacity = scratch.capacity();
    for (int i = 0; i < 5; ++i) {
      for (Algorithm a : {Algorithm::kRing, Algorithm::kTree, Algorithm::kRhd}) {
        run_all_reduce(a, transport, data.data(), data.size(), sum, scratch, 4096);
      }
    }
    EXPECT_EQ(scratch.get(1), first);
    EXPECT_EQ(scratch.capacity(), capacity);
  });
}

// kAuto as a communicator's default, asked for by no call.
Algorithm auto_choice(std::size_t bytes, int world, bool shm) {
  return choose_all_reduce_algorithm(std::nullopt, Algorithm::kAuto, bytes, world, shm);
}

TEST(AlgorithmTest, AutoNeverReturnsAutoOrNative) {
  for (int world : {1, 2, 3, 4, 64}) {
    for (std::size_t bytes = 0; bytes < (std::size_t{1} << 31); bytes = bytes * 2 + 1) {
      for (bool shm : {false, true}) {
        const Algorithm a = auto_choice(bytes, world, shm);
        EXPECT_NE(a, Algorithm::kAuto);
        EXPECT_NE(a, Algorithm::kNative);
        if (!shm) {
          EXPECT_NE(a, Algorithm::kShm) << "shm chosen without shared memory";
        }
        // A call that asks for auto gets what the default auto gets.
        EXPECT_EQ(
            choose_all_reduce_algorithm(Algorithm::kAuto, Algorithm::kTree, bytes, world, shm), a);
      }
    }
  }
  // Reduce-scatter and all-gather: shm exactly where all-reduce picks it,
  // else the ring (their only other algorithm).
  for (int world : {1, 2, 3, 4, 64}) {
    for (std::size_t bytes = 0; bytes < (std::size_t{1} << 31); bytes = bytes * 2 + 1) {
      for (bool shm : {false, true}) {
        const bool all_reduce_shm = auto_choice(bytes, world, shm) == Algorithm::kShm;
        EXPECT_EQ(choose_scatter_gather_algorithm(bytes, world, shm),
                  all_reduce_shm ? Algorithm::kShm : Algorithm::kRing)
            << bytes << " bytes, " << world << " ranks, shm " << shm;
      }
    }
  }
  // The crossovers of docs/collectives.md.
  EXPECT_EQ(auto_choice(8, 2, true), Algorithm::kShm);
  EXPECT_EQ(auto_choice(std::size_t{64} << 20, 4, true), Algorithm::kShm);
  EXPECT_EQ(auto_choice(1024, 4, true), Algorithm::kRhd);
  EXPECT_EQ(auto_choice(std::size_t{1} << 20, 2, false), Algorithm::kRhd);
  EXPECT_EQ(auto_choice((std::size_t{1} << 20) + 4, 2, false), Algorithm::kRing);
  EXPECT_EQ(auto_choice(std::size_t{8} << 20, 4, false), Algorithm::kRhd);
  EXPECT_EQ(auto_choice((std::size_t{8} << 20) + 4, 4, false), Algorithm::kRing);
  EXPECT_EQ(auto_choice(std::size_t{64} << 20, 1, true), Algorithm::kRing);
}

// The call's request wins over the communicator's default; shm without
// shared memory runs as ring; the others run as asked.
TEST(AlgorithmTest, TheCallsRequestWinsAndShmNeedsSharedMemory) {
  const std::size_t bytes = 4096;
  for (Algorithm a : {Algorithm::kRing, Algorithm::kTree, Algorithm::kRhd, Algorithm::kNative}) {
    EXPECT_EQ(choose_all_reduce_algorithm(a, Algorithm::kShm, bytes, 4, true), a) << to_string(a);
    EXPECT_EQ(choose_all_reduce_algorithm(std::nullopt, a, bytes, 4, false), a) << to_string(a);
  }
  EXPECT_EQ(choose_all_reduce_algorithm(Algorithm::kShm, Algorithm::kRhd, bytes, 4, true),
            Algorithm::kShm);
  EXPECT_EQ(choose_all_reduce_algorithm(Algorithm::kShm, Algorithm::kRhd, bytes, 4, false),
            Algorithm::kRing);
  EXPECT_EQ(choose_all_reduce_algorithm(std::nullopt, Algorithm::kShm, bytes, 2, false),
            Algorithm::kRing);
}

TEST(AlgorithmTest, AutoAcrossHostsNeverPicksShmAndPicksHierWhenHostsHoldSeveralRanks) {
  for (int per_host : {0, 2, 3, 8}) {
    for (int hosts : {2, 3, 16}) {
      const int world = per_host == 0 ? hosts : hosts * per_host;
      for (std::size_t bytes = 0; bytes < (std::size_t{1} << 31); bytes = bytes * 2 + 1) {
        // `shm` is never true across hosts; a caller that said so anyway
        // still gets no kShm once the hosts are known.
        for (bool shm : {false, true}) {
          if (shm && per_host == 0) continue;  // one host: the single-host rules
          const Algorithm a = choose_all_reduce_algorithm(std::nullopt, Algorithm::kAuto, bytes,
                                                          world, shm, per_host);
          EXPECT_NE(a, Algorithm::kShm) << bytes << " bytes on " << hosts << " hosts";
          EXPECT_NE(a, Algorithm::kAuto);
          EXPECT_NE(a, Algorithm::kNative);
          if (per_host == 0) {
            EXPECT_NE(a, Algorithm::kHier) << "hier without a hierarchy";
          }
          if (per_host >= 2 && bytes > 0) {
            EXPECT_EQ(a, Algorithm::kHier) << bytes << " bytes, " << per_host << " per host";
          }
        }
      }
    }
  }
  // Asked for by the call or as the default: hier where it can run, else
  // the ring (like shm without shared memory).
  EXPECT_EQ(choose_all_reduce_algorithm(Algorithm::kHier, Algorithm::kRhd, 4096, 8, false, 4),
            Algorithm::kHier);
  EXPECT_EQ(choose_all_reduce_algorithm(std::nullopt, Algorithm::kHier, 4096, 8, false, 4),
            Algorithm::kHier);
  EXPECT_EQ(choose_all_reduce_algorithm(Algorithm::kHier, Algorithm::kRhd, 4096, 4, true),
            Algorithm::kRing);
  EXPECT_EQ(choose_all_reduce_algorithm(std::nullopt, Algorithm::kHier, 4096, 4, false, 0),
            Algorithm::kRing);
  // Reduce-scatter and all-gather have no hier: across hosts (no shm), the ring.
  EXPECT_EQ(choose_scatter_gather_algorithm(std::size_t{64} << 20, 8, false), Algorithm::kRing);
}

// --- shared-memory all-reduce: ranks are threads over one allocation --------

// Ends a wait with TimeoutError once the deadline passes (the MPI backend
// also runs a roll call here).
class DeadlineWaiter final : public ShmWaiter {
 public:
  explicit DeadlineWaiter(std::chrono::milliseconds timeout)
      : deadline_(std::chrono::steady_clock::now() + timeout) {}
  void idle(const char* phase, int peer) override {
    if (std::chrono::steady_clock::now() >= deadline_) {
      throw TimeoutError(std::string("waited too long for rank ") + std::to_string(peer) + " to " +
                         phase);
    }
  }

 private:
  std::chrono::steady_clock::time_point deadline_;
};

// One zero-filled allocation holding every rank's region, as the MPI backend
// maps it; `body(group, rank)` runs on one thread per rank.
void run_shm_ranks(int world, std::size_t slot_bytes,
                   const std::function<void(ShmGroup&, int)>& body) {
  const std::size_t region = shm_region_bytes(slot_bytes);
  std::vector<std::uint64_t> memory(region * world / sizeof(std::uint64_t) + 8, 0);
  char* base = reinterpret_cast<char*>(memory.data());
  std::vector<void*> regions;
  for (int r = 0; r < world; ++r) regions.push_back(base + region * r);
  std::vector<ShmGroup> groups;
  for (int r = 0; r < world; ++r) groups.emplace_back(r, regions, slot_bytes);
  run_threads(world, [&](int r) { body(groups[r], r); });
}

using ShmCase = std::tuple<ElementType, ReduceOp, std::size_t, int>;

class ShmAllReduceTest : public ::testing::TestWithParam<ShmCase> {};

std::string shm_case_name(const ::testing::TestParamInfo<ShmCase>& info) {
  const auto [type, op, count, world] = info.param;
  return std::string(to_string(type)) + "_" + to_string(op) + "_n" + std::to_string(count) + "_w" +
         std::to_string(world);
}

TEST_P(ShmAllReduceTest, MatchesSequentialReductionOnEveryRank) {
  const auto [type, op, count, world] = GetParam();
  if (op == ReduceOp::kAvg && !is_floating(type)) return;  // rejected by make_reducer
  const Reducer reducer = make_reducer(type, op);
  const std::size_t es = element_size(type);
  std::vector<std::vector<char>> results(world);
  // 256-byte slots: 1001 elements take several rounds, through both slots.
  run_shm_ranks(world, 256, [&](ShmGroup& group, int rank) {
    DeadlineWaiter waiter(std::chrono::seconds(20));
    std::vector<char> data(count * es + 1);
    // Three ops in a row: rounds carry on across ops.
    for (int repeat = 0; repeat < 3; ++repeat) {
      for (std::size_t i = 0; i < count; ++i) store(type, data.data(), i, pattern(op, rank, i));
      shm_all_reduce(group, data.data(), count, reducer, waiter);
    }
    if (op == ReduceOp::kAvg) divide_in_place(data.data(), count, type, world);
    results[rank] = std::move(data);
  });
  expect_reduced(results, type, op, count, world);
}

INSTANTIATE_TEST_SUITE_P(DtypesOpsAndWorlds, ShmAllReduceTest,
                         ::testing::Combine(kAllTypes, kAllOps,
                                            ::testing::Values(std::size_t{0}, std::size_t{1},
                                                              std::size_t{7}, std::size_t{1001}),
                                            ::testing::Values(2, 3, 5)),
                         shm_case_name);

TEST(ShmTest, ManyOpsOfChangingSizesStayInStep) {
  // Rounds alternate between two slots: a rank must never overwrite a slot
  // a slower peer still reads. Random sizes, 4 ranks on fewer cores.
  constexpr int kWorld = 4;
  run_shm_ranks(kWorld, 512, [&](ShmGroup& group, int rank) {
    DeadlineWaiter waiter(std::chrono::seconds(60));
    const Reducer sum = make_reducer(ElementType::kInt64, ReduceOp::kSum);
    std::vector<std::int64_t> data;
    for (int op = 0; op < 300; ++op) {
      const std::size_t count = static_cast<std::size_t>((op * 7919) % 517);
      data.assign(count, 0);
      for (std::size_t i = 0; i < count; ++i) data[i] = rank * 1000 + op + static_cast<int>(i);
      shm_all_reduce(group, data.data(), count, sum, waiter);
      for (std::size_t i = 0; i < count; ++i) {
        const std::int64_t want =
            1000 * (kWorld * (kWorld - 1) / 2) + kWorld * (op + static_cast<std::int64_t>(i));
        ASSERT_EQ(data[i], want) << "op " << op << " element " << i << " rank " << rank;
      }
    }
  });
}

// Runs a 2-rank op whose ranks disagree and returns the CommError's text
// (a TimeoutError would mean the mismatch went unnoticed).
std::string shm_mismatch_error(std::size_t count0, std::size_t count1, ElementType type0,
                               ElementType type1) {
  try {
    run_shm_ranks(2, 4096, [&](ShmGroup& group, int rank) {
      DeadlineWaiter waiter(std::chrono::seconds(5));
      const std::size_t count = rank == 0 ? count0 : count1;
      std::vector<double> data(count, 1.0);
      shm_all_reduce(group, data.data(), count,
                     make_reducer(rank == 0 ? type0 : type1, ReduceOp::kSum), waiter);
    });
  } catch (const TimeoutError& e) {
    return std::string("timed out instead: ") + e.what();
  } catch (const CommError& e) {
    return e.what();
  }
  return "no error";
}

TEST(ShmTest, SizeOrDtypeMismatchIsACommErrorNamingBothSides) {
  const std::string sizes =
      shm_mismatch_error(100, 120, ElementType::kFloat32, ElementType::kFloat32);
  EXPECT_NE(sizes.find("100 x float32"), std::string::npos) << sizes;
  EXPECT_NE(sizes.find("120 x float32"), std::string::npos) << sizes;
  EXPECT_NE(sizes.find("different sizes or dtypes"), std::string::npos) << sizes;
  // Same byte count, different dtype.
  const std::string types = shm_mismatch_error(8, 8, ElementType::kFloat64, ElementType::kInt64);
  EXPECT_NE(types.find("8 x float64"), std::string::npos) << types;
  EXPECT_NE(types.find("8 x int64"), std::string::npos) << types;
  // A 0-element op still checks that the peer is in the same op.
  const std::string empty = shm_mismatch_error(0, 5, ElementType::kFloat32, ElementType::kFloat32);
  EXPECT_NE(empty.find("0 x float32"), std::string::npos) << empty;
}

TEST(ShmTest, MissingPeerTimesOutNamingIt) {
  try {
    run_shm_ranks(3, 4096, [&](ShmGroup& group, int rank) {
      if (rank == 2) return;  // never joins
      DeadlineWaiter waiter(std::chrono::milliseconds(200));
      std::vector<float> data(10, 1.0f);
      shm_all_reduce(group, data.data(), data.size(),
                     make_reducer(ElementType::kFloat32, ReduceOp::kSum), waiter);
    });
    FAIL() << "no error";
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("rank 2"), std::string::npos) << e.what();
  }
}

// --- hierarchical all-reduce: hosts x local ranks as threads -----------------

// `hosts` hosts of `per_host` ranks each: world rank h * per_host + j is local
// rank j of host h. Each host has its shared memory and fabric; local rank j
// of every host shares a fabric with the others of its local rank.
void run_hier_ranks(int hosts, int per_host, std::size_t slot_bytes,
                    const std::function<void(const HierLinks&, int)>& body) {
  const std::size_t region = shm_region_bytes(slot_bytes);
  std::vector<std::vector<std::uint64_t>> memory;
  std::vector<std::vector<ShmGroup>> groups(static_cast<std::size_t>(hosts));
  std::vector<std::unique_ptr<Fabric>> node_fabrics;
  std::vector<std::unique_ptr<Fabric>> host_fabrics;
  for (int h = 0; h < hosts; ++h) {
    memory.emplace_back(region * per_host / sizeof(std::uint64_t) + 8, 0);
    char* base = reinterpret_cast<char*>(memory.back().data());
    std::vector<void*> regions;
    for (int j = 0; j < per_host; ++j) regions.push_back(base + region * j);
    for (int j = 0; j < per_host; ++j) groups[h].emplace_back(j, regions, slot_bytes);
    node_fabrics.push_back(std::make_unique<Fabric>(per_host));
  }
  for (int j = 0; j < per_host; ++j) host_fabrics.push_back(std::make_unique<Fabric>(hosts));
  run_threads(hosts * per_host, [&](int rank) {
    const int h = rank / per_host;
    const int j = rank % per_host;
    DeadlineWaiter waiter(std::chrono::seconds(20));
    ThreadTransport node(*node_fabrics[h], j);
    ThreadTransport between(*host_fabrics[j], h);
    body(HierLinks{groups[h][j], waiter, node, between}, rank);
  });
}

using HierCase = std::tuple<ElementType, ReduceOp, std::size_t, std::pair<int, int>>;

class HierAllReduceTest : public ::testing::TestWithParam<HierCase> {};

TEST_P(HierAllReduceTest, MatchesSequentialReductionOnEveryRank) {
  const auto [type, op, count, shape] = GetParam();
  const auto [hosts, per_host] = shape;
  if (op == ReduceOp::kAvg && !is_floating(type)) return;  // rejected by make_reducer
  const int world = hosts * per_host;
  const Reducer reducer = make_reducer(type, op);
  const std::size_t es = element_size(type);
  std::vector<std::vector<char>> results(static_cast<std::size_t>(world));
  run_hier_ranks(hosts, per_host, 256, [&](const HierLinks& links, int rank) {
    std::vector<char> data(count * es + 1);
    Scratch scratch;
    // Twice in a row: the shared-memory rounds carry on across ops.
    for (int repeat = 0; repeat < 2; ++repeat) {
      for (std::size_t i = 0; i < count; ++i) store(type, data.data(), i, pattern(op, rank, i));
      hier_all_reduce(links, data.data(), count, reducer, scratch, 4096);
    }
    if (op == ReduceOp::kAvg) divide_in_place(data.data(), count, type, world);
    results[static_cast<std::size_t>(rank)] = std::move(data);
  });
  expect_reduced(results, type, op, count, world);
}

std::string hier_case_name(const ::testing::TestParamInfo<HierCase>& info) {
  const auto [type, op, count, shape] = info.param;
  return std::string(to_string(type)) + "_" + to_string(op) + "_n" + std::to_string(count) + "_" +
         std::to_string(shape.first) + "x" + std::to_string(shape.second);
}

INSTANTIATE_TEST_SUITE_P(DtypesOpsAndShapes, HierAllReduceTest,
                         ::testing::Combine(kAllTypes, kAllOps,
                                            ::testing::Values(std::size_t{0}, std::size_t{1},
                                                              std::size_t{7}, std::size_t{1001}),
                                            ::testing::Values(std::make_pair(2, 2),
                                                              std::make_pair(3, 2),
                                                              std::make_pair(2, 3))),
                         hier_case_name);
// Reduce-scatter and all-gather through the same slots. Worlds 1-5, counts
// per rank 0, 1, 7 and 1001 (with 256-byte slots: many rounds through both
// slots), three ops in a row so that rounds carry on across ops.
using ShmBlockCase = std::tuple<ElementType, ReduceOp, std::size_t, int>;

class ShmReduceScatterTest : public ::testing::TestWithParam<ShmBlockCase> {};

TEST_P(ShmReduceScatterTest, EachRankGetsItsBlockReducedAndTheInputIsUnchanged) {
  const auto [type, op, block, world] = GetParam();
  if (op == ReduceOp::kAvg && !is_floating(type)) return;  // rejected by make_reducer
  const Reducer reducer = make_reducer(type, op);
  const std::size_t es = element_size(type);
  const std::size_t total = block * world;
  run_shm_ranks(world, 256, [&](ShmGroup& group, int rank) {
    DeadlineWaiter waiter(std::chrono::seconds(20));
    std::vector<char> input(total * es + 1);
    for (std::size_t i = 0; i < total; ++i) store(type, input.data(), i, pattern(op, rank, i));
    const std::vector<char> input_before = input;
    // One element past the block: must stay untouched.
    std::vector<char> output((block + 1) * es);
    for (int repeat = 0; repeat < 3; ++repeat) {
      store(type, output.data(), block, 99);
      shm_reduce_scatter(group, input.data(), output.data(), block, reducer, waiter);
    }
    if (op == ReduceOp::kAvg) divide_in_place(output.data(), block, type, world);
    const double tolerance = es == 2 ? 1e-2 : 1e-6;
    for (std::size_t i = 0; i < block; ++i) {
      const double want = expected_value(op, world, rank * block + i);
      ASSERT_NEAR(load(type, output.data(), i), want, tolerance * std::max(1.0, std::abs(want)))
          << "rank " << rank << " element " << i << " of " << block;
    }
    EXPECT_EQ(load(type, output.data(), block), 99) << "wrote past the output";
    EXPECT_EQ(input, input_before) << "the input changed";
  });
}

class ShmAllGatherTest : public ::testing::TestWithParam<ShmBlockCase> {};

TEST_P(ShmAllGatherTest, EveryRankGetsEveryBlock) {
  const auto [type, op, block, world] = GetParam();
  const std::size_t es = element_size(type);
  std::vector<std::vector<char>> results(world);
  run_shm_ranks(world, 256, [&](ShmGroup& group, int rank) {
    DeadlineWaiter waiter(std::chrono::seconds(20));
    std::vector<char> data(block * world * es + 1);
    for (int repeat = 0; repeat < 3; ++repeat) {
      std::fill(data.begin(), data.end(), static_cast<char>(0x5A));
      for (std::size_t i = 0; i < block; ++i) {
        store(type, data.data(), rank * block + i, pattern(op, rank, i));
      }
      shm_all_gather(group, data.data(), block, type, waiter);
    }
    for (int r = 0; r < world; ++r) {
      for (std::size_t i = 0; i < block; ++i) {
        ASSERT_EQ(load(type, data.data(), r * block + i), pattern(op, r, i))
            << "rank " << rank << " block " << r << " element " << i;
      }
    }
    EXPECT_EQ(data.back(), static_cast<char>(0x5A)) << "wrote past the output";
    results[rank] = std::move(data);
  });
  for (int r = 1; r < world; ++r) EXPECT_EQ(results[r], results[0]) << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(DtypesOpsAndWorlds, ShmReduceScatterTest,
                         ::testing::Combine(kAllTypes, kAllOps,
                                            ::testing::Values(std::size_t{0}, std::size_t{1},
                                                              std::size_t{7}, std::size_t{1001}),
                                            ::testing::Values(1, 2, 3, 5)),
                         shm_case_name);

INSTANTIATE_TEST_SUITE_P(DtypesAndWorlds, ShmAllGatherTest,
                         ::testing::Combine(kAllTypes, ::testing::Values(ReduceOp::kSum),
                                            ::testing::Values(std::size_t{0}, std::size_t{1},
                                                              std::size_t{7}, std::size_t{1001}),
                                            ::testing::Values(1, 2, 3, 5)),
                         shm_case_name);

TEST(ShmTest, InterleavedCollectivesOfChangingSizesStayInStep) {
  // All-reduces, reduce-scatters and all-gathers share the rounds, the two
  // slots and the two stamps; reduce-scatter and all-gather never wait for
  // their peers to finish reading, so a fast rank runs a round ahead of a
  // slow one. 4 ranks on fewer cores, random sizes, 512-byte slots.
  constexpr int kWorld = 4;
  run_shm_ranks(kWorld, 512, [&](ShmGroup& group, int rank) {
    DeadlineWaiter waiter(std::chrono::seconds(60));
    const Reducer sum = make_reducer(ElementType::kInt64, ReduceOp::kSum);
    std::vector<std::int64_t> input;
    std::vector<std::int64_t> output;
    for (int op = 0; op < 600; ++op) {
      const std::size_t block = static_cast<std::size_t>((op * 7919) % 131);
      const std::size_t total = block * kWorld;
      auto value = [&](int r, std::size_t i) {
        return static_cast<std::int64_t>(r * 1000 + op + static_cast<int>(i));
      };
      switch (op % 3) {
        case 0: {
          input.assign(total, 0);
          for (std::size_t i = 0; i < total; ++i) input[i] = value(rank, i);
          shm_all_reduce(group, input.data(), total, sum, waiter);
          for (std::size_t i = 0; i < total; ++i) {
            const std::int64_t want =
                1000 * (kWorld * (kWorld - 1) / 2) + kWorld * (op + static_cast<std::int64_t>(i));
            ASSERT_EQ(input[i], want) << "all_reduce op " << op << " element " << i;
          }
          break;
        }
        case 1: {
          input.assign(total, 0);
          for (std::size_t i = 0; i < total; ++i) input[i] = value(rank, i);
          output.assign(block, -1);
          shm_reduce_scatter(group, input.data(), output.data(), block, sum, waiter);
          for (std::size_t i = 0; i < block; ++i) {
            const std::size_t g = rank * block + i;
            const std::int64_t want =
                1000 * (kWorld * (kWorld - 1) / 2) + kWorld * (op + static_cast<std::int64_t>(g));
            ASSERT_EQ(output[i], want) << "reduce_scatter op " << op << " element " << i;
          }
          break;
        }
        case 2: {
          output.assign(total, -1);
          for (std::size_t i = 0; i < block; ++i) output[rank * block + i] = value(rank, i);
          shm_all_gather(group, output.data(), block, ElementType::kInt64, waiter);
          for (int r = 0; r < kWorld; ++r) {
            for (std::size_t i = 0; i < block; ++i) {
              ASSERT_EQ(output[r * block + i], value(r, i))
                  << "all_gather op " << op << " block " << r << " element " << i;
            }
          }
          break;
        }
      }
    }
  });
}

// Runs a 2-rank op whose ranks disagree (`body(group, rank, waiter)` runs
// each rank's op) and returns the error's text.
std::string shm_disagreement_error(const std::function<void(ShmGroup&, int, ShmWaiter&)>& body) {
  try {
    run_shm_ranks(2, 4096, [&](ShmGroup& group, int rank) {
      DeadlineWaiter waiter(std::chrono::seconds(5));
      body(group, rank, waiter);
    });
  } catch (const TimeoutError& e) {
    return std::string("timed out instead: ") + e.what();
  } catch (const CommError& e) {
    return e.what();
  }
  return "no error";
}

TEST(ShmTest, DifferentCollectivesOrBlockSizesAreACommErrorNamingBothSides) {
  const Reducer sum = make_reducer(ElementType::kFloat32, ReduceOp::kSum);
  // Rank 0 all-reduces 8 elements while rank 1 reduce-scatters 4 per rank:
  // the same bytes, a different op.
  const std::string ops = shm_disagreement_error([&](ShmGroup& g, int rank, ShmWaiter& waiter) {
    std::vector<float> data(8, 1.0f);
    std::vector<float> out(4);
    if (rank == 0) {
      shm_all_reduce(g, data.data(), 8, sum, waiter);
    } else {
      shm_reduce_scatter(g, data.data(), out.data(), 4, sum, waiter);
    }
  });
  EXPECT_NE(ops.find("an all_reduce of 8 x float32 (sum)"), std::string::npos) << ops;
  EXPECT_NE(ops.find("a reduce_scatter of 4 x float32 (sum)"), std::string::npos) << ops;
  const std::string gather = shm_disagreement_error([&](ShmGroup& g, int rank, ShmWaiter& waiter) {
    std::vector<float> data(rank == 0 ? 20 : 24, 1.0f);
    shm_all_gather(g, data.data(), data.size() / 2, ElementType::kFloat32, waiter);
  });
  EXPECT_NE(gather.find("an all_gather of 10 x float32"), std::string::npos) << gather;
  EXPECT_NE(gather.find("an all_gather of 12 x float32"), std::string::npos) << gather;
  EXPECT_NE(gather.find("different sizes or dtypes"), std::string::npos) << gather;
  const std::string scatter = shm_disagreement_error([&](ShmGroup& g, int rank, ShmWaiter& waiter) {
    const std::size_t block = rank == 0 ? 0 : 3;
    std::vector<float> data(2 * block, 1.0f);
    std::vector<float> out(block);
    shm_reduce_scatter(
        g, data.data(), out.data(), block,
        make_reducer(ElementType::kFloat32, rank == 0 ? ReduceOp::kSum : ReduceOp::kMax), waiter);
  });
  EXPECT_NE(scatter.find("a reduce_scatter of 0 x float32 (sum)"), std::string::npos) << scatter;
  EXPECT_NE(scatter.find("a reduce_scatter of 3 x float32 (max)"), std::string::npos) << scatter;
}

TEST(ShmTest, MissingPeerOfAReduceScatterOrAllGatherTimesOutNamingIt) {
  for (ShmCollective collective : {ShmCollective::kReduceScatter, ShmCollective::kAllGather}) {
    try {
      run_shm_ranks(3, 4096, [&](ShmGroup& group, int rank) {
        if (rank == 2) return;  // never joins
        DeadlineWaiter waiter(std::chrono::milliseconds(200));
        std::vector<float> data(30, 1.0f);
        std::vector<float> out(10);
        if (collective == ShmCollective::kReduceScatter) {
          shm_reduce_scatter(group, data.data(), out.data(), 10,
                             make_reducer(ElementType::kFloat32, ReduceOp::kSum), waiter);
        } else {
          shm_all_gather(group, data.data(), 10, ElementType::kFloat32, waiter);
        }
      });
      FAIL() << "no error";
    } catch (const TimeoutError& e) {
      EXPECT_NE(std::string(e.what()).find("rank 2"), std::string::npos) << e.what();
    }
  }
}

TEST(ShmTest, SlotsTooSmallForEveryPeerAreRejected) {
  EXPECT_EQ(shm_min_slot_bytes(2), 64u);
  EXPECT_EQ(shm_min_slot_bytes(9), 64u);
  EXPECT_EQ(shm_min_slot_bytes(10), 128u);
  std::vector<std::uint64_t> memory(shm_region_bytes(64) * 10 / sizeof(std::uint64_t), 0);
  std::vector<void*> regions;
  for (int r = 0; r < 10; ++r) {
    regions.push_back(reinterpret_cast<char*>(memory.data()) + shm_region_bytes(64) * r);
  }
  EXPECT_THROW(ShmGroup(0, regions, 64), Error);
}

TEST(SegmentsTest, PartitionIsBalancedAndCoversTheRange) {
  for (std::size_t count : {0, 1, 5, 7, 100, 1001}) {
    for (std::size_t parts : {1, 2, 3, 4, 7}) {
      const Segments seg{count, parts};
      EXPECT_EQ(seg.begin(0), 0u);
      EXPECT_EQ(seg.begin(parts), count);
      for (std::size_t i = 0; i < parts; ++i) {
        EXPECT_LE(seg.length(i), count / parts + 1);
        EXPECT_GE(seg.length(i), count / parts);
      }
    }
  }
}

TEST(ReduceKernelTest, BFloat16RoundsToNearestEven) {
  const Reducer sum = make_reducer(ElementType::kBFloat16, ReduceOp::kSum);
  c10::BFloat16 a(256.0f);
  c10::BFloat16 b(1.0f);  // 257 is not representable: ties to even -> 256
  sum(&a, &b, 1);
  EXPECT_EQ(static_cast<float>(a), 256.0f);
  c10::BFloat16 c(258.0f);
  c10::BFloat16 d(1.0f);  // 259 -> 260 (ties to even)
  sum(&c, &d, 1);
  EXPECT_EQ(static_cast<float>(c), 260.0f);
}

}  // namespace
}  // namespace dtrain::collectives::detail
