// Creating NCCL communicators, against a mocked CUDA/NCCL and a scripted
// bootstrap: unique-id exchange, device choice, the no-GPU message,
// algorithm setting, initialization timeouts, options, error mapping.

#include <gtest/gtest.h>

#include <cstdlib>

#include "dtrain/collectives/nccl.h"
#include "tests/nccl/nccl_test_support.h"

namespace dtrain::collectives::testing {
namespace {

using ::testing::_;
using ::testing::Eq;
using ::testing::Field;
using ::testing::NiceMock;
using ::testing::Return;
using ::testing::Throw;

class NcclBootstrapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    unsetenv("NCCL_ALGO");
    api_->install_defaults();
  }
  void TearDown() override { unsetenv("NCCL_ALGO"); }

  std::shared_ptr<Communicator> create(FakeBootstrap& bootstrap, NcclOptions options = {},
                                       int local_rank = 0) {
    return detail::create_nccl_communicator(bootstrap, std::move(options),
                                            fake_hooks(api_, streams_, local_rank));
  }

  std::shared_ptr<NiceMock<MockCudaNcclApi>> api_ = std::make_shared<NiceMock<MockCudaNcclApi>>();
  std::shared_ptr<FakeStreamProvider> streams_ = std::make_shared<FakeStreamProvider>();
};

MATCHER_P(IdIs, expected, "") { return arg.bytes == expected.bytes; }

TEST_F(NcclBootstrapTest, RankZeroCreatesTheUniqueIdAndBroadcastsIt) {
  FakeBootstrap bootstrap(/*rank=*/0, /*size=*/4);
  const NcclUniqueId id = unique_id_filled_with('x');
  EXPECT_CALL(*api_, get_unique_id()).WillOnce(Return(id));
  EXPECT_CALL(*api_, comm_init_rank(4, IdIs(id), 0, Field(&NcclCommConfig::name, Eq("gpus"))))
      .WillOnce(Return(kComm));
  NcclOptions options;
  options.name = "gpus";
  auto comm = create(bootstrap, options);
  EXPECT_EQ(bootstrap.broadcast_calls, 1);
  EXPECT_EQ(bootstrap.broadcast_sent.bytes, id.bytes);
  EXPECT_EQ(bootstrap.flag_sent, 0);
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 4);
  EXPECT_EQ(comm->name(), "gpus");
}

TEST_F(NcclBootstrapTest, OtherRanksReceiveTheIdFromRankZero) {
  FakeBootstrap bootstrap(/*rank=*/2, /*size=*/3);
  bootstrap.root_id = unique_id_filled_with('z');
  EXPECT_CALL(*api_, get_unique_id()).Times(0);
  EXPECT_CALL(*api_, comm_init_rank(3, IdIs(bootstrap.root_id), 2, _)).WillOnce(Return(kComm));
  auto comm = create(bootstrap);
  EXPECT_EQ(bootstrap.broadcast_calls, 1);
  EXPECT_EQ(comm->rank(), 2);
}

TEST_F(NcclBootstrapTest, InitializesNonBlockingOnTheLocalRanksDevice) {
  FakeBootstrap bootstrap(1, 2);
  EXPECT_CALL(*api_, comm_init_rank(2, _, 1, Field(&NcclCommConfig::blocking, false)))
      .WillOnce([this](int, const NcclUniqueId&, int, const NcclCommConfig&) {
        EXPECT_EQ(api_->current_device.load(), 1);  // NCCL binds the current device
        return kComm;
      });
  auto comm = create(bootstrap, {}, /*local_rank=*/1);
  EXPECT_EQ(std::dynamic_pointer_cast<detail::NcclCommunicator>(comm)->device(), 1);
  EXPECT_EQ(api_->current_device.load(), 0) << "the caller's device is restored";
}

TEST_F(NcclBootstrapTest, AnExplicitDeviceOverridesTheLocalRank) {
  FakeBootstrap bootstrap(0, 1);
  NcclOptions options;
  options.device = 0;
  auto comm = create(bootstrap, options, /*local_rank=*/1);
  EXPECT_EQ(std::dynamic_pointer_cast<detail::NcclCommunicator>(comm)->device(), 0);
}

TEST_F(NcclBootstrapTest, NoDeviceSaysToUseTheCpuAndTellsTheOtherRanks) {
  FakeBootstrap bootstrap(0, 2);
  EXPECT_CALL(*api_, device_count())
      .WillOnce(Throw(CommError(
          "cudaGetDeviceCount failed: CUDA driver version is insufficient for CUDA runtime "
          "version (cudaErrorInsufficientDriver)")));
  EXPECT_CALL(*api_, comm_init_rank(_, _, _, _)).Times(0);
  try {
    create(bootstrap);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "no CUDA device visible");
    EXPECT_MESSAGE_HAS(e.what(), "--device cpu");
    EXPECT_MESSAGE_HAS(e.what(), "cudaErrorInsufficientDriver");
  }
  EXPECT_EQ(bootstrap.flag_sent, 1) << "the other ranks must learn that this one failed";
  EXPECT_EQ(bootstrap.broadcast_calls, 0);
}

TEST_F(NcclBootstrapTest, ZeroDevicesGiveTheSameGuidance) {
  FakeBootstrap bootstrap(0, 1);
  EXPECT_CALL(*api_, device_count()).WillOnce(Return(0));
  try {
    create(bootstrap);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "no CUDA device visible");
  }
}

TEST_F(NcclBootstrapTest, MoreLocalRanksThanGpusIsAnArgumentError) {
  FakeBootstrap bootstrap(0, 8);
  try {
    create(bootstrap, {}, /*local_rank=*/3);  // 2 devices
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "local rank 3");
    EXPECT_MESSAGE_HAS(e.what(), "NcclOptions::device");
  }
  NcclOptions options;
  options.device = 5;
  EXPECT_THROW(create(bootstrap, options), InvalidArgument);
}

TEST_F(NcclBootstrapTest, AnotherRanksFailureEndsEveryRankWithoutInitializing) {
  FakeBootstrap bootstrap(1, 2);
  bootstrap.another_rank_failed = true;
  EXPECT_CALL(*api_, comm_init_rank(_, _, _, _)).Times(0);
  try {
    create(bootstrap);
    FAIL() << "expected CommError";
  } catch (const CommError& e) {
    EXPECT_MESSAGE_HAS(e.what(), "another rank of 'bootstrap'");
  }
  EXPECT_EQ(bootstrap.flag_sent, 0);
  EXPECT_EQ(bootstrap.broadcast_calls, 0);
}

TEST_F(NcclBootstrapTest, InitializationThatNeverSettlesTimesOutAndAborts) {
  FakeBootstrap bootstrap(0, 2);
  ON_CALL(*api_, comm_check_async_error(kComm)).WillByDefault(Return(true));  // in progress
  EXPECT_CALL(*api_, comm_abort(kComm)).Times(1);
  NcclOptions options;
  options.timeout = Timeout(30);
  try {
    create(bootstrap, options);
    FAIL() << "expected TimeoutError";
  } catch (const TimeoutError& e) {
    EXPECT_MESSAGE_HAS(e.what(), "did not complete within 30 ms");
    EXPECT_MESSAGE_HAS(e.what(), "'world'");
  }
}

TEST_F(NcclBootstrapTest, AnAsynchronousInitErrorAbortsAndCarriesNcclsMessage) {
  FakeBootstrap bootstrap(0, 2);
  EXPECT_CALL(*api_, comm_check_async_error(kComm))
      .WillOnce(Throw(detail::nccl_error(2, "NCCL communicator", "socket connect refused")));
  EXPECT_CALL(*api_, comm_abort(kComm)).Times(1);
  try {
    create(bootstrap);
    FAIL() << "expected CommError";
  } catch (const CommError& e) {
    EXPECT_MESSAGE_HAS(e.what(), "socket connect refused");
  }
}

TEST_F(NcclBootstrapTest, RingOrTreeIsHandedToNcclThroughNcclAlgoDuringInit) {
  FakeBootstrap bootstrap(0, 2);
  EXPECT_CALL(*api_, comm_init_rank(_, _, _, _))
      .WillOnce([](int, const NcclUniqueId&, int, const NcclCommConfig&) {
        const char* algo = std::getenv("NCCL_ALGO");
        EXPECT_STREQ(algo, "allreduce:tree");
        return kComm;
      });
  NcclOptions options;
  options.algorithm = Algorithm::kTree;
  auto comm = create(bootstrap, options);
  EXPECT_EQ(std::getenv("NCCL_ALGO"), nullptr) << "restored after init";
  EXPECT_EQ(comm->options().allreduce_algorithm, Algorithm::kTree);
}

TEST_F(NcclBootstrapTest, AutoLeavesTheEnvironmentAlone) {
  FakeBootstrap bootstrap(0, 1);
  setenv("NCCL_ALGO", "Ring", 1);
  EXPECT_CALL(*api_, comm_init_rank(_, _, _, _))
      .WillOnce([](int, const NcclUniqueId&, int, const NcclCommConfig&) {
        EXPECT_STREQ(std::getenv("NCCL_ALGO"), "Ring");
        return kComm;
      });
  create(bootstrap);
  EXPECT_STREQ(std::getenv("NCCL_ALGO"), "Ring");
}

TEST_F(NcclBootstrapTest, AnAlgorithmThatConflictsWithNcclAlgoOrAnOldNcclIsRejected) {
  FakeBootstrap bootstrap(0, 1);
  NcclOptions options;
  options.algorithm = Algorithm::kRing;
  setenv("NCCL_ALGO", "Tree", 1);
  try {
    create(bootstrap, options);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "NCCL_ALGO='Tree'");
  }
  unsetenv("NCCL_ALGO");
  EXPECT_CALL(*api_, nccl_version()).WillRepeatedly(Return(22304));
  EXPECT_CALL(*api_, nccl_header_version()).WillRepeatedly(Return(22304));
  try {
    create(bootstrap, options);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "needs NCCL >= 2.24");
  }
}

// Seen on a GPU machine with a system libnccl beside PyTorch's wheel: dtrain
// compiled against one nccl.h and loaded another release's library, and
// ncclCommSplit overran a stack-allocated ncclConfig_t.
TEST_F(NcclBootstrapTest, ALibraryOfAnotherReleaseThanTheHeaderIsRejectedOnEveryRank) {
  FakeBootstrap bootstrap(0, 2);
  EXPECT_CALL(*api_, nccl_header_version()).WillRepeatedly(Return(22703));
  EXPECT_CALL(*api_, nccl_version()).WillRepeatedly(Return(22809));
  EXPECT_CALL(*api_, comm_init_rank(_, _, _, _)).Times(0);
  try {
    create(bootstrap);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "compiled against NCCL 2.27.3");
    EXPECT_MESSAGE_HAS(e.what(), "loaded libnccl 2.28.9");
  }
  EXPECT_EQ(bootstrap.flag_sent, 1) << "the other ranks must learn that this one failed";
  // Another patch release of the same NCCL is fine.
  EXPECT_CALL(*api_, nccl_version()).WillRepeatedly(Return(22707));
  EXPECT_CALL(*api_, comm_init_rank(_, _, _, _)).WillOnce(Return(kComm));
  EXPECT_NO_THROW(create(bootstrap));
}

TEST(NcclOptionsTest, ValidateRejectsNonsense) {
  NcclOptions options;
  EXPECT_NO_THROW(options.validate());
  options.algorithm = Algorithm::kRhd;
  EXPECT_THROW(options.validate(), InvalidArgument);
  options = NcclOptions{};
  options.algorithm = Algorithm::kNative;
  EXPECT_THROW(options.validate(), InvalidArgument);
  options = NcclOptions{};
  options.timeout = Timeout(0);
  EXPECT_THROW(options.validate(), InvalidArgument);
  options = NcclOptions{};
  options.name = "";
  EXPECT_THROW(options.validate(), InvalidArgument);
  options = NcclOptions{};
  options.device = -2;
  EXPECT_THROW(options.validate(), InvalidArgument);
}

TEST(NcclErrorMappingTest, NcclStatusBecomesCommErrorWithNcclsOwnText) {
  // 4 is ncclInvalidArgument; the text comes from ncclGetErrorString.
  const CommError error = detail::nccl_error(4, "ncclAllReduce", "count overflow");
  EXPECT_MESSAGE_HAS(error.what(), "ncclAllReduce failed: invalid argument");
  EXPECT_MESSAGE_HAS(error.what(), "count overflow");
  // 6 is ncclRemoteError.
  EXPECT_MESSAGE_HAS(detail::nccl_error(6, "ncclCommInitRankConfig").what(), "remote");
}

TEST(NcclErrorMappingTest, CudaStatusBecomesCommErrorWithCudasOwnText) {
  // 1 is cudaErrorInvalidValue; the text comes from cudaGetErrorString.
  const CommError error = detail::cuda_error(1, "cudaStreamWaitEvent");
  EXPECT_MESSAGE_HAS(error.what(), "cudaStreamWaitEvent failed: invalid argument");
  EXPECT_MESSAGE_HAS(error.what(), "cudaErrorInvalidValue");
}

// The real CUDA runtime, on a machine without a GPU (or driver): the public
// entry points must say so plainly instead of crashing.
TEST(NcclWithoutGpuTest, RealRuntimeReportsNoDeviceWithGuidance) {
  const int devices = visible_cuda_device_count();
  if (devices > 0) GTEST_SKIP() << "this machine has " << devices << " CUDA device(s)";
  FakeBootstrap bootstrap(0, 1);
  try {
    make_nccl_communicator(bootstrap);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_MESSAGE_HAS(e.what(), "no CUDA device visible");
    EXPECT_MESSAGE_HAS(e.what(), "--device cpu");
  }
}

}  // namespace
}  // namespace dtrain::collectives::testing
