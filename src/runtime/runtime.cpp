// Runtime: the allocator policy, then MPI's lifetime and the world
// communicators, through the MPI backend's entry points (mpi_backend.h).
// The runtime sits on top of collectives: nothing below includes it.

#include "dtrain/runtime.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "dtrain/collectives/communicator.h"
#include "dtrain/env.h"
#include "dtrain/error.h"
#include "src/collectives/mpi/mpi_backend.h"

namespace dtrain {
namespace {

// Guards the one-Runtime-per-process rule (MPI can be initialized once).
std::atomic<bool> g_runtime_alive{false};

}  // namespace

Runtime::Runtime(int* argc, char*** argv) : launch_(detect_launch()) {
  bool expected = false;
  DTRAIN_CHECK_ARG(
      g_runtime_alive.compare_exchange_strong(expected, true),
      "a dtrain::Runtime already exists in this process; create exactly one in main()");
  try {
    malloc_policy_ = plan_malloc_policy();
    if (!apply_malloc_policy(malloc_policy_)) {
      std::fprintf(stderr, "[dtrain rank %d] warning: could not set malloc's thresholds (%s)\n",
                   launch_.rank, malloc_policy_.reason.c_str());
      malloc_policy_.tune = false;
      malloc_policy_.reason = "mallopt refused";
    }
    const collectives::detail::MpiProcess mpi = collectives::detail::initialize_mpi(argc, argv);
    owns_mpi_ = mpi.initialized_here;
    rank_ = mpi.rank;
    size_ = mpi.size;
  } catch (...) {
    g_runtime_alive.store(false);
    throw;
  }
}

Runtime::~Runtime() {
  if (owns_mpi_) collectives::detail::finalize_mpi();
  g_runtime_alive.store(false);
}

std::shared_ptr<collectives::Communicator> Runtime::world(
    collectives::CommunicatorOptions options) {
  read_env_overrides().apply(options);
  return collectives::detail::make_world_communicator(std::move(options));
}

void Runtime::abort_job(int exit_code, std::string_view reason) noexcept {
  const int rank = collectives::detail::world_rank_if_running();
  std::fprintf(stderr, "[dtrain rank %d] aborting the job: %.*s\n", rank,
               static_cast<int>(reason.size()), reason.data());
  std::fflush(stderr);
  const int code = exit_code == 0 ? 1 : exit_code;
  collectives::detail::abort_world(code);
  std::_Exit(code);
}

}  // namespace dtrain
