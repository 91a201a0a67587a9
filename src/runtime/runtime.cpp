#include "dtrain/runtime.h"

#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "dtrain/collectives/communicator.h"
#include "dtrain/env.h"
#include "dtrain/error.h"
#include "src/collectives/mpi/mpi_communicator.h"
#include "src/collectives/mpi/mpi_error.h"
#include "src/runtime/heartbeat.h"

namespace dtrain {
namespace {

// Guards the one-Runtime-per-process rule (MPI can be initialized once).
std::atomic<bool> g_runtime_alive{false};

int env_int(const char* name, int fallback) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return fallback;
  char* end = nullptr;
  const long value = std::strtol(raw, &end, 10);
  return (end != raw && *end == '\0' && value >= 0) ? static_cast<int>(value) : fallback;
}

bool has_env(const char* name) { return std::getenv(name) != nullptr; }

}  // namespace

LaunchInfo detect_launch() {
  LaunchInfo info;
  if (has_env("OMPI_COMM_WORLD_RANK")) {
    info.launcher = "openmpi";
    info.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    info.size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    info.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    info.local_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1);
  } else if (has_env("PMIX_RANK") || has_env("PMI_RANK")) {
    info.launcher = "pmi";
    info.rank = env_int("PMIX_RANK", env_int("PMI_RANK", 0));
    info.size = env_int("PMI_SIZE", env_int("SLURM_NTASKS", 1));
    info.local_rank = env_int("MPI_LOCALRANKID", env_int("SLURM_LOCALID", 0));
    info.local_size = env_int("MPI_LOCALNRANKS", env_int("SLURM_NTASKS_PER_NODE", 1));
  } else if (has_env("SLURM_PROCID")) {
    info.launcher = "slurm";
    info.rank = env_int("SLURM_PROCID", 0);
    info.size = env_int("SLURM_NTASKS", 1);
    info.local_rank = env_int("SLURM_LOCALID", 0);
    info.local_size = env_int("SLURM_NTASKS_PER_NODE", 1);
  }
  if (info.size < 1) info.size = 1;
  if (info.local_size < 1) info.local_size = 1;
  return info;
}

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
    int initialized = 0;
    DTRAIN_MPI_CHECK(MPI_Initialized(&initialized));
    int provided = MPI_THREAD_SINGLE;
    if (initialized) {
      DTRAIN_MPI_CHECK(MPI_Query_thread(&provided));
    } else {
      // Open MPI 4.1's shared-memory single-copy (CMA) path writes a longer
      // message past a shorter receive buffer instead of truncating it (seen
      // as heap corruption when ranks passed tensors of different sizes);
      // its copy-in/copy-out path truncates and reports MPI_ERR_TRUNCATE.
      // Use the latter unless the user chose otherwise.
      setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", /*overwrite=*/0);
      DTRAIN_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
      owns_mpi_ = true;
    }
    DTRAIN_CHECK_T(
        CommError, provided >= MPI_THREAD_MULTIPLE, "the MPI library provides thread level ",
        provided, " but dtrain needs MPI_THREAD_MULTIPLE (", MPI_THREAD_MULTIPLE,
        "): each communicator runs its ops on a thread of its own. Use an MPI built "
        "with thread support (Open MPI: check `ompi_info | grep 'Thread support'`)",
        initialized ? ", and initialize it with MPI_Init_thread(MPI_THREAD_MULTIPLE)" : "");
    DTRAIN_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
    DTRAIN_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_));
    heartbeat_ = std::make_unique<detail::Heartbeat>(MPI_COMM_WORLD, heartbeat_options_);
  } catch (...) {
    heartbeat_.reset();
    if (owns_mpi_) MPI_Finalize();
    g_runtime_alive.store(false);
    throw;
  }
}

Runtime::~Runtime() {
  heartbeat_.reset();  // says goodbye: the neighbours stop watching this rank
  if (owns_mpi_) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
  g_runtime_alive.store(false);
}

std::shared_ptr<collectives::Communicator> Runtime::world(
    collectives::CommunicatorOptions options) {
  read_env_overrides().apply(options);
  options.validate();
  // MPI_Comm_dup blocks without a timeout: first make sure everyone is here.
  collectives::detail::rendezvous(MPI_COMM_WORLD, options.timeout, "Runtime::world");
  MPI_Comm comm = MPI_COMM_NULL;
  DTRAIN_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm));
  return collectives::detail::make_mpi_communicator(comm, std::move(options),
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
  int rank = -1;
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "[dtrain rank %d] aborting the job: %.*s\n", rank,
               static_cast<int>(reason.size()), reason.data());
  std::fflush(stderr);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace dtrain
