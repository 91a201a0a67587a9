// Point-to-point on real processes: batch_send_recv moving 64 MiB both ways
// at once (a ring on 1-4 ranks; on 2 ranks both directions between one
// pair), the dtype and shape check of a channel's first message on both
// ends, tags that do not cross, and argument errors.

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <chrono>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::collectives {
namespace {

using dtrain::testing::fresh_world;
using dtrain::testing::runtime;
using dtrain::testing::world;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

TEST(BatchSendRecvTest, RingOf64MiBMessages200TimesWithTheContentsCheckedEachTime) {
  // Every rank sends 64 MiB to its right neighbour and receives 64 MiB from
  // its left one, in one batch. Far above MPI's eager limit: a send that
  // waited for its own completion before the receive was posted would
  // deadlock. On 2 ranks this is both directions between one pair at once;
  // on 1 rank a message to itself.
  Communicator& comm = world();
  const int n = comm.size();
  const int right = (comm.rank() + 1) % n;
  const int left = (comm.rank() + n - 1) % n;
  constexpr std::int64_t kElements = std::int64_t{16} << 20;  // int32: 64 MiB
  at::Tensor out = at::arange(kElements, at::kInt) + comm.rank() * 1000;
  at::Tensor want = at::arange(kElements, at::kInt) + left * 1000;
  at::Tensor in = at::empty({kElements}, at::kInt);
  for (int i = 0; i < 200; ++i) {
    // `want` changes every iteration: stale contents of `in` fail the check.
    comm.batch_send_recv({P2POp::send(out, right, 7), P2POp::recv(in, left, 7)})->wait();
    ASSERT_TRUE(at::equal(in, want)) << "iteration " << i;
    out.add_(1);
    want.add_(1);
  }
}

TEST(BatchSendRecvTest, BothDirectionsAtOnceWithSeveralTagsAndNonContiguousTensors) {
  Communicator& comm = world();
  const int n = comm.size();
  const int right = (comm.rank() + 1) % n;
  const int left = (comm.rank() + n - 1) % n;
  // 8 MiB each way per tag; columns of a matrix are strided.
  at::Tensor to_right = (at::arange(2 << 20, at::kDouble) + comm.rank()).reshape({1024, 2048});
  at::Tensor to_left = at::full({4096, 2}, -comm.rank() - 1.0, at::kDouble);
  at::Tensor from_left = at::zeros({2048, 1024}, at::kDouble).t();  // non-contiguous
  at::Tensor from_right = at::zeros({4096, 2}, at::kDouble);
  for (int i = 0; i < 3; ++i) {
    comm.batch_send_recv({P2POp::recv(from_left, left, 1), P2POp::recv(from_right, right, 2),
                          P2POp::send(to_left, left, 2), P2POp::send(to_right, right, 1)})
        ->wait();
    EXPECT_TRUE(
        at::equal(from_left, (at::arange(2 << 20, at::kDouble) + left).reshape({1024, 2048})));
    EXPECT_TRUE(at::equal(from_right, at::full({4096, 2}, -right - 1.0, at::kDouble)));
  }
}

TEST(BatchSendRecvTest, TagsDoNotCross) {
  Communicator& comm = world();
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  // Rank 0 sends tag 5 then tag 9, in one batch and then in two batches;
  // rank 1 receives them in the opposite order. Same shapes, so only the
  // tags tell the messages apart. 4 MiB: above the eager limit.
  const std::int64_t count = 1 << 20;
  for (bool one_batch : {true, false}) {
    if (comm.rank() == 0) {
      at::Tensor five = at::full({count}, 5.0f);
      at::Tensor nine = at::full({count}, 9.0f);
      if (one_batch) {
        comm.batch_send_recv({P2POp::send(five, 1, 5), P2POp::send(nine, 1, 9)})->wait();
      } else {
        auto first = comm.batch_send_recv({P2POp::send(five, 1, 5)});
        auto second = comm.batch_send_recv({P2POp::send(nine, 1, 9)});
        first->wait();
        second->wait();
      }
    } else if (comm.rank() == 1) {
      at::Tensor got_nine = at::zeros({count});
      at::Tensor got_five = at::zeros({count});
      comm.batch_send_recv({P2POp::recv(got_nine, 0, 9), P2POp::recv(got_five, 0, 5)})->wait();
      EXPECT_TRUE(at::equal(got_five, at::full({count}, 5.0f))) << one_batch;
      EXPECT_TRUE(at::equal(got_nine, at::full({count}, 9.0f))) << one_batch;
    }
  }
  comm.barrier()->wait();
}

TEST(BatchSendRecvTest, SeveralMessagesOfOneChannelArriveInIssueOrder) {
  Communicator& comm = world();
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  auto comm_ptr = fresh_world("p2p-order", Timeout(60000));
  // The first batch opens the channel and sends three messages on it.
  for (int round = 0; round < 2; ++round) {
    if (comm.rank() == 0) {
      std::vector<P2POp> ops;
      std::vector<at::Tensor> outs;
      for (int i = 0; i < 3; ++i) {
        outs.push_back(at::full({300000}, static_cast<float>(10 * round + i)));
        ops.push_back(P2POp::send(outs.back(), 1, 3));
      }
      comm_ptr->batch_send_recv(ops)->wait();
    } else if (comm.rank() == 1) {
      std::vector<P2POp> ops;
      std::vector<at::Tensor> ins;
      for (int i = 0; i < 3; ++i) {
        ins.push_back(at::zeros({300000}));
        ops.push_back(P2POp::recv(ins.back(), 0, 3));
      }
      comm_ptr->batch_send_recv(ops)->wait();
      for (int i = 0; i < 3; ++i) {
        EXPECT_TRUE(at::equal(ins[i], at::full({300000}, static_cast<float>(10 * round + i))))
            << "round " << round << ", message " << i;
      }
    }
  }
  comm.barrier()->wait();
}

// Runs `send` on rank 0 and `recv` on rank 1 of a fresh communicator (2 s
// timeout); both must fail with a CommError (not a timeout) that names
// both signatures, well within the timeout.
template <typename Send, typename Recv>
void expect_mismatch_on_both_ends(const std::string& name, Send send, Recv recv,
                                  const std::string& sent, const std::string& expected) {
  Communicator& comm = world();
  auto fresh = fresh_world(name, Timeout(2000));  // collective: every rank
  if (comm.rank() < 2) {
    const auto start = Clock::now();
    std::string message;
    try {
      (comm.rank() == 0 ? send(*fresh) : recv(*fresh))->wait();
      ADD_FAILURE() << "rank " << comm.rank() << ": the mismatched message went through";
    } catch (const TimeoutError& e) {
      ADD_FAILURE() << "rank " << comm.rank() << ": timed out instead: " << e.what();
    } catch (const CommError& e) {
      message = e.what();
    }
    EXPECT_LT(seconds_since(start), 1.5) << message;
    EXPECT_NE(message.find(sent), std::string::npos) << message;
    EXPECT_NE(message.find(expected), std::string::npos) << message;
    EXPECT_NE(message.find("'" + name + "'"), std::string::npos) << message;
    EXPECT_TRUE(fresh->failed());
  }
  world().barrier()->wait();
}

TEST(MismatchTest, ShapeMismatchIsACommErrorOnBothEnds) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  // Same byte count, transposed shape: taken silently before the check.
  at::Tensor sent = at::arange(32, at::kFloat).reshape({4, 8});
  at::Tensor target = at::full({8, 4}, -1.0f);
  expect_mismatch_on_both_ends(
      "p2p-shape", [&](Communicator& c) { return c.send(sent, 1); },
      [&](Communicator& c) { return c.recv(target, 0); }, "sends [4, 8] float32",
      "expects [8, 4] float32");
  if (world().rank() == 1) {
    EXPECT_TRUE(at::equal(target, at::full({8, 4}, -1.0f))) << "the receive buffer was written";
  }
}

TEST(MismatchTest, ShapeMismatchInABatchIsACommErrorOnBothEnds) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  // 64 MiB both ways; one direction disagrees on its shape.
  const std::int64_t count = std::int64_t{16} << 20;
  at::Tensor out = at::ones({count});
  at::Tensor in = at::zeros({count});
  at::Tensor other_shape = at::zeros({count / 2, 2});
  expect_mismatch_on_both_ends(
      "p2p-batch-shape",
      [&](Communicator& c) {
        return c.batch_send_recv({P2POp::send(out, 1), P2POp::recv(in, 1)});
      },
      [&](Communicator& c) {
        return c.batch_send_recv({P2POp::send(out, 0), P2POp::recv(other_shape, 0)});
      },
      "sends [16777216] float32", "expects [8388608, 2] float32");
}

TEST(MismatchTest, DtypeMismatchIsACommErrorOnBothEnds) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  // float32 and int32 have the same size: only the header tells them apart.
  at::Tensor sent = at::ones({16}, at::kFloat);
  at::Tensor target = at::zeros({16}, at::kInt);
  expect_mismatch_on_both_ends(
      "p2p-dtype", [&](Communicator& c) { return c.batch_send_recv({P2POp::send(sent, 1, 4)}); },
      [&](Communicator& c) { return c.batch_send_recv({P2POp::recv(target, 0, 4)}); },
      "sends [16] float32", "expects [16] int32");
}

TEST(ArgumentTest, BadBatchesAreRejectedBeforeAnythingRuns) {
  Communicator& comm = world();
  const int n = comm.size();
  const int right = (comm.rank() + 1) % n;
  at::Tensor a = at::ones({10});
  at::Tensor b = at::ones({10});
  auto expect_invalid = [](auto call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "expected InvalidArgument mentioning '" << needle << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_invalid([&] { comm.batch_send_recv({}); }, "list of ops is empty");
  expect_invalid([&] { comm.batch_send_recv({P2POp::send(a, n)}); }, "is not a rank");
  expect_invalid([&] { comm.batch_send_recv({P2POp::recv(a, -1)}); }, "is not a rank");
  expect_invalid([&] { comm.batch_send_recv({P2POp::send(a, right, -2)}); }, "tag -2");
  expect_invalid(
      [&] {
        comm.batch_send_recv({P2POp::recv(a, right), P2POp::recv(a, right, 1)});
      },
      "also receives into");
  expect_invalid(
      [&] {
        comm.batch_send_recv({P2POp::recv(a.narrow(0, 0, 6), right), P2POp::send(a, right)});
      },
      "sends from");
  expect_invalid([&] { comm.batch_send_recv({P2POp::send(a, comm.rank())}); }, "to itself");
  expect_invalid([&] { comm.batch_send_recv({P2POp::send(at::ones({2}, at::kBool), right)}); },
                 "not supported");
  expect_invalid([&] { comm.batch_send_recv({P2POp::send(at::Tensor(), right)}); }, "undefined");
  // A channel keeps the dtype and shape of its first message.
  if (n >= 2) {
    if (comm.rank() == 0) {
      comm.batch_send_recv({P2POp::send(a, 1, 11)})->wait();
      expect_invalid([&] { comm.batch_send_recv({P2POp::send(at::ones({5}), 1, 11)}); },
                     "this channel carries [10] float32");
      comm.batch_send_recv({P2POp::send(a, 1, 11)})->wait();
    } else if (comm.rank() == 1) {
      comm.batch_send_recv({P2POp::recv(b, 0, 11)})->wait();
      comm.batch_send_recv({P2POp::recv(b, 0, 11)})->wait();
    }
  }
  EXPECT_FALSE(comm.failed());
  comm.barrier()->wait();
}

}  // namespace
}  // namespace dtrain::collectives
