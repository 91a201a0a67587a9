// Pure logic without communication: grid rank math, option validation,
// environment overrides, launcher detection, Work.

#include <gtest/gtest.h>
#include <malloc.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <set>
#include <thread>
#include <vector>

#include "dtrain/collectives/process_grid.h"
#include "dtrain/collectives/types.h"
#include "dtrain/collectives/work.h"
#include "dtrain/env.h"
#include "dtrain/error.h"
#include "dtrain/runtime.h"

namespace dtrain::collectives {
namespace {

TEST(GridShapeTest, FactorizesTheWorld) {
  const GridShape shape = GridShape::from_world(16, /*tp=*/2, /*pp=*/2);
  EXPECT_EQ(shape.dp, 4);
  EXPECT_EQ(shape.pp, 2);
  EXPECT_EQ(shape.tp, 2);
  EXPECT_EQ(shape.world_size(), 16);
}

TEST(GridShapeTest, RejectsFactorizationsThatDoNotDivide) {
  EXPECT_THROW(GridShape::from_world(6, 4, 1), InvalidArgument);
  EXPECT_THROW(GridShape::from_world(8, 3, 1), InvalidArgument);
  EXPECT_THROW(GridShape::from_world(8, 0, 1), InvalidArgument);
  EXPECT_THROW(GridShape::from_world(8, 1, -2), InvalidArgument);
  try {
    GridShape::from_world(6, 4, 1);
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("not divisible"), std::string::npos) << e.what();
  }
}

TEST(GridCoordTest, WorkedExampleFromTheHeader) {
  const GridShape shape{4, 2, 2};
  EXPECT_EQ(grid_coord(shape, 6), (GridCoord{1, 1, 0}));
  EXPECT_EQ(grid_coord(shape, 13), (GridCoord{3, 0, 1}));
  EXPECT_EQ(grid_rank(shape, GridCoord{2, 1, 1}), 11);
}

TEST(GridCoordTest, RoundTripsAndTpIsFastest) {
  for (int tp : {1, 2, 3}) {
    for (int pp : {1, 2, 4}) {
      for (int dp : {1, 2, 3}) {
        const GridShape shape{dp, pp, tp};
        std::set<int> seen;
        for (int r = 0; r < shape.world_size(); ++r) {
          const GridCoord c = grid_coord(shape, r);
          EXPECT_EQ(grid_rank(shape, c), r);
          EXPECT_EQ(c.tp, r % tp);
          seen.insert(grid_rank(shape, c));
        }
        EXPECT_EQ(static_cast<int>(seen.size()), shape.world_size());
      }
    }
  }
  EXPECT_THROW(grid_coord(GridShape{2, 1, 1}, 2), InvalidArgument);
  EXPECT_THROW(grid_rank(GridShape{2, 1, 1}, GridCoord{0, 1, 0}), InvalidArgument);
}

TEST(OptionsTest, ParsesAlgorithmsAndRejectsUnknownOnes) {
  EXPECT_EQ(parse_algorithm("ring"), Algorithm::kRing);
  EXPECT_EQ(parse_algorithm("tree"), Algorithm::kTree);
  EXPECT_EQ(parse_algorithm("rhd"), Algorithm::kRhd);
  EXPECT_EQ(parse_algorithm("native"), Algorithm::kNative);
  EXPECT_EQ(parse_algorithm("auto"), Algorithm::kAuto);
  EXPECT_EQ(parse_algorithm("shm"), Algorithm::kShm);
  try {
    parse_algorithm("butterfly");
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("ring"), std::string::npos);
  }
}

TEST(OptionsTest, ValidateRejectsNonsense) {
  CommunicatorOptions options;
  EXPECT_NO_THROW(options.validate());
  options.timeout = Timeout(0);
  EXPECT_THROW(options.validate(), InvalidArgument);
  options = CommunicatorOptions{};
  options.chunk_bytes = 100;
  EXPECT_THROW(options.validate(), InvalidArgument);
  options = CommunicatorOptions{};
  options.name = "";
  EXPECT_THROW(options.validate(), InvalidArgument);
  options = CommunicatorOptions{};
  options.shm_slot_bytes = 1000;  // not a multiple of 64
  EXPECT_THROW(options.validate(), InvalidArgument);
  options.shm_slot_bytes = 0;  // shared memory off
  EXPECT_NO_THROW(options.validate());
}

// The message of the InvalidArgument that `call` throws ("" if none).
template <typename Call>
std::string invalid_argument_message(Call call) {
  try {
    call();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

class EnvTest : public ::testing::Test {
 protected:
  void TearDown() override {
    unsetenv("DTRAIN_ALLREDUCE_ALGO");
    unsetenv("DTRAIN_TIMEOUT_MS");
    unsetenv("DTRAIN_CHUNK_BYTES");
    unsetenv("DTRAIN_SHM_SLOT_BYTES");
  }
};

TEST_F(EnvTest, OverridesApplyOnTopOfOptions) {
  setenv("DTRAIN_ALLREDUCE_ALGO", "tree", 1);
  setenv("DTRAIN_TIMEOUT_MS", "1500", 1);
  setenv("DTRAIN_CHUNK_BYTES", "65536", 1);
  setenv("DTRAIN_SHM_SLOT_BYTES", "0", 1);
  CommunicatorOptions options;
  read_env_overrides().apply(options);
  EXPECT_EQ(options.allreduce_algorithm, Algorithm::kTree);
  EXPECT_EQ(options.timeout, Timeout(1500));
  EXPECT_EQ(options.chunk_bytes, 65536u);
  EXPECT_EQ(options.shm_slot_bytes, 0u);
}

TEST_F(EnvTest, UnsetVariablesChangeNothing) {
  CommunicatorOptions options;
  options.timeout = Timeout(123);
  read_env_overrides().apply(options);
  EXPECT_EQ(options.timeout, Timeout(123));
  EXPECT_EQ(options.allreduce_algorithm, Algorithm::kAuto);
}

TEST_F(EnvTest, MalformedValuesNameTheVariable) {
  setenv("DTRAIN_TIMEOUT_MS", "soon", 1);
  EXPECT_NE(invalid_argument_message(read_env_overrides).find("DTRAIN_TIMEOUT_MS"),
            std::string::npos);
  unsetenv("DTRAIN_TIMEOUT_MS");
  setenv("DTRAIN_ALLREDUCE_ALGO", "fast", 1);
  EXPECT_THROW(read_env_overrides(), InvalidArgument);
}

TEST_F(EnvTest, HeartbeatVariablesAndTheirLimits) {
  EXPECT_FALSE(read_heartbeat_env().interval.has_value());
  setenv("DTRAIN_HEARTBEAT_MS", "250", 1);
  setenv("DTRAIN_HEARTBEAT_TIMEOUT_MS", "2000", 1);
  const HeartbeatEnv env = read_heartbeat_env();
  EXPECT_EQ(env.interval, std::chrono::milliseconds(250));
  EXPECT_EQ(env.timeout, std::chrono::milliseconds(2000));
  setenv("DTRAIN_HEARTBEAT_MS", "often", 1);
  EXPECT_NE(invalid_argument_message(read_heartbeat_env).find("DTRAIN_HEARTBEAT_MS"),
            std::string::npos);
  unsetenv("DTRAIN_HEARTBEAT_MS");
  unsetenv("DTRAIN_HEARTBEAT_TIMEOUT_MS");

  HeartbeatOptions options;
  EXPECT_NO_THROW(options.validate());
  options.timeout = options.interval;  // a single late datagram would end the job
  EXPECT_NE(invalid_argument_message([&] { options.validate(); }).find("at least twice"),
            std::string::npos);
  options.interval = std::chrono::milliseconds(0);  // off: the timeout does not matter
  EXPECT_NO_THROW(options.validate());
}

// The trainer's variables: the attempt number and the faults a test asks for.
class RunEnvTest : public ::testing::Test {
 protected:
  void SetUp() override { clear(); }
  void TearDown() override { clear(); }
  static void clear() {
    for (const char* v : {"DTRAIN_RESTART_COUNT", "DTRAIN_FAULT_CHECKPOINT", "DTRAIN_FAULT_KILL",
                          "DTRAIN_FAULT_FILE_LIMIT_KIB"}) {
      unsetenv(v);
    }
  }
};

TEST_F(RunEnvTest, RestartCountIsZeroUnlessTheLauncherSaysOtherwise) {
  EXPECT_EQ(read_restart_count(), 0);
  setenv("DTRAIN_RESTART_COUNT", "2", 1);
  EXPECT_EQ(read_restart_count(), 2);
  setenv("DTRAIN_RESTART_COUNT", "again", 1);
  EXPECT_NE(invalid_argument_message(read_restart_count).find("DTRAIN_RESTART_COUNT='again'"),
            std::string::npos);
}

TEST_F(RunEnvTest, FaultVariablesParseOrNameTheirForm) {
  FaultInjectionEnv none = read_fault_injection_env();
  EXPECT_FALSE(none.checkpoint || none.kill || none.file_limit_kib);

  setenv("DTRAIN_FAULT_CHECKPOINT", "before_rename:8:1", 1);
  setenv("DTRAIN_FAULT_KILL", "3:6:always", 1);
  setenv("DTRAIN_FAULT_FILE_LIMIT_KIB", "256", 1);
  FaultInjectionEnv env = read_fault_injection_env();
  ASSERT_TRUE(env.checkpoint && env.kill && env.file_limit_kib);
  EXPECT_EQ(env.checkpoint->phase, "before_rename");
  EXPECT_EQ(env.checkpoint->step, 8);
  EXPECT_EQ(env.checkpoint->rank, 1);
  EXPECT_EQ(env.kill->rank, 3);
  EXPECT_EQ(env.kill->step, 6);
  EXPECT_TRUE(env.kill->every_attempt);
  EXPECT_EQ(*env.file_limit_kib, 256u);
  EXPECT_FALSE(env.checkpoint->stall);
  setenv("DTRAIN_FAULT_KILL", "1:6", 1);
  EXPECT_FALSE(read_fault_injection_env().kill->every_attempt);
  setenv("DTRAIN_FAULT_CHECKPOINT", "after_write:8:1:stall", 1);
  EXPECT_TRUE(read_fault_injection_env().checkpoint->stall);

  for (const auto& [name, value] : std::vector<std::pair<const char*, const char*>>{
           {"DTRAIN_FAULT_KILL", "1"},
           {"DTRAIN_FAULT_KILL", "1:6:sometimes"},
           {"DTRAIN_FAULT_KILL", "one:6"},
           {"DTRAIN_FAULT_CHECKPOINT", "after_write:8"},
           {"DTRAIN_FAULT_CHECKPOINT", "after_write:eight:0"},
           {"DTRAIN_FAULT_CHECKPOINT", "after_write:8:0:wait"},
           {"DTRAIN_FAULT_FILE_LIMIT_KIB", "0"}}) {
    clear();
    setenv(name, value, 1);
    const std::string message = invalid_argument_message(read_fault_injection_env);
    EXPECT_NE(message.find(std::string(name) + "='" + value + "'"), std::string::npos)
        << name << "=" << value << ": " << message;
  }
}

TEST(ScopedEnvSettingTest, RestoresThePreviousValueOrUnsets) {
  unsetenv("DTRAIN_TEST_SCOPED");
  {
    ScopedEnvSetting setting("DTRAIN_TEST_SCOPED", "inner");
    EXPECT_STREQ(std::getenv("DTRAIN_TEST_SCOPED"), "inner");
  }
  EXPECT_EQ(std::getenv("DTRAIN_TEST_SCOPED"), nullptr);
  setenv("DTRAIN_TEST_SCOPED", "outer", 1);
  {
    ScopedEnvSetting setting("DTRAIN_TEST_SCOPED", "inner");
    EXPECT_STREQ(std::getenv("DTRAIN_TEST_SCOPED"), "inner");
  }
  EXPECT_STREQ(std::getenv("DTRAIN_TEST_SCOPED"), "outer");
  EXPECT_FALSE(set_env_default("DTRAIN_TEST_SCOPED", "default"));
  EXPECT_STREQ(std::getenv("DTRAIN_TEST_SCOPED"), "outer");
  unsetenv("DTRAIN_TEST_SCOPED");
  EXPECT_TRUE(set_env_default("DTRAIN_TEST_SCOPED", "default"));
  EXPECT_STREQ(std::getenv("DTRAIN_TEST_SCOPED"), "default");
  unsetenv("DTRAIN_TEST_SCOPED");
}

class MallocPolicyTest : public ::testing::Test {
 protected:
  // The user's own malloc settings would make the policy step aside.
  void SetUp() override { clear(); }
  void TearDown() override { clear(); }
  static void clear() {
    for (const char* name :
         {"DTRAIN_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
          "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"}) {
      unsetenv(name);
    }
  }
};

TEST_F(MallocPolicyTest, TunesByDefaultAndStepsAsideForTheUsersSettings) {
  MallocPolicy policy = plan_malloc_policy();
  EXPECT_TRUE(policy.tune) << policy.reason;
  EXPECT_EQ(policy.mmap_threshold, std::size_t{32} << 20);
  EXPECT_GE(policy.trim_threshold, policy.mmap_threshold);

  setenv("DTRAIN_MALLOC_TUNING", "0", 1);
  policy = plan_malloc_policy();
  EXPECT_FALSE(policy.tune);
  EXPECT_NE(policy.reason.find("DTRAIN_MALLOC_TUNING=0"), std::string::npos);
  setenv("DTRAIN_MALLOC_TUNING", "1", 1);
  EXPECT_TRUE(plan_malloc_policy().tune);

  setenv("MALLOC_TRIM_THRESHOLD_", "1000000", 1);
  policy = plan_malloc_policy();
  EXPECT_FALSE(policy.tune);
  EXPECT_NE(policy.reason.find("MALLOC_TRIM_THRESHOLD_"), std::string::npos);
  unsetenv("MALLOC_TRIM_THRESHOLD_");

  setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536", 1);
  EXPECT_FALSE(plan_malloc_policy().tune);
  setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0", 1);  // not malloc's: still ours
  EXPECT_TRUE(plan_malloc_policy().tune);
}

TEST_F(MallocPolicyTest, MalformedSwitchNamesTheVariable) {
  setenv("DTRAIN_MALLOC_TUNING", "yes", 1);
  EXPECT_NE(invalid_argument_message(plan_malloc_policy).find("DTRAIN_MALLOC_TUNING='yes'"),
            std::string::npos);
}

// Minor page faults of the last `tail` of `steps` training-like steps (16
// blocks of 1-4 MiB allocated, written, freed), in a forked child that starts
// from glibc's initial 128 KiB thresholds and then applies the policy if
// `tune`. The child's own heap keeps the parent's state out of the count.
long faults_in_steady_state(bool tune) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    mallopt(M_MMAP_THRESHOLD, 128 << 10);
    mallopt(M_TRIM_THRESHOLD, 128 << 10);
    if (tune) apply_malloc_policy(plan_malloc_policy());
    constexpr int kSteps = 10, kTail = 3;
    long faults = 0;
    for (int step = 0; step < kSteps; ++step) {
      rusage before{}, after{};
      getrusage(RUSAGE_SELF, &before);
      std::vector<void*> blocks;
      for (int i = 0; i < 16; ++i) {
        const std::size_t bytes = (std::size_t{1} << 20) * (1 + i % 4);
        void* block = nullptr;
        if (posix_memalign(&block, 64, bytes) != 0) _exit(2);
        std::memset(block, 1, bytes);
        blocks.push_back(block);
      }
      for (void* block : blocks) free(block);
      getrusage(RUSAGE_SELF, &after);
      if (step >= kSteps - kTail) faults += after.ru_minflt - before.ru_minflt;
    }
    const bool written = write(fds[1], &faults, sizeof faults) == sizeof faults;
    _exit(written ? 0 : 3);
  }
  close(fds[1]);
  long faults = -1;
  if (pid < 0 || read(fds[0], &faults, sizeof faults) != sizeof faults) faults = -1;
  close(fds[0]);
  int status = 0;
  if (pid > 0) waitpid(pid, &status, 0);
  return faults;
}

TEST_F(MallocPolicyTest, StepsStopFaultingInTheirMemory) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizer's allocator replaces glibc malloc";
#endif
  const long untuned = faults_in_steady_state(false);
  const long tuned = faults_in_steady_state(true);
  ASSERT_GE(untuned, 0);
  ASSERT_GE(tuned, 0);
  // 3 steps of 40 MiB: ~30,000 faults when every step's memory goes back.
  if (untuned < 1000) GTEST_SKIP() << "this C library keeps the memory anyway (" << untuned << ")";
  EXPECT_LT(tuned, untuned / 20) << "untuned " << untuned;
}

TEST(LaunchTest, ReadsOpenMpiAndSlurmVariables) {
  setenv("SLURM_PROCID", "3", 1);
  setenv("SLURM_NTASKS", "8", 1);
  setenv("SLURM_LOCALID", "1", 1);
  unsetenv("OMPI_COMM_WORLD_RANK");
  unsetenv("PMIX_RANK");
  unsetenv("PMI_RANK");
  LaunchInfo info = detect_launch();
  EXPECT_EQ(info.launcher, "slurm");
  EXPECT_EQ(info.rank, 3);
  EXPECT_EQ(info.size, 8);
  EXPECT_EQ(info.local_rank, 1);
  setenv("OMPI_COMM_WORLD_RANK", "5", 1);
  setenv("OMPI_COMM_WORLD_SIZE", "6", 1);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "2", 1);
  setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "3", 1);
  info = detect_launch();
  EXPECT_EQ(info.launcher, "openmpi");
  EXPECT_EQ(info.rank, 5);
  EXPECT_EQ(info.size, 6);
  EXPECT_EQ(info.local_rank, 2);
  for (const char* v :
       {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"}) {
    unsetenv(v);
  }
  EXPECT_EQ(detect_launch().launcher, "none");
}

TEST(WorkTest, WaitRethrowsTheOpsError) {
  Work work("test op");
  EXPECT_FALSE(work.is_completed());
  std::thread finisher([&] { work.complete(std::make_exception_ptr(CommError("peer vanished"))); });
  EXPECT_THROW(work.wait(), CommError);
  finisher.join();
  EXPECT_TRUE(work.is_completed());
}

TEST(WorkTest, WaitWithTimeoutThrowsWhileTheOpRuns) {
  Work work("slow op");
  EXPECT_THROW(work.wait(Timeout(20)), TimeoutError);
  work.complete();
  EXPECT_NO_THROW(work.wait(Timeout(20)));
}

}  // namespace
}  // namespace dtrain::collectives
