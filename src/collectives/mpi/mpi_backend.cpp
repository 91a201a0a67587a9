// MPI's lifetime in the process and the world communicator (mpi_backend.h).

#include "src/collectives/mpi/mpi_backend.h"

#include <mpi.h>

#include <climits>

#include "dtrain/env.h"
#include "dtrain/error.h"
#include "src/collectives/mpi/mpi_communicator.h"
#include "src/collectives/mpi/mpi_error.h"

namespace dtrain::collectives::detail {

MpiProcess initialize_mpi(int* argc, char*** argv) {
  MpiProcess process;
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
    set_env_default("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    set_env_default("OMPI_MCA_smsc", "^cma,knem,xpmem");
    DTRAIN_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
    process.initialized_here = true;
  }
  try {
    if (process.initialized_here) {
      // MPI's default handler aborts the job on any error, before the
      // checks around the calls on MPI_COMM_WORLD (Runtime::world's
      // rendezvous and MPI_Comm_dup) can turn it into a CommError with
      // MPI's message. Every communicator dtrain creates inherits this
      // handler, and MpiCommunicator sets it again on the one it wraps. An
      // MPI the application initialized keeps the handler it chose.
      DTRAIN_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    }
    DTRAIN_CHECK_T(
        CommError, provided >= MPI_THREAD_MULTIPLE, "the MPI library provides thread level ",
        provided, " but dtrain needs MPI_THREAD_MULTIPLE (", MPI_THREAD_MULTIPLE,
        "): each communicator runs its ops on a thread of its own. Use an MPI built "
        "with thread support (Open MPI: check `ompi_info | grep 'Thread support'`)",
        initialized ? ", and initialize it with MPI_Init_thread(MPI_THREAD_MULTIPLE)" : "");
    DTRAIN_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &process.rank));
    DTRAIN_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &process.size));
  } catch (...) {
    if (process.initialized_here) MPI_Finalize();
    throw;
  }
  return process;
}

void finalize_mpi() noexcept {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

std::shared_ptr<Communicator> make_world_communicator(CommunicatorOptions options,
                                                      std::shared_ptr<const PeerHealth> health) {
  options.validate();
  // MPI_Comm_dup blocks without a timeout: first make sure everyone is here.
  rendezvous(MPI_COMM_WORLD, options.timeout, "Runtime::world");
  MPI_Comm comm = MPI_COMM_NULL;
  DTRAIN_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm));
  return make_mpi_communicator(comm, std::move(options), std::move(health));
}

void world_all_gather(const void* mine, std::size_t bytes, void* all, const char* what) {
  DTRAIN_CHECK_ARG(bytes <= static_cast<std::size_t>(INT_MAX), what, ": ", bytes,
                   " bytes exceed MPI's int count limit");
  const int count = static_cast<int>(bytes);
  const int rc = MPI_Allgather(mine, count, MPI_BYTE, all, count, MPI_BYTE, MPI_COMM_WORLD);
  if (rc != MPI_SUCCESS) throw_mpi_error(rc, "MPI_Allgather", what);
}

int world_rank_if_running() noexcept {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return -1;
  int rank = -1;
  if (MPI_Comm_rank(MPI_COMM_WORLD, &rank) != MPI_SUCCESS) return -1;
  return rank;
}

void abort_world(int exit_code) noexcept {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, exit_code);
}

}  // namespace dtrain::collectives::detail
