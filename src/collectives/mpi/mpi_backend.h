#pragma once
// What the runtime takes from the MPI backend: MPI's lifetime in this
// process, and communicators over the whole job. dtrain::Runtime includes
// this header and no other of the backend, and makes no MPI call of its
// own; the backend includes nothing of the runtime. Dependencies point one
// way: runtime -> collectives (this backend) -> env, types, errors.
//
// No <mpi.h> here: MPI's types stay inside the backend.

#include <cstddef>
#include <memory>

#include "dtrain/collectives/communicator.h"
#include "src/collectives/peer_health.h"

namespace dtrain::collectives::detail {

/// What initialize_mpi() found or did.
struct MpiProcess {
  /// MPI was initialized by this call, so finalize_mpi() is the caller's.
  bool initialized_here = false;
  int rank = 0;  ///< in MPI_COMM_WORLD
  int size = 1;
};

/// Initializes MPI with MPI_THREAD_MULTIPLE (each communicator runs its ops
/// on a thread of its own), and sets MPI_ERRORS_RETURN on MPI_COMM_WORLD so
/// that a failed call becomes a CommError with MPI's message instead of an
/// abort; or, if the application initialized MPI already, checks its thread
/// level and leaves its error handler alone. Throws CommError if MPI cannot
/// provide that level or a call fails. Not thread-safe; once per process.
MpiProcess initialize_mpi(int* argc, char*** argv);

/// MPI_Finalize, unless MPI is already finalized. Never throws.
void finalize_mpi() noexcept;

/// A new communicator over every process of the job (a duplicate of
/// MPI_COMM_WORLD). Collective: every process calls it, in the same order;
/// throws TimeoutError if not all arrive within options.timeout. `options`
/// are used as given (validated). `health` (the job's heartbeat; may be
/// null): once it has failed, every op of the communicator ends with a
/// CommError naming the lost ranks.
std::shared_ptr<Communicator> make_world_communicator(
    CommunicatorOptions options, std::shared_ptr<const PeerHealth> health = nullptr);

/// Every process's `bytes` bytes at `mine`, gathered into `all` (size *
/// bytes, in rank order) on every process, over MPI_COMM_WORLD. Collective;
/// blocks without a timeout. Throws CommError naming `what` when MPI fails.
void world_all_gather(const void* mine, std::size_t bytes, void* all, const char* what);

/// This process's rank in MPI_COMM_WORLD, or -1 when MPI is not running.
/// Never throws.
int world_rank_if_running() noexcept;

/// Ends the whole job with `exit_code` (MPI_Abort on MPI_COMM_WORLD) when
/// MPI is running; returns otherwise, for the caller to exit.
void abort_world(int exit_code) noexcept;

}  // namespace dtrain::collectives::detail
