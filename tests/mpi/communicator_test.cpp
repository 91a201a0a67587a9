// Communicator semantics on real processes: issue order with many ops in
// flight, concurrent split communicators, point-to-point, timeouts naming
// the missing rank, mismatched sizes, failed communicators, the
// shared-memory path and its fallbacks, ProcessGrid.

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <mpi.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <csignal>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/collectives/process_grid.h"
#include "dtrain/error.h"
#include "src/collectives/mpi/mpi_error.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::collectives {
namespace {

using dtrain::testing::fresh_world;
using dtrain::testing::runtime;
using dtrain::testing::world;
using Clock = std::chrono::steady_clock;

// Issues an all-gather of `input` into `output` (gather) or a reduce-scatter
// of `input` into `output`, with `algorithm`, and returns its Work.
std::shared_ptr<Work> scatter_or_gather(Communicator& comm, bool gather, Algorithm algorithm,
                                        const at::Tensor& output, const at::Tensor& input) {
  if (gather) {
    AllGatherOptions options;
    options.algorithm = algorithm;
    return comm.all_gather(output, input, options);
  }
  ReduceScatterOptions options;
  options.algorithm = algorithm;
  return comm.reduce_scatter(output, input, options);
}

TEST(OrderingTest, ManyAsyncOpsInFlightCompleteInIssueOrder) {
  Communicator& comm = world();
  const int n = comm.size();
  constexpr int kOps = 200;
  std::vector<at::Tensor> tensors;
  std::vector<std::shared_ptr<Work>> works;
  const Algorithm algorithms[] = {Algorithm::kRing,   Algorithm::kTree, Algorithm::kRhd,
                                  Algorithm::kNative, Algorithm::kShm,  Algorithm::kHier,
                                  Algorithm::kAuto};
  constexpr int kAlgorithms = sizeof(algorithms) / sizeof(algorithms[0]);
  for (int i = 0; i < kOps; ++i) {
    // Sizes vary so that ops of different lengths overlap.
    tensors.push_back(at::full({1 + (i % 7) * 1000}, static_cast<float>(comm.rank() + i)));
    AllReduceOptions options;
    options.algorithm = algorithms[i % kAlgorithms];
    works.push_back(comm.all_reduce(tensors.back(), options));
  }
  // Completion order: when op i is complete, every op before it is too.
  for (int i = kOps - 1; i >= 0; --i) {
    works[i]->wait();
    for (int j = 0; j < i; ++j) ASSERT_TRUE(works[j]->is_completed()) << j << " before " << i;
  }
  for (int i = 0; i < kOps; ++i) {
    const float want = static_cast<float>(n * i + n * (n - 1) / 2);
    ASSERT_TRUE(at::equal(tensors[i], at::full_like(tensors[i], want))) << "op " << i;
  }
}

TEST(OrderingTest, ReduceScattersAndAllGathersInterleavedWithAllReducesCompleteInIssueOrder) {
  // Shared-memory and ring variants of all three collectives, in flight
  // together: they share the shm rounds and the op sequence.
  Communicator& comm = world();
  const int n = comm.size();
  constexpr int kOps = 150;
  struct Op {
    at::Tensor input, output;
    std::shared_ptr<Work> work;
  };
  std::vector<Op> ops;
  const Algorithm algorithms[] = {Algorithm::kShm, Algorithm::kRing, Algorithm::kAuto};
  for (int i = 0; i < kOps; ++i) {
    const std::int64_t block = 1 + (i % 5) * 20000;  // up to 320 KB per rank
    const Algorithm algorithm = algorithms[(i / 3) % 3];
    Op op;
    switch (i % 3) {
      case 0: {
        op.input = at::full({block}, static_cast<float>(comm.rank() + i));
        AllReduceOptions options;
        options.algorithm = algorithm;
        op.work = comm.all_reduce(op.input, options);
        break;
      }
      case 1:
      case 2: {
        const bool gather = i % 3 == 2;
        op.input = at::full({gather ? block : block * n}, static_cast<float>(comm.rank() + i));
        op.output = at::zeros({gather ? block * n : block});
        op.work = scatter_or_gather(comm, gather, algorithm, op.output, op.input);
        break;
      }
    }
    ops.push_back(std::move(op));
  }
  for (int i = kOps - 1; i >= 0; --i) {
    ops[i].work->wait();
    for (int j = 0; j < i; ++j) ASSERT_TRUE(ops[j].work->is_completed()) << j << " before " << i;
  }
  for (int i = 0; i < kOps; ++i) {
    const float sum = static_cast<float>(n * i + n * (n - 1) / 2);
    const Op& op = ops[i];
    if (i % 3 == 0) {
      ASSERT_TRUE(at::equal(op.input, at::full_like(op.input, sum))) << "all_reduce " << i;
    } else if (i % 3 == 1) {
      ASSERT_TRUE(at::equal(op.output, at::full_like(op.output, sum))) << "reduce_scatter " << i;
    } else {
      const std::int64_t block = op.input.numel();
      for (int r = 0; r < n; ++r) {
        ASSERT_TRUE(at::equal(op.output.narrow(0, r * block, block),
                              at::full({block}, static_cast<float>(r + i))))
            << "all_gather " << i << " block " << r;
      }
    }
  }
}

TEST(SplitTest, SplitCommunicatorsRunConcurrentlyWithTheParent) {
  Communicator& comm = world();
  auto half = comm.split(comm.rank() % 2, comm.rank());
  ASSERT_NE(half, nullptr);
  const int expected_size = (comm.size() + 1 - comm.rank() % 2) / 2;
  EXPECT_EQ(half->size(), expected_size);
  EXPECT_EQ(half->rank(), comm.rank() / 2);
  EXPECT_EQ(half->name(), comm.name() + "/" + std::to_string(comm.rank() % 2));

  // Drive both communicators at once from two threads.
  constexpr int kOps = 50;
  std::vector<at::Tensor> on_world;
  std::vector<at::Tensor> on_half;
  std::thread other([&] {
    for (int i = 0; i < kOps; ++i) {
      on_half.push_back(at::full({513}, 1.0f));
      half->all_reduce(on_half.back())->wait();
    }
  });
  std::vector<std::shared_ptr<Work>> works;
  for (int i = 0; i < kOps; ++i) {
    on_world.push_back(at::full({1025}, 1.0f));
    works.push_back(comm.all_reduce(on_world.back()));
  }
  for (auto& w : works) w->wait();
  other.join();
  for (auto& t : on_world) ASSERT_TRUE(at::equal(t, at::full({1025}, float(comm.size()))));
  for (auto& t : on_half) ASSERT_TRUE(at::equal(t, at::full({513}, float(expected_size))));
}

TEST(SplitTest, NegativeColorGetsNoCommunicatorAndKeyOrdersRanks) {
  Communicator& comm = world();
  // Rank 0 opts out; the others are ordered in reverse.
  const int color = comm.rank() == 0 ? -1 : 7;
  auto sub = comm.split(color, -comm.rank(), {"reversed", std::nullopt});
  if (comm.rank() == 0) {
    EXPECT_EQ(sub, nullptr);
    return;
  }
  ASSERT_NE(sub, nullptr);
  EXPECT_EQ(sub->size(), comm.size() - 1);
  EXPECT_EQ(sub->rank(), comm.size() - 1 - comm.rank());
  EXPECT_EQ(sub->name(), "reversed");
  at::Tensor t = at::full({3}, static_cast<std::int64_t>(comm.rank()));
  sub->all_reduce(t, {ReduceOp::kMax, std::nullopt, std::nullopt})->wait();
  EXPECT_EQ(t[0].item<std::int64_t>(), comm.size() - 1);
}

TEST(SplitTest, OneRankCollectivesCompleteOnTheCallersThreadAndLeaveDataAlone) {
  // A 1-rank communicator moves no data: even a large average is complete
  // when all_reduce returns, and x / 1 leaves every bit as it was.
  Communicator& comm = world();
  auto alone = comm.split(comm.rank(), 0, {"alone", std::nullopt});
  ASSERT_NE(alone, nullptr);
  ASSERT_EQ(alone->size(), 1);
  at::Tensor t = at::randn({std::int64_t{8} << 20});  // 32 MiB, far above inline_max_bytes
  const at::Tensor before = t.clone();
  auto work = alone->all_reduce(t, {ReduceOp::kAvg, std::nullopt, std::nullopt});
  EXPECT_TRUE(work->is_completed());
  work->wait();
  EXPECT_TRUE(at::equal(t, before));
}

TEST(ShmTest, WithoutSharedMemoryShmRunsAsRingAndSmallSlotsTakeManyRounds) {
  for (std::size_t slot : {std::size_t{0}, std::size_t{4096}}) {
    CommunicatorOptions options;
    options.name = "shm-slot-" + std::to_string(slot);
    options.shm_slot_bytes = slot;
    auto comm = runtime().world(options);
    const int n = comm->size();
    at::Tensor t = at::arange(100000, at::kDouble) + comm->rank();  // 800 KB: 196 rounds of 4 KiB
    AllReduceOptions shm;
    shm.algorithm = Algorithm::kShm;
    comm->all_reduce(t, shm)->wait();
    const at::Tensor want = at::arange(100000, at::kDouble) * n + n * (n - 1) / 2;
    EXPECT_TRUE(at::equal(t, want)) << "slot " << slot;
  }
}

// Runs a reduce_scatter and an all_gather with `algorithm` on `comm`, checks
// their results, and returns the two ops' descriptions.
std::vector<std::string> scatter_and_gather(Communicator& comm, Algorithm algorithm,
                                            std::int64_t block) {
  const int n = comm.size();
  at::Tensor input = at::arange(block * n, at::kDouble) + comm.rank();
  at::Tensor output = at::zeros({block}, at::kDouble);
  ReduceScatterOptions scatter;
  scatter.algorithm = algorithm;
  auto scattered = comm.reduce_scatter(output, input, scatter);
  scattered->wait();
  const at::Tensor want = (at::arange(block * n, at::kDouble) * n + n * (n - 1) / 2)
                              .narrow(0, comm.rank() * block, block);
  EXPECT_TRUE(at::equal(output, want)) << scattered->description();
  at::Tensor mine = at::full({block}, static_cast<double>(comm.rank()), at::kDouble);
  at::Tensor all = at::zeros({block * n}, at::kDouble);
  AllGatherOptions gather;
  gather.algorithm = algorithm;
  auto gathered = comm.all_gather(all, mine, gather);
  gathered->wait();
  for (int r = 0; r < n; ++r) {
    EXPECT_TRUE(at::equal(all.narrow(0, r * block, block),
                          at::full({block}, static_cast<double>(r), at::kDouble)))
        << gathered->description() << " block " << r;
  }
  return {scattered->description(), gathered->description()};
}

TEST(ShmTest, ReduceScatterAndAllGatherRunAsRingWithoutSharedMemory) {
  // Slot 0 turns shared memory off: shm and auto run the ring. 4 KiB slots
  // take many rounds (100,000 doubles per rank).
  for (std::size_t slot : {std::size_t{0}, std::size_t{4096}}) {
    CommunicatorOptions options;
    options.name = "shm-scatter-slot-" + std::to_string(slot);
    options.shm_slot_bytes = slot;
    auto comm = runtime().world(options);
    for (Algorithm algorithm : {Algorithm::kShm, Algorithm::kAuto}) {
      for (const std::string& description : scatter_and_gather(*comm, algorithm, 100000)) {
        const bool shm = description.find("(shm,") != std::string::npos;
        EXPECT_EQ(shm, slot != 0) << description;
        EXPECT_NE(description.find(slot != 0 ? "(shm," : "(ring,"), std::string::npos)
            << description;
      }
    }
  }
}

TEST(ShmTest, AutoPicksSharedMemoryForScatterAndGatherWhereAllReduceDoes) {
  // 2 ranks: shm at every size; more: above 128 KiB in all (the input of a
  // reduce_scatter, the output of an all_gather), the ring below.
  Communicator& comm = world();
  if (comm.size() == 1) GTEST_SKIP() << "1 rank: no shared memory";
  const std::int64_t small = 16;                           // 128 B per rank
  const std::int64_t large = (std::int64_t{1} << 20) / 8;  // 1 MiB per rank
  for (std::int64_t block : {small, large}) {
    const bool want_shm = comm.size() == 2 || block == large;
    for (const std::string& description : scatter_and_gather(comm, Algorithm::kAuto, block)) {
      EXPECT_NE(description.find(want_shm ? "(shm," : "(ring,"), std::string::npos) << description;
    }
  }
}

TEST(ShmTest, NoRoomInDevShmFallsBackToTheRing) {
  // A file-size limit makes reserving the shared-memory object fail, as a
  // full /dev/shm would: the communicator must still work, through the ring.
  struct rlimit saved {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  const auto previous = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = saved;
  small.rlim_cur = 64 << 10;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  CommunicatorOptions options;
  options.name = "shm-no-room";
  std::shared_ptr<Communicator> comm;
  try {
    comm = runtime().world(options);
  } catch (...) {
    setrlimit(RLIMIT_FSIZE, &saved);
    throw;
  }
  setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, previous);
  const int n = comm->size();
  at::Tensor t = at::full({1000}, static_cast<float>(comm->rank() + 1));
  AllReduceOptions shm;
  shm.algorithm = Algorithm::kShm;
  auto work = comm->all_reduce(t, shm);
  work->wait();
  EXPECT_NE(work->description().find("all_reduce(ring"), std::string::npos) << work->description();
  EXPECT_TRUE(at::equal(t, at::full({1000}, static_cast<float>(n * (n + 1) / 2))));
  // With room, the same request runs through shared memory.
  auto roomy = fresh_world("shm-room", Timeout(60000));
  auto work2 = roomy->all_reduce(t, shm);
  work2->wait();
  EXPECT_NE(work2->description().find("all_reduce(shm"), std::string::npos) << work2->description();
  // Reduce-scatter and all-gather fall back the same way.
  for (const std::string& description : scatter_and_gather(*comm, Algorithm::kShm, 1000)) {
    EXPECT_NE(description.find("(ring,"), std::string::npos) << description;
  }
  for (const std::string& description : scatter_and_gather(*roomy, Algorithm::kShm, 1000)) {
    EXPECT_NE(description.find("(shm,"), std::string::npos) << description;
  }
}

TEST(ShmTest, TheSmallestSlotRunsReduceScatterAndAllGatherInManyRounds) {
  // A 64-byte slot holds a reduce-scatter piece of one 8-byte element for
  // each of up to 8 peers (2 doubles per peer on 4 ranks, 333 rounds).
  CommunicatorOptions options;
  options.name = "shm-tiny-slot";
  options.shm_slot_bytes = 64;
  auto comm = runtime().world(options);
  const std::string shm = comm->size() > 1 ? "(shm," : "(ring,";
  for (const std::string& description : scatter_and_gather(*comm, Algorithm::kShm, 333)) {
    EXPECT_NE(description.find(shm), std::string::npos) << description;
  }
}

TEST(PointToPointTest, RingExchangeWithTags) {
  Communicator& comm = world();
  const int right = (comm.rank() + 1) % comm.size();
  const int left = (comm.rank() + comm.size() - 1) % comm.size();
  at::Tensor out_a = at::full({100}, comm.rank(), at::kDouble);
  at::Tensor out_b = at::full({5}, comm.rank() * 10, at::kDouble);
  at::Tensor in_a = at::zeros({100}, at::kDouble);
  at::Tensor in_b = at::zeros({5}, at::kDouble);
  PointToPointOptions tag_a;
  tag_a.tag = 1;
  PointToPointOptions tag_b;
  tag_b.tag = 2;
  // Even ranks send first, odd ranks receive first (no reliance on buffering).
  std::vector<std::shared_ptr<Work>> works;
  if (comm.rank() % 2 == 0) {
    works.push_back(comm.send(out_a, right, tag_a));
    works.push_back(comm.send(out_b, right, tag_b));
    works.push_back(comm.recv(in_a, left, tag_a));
    works.push_back(comm.recv(in_b, left, tag_b));
  } else {
    works.push_back(comm.recv(in_a, left, tag_a));
    works.push_back(comm.recv(in_b, left, tag_b));
    works.push_back(comm.send(out_a, right, tag_a));
    works.push_back(comm.send(out_b, right, tag_b));
  }
  for (auto& w : works) w->wait();
  EXPECT_TRUE(at::equal(in_a, at::full({100}, left, at::kDouble)));
  EXPECT_TRUE(at::equal(in_b, at::full({5}, left * 10, at::kDouble)));
}

// No rank leaves a barrier before the last one has entered it. Each round
// one rank arrives late (it sleeps first); every rank notes when it entered
// and when it left, on the steady clock (CLOCK_MONOTONIC, one clock for
// every process of a machine), and the latest entry must precede the
// earliest exit. A barrier that returned at once would let the punctual
// ranks leave while the late one is still asleep.
TEST(BarrierTest, NoRankLeavesBeforeTheLastOneArrives) {
  Communicator& comm = world();
  const auto now_ns = [] {
    return static_cast<std::int64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
            .count());
  };
  for (int late = 0; late < comm.size(); ++late) {
    comm.barrier()->wait();  // a common start
    if (comm.rank() == late) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    at::Tensor mine = at::empty({2}, at::kLong);
    mine[0] = now_ns();
    comm.barrier()->wait();
    mine[1] = now_ns();
    at::Tensor all = at::empty({comm.size(), 2}, at::kLong);
    comm.all_gather(all, mine)->wait();
    const std::int64_t last_entry = all.select(1, 0).max().item<std::int64_t>();
    const std::int64_t first_exit = all.select(1, 1).min().item<std::int64_t>();
    EXPECT_LE(last_entry, first_exit)
        << "rank " << all.select(1, 1).argmin().item<std::int64_t>() << " left the barrier "
        << (last_entry - first_exit) / 1000 << " us before rank "
        << all.select(1, 0).argmax().item<std::int64_t>() << " entered it (late rank: " << late
        << ")";
  }
}

TEST(TimeoutTest, SkippedCollectiveGivesTimeoutErrorNamingTheMissingRank) {
  const Timeout timeout(2000);
  auto comm = fresh_world("timeout-test", timeout);
  const int skipper = comm->size() - 1;
  if (comm->rank() != skipper) {
    at::Tensor t = at::ones({8});
    const auto start = Clock::now();
    std::string message;
    try {
      comm->all_reduce(t)->wait();
      ADD_FAILURE() << "all_reduce with a missing rank succeeded";
    } catch (const TimeoutError& e) {
      message = e.what();
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_GE(seconds, 1.5) << message;
    EXPECT_LE(seconds, 5.0) << message;
    EXPECT_NE(message.find("all_reduce"), std::string::npos) << message;
    EXPECT_NE(message.find("8 x float32"), std::string::npos) << message;
    EXPECT_NE(message.find("'timeout-test'"), std::string::npos) << message;
    EXPECT_NE(message.find("not heard from: [" + std::to_string(skipper) + "]"), std::string::npos)
        << message;
    // The communicator is failed from now on: later ops fail at once.
    EXPECT_TRUE(comm->failed());
    const auto again = Clock::now();
    EXPECT_THROW(comm->all_reduce(t)->wait(), CommError);
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - again).count(), 0.5);
  }
  world().barrier()->wait();
}

// A rank that waits in the op but is off the core when a peer's deadline
// passes (a loaded machine) must still be heard by that peer's roll call:
// the roll call waits long enough for a live rank to answer. The last rank
// skips the all-reduce and keeps rank 1 stopped (SIGSTOP) from shortly
// before the 2 s deadline until 350 ms after it.
TEST(TimeoutTest, ALiveRankOffTheCoreWhenTheDeadlinePassesIsStillHeard) {
  Communicator& all = world();
  if (all.size() < 3) GTEST_SKIP() << "needs a rank to skip and another to stop";
  at::Tensor pids = at::empty({all.size()}, at::kLong);
  all.all_gather(pids, at::full({1}, static_cast<std::int64_t>(getpid())))->wait();
  const Timeout timeout(2000);
  auto comm = fresh_world("timeout-descheduled", timeout);
  const int skipper = comm->size() - 1;
  const auto start = Clock::now();
  if (comm->rank() == skipper) {
    const auto peer = static_cast<pid_t>(pids[1].item<std::int64_t>());
    std::this_thread::sleep_until(start + std::chrono::milliseconds(1800));
    kill(peer, SIGSTOP);
    std::this_thread::sleep_until(start + std::chrono::milliseconds(2350));
    kill(peer, SIGCONT);
  } else {
    at::Tensor t = at::ones({8});
    std::string message;
    try {
      comm->all_reduce(t)->wait();
      ADD_FAILURE() << "all_reduce with a missing rank succeeded";
    } catch (const TimeoutError& e) {
      message = e.what();
    }
    EXPECT_NE(message.find("not heard from: [" + std::to_string(skipper) + "]"), std::string::npos)
        << message;
  }
  all.barrier()->wait();
}

class ScatterGatherTimeoutTest : public ::testing::TestWithParam<std::tuple<Algorithm, bool>> {};

TEST_P(ScatterGatherTimeoutTest, SkippedOpGivesTimeoutErrorNamingTheMissingRank) {
  const auto [algorithm, gather] = GetParam();
  const Timeout timeout(2000);
  auto comm = fresh_world("scatter-gather-timeout", timeout);
  const int skipper = comm->size() - 1;
  if (comm->rank() != skipper) {
    const int n = comm->size();
    at::Tensor small = at::ones({8});
    at::Tensor large = at::ones({8 * n});
    const auto start = Clock::now();
    std::string message;
    try {
      scatter_or_gather(*comm, gather, algorithm, gather ? large : small, gather ? small : large)
          ->wait();
      ADD_FAILURE() << "a collective with a missing rank succeeded";
    } catch (const TimeoutError& e) {
      message = e.what();
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_GE(seconds, 1.5) << message;
    EXPECT_LE(seconds, 5.0) << message;
    EXPECT_NE(message.find(gather ? "all_gather(" : "reduce_scatter("), std::string::npos)
        << message;
    EXPECT_NE(message.find(std::string("(") + to_string(algorithm)), std::string::npos) << message;
    EXPECT_NE(message.find("8 x float32"), std::string::npos) << message;
    EXPECT_NE(message.find("not heard from: [" + std::to_string(skipper) + "]"), std::string::npos)
        << message;
    EXPECT_TRUE(comm->failed());
  }
  world().barrier()->wait();
}

std::string scatter_gather_timeout_name(
    const ::testing::TestParamInfo<std::tuple<Algorithm, bool>>& info) {
  return std::string(to_string(std::get<0>(info.param))) +
         (std::get<1>(info.param) ? "_all_gather" : "_reduce_scatter");
}

INSTANTIATE_TEST_SUITE_P(ShmAndRing, ScatterGatherTimeoutTest,
                         ::testing::Combine(::testing::Values(Algorithm::kShm, Algorithm::kRing),
                                            ::testing::Bool()),
                         scatter_gather_timeout_name);

TEST(TimeoutTest, PerCallTimeoutOverridesTheDefault) {
  auto comm = fresh_world("per-call-timeout", std::chrono::minutes(5));
  if (comm->rank() == 0) {
    at::Tensor t = at::ones({4});
    AllReduceOptions options;
    options.timeout = Timeout(500);
    const auto start = Clock::now();
    EXPECT_THROW(comm->all_reduce(t, options)->wait(), TimeoutError);
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 3.0);
  }
  world().barrier()->wait();
}

TEST(MismatchTest, DifferentSizesAcrossRanksAreACommErrorNotCorruption) {
  // Sizes on both sides of Open MPI's 4 KiB eager limit: past it the
  // single-copy path would write a longer message past a shorter buffer if
  // receives were not size-checked before MPI touches them.
  for (Algorithm algorithm : {Algorithm::kRing, Algorithm::kTree, Algorithm::kRhd,
                              Algorithm::kNative, Algorithm::kShm, Algorithm::kHier}) {
    for (std::int64_t base : {1000, 100000}) {
      auto comm = fresh_world(std::string("mismatch-") + to_string(algorithm), Timeout(3000));
      // Guard elements around the data must stay untouched.
      const std::int64_t count = comm->rank() == 0 ? base : base + base / 5;
      at::Tensor buffer = at::full({count + 2}, -7.0f);
      at::Tensor data = buffer.narrow(0, 1, count);
      data.fill_(1.0f);
      AllReduceOptions options;
      options.algorithm = algorithm;
      EXPECT_THROW(comm->all_reduce(data, options)->wait(), CommError) << to_string(algorithm);
      EXPECT_EQ(buffer[0].item<float>(), -7.0f);
      EXPECT_EQ(buffer[count + 1].item<float>(), -7.0f);
      world().barrier()->wait();
    }
  }
}

TEST(MismatchTest, ScatterAndGatherOfDifferentSizesAreACommErrorNotCorruption) {
  for (Algorithm algorithm : {Algorithm::kRing, Algorithm::kShm}) {
    for (bool gather : {false, true}) {
      for (std::int64_t base : {1000, 100000}) {
        auto comm = fresh_world(std::string("mismatch-scatter-gather-") + to_string(algorithm),
                                Timeout(3000));
        const int n = comm->size();
        const std::int64_t block = comm->rank() == 0 ? base : base + base / 5;
        // Guard elements around the output must stay untouched.
        const std::int64_t out_count = gather ? block * n : block;
        at::Tensor buffer = at::full({out_count + 2}, -7.0f);
        at::Tensor output = buffer.narrow(0, 1, out_count);
        at::Tensor input = at::ones({gather ? block : block * n});
        try {
          scatter_or_gather(*comm, gather, algorithm, output, input)->wait();
          if (n > 1) ADD_FAILURE() << "no error: " << to_string(algorithm) << " gather " << gather;
        } catch (const CommError& e) {
          // Over shared memory every rank sees the other side's stamp; over
          // the ring the rank that received a wrong size tells the others
          // (who end with a TimeoutError saying so).
          if (algorithm == Algorithm::kShm) {
            EXPECT_EQ(dynamic_cast<const TimeoutError*>(&e), nullptr) << e.what();
            EXPECT_NE(std::string(e.what()).find("different sizes or dtypes"), std::string::npos)
                << e.what();
          }
        }
        EXPECT_EQ(buffer[0].item<float>(), -7.0f);
        EXPECT_EQ(buffer[out_count + 1].item<float>(), -7.0f);
        world().barrier()->wait();
      }
    }
  }
}

// A receive that MPI has matched cannot be cancelled: when an op fails while
// its sender is stalled mid-message, MPI goes on filling the buffer once the
// sender moves again, by then perhaps after the communicator is gone. Rank 1,
// the root of a 1 MiB broadcast (4 chunks of 256 KiB, each a rendezvous
// message), stops itself (SIGSTOP) once its sends are posted; rank 0's
// broadcast matches them and times out. Rank 0 then destroys the
// communicator, drops its tensor and resumes rank 1, whose chunks land in
// rank 0's buffer: that buffer must not have been freed.
TEST(FailureTest, ABufferMpiMayStillFillOutlivesTheFailedCommunicator) {
  Communicator& all = world();
  at::Tensor pids = at::empty({all.size()}, at::kLong);
  all.all_gather(pids, at::full({1}, static_cast<std::int64_t>(getpid())))->wait();
  auto comm = fresh_world("stalled-sender", Timeout(10000));
  auto pair = comm->split(comm->rank() < 2 ? 0 : -1, comm->rank(), {"stalled-pair", std::nullopt});
  constexpr std::int64_t kCount = 256 * 1024;  // 1 MiB of float32
  if (comm->rank() == 1) {
    at::Tensor data = at::full({kCount}, 42.0f);
    BroadcastOptions options;
    options.root = 1;
    auto work = pair->broadcast(data, options);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the sends get posted
    std::raise(SIGSTOP);
    try {
      work->wait();
    } catch (const CommError&) {
      // Rank 0 gave up on the broadcast: either ending is fine here.
    }
  } else if (comm->rank() == 0) {
    const auto peer = static_cast<pid_t>(pids[1].item<std::int64_t>());
    struct Resume {  // rank 1 never stays stopped, whatever fails below
      pid_t pid;
      ~Resume() { kill(pid, SIGCONT); }
    } resume{peer};
    const auto stopped = [peer] {
      std::ifstream stat("/proc/" + std::to_string(peer) + "/stat");
      std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
      const auto end = text.rfind(')');
      return end != std::string::npos && end + 2 < text.size() && text[end + 2] == 'T';
    };
    const auto give_up = Clock::now() + std::chrono::seconds(30);
    while (!stopped() && Clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_TRUE(stopped()) << "rank 1 (pid " << peer << ") did not stop";
    // Rank 1 is resumed after 1.5 s at the latest, even if a loaded machine
    // keeps this rank from doing it sooner: its neighbours' heartbeat would
    // take a rank silent for 4 s for a lost one.
    std::thread watchdog([peer] {
      std::this_thread::sleep_for(std::chrono::milliseconds(1500));
      kill(peer, SIGCONT);
    });
    struct Join {
      std::thread& thread;
      ~Join() { thread.join(); }
    } join{watchdog};
    // The memory itself is the test's (never freed, so a late write cannot
    // hurt this process); the tensor's deleter says when dtrain let go of it.
    auto* memory = new std::vector<float>(static_cast<std::size_t>(kCount), 0.0f);
    bool freed = false;
    {
      at::Tensor data = at::from_blob(
          memory->data(), {kCount}, [&freed](void*) { freed = true; }, at::kFloat);
      BroadcastOptions options;
      options.root = 1;
      options.timeout = Timeout(500);
      EXPECT_THROW(pair->broadcast(data, options)->wait(), TimeoutError);
    }
    pair.reset();
    comm.reset();
    EXPECT_FALSE(freed) << "the buffer of a failed op was freed with its communicator, while MPI "
                           "could still write into it";
    kill(peer, SIGCONT);
    // The chunks rank 0 had matched arrive now, after the communicator is
    // gone: MPI writes them into the buffer.
    const auto last_of_chunk = [memory](std::int64_t c) {
      return (*memory)[static_cast<std::size_t>((c + 1) * kCount / 4 - 1)];
    };
    const auto until = Clock::now() + std::chrono::seconds(20);
    int landed = 0;
    while (Clock::now() < until) {
      landed = 0;
      for (std::int64_t c = 0; c < 4; ++c) landed += last_of_chunk(c) == 42.0f ? 1 : 0;
      if (landed > 0) break;
      int flag = 0;
      MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE);
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_GT(landed, 0) << "no chunk of the stalled broadcast arrived after rank 1 resumed";
  }
  all.barrier()->wait();
}

// MPI_COMM_WORLD runs under MPI_ERRORS_RETURN once the Runtime has started
// MPI, so a failed call on it (as in Runtime::world's rendezvous and
// MPI_Comm_dup) comes back to dtrain's check as a CommError with MPI's own
// message, instead of MPI's default handler aborting the job.
TEST(MpiErrorTest, AFailedCallOnTheWorldIsACommErrorWithMpisMessage) {
  int size = 0;
  ASSERT_EQ(MPI_Comm_size(MPI_COMM_WORLD, &size), MPI_SUCCESS);
  int value = 0;
  std::string message;
  try {
    // Rank `size + 1` does not exist: MPI_ERR_RANK.
    DTRAIN_MPI_CHECK(MPI_Send(&value, 1, MPI_INT, size + 1, 0, MPI_COMM_WORLD));
    ADD_FAILURE() << "MPI_Send to a rank that does not exist succeeded";
  } catch (const CommError& e) {
    message = e.what();
  }
  EXPECT_NE(message.find("MPI_Send("), std::string::npos) << message;
  std::string lower = message;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  EXPECT_NE(lower.find("invalid rank"), std::string::npos) << "not MPI's message: " << message;
  // The world is still usable.
  world().barrier()->wait();
}

TEST(ProcessGridTest, GroupsFollowTheRankMath) {
  Communicator& comm = world();
  for (int tp : {1, 2}) {
    if (comm.size() % tp != 0) continue;
    auto world_ptr = runtime().world({"grid", Timeout(60000)});
    ProcessGrid grid(world_ptr, tp, /*pp=*/1);
    EXPECT_EQ(grid.shape().tp, tp);
    EXPECT_EQ(grid.shape().dp, comm.size() / tp);
    EXPECT_EQ(grid.coord(), grid_coord(grid.shape(), comm.rank()));
    EXPECT_EQ(grid.tp().size(), tp);
    EXPECT_EQ(grid.tp().rank(), grid.coord().tp);
    EXPECT_EQ(grid.dp().rank(), grid.coord().dp);
    // Summing world ranks over the dp group gives the ranks with our tp coordinate.
    at::Tensor r = at::full({1}, static_cast<std::int64_t>(comm.rank()));
    grid.dp().all_reduce(r)->wait();
    std::int64_t want = 0;
    for (int d = 0; d < grid.shape().dp; ++d)
      want += grid_rank(grid.shape(), {d, 0, grid.coord().tp});
    EXPECT_EQ(r.item<std::int64_t>(), want);
  }
  EXPECT_THROW(ProcessGrid(runtime().world({"bad-grid", Timeout(60000)}), comm.size() + 1, 1),
               InvalidArgument);
}

}  // namespace
}  // namespace dtrain::collectives
