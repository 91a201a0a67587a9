// Runtime: the allocator policy, then MPI's lifetime and the world
// communicators, through the MPI backend's entry points (mpi_backend.h).
// The runtime sits on top of collectives: nothing below includes it.

#include "dtrain/runtime.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>

#include "dtrain/collectives/communicator.h"
#include "dtrain/env.h"
#include "dtrain/error.h"
#include "src/collectives/mpi/mpi_backend.h"
#include "src/runtime/heartbeat.h"

namespace dtrain {
namespace {

// Guards the one-Runtime-per-process rule (MPI can be initialized once).
std::atomic<bool> g_runtime_alive{false};

}  // namespace

void HeartbeatOptions::validate() const {
  DTRAIN_CHECK_ARG(interval.count() >= 0, "HeartbeatOptions::interval must be >= 0, got ",
                   interval.count(), " ms");
  DTRAIN_CHECK_ARG(interval.count() == 0 || timeout >= 2 * interval, "the heartbeat timeout (",
                   timeout.count(),
                   " ms, DTRAIN_HEARTBEAT_TIMEOUT_MS) must be at least twice its interval (",
                   interval.count(), " ms, DTRAIN_HEARTBEAT_MS)");
}

Runtime::Runtime(int* argc, char*** argv, HeartbeatOptions heartbeat)
    : launch_(detect_launch()), heartbeat_options_(heartbeat) {
  bool expected = false;
  DTRAIN_CHECK_ARG(
      g_runtime_alive.compare_exchange_strong(expected, true),
      "a dtrain::Runtime already exists in this process; create exactly one in main()");
  try {
    const HeartbeatEnv heartbeat_env = read_heartbeat_env();
    if (heartbeat_env.interval) heartbeat_options_.interval = *heartbeat_env.interval;
    if (heartbeat_env.timeout) heartbeat_options_.timeout = *heartbeat_env.timeout;
    heartbeat_options_.validate();
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
    heartbeat_ = std::make_unique<detail::Heartbeat>(rank_, size_, heartbeat_options_);
  } catch (...) {
    heartbeat_.reset();
    if (owns_mpi_) collectives::detail::finalize_mpi();
    g_runtime_alive.store(false);
    throw;
  }
}

Runtime::~Runtime() {
  heartbeat_.reset();  // says goodbye: the neighbours stop watching this rank
  if (owns_mpi_) collectives::detail::finalize_mpi();
  g_runtime_alive.store(false);
}

std::shared_ptr<collectives::Communicator> Runtime::world(
    collectives::CommunicatorOptions options) {
  read_env_overrides().apply(options);
  return collectives::detail::make_world_communicator(std::move(options),
                                                      heartbeat_ ? heartbeat_->health() : nullptr);
}

void Runtime::abort_job(int exit_code, std::string_view reason) noexcept {
  const int code = exit_code == 0 ? 1 : exit_code;
  // One abort per process: a second caller (the heartbeat's thread, say)
  // waits for the first, which ends the process.
  static std::once_flag once;
  bool first = false;
  std::call_once(once, [&] { first = true; });
  if (!first) {
    while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  // MPI_Abort asks the launcher to end every rank; a launcher that cannot
  // reach a lost host may never answer. Do not wait for it forever.
  try {
    std::thread([code] {
      std::this_thread::sleep_for(std::chrono::seconds(10));
      std::_Exit(code);
    }).detach();
  } catch (...) {  // no thread: MPI_Abort alone then
  }
  const int rank = collectives::detail::world_rank_if_running();
  std::fprintf(stderr, "[dtrain rank %d] aborting the job: %.*s\n", rank,
               static_cast<int>(reason.size()), reason.data());
  std::fflush(stderr);
  collectives::detail::abort_world(code);
  std::_Exit(code);
}

}  // namespace dtrain
