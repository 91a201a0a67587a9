#include "dtrain/runtime.h"

#include <mpi.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "dtrain/collectives/communicator.h"
#include "dtrain/env.h"
#include "dtrain/error.h"
#include "src/collectives/mpi/mpi_communicator.h"
#include "src/collectives/mpi/mpi_error.h"

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
    int initialized = 0;
    DTRAIN_MPI_CHECK(MPI_Initialized(&initialized));
    int provided = MPI_THREAD_SINGLE;
    if (initialized) {
      DTRAIN_MPI_CHECK(MPI_Query_thread(&provided));
    } else {
      // Open MPI's shared-memory single-copy (CMA) path writes a longer
      // message past a shorter receive buffer instead of truncating it (seen
      // as heap corruption when ranks passed tensors of different sizes, in
      // 4.1 and in 5.0); its copy-in/copy-out path truncates and reports
      // MPI_ERR_TRUNCATE. Use the latter unless the user chose otherwise:
      // 4.x turns single copy off in its `vader` BTL, 5.x, where single copy
      // is a framework of its own (`smsc`), by excluding its components.
      // Each version ignores the other's variable.
      setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", /*overwrite=*/0);
      setenv("OMPI_MCA_smsc", "^cma,knem,xpmem", /*overwrite=*/0);
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
  } catch (...) {
    if (owns_mpi_) MPI_Finalize();
    g_runtime_alive.store(false);
    throw;
  }
}

Runtime::~Runtime() {
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
  return collectives::detail::make_mpi_communicator(comm, std::move(options));
}

void Runtime::abort_job(int exit_code, std::string_view reason) noexcept {
  int rank = -1;
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "[dtrain rank %d] aborting the job: %.*s\n", rank,
               static_cast<int>(reason.size()), reason.data());
  std::fflush(stderr);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, exit_code == 0 ? 1 : exit_code);
  std::_Exit(exit_code == 0 ? 1 : exit_code);
}

}  // namespace dtrain
