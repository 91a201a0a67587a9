// The one gtest main of every mpi-labelled test binary, launched by ctest
// through mpiexec. Every rank runs every test; only rank 0 prints the usual
// report, other ranks print only their failures (prefixed with the rank).
// At the end the ranks agree on the verdict: any rank's failure fails the
// run on every rank.

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "tests/mpi/mpi_test_env.h"

namespace dtrain::testing {
namespace {

Runtime* g_runtime = nullptr;
std::shared_ptr<collectives::Communicator> g_world;
std::size_t g_large_message_bytes = std::size_t{16} << 20;

// Prints failed assertions only, tagged with the rank.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 result.file_name() ? result.file_name() : "?", result.line_number(),
                 result.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
    }
  }

 private:
  int rank_;
};

}  // namespace

Runtime& runtime() { return *g_runtime; }
collectives::Communicator& world() { return *g_world; }
std::size_t large_message_bytes() { return g_large_message_bytes; }

std::shared_ptr<collectives::Communicator> fresh_world(const std::string& name,
                                                       collectives::Timeout timeout) {
  collectives::CommunicatorOptions options;
  options.name = name;
  options.timeout = timeout;
  return runtime().world(options);
}

std::string shared_temp_dir(collectives::Communicator& comm, const std::string& prefix) {
  at::Tensor text = at::zeros({512}, at::kByte);
  if (comm.rank() == 0) {
    std::string pattern = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (pattern.size() >= 512 || ::mkdtemp(pattern.data()) == nullptr) std::abort();
    std::copy(pattern.begin(), pattern.end(), text.data_ptr<std::uint8_t>());
  }
  comm.broadcast(text)->wait();
  return std::string(reinterpret_cast<const char*>(text.data_ptr<std::uint8_t>()));
}

}  // namespace dtrain::testing

int main(int argc, char** argv) {
  dtrain::Runtime runtime(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {  // what gtest left: our own flags
    const std::string arg = argv[i];
    if (arg.rfind("--large-bytes=", 0) == 0) {
      dtrain::testing::g_large_message_bytes = std::stoull(arg.substr(14));
    } else {
      std::fprintf(stderr, "unknown argument '%s' (gtest flags, or --large-bytes=N)\n", argv[i]);
      return 2;
    }
  }
  dtrain::testing::g_runtime = &runtime;
  dtrain::collectives::CommunicatorOptions options;
  options.name = "test-world";
  options.timeout = std::chrono::seconds(60);
  dtrain::testing::g_world = runtime.world(options);

  if (runtime.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new dtrain::testing::FailurePrinter(runtime.rank()));
  }
  const int local_failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int failed_ranks = 0;
  MPI_Allreduce(&local_failed, &failed_ranks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (runtime.rank() == 0 && failed_ranks > 0) {
    std::fprintf(stderr, "%d of %d ranks had failing tests\n", failed_ranks, runtime.size());
  }
  dtrain::testing::g_world.reset();
  return failed_ranks > 0 ? 1 : 0;
}
