// The NCCL backend's ops against a mocked CUDA/NCCL: dtype and op mapping,
// argument checks, stream/event ordering, Work::wait in both modes,
// keep-alive, send/recv grouping, split, lifecycle, and failures (NCCL
// errors, asynchronous errors, timeouts that abort the communicator).

#include <gtest/gtest.h>

#include <ATen/ops/ones.h>

#include <cstdlib>
#include <thread>

#include "dtrain/collectives/nccl.h"
#include "tests/nccl/nccl_test_support.h"

namespace dtrain::collectives::testing {
namespace {

using ::testing::_;
using ::testing::AnyNumber;
using ::testing::Field;
using ::testing::InSequence;
using ::testing::NiceMock;
using ::testing::Return;
using ::testing::Throw;

constexpr std::uintptr_t kData = 0xD000;

class NcclOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    api_->install_defaults();
    comm_ = make(NcclOptions{});
  }

  void TearDown() override {
    api_->gpu_done = true;  // let the destructor's drain finish
    comm_.reset();
  }

  // The tensor API through the base class, whose declarations carry the
  // default options.
  Communicator& base() { return *comm_; }

  std::shared_ptr<detail::NcclCommunicator> make(NcclOptions options, int size = 4) {
    FakeBootstrap bootstrap(/*rank=*/0, size);
    return std::dynamic_pointer_cast<detail::NcclCommunicator>(detail::create_nccl_communicator(
        bootstrap, std::move(options), fake_hooks(api_, streams_)));
  }

  // Waits (bounded) until the watchdog has completed `work`.
  static void wait_until_completed(const Work& work) {
    for (int i = 0; i < 5000 && !work.is_completed(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_TRUE(work.is_completed());
  }

  std::shared_ptr<NiceMock<MockCudaNcclApi>> api_ = std::make_shared<NiceMock<MockCudaNcclApi>>();
  std::shared_ptr<FakeStreamProvider> streams_ = std::make_shared<FakeStreamProvider>();
  std::shared_ptr<detail::NcclCommunicator> comm_;
};

// --- mapping ----------------------------------------------------------------

TEST_F(NcclOpsTest, EverySupportedDtypeMapsToItsNcclType) {
  const std::pair<at::ScalarType, NcclDataType> cases[] = {
      {at::kFloat, NcclDataType::kFloat32},     {at::kHalf, NcclDataType::kFloat16},
      {at::kBFloat16, NcclDataType::kBfloat16}, {at::kDouble, NcclDataType::kFloat64},
      {at::kInt, NcclDataType::kInt32},         {at::kLong, NcclDataType::kInt64},
      {at::kByte, NcclDataType::kUint8},
  };
  for (const auto& [dtype, nccl_type] : cases) {
    at::Tensor tensor = fake_cuda_tensor(fake_handle<void*>(kData), {3, 5}, dtype);
    EXPECT_CALL(*api_, all_reduce(tensor.data_ptr(), tensor.data_ptr(), 15, nccl_type,
                                  NcclRedOp::kSum, kComm, kCommStream));
    auto work = base().all_reduce(tensor);
    wait_until_completed(*work);  // set the next expectation while no op is in flight
  }
}

TEST_F(NcclOpsTest, EveryReduceOpMapsToItsNcclOp) {
  const std::pair<ReduceOp, NcclRedOp> cases[] = {
      {ReduceOp::kSum, NcclRedOp::kSum},      {ReduceOp::kAvg, NcclRedOp::kAvg},
      {ReduceOp::kMin, NcclRedOp::kMin},      {ReduceOp::kMax, NcclRedOp::kMax},
      {ReduceOp::kProduct, NcclRedOp::kProd},
  };
  for (const auto& [op, nccl_op] : cases) {
    EXPECT_CALL(*api_, all_reduce(_, _, 8, NcclDataType::kBfloat16, nccl_op, kComm, _));
    EXPECT_CALL(*api_, reduce_scatter(_, _, 2, NcclDataType::kBfloat16, nccl_op, kComm, _));
    AllReduceOptions reduce;
    reduce.op = op;
    comm_->all_reduce_buffer(fake_buffer(kData, 8, at::kBFloat16), reduce);
    ReduceScatterOptions scatter;
    scatter.op = op;
    auto work = comm_->reduce_scatter_buffer(fake_buffer(kData, 2, at::kBFloat16),
                                             fake_buffer(kData + 64, 8, at::kBFloat16), scatter);
    wait_until_completed(*work);
  }
}

TEST_F(NcclOpsTest, UnsupportedDtypesAndIntegerAverageAreRejectedBeforeAnyCall) {
  EXPECT_CALL(*api_, all_reduce(_, _, _, _, _, _, _)).Times(0);
  EXPECT_CALL(*api_, event_record(_, _)).Times(0);
  for (at::ScalarType dtype : {at::kBool, at::kChar, at::kShort, at::kComplexFloat}) {
    try {
      comm_->all_reduce_buffer(fake_buffer(kData, 4, dtype), {});
      FAIL() << "expected InvalidArgument for " << dtype;
    } catch (const InvalidArgument& e) {
      EXPECT_MESSAGE_HAS(e.what(), "not supported by the NCCL backend");
    }
  }
  AllReduceOptions average;
  average.op = ReduceOp::kAvg;
  try {
    comm_->all_reduce_buffer(fake_buffer(kData, 4, at::kInt), average);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "floating dtype");
  }
}

// --- argument checks ----------------------------------------------------------

TEST_F(NcclOpsTest, CpuTensorsAreRejectedWithAPointerToTheMpiBackend) {
  EXPECT_CALL(*api_, all_reduce(_, _, _, _, _, _, _)).Times(0);
  try {
    base().all_reduce(at::ones({4}));
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "is on cpu");
    EXPECT_MESSAGE_HAS(e.what(), "CUDA tensors");
    EXPECT_MESSAGE_HAS(e.what(), "Runtime::world()");
  }
  EXPECT_THROW(comm_->broadcast(at::ones({4}), {}), InvalidArgument);
  EXPECT_THROW(comm_->send(at::ones({4}), 1, {}), InvalidArgument);
}

TEST_F(NcclOpsTest, TensorsOnAnotherGpuOrNonContiguousAreRejected) {
  try {
    base().all_reduce(fake_cuda_tensor(fake_handle<void*>(kData), {4}, at::kFloat, /*device=*/1));
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "cuda:1");
    EXPECT_MESSAGE_HAS(e.what(), "runs on cuda:0");
  }
  at::Tensor transposed =
      fake_cuda_tensor(fake_handle<void*>(kData), {4, 3}, at::kFloat, 0, /*strides=*/{1, 4});
  try {
    base().all_reduce(transposed);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "contiguous");
  }
  EXPECT_THROW(base().all_reduce(at::Tensor()), InvalidArgument);
}

TEST_F(NcclOpsTest, ShapesRootsPeersTagsAndAlgorithmsAreChecked) {
  const auto in = fake_buffer(kData, 3);
  EXPECT_THROW(comm_->all_gather_buffer(fake_buffer(kData, 11), in, {}), InvalidArgument);
  EXPECT_THROW(comm_->all_gather_buffer(fake_buffer(kData, 12, at::kHalf), in, {}),
               InvalidArgument);
  EXPECT_THROW(comm_->reduce_scatter_buffer(in, fake_buffer(kData, 13), {}), InvalidArgument);
  BroadcastOptions root;
  root.root = 4;
  EXPECT_THROW(comm_->broadcast_buffer(in, root), InvalidArgument);
  EXPECT_THROW(comm_->send_buffer(in, 0, {}), InvalidArgument);  // to itself
  EXPECT_THROW(comm_->recv_buffer(in, 4, {}), InvalidArgument);
  PointToPointOptions tagged;
  tagged.tag = 7;
  try {
    comm_->send_buffer(in, 1, tagged);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "issue order");
  }
  AllReduceOptions ring;
  ring.algorithm = Algorithm::kRing;  // the communicator was created with auto
  EXPECT_THROW(comm_->all_reduce_buffer(in, ring), InvalidArgument);
  AllReduceOptions automatic;
  automatic.algorithm = Algorithm::kAuto;
  EXPECT_NO_THROW(comm_->all_reduce_buffer(in, automatic));
  // NCCL chooses how to run reduce-scatter and all-gather: shm and ring are
  // MPI-backend algorithms.
  AllGatherOptions gather_shm;
  gather_shm.algorithm = Algorithm::kShm;
  try {
    comm_->all_gather_buffer(fake_buffer(kData, 12), in, gather_shm);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "all_gather: algorithm 'shm'");
  }
  ReduceScatterOptions scatter_ring;
  scatter_ring.algorithm = Algorithm::kRing;
  EXPECT_THROW(comm_->reduce_scatter_buffer(in, fake_buffer(kData, 12), scatter_ring),
               InvalidArgument);
}

// --- stream ordering and waiting ------------------------------------------------

TEST_F(NcclOpsTest, OpsAreOrderedAfterTheCallersStreamAndWaitOrdersTheCallerAfterTheOp) {
  api_->gpu_done = false;  // the op stays "running" until the caller's stream waits
  const CudaEvent ready = api_->events().at(0);  // created with the communicator
  CudaEvent done = nullptr;
  {
    InSequence order;
    EXPECT_CALL(*api_, event_record(ready, kCallerStream));
    EXPECT_CALL(*api_, stream_wait_event(kCommStream, ready));
    EXPECT_CALL(*api_, all_reduce(_, _, 16, _, _, kComm, kCommStream));
    EXPECT_CALL(*api_, event_record(_, kCommStream)).WillOnce([&](CudaEvent event, CudaStream) {
      done = event;
    });
    EXPECT_CALL(*api_, stream_wait_event(kCallerStream, _))
        .WillOnce([&](CudaStream, CudaEvent event) { EXPECT_EQ(event, done); });
  }
  auto work = comm_->all_reduce_buffer(fake_buffer(kData, 16), {});
  EXPECT_NE(done, nullptr);
  EXPECT_NE(done, ready);
  EXPECT_FALSE(work->is_completed());
  work->wait();  // queues the caller-stream wait; returns without blocking the host
  EXPECT_FALSE(work->is_completed());
  EXPECT_EQ(streams_->last_device.load(), 0);
  api_->gpu_done = true;
  wait_until_completed(*work);
}

TEST_F(NcclOpsTest, WaitOnACompletedOpTouchesNoStream) {
  auto work = comm_->all_reduce_buffer(fake_buffer(kData, 16), {});
  wait_until_completed(*work);
  EXPECT_CALL(*api_, stream_wait_event(_, _)).Times(AnyNumber());  // the comm stream's waits
  EXPECT_CALL(*api_, stream_wait_event(kCallerStream, _)).Times(0);
  work->wait();
}

TEST_F(NcclOpsTest, BlockingWaitWaitsOnTheHostUntilTheEventFires) {
  comm_ = make([] {
    NcclOptions options;
    options.blocking_wait = true;
    return options;
  }());
  api_->gpu_done = false;
  EXPECT_CALL(*api_, stream_wait_event(_, _)).Times(AnyNumber());  // the comm stream's waits
  EXPECT_CALL(*api_, stream_wait_event(kCallerStream, _)).Times(0);
  auto work = comm_->all_reduce_buffer(fake_buffer(kData, 16), {});
  EXPECT_THROW(work->wait(Timeout(20)), TimeoutError);  // still running: the wait's own timeout
  EXPECT_FALSE(comm_->failed()) << "a Work::wait timeout does not fail the op";
  std::thread gpu([this] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    api_->gpu_done = true;
  });
  work->wait();
  EXPECT_TRUE(work->is_completed());
  gpu.join();
}

TEST_F(NcclOpsTest, BarrierAllReducesOneByteAndWaitsOnTheHost) {
  EXPECT_CALL(*api_, device_malloc(1)).Times(1).WillOnce(Return(fake_handle<void*>(0xB000)));
  EXPECT_CALL(*api_, all_reduce(fake_handle<void*>(0xB000), fake_handle<void*>(0xB000), 1,
                                NcclDataType::kUint8, NcclRedOp::kMax, kComm, kCommStream))
      .Times(2);
  EXPECT_CALL(*api_, stream_wait_event(_, _)).Times(AnyNumber());  // the comm stream's waits
  EXPECT_CALL(*api_, stream_wait_event(kCallerStream, _)).Times(0);
  comm_->barrier({})->wait();
  auto second = comm_->barrier({});
  second->wait();
  EXPECT_TRUE(second->is_completed());
  EXPECT_CALL(*api_, device_free(fake_handle<void*>(0xB000)));
  comm_.reset();
}

TEST_F(NcclOpsTest, TheWorkKeepsTensorsAliveUntilTheGpuIsDone) {
  api_->gpu_done = false;
  at::Tensor tensor = fake_cuda_tensor(fake_handle<void*>(kData), {8});
  auto work = base().all_reduce(tensor);
  EXPECT_GT(tensor.use_count(), 1);
  api_->gpu_done = true;
  wait_until_completed(*work);
  for (int i = 0; i < 1000 && tensor.use_count() > 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(tensor.use_count(), 1);
}

TEST_F(NcclOpsTest, CompletionEventsAreReused) {
  auto first = comm_->all_reduce_buffer(fake_buffer(kData, 4), {});
  wait_until_completed(*first);
  const std::size_t created = api_->events().size();
  first.reset();  // gives its event back
  for (int i = 0; i < 10; ++i) {
    auto work = comm_->all_reduce_buffer(fake_buffer(kData, 4), {});
    wait_until_completed(*work);
  }
  EXPECT_EQ(api_->events().size(), created);
}

TEST_F(NcclOpsTest, CollectivesPassCountsAndBuffersThrough) {
  EXPECT_CALL(*api_, broadcast(fake_handle<void*>(kData), fake_handle<void*>(kData), 10,
                               NcclDataType::kInt64, 2, kComm, kCommStream));
  EXPECT_CALL(*api_, all_gather(fake_handle<void*>(kData), fake_handle<void*>(0xF000), 3,
                                NcclDataType::kFloat32, kComm, kCommStream));
  EXPECT_CALL(*api_, reduce_scatter(fake_handle<void*>(0xF000), fake_handle<void*>(kData), 3,
                                    NcclDataType::kFloat32, NcclRedOp::kSum, kComm, kCommStream));
  EXPECT_CALL(*api_, all_reduce(_, _, 0, _, _, kComm, kCommStream));  // empty tensors are legal
  BroadcastOptions root;
  root.root = 2;
  comm_->broadcast_buffer(fake_buffer(kData, 10, at::kLong), root);
  comm_->all_gather_buffer(fake_buffer(0xF000, 12), fake_buffer(kData, 3), {});
  comm_->reduce_scatter_buffer(fake_buffer(kData, 3), fake_buffer(0xF000, 12), {});
  comm_->all_reduce_buffer(fake_buffer(0, 0), {});
}

TEST_F(NcclOpsTest, SendAndRecvAreGroupedNcclCalls) {
  {
    InSequence order;
    EXPECT_CALL(*api_, group_start());
    EXPECT_CALL(*api_,
                send(fake_handle<void*>(kData), 5, NcclDataType::kFloat64, 3, kComm, kCommStream));
    EXPECT_CALL(*api_, group_end());
    EXPECT_CALL(*api_, group_start());
    EXPECT_CALL(*api_,
                recv(fake_handle<void*>(kData), 5, NcclDataType::kFloat64, 1, kComm, kCommStream));
    EXPECT_CALL(*api_, group_end());
  }
  comm_->send_buffer(fake_buffer(kData, 5, at::kDouble), 3, {});
  comm_->recv_buffer(fake_buffer(kData, 5, at::kDouble), 1, {});
}

TEST_F(NcclOpsTest, ABatchIsOneGroupOfItsOpsInListOrderWithOneCompletionEvent) {
  // Rank 0 of 4: both directions with rank 1, a send to rank 3, and a
  // message to itself (NCCL allows self sends inside a group).
  const std::vector<detail::P2PBufferOp> ops = {
      {false, fake_buffer(0xD000, 8), 1, 0},
      {true, fake_buffer(0xD100, 8), 1, 0},
      {false, fake_buffer(0xD200, 2, at::kHalf), 3, 0},
      {true, fake_buffer(0xD300, 6, at::kInt), 0, 0},
      {false, fake_buffer(0xD400, 6, at::kInt), 0, 0},
  };
  {
    InSequence order;
    EXPECT_CALL(*api_, event_record(_, kCallerStream));
    EXPECT_CALL(*api_, stream_wait_event(kCommStream, _));
    EXPECT_CALL(*api_, group_start());
    EXPECT_CALL(*api_,
                send(fake_handle<void*>(0xD000), 8, NcclDataType::kFloat32, 1, kComm, kCommStream));
    EXPECT_CALL(*api_,
                recv(fake_handle<void*>(0xD100), 8, NcclDataType::kFloat32, 1, kComm, kCommStream));
    EXPECT_CALL(*api_,
                send(fake_handle<void*>(0xD200), 2, NcclDataType::kFloat16, 3, kComm, kCommStream));
    EXPECT_CALL(*api_,
                recv(fake_handle<void*>(0xD300), 6, NcclDataType::kInt32, 0, kComm, kCommStream));
    EXPECT_CALL(*api_,
                send(fake_handle<void*>(0xD400), 6, NcclDataType::kInt32, 0, kComm, kCommStream));
    EXPECT_CALL(*api_, group_end());
    EXPECT_CALL(*api_, event_record(_, kCommStream));  // the batch's one completion event
  }
  auto work = comm_->batch_send_recv_buffers(ops, {});
  EXPECT_MESSAGE_HAS(work->description(), "batch_send_recv(3 sends, 2 recvs) on communicator");
  wait_until_completed(*work);
  work->wait();
}

TEST_F(NcclOpsTest, ABatchKeepsItsTensorsAliveAndTakesTheTensorApi) {
  at::Tensor out = fake_cuda_tensor(fake_handle<void*>(0xD000), {4, 2});
  at::Tensor in = fake_cuda_tensor(fake_handle<void*>(0xD100), {2, 4});
  EXPECT_CALL(*api_, send(fake_handle<void*>(0xD000), 8, NcclDataType::kFloat32, 2, _, _));
  EXPECT_CALL(*api_, recv(fake_handle<void*>(0xD100), 8, NcclDataType::kFloat32, 2, _, _));
  api_->gpu_done = false;
  const auto uses = out.use_count();
  auto work = base().batch_send_recv({P2POp::send(out, 2), P2POp::recv(in, 2)});
  EXPECT_GT(out.use_count(), uses);
  api_->gpu_done = true;
  wait_until_completed(*work);
  EXPECT_EQ(out.use_count(), uses);
}

TEST_F(NcclOpsTest, BadBatchesAreRejectedBeforeAnyNcclCall) {
  EXPECT_CALL(*api_, group_start()).Times(0);
  EXPECT_CALL(*api_, send(_, _, _, _, _, _)).Times(0);
  EXPECT_CALL(*api_, recv(_, _, _, _, _, _)).Times(0);
  auto expect_invalid = [&](const std::vector<detail::P2PBufferOp>& ops, const char* needle) {
    try {
      comm_->batch_send_recv_buffers(ops, {});
      ADD_FAILURE() << "expected InvalidArgument mentioning " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_MESSAGE_HAS(e.what(), needle);
    }
  };
  expect_invalid({}, "list of ops is empty");
  expect_invalid({{false, fake_buffer(kData, 4), 4, 0}}, "is not a rank");
  expect_invalid({{true, fake_buffer(kData, 4), -1, 0}}, "is not a rank");
  // No tags in NCCL: the ordering rule replaces them.
  expect_invalid({{false, fake_buffer(kData, 4), 1, 3}}, "issue order");
  // The same memory received into twice, or received into and sent from.
  expect_invalid({{true, fake_buffer(kData, 4), 1, 0}, {true, fake_buffer(kData + 8, 4), 2, 0}},
                 "also receives into");
  expect_invalid({{false, fake_buffer(kData, 4), 1, 0}, {true, fake_buffer(kData, 1), 2, 0}},
                 "sends from");
  expect_invalid({{false, fake_buffer(kData, 4), 0, 0}}, "to itself");
  auto cpu = fake_buffer(kData, 4);
  cpu.device = c10::Device(c10::kCPU);
  expect_invalid({{false, cpu, 1, 0}}, "CUDA tensors");
  EXPECT_FALSE(comm_->failed());
}

TEST_F(NcclOpsTest, AnNcclErrorInsideABatchStillEndsTheGroupAndFailsTheWork) {
  {
    InSequence order;
    EXPECT_CALL(*api_, group_start());
    EXPECT_CALL(*api_, send(_, _, _, 1, _, _));
    EXPECT_CALL(*api_, recv(_, _, _, 1, _, _))
        .WillOnce(Throw(detail::nccl_error(2, "ncclRecv", "no peer")));
    EXPECT_CALL(*api_, group_end());
  }
  EXPECT_CALL(*api_, comm_abort(kComm));
  auto work = comm_->batch_send_recv_buffers(
      {{false, fake_buffer(0xD000, 4), 1, 0}, {true, fake_buffer(0xD100, 4), 1, 0}}, {});
  try {
    work->wait();
    FAIL() << "expected CommError";
  } catch (const CommError& e) {
    EXPECT_MESSAGE_HAS(e.what(), "batch_send_recv(1 sends, 1 recvs)");
    EXPECT_MESSAGE_HAS(e.what(), "ncclRecv failed");
  }
  EXPECT_TRUE(comm_->failed());
}

// --- split and lifecycle ------------------------------------------------------

TEST_F(NcclOpsTest, SplitMapsColorAndKeyAndReadsRankAndSizeFromNccl) {
  EXPECT_CALL(*api_, comm_split(kComm, 3, 7, Field(&NcclCommConfig::name, "world/3")))
      .WillOnce(Return(kChildSplit));
  EXPECT_CALL(*api_, comm_count(kChildComm)).WillOnce(Return(2));
  EXPECT_CALL(*api_, comm_user_rank(kChildComm)).WillOnce(Return(1));
  EXPECT_CALL(*api_, all_reduce(_, _, 4, _, _, kChildComm, _));
  EXPECT_CALL(*api_, comm_finalize(_)).Times(AnyNumber());  // the parent's, at teardown
  EXPECT_CALL(*api_, comm_destroy(_)).Times(AnyNumber());
  EXPECT_CALL(*api_, comm_finalize(kChildComm));
  EXPECT_CALL(*api_, comm_destroy(kChildComm));
  auto child = comm_->split(3, 7, {});
  ASSERT_NE(child, nullptr);
  EXPECT_EQ(child->rank(), 1);
  EXPECT_EQ(child->size(), 2);
  EXPECT_EQ(child->name(), "world/3");
  child->all_reduce(fake_cuda_tensor(fake_handle<void*>(kData), {4}))->wait();
  child.reset();
}

TEST_F(NcclOpsTest, NegativeColorsTakePartButGetNoCommunicator) {
  EXPECT_CALL(*api_, comm_split(kComm, detail::kNcclSplitNoColor, 0, _)).WillOnce(Return(nullptr));
  EXPECT_EQ(comm_->split(-5, 0, {}), nullptr);
  SplitOptions named;
  named.name = "tp";
  EXPECT_CALL(*api_, comm_split(kComm, 0, 1, Field(&NcclCommConfig::name, "tp")))
      .WillOnce(Return(kChildSplit));
  EXPECT_CALL(*api_, comm_count(kChildComm)).WillOnce(Return(1));
  EXPECT_EQ(comm_->split(0, 1, named)->name(), "tp");
}

TEST_F(NcclOpsTest, SplitsOfARingOrTreeCommunicatorGetTheSameAlgorithm) {
  comm_ = make([] {
    NcclOptions options;
    options.algorithm = Algorithm::kTree;
    return options;
  }());
  setenv("NCCL_ALGO", "Ring", 1);  // set by the program after creation
  EXPECT_CALL(*api_, comm_split(kComm, 0, 0, _))
      .WillOnce([](NcclComm, int, int, const NcclCommConfig&) {
        EXPECT_STREQ(std::getenv("NCCL_ALGO"), "allreduce:tree");
        return kChildSplit;
      });
  EXPECT_CALL(*api_, comm_count(kChildComm)).WillOnce(Return(4));
  auto child = comm_->split(0, 0, {});
  EXPECT_STREQ(std::getenv("NCCL_ALGO"), "Ring") << "the program's value is restored";
  EXPECT_EQ(child->options().allreduce_algorithm, Algorithm::kTree);
  unsetenv("NCCL_ALGO");
}

// NCCL publishes a split's child only when the split completes (its handle
// is null until then); the backend polls for it. Seen on an H200: treating
// the null handle as the answer lost the child, and NCCL later wrote it into
// memory that was gone.
TEST_F(NcclOpsTest, ASplitsChildIsTakenWhenNcclPublishesIt) {
  EXPECT_CALL(*api_, comm_split(kComm, 2, 0, _)).WillOnce(Return(kChildSplit));
  EXPECT_CALL(*api_, split_child(kChildSplit))
      .WillOnce(Return(nullptr))
      .WillOnce(Return(nullptr))
      .WillRepeatedly(Return(kChildComm));
  EXPECT_CALL(*api_, comm_count(kChildComm)).WillOnce(Return(2));
  auto child = comm_->split(2, 0, {});
  ASSERT_NE(child, nullptr);
  EXPECT_EQ(child->size(), 2);
}

TEST_F(NcclOpsTest, ASplitWhoseChildNeverAppearsTimesOutAndFailsTheParent) {
  EXPECT_CALL(*api_, comm_split(kComm, 1, 0, _)).WillOnce(Return(kChildSplit));
  ON_CALL(*api_, split_child(kChildSplit)).WillByDefault(Return(nullptr));
  EXPECT_CALL(*api_, comm_abort(kComm));
  SplitOptions quick;
  quick.timeout = Timeout(20);
  EXPECT_THROW(comm_->split(1, 0, quick), TimeoutError);
  EXPECT_TRUE(comm_->failed());
}

TEST_F(NcclOpsTest, ASplitThatNeverSettlesTimesOutAndFailsTheParent) {
  EXPECT_CALL(*api_, comm_split(kComm, 1, 0, _)).WillOnce(Return(kChildSplit));
  ON_CALL(*api_, comm_check_async_error(kChildComm)).WillByDefault(Return(true));
  EXPECT_CALL(*api_, comm_abort(kChildComm));
  EXPECT_CALL(*api_, comm_abort(kComm));
  SplitOptions quick;
  quick.timeout = Timeout(20);
  EXPECT_THROW(comm_->split(1, 0, quick), TimeoutError);
  EXPECT_TRUE(comm_->failed());
}

TEST_F(NcclOpsTest, DestroyingAHealthyCommunicatorFinalizesAndFreesEverything) {
  EXPECT_CALL(*api_, comm_abort(_)).Times(0);
  {
    InSequence order;
    EXPECT_CALL(*api_, comm_finalize(kComm));
    EXPECT_CALL(*api_, comm_destroy(kComm));
  }
  EXPECT_CALL(*api_, stream_destroy(kCommStream));
  EXPECT_CALL(*api_, event_destroy(_)).Times(AnyNumber());
  comm_->all_reduce_buffer(fake_buffer(kData, 4), {})->wait();
  comm_.reset();
}

// --- failures -----------------------------------------------------------------

TEST_F(NcclOpsTest, AnNcclCallErrorFailsTheWorkAndTheCommunicator) {
  EXPECT_CALL(*api_, all_reduce(_, _, _, _, _, _, _))
      .WillOnce(Throw(detail::nccl_error(3, "ncclAllReduce", "bad things")));
  EXPECT_CALL(*api_, comm_abort(kComm));
  auto work = comm_->all_reduce_buffer(fake_buffer(kData, 4), {});
  try {
    work->wait();
    FAIL() << "expected CommError";
  } catch (const CommError& e) {
    EXPECT_MESSAGE_HAS(e.what(), "all_reduce(sum, 4 x float32) on communicator 'world'");
    EXPECT_MESSAGE_HAS(e.what(), "ncclAllReduce failed: internal error");
    EXPECT_MESSAGE_HAS(e.what(), "bad things");
  }
  EXPECT_TRUE(comm_->failed());
  try {
    comm_->barrier({})->wait();
    FAIL() << "expected CommError";
  } catch (const CommError& e) {
    EXPECT_MESSAGE_HAS(e.what(), "failed earlier");
  }
}

TEST_F(NcclOpsTest, AnAsynchronousErrorAbortsAndFailsEveryOpInFlight) {
  std::atomic<bool> remote_failed{false};
  EXPECT_CALL(*api_, comm_check_async_error(kComm)).WillRepeatedly([&](NcclComm) {
    if (remote_failed) throw detail::nccl_error(6, "NCCL communicator", "rank 3 vanished");
    return false;
  });
  EXPECT_CALL(*api_, comm_abort(kComm)).Times(1);
  api_->gpu_done = false;
  auto first = comm_->all_reduce_buffer(fake_buffer(kData, 4), {});
  auto second = comm_->broadcast_buffer(fake_buffer(kData, 4), {});
  EXPECT_FALSE(first->is_completed());
  remote_failed = true;
  comm_->poll();  // what the watchdog does every few milliseconds
  ASSERT_TRUE(first->is_completed());
  ASSERT_TRUE(second->is_completed());
  for (const auto& work : {first, second}) {
    try {
      work->wait();
      FAIL() << "expected CommError";
    } catch (const TimeoutError&) {
      FAIL() << "an NCCL error is not a timeout";
    } catch (const CommError& e) {
      EXPECT_MESSAGE_HAS(e.what(), "rank 3 vanished");
    }
  }
  EXPECT_TRUE(comm_->failed());
}

TEST_F(NcclOpsTest, AnOpPastItsDeadlineAbortsTheCommunicatorWithTimeoutError) {
  api_->gpu_done = false;  // the event never fires
  EXPECT_CALL(*api_, comm_abort(kComm)).Times(1);
  AllReduceOptions quick;
  quick.timeout = Timeout(30);
  auto stuck = comm_->all_reduce_buffer(fake_buffer(kData, 8), quick);
  auto behind = comm_->all_reduce_buffer(fake_buffer(kData, 8), {});
  wait_until_completed(*stuck);  // the watchdog notices; nobody needs to wait
  try {
    stuck->wait();
    FAIL() << "expected TimeoutError";
  } catch (const TimeoutError& e) {
    EXPECT_MESSAGE_HAS(e.what(), "all_reduce(sum, 8 x float32) on communicator 'world'");
    EXPECT_MESSAGE_HAS(e.what(), "did not complete within 30 ms");
    EXPECT_MESSAGE_HAS(e.what(), "aborted");
  }
  EXPECT_THROW(behind->wait(), CommError);
  EXPECT_TRUE(comm_->failed());
  // Aborted, so not finalized again.
  EXPECT_CALL(*api_, comm_finalize(_)).Times(0);
  comm_.reset();
}

TEST_F(NcclOpsTest, HostBlockingWaitSurfacesTheTimeoutItself) {
  comm_ = make([] {
    NcclOptions options;
    options.blocking_wait = true;
    options.timeout = Timeout(30);
    return options;
  }());
  api_->gpu_done = false;
  EXPECT_CALL(*api_, comm_abort(kComm)).Times(1);
  auto work = comm_->all_reduce_buffer(fake_buffer(kData, 8), {});
  EXPECT_THROW(work->wait(), TimeoutError);
}

}  // namespace
}  // namespace dtrain::collectives::testing
