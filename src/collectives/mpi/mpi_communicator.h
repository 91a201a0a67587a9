#pragma once
// The MPI backend of Communicator (CPU tensors). Private: users get one from
// Runtime::world() or Communicator::split().

#include <mpi.h>

#include <memory>

#include "dtrain/collectives/communicator.h"

namespace dtrain::collectives::detail {

class PeerHealth;

/// Wraps `comm` (taken over: freed with the communicator) in a Communicator.
/// Collective over `comm`: duplicates it for point-to-point and diagnostics.
/// `health` (the job's heartbeat; may be null) ends its ops, and those of
/// the communicators split from it, once peers are lost.
std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, CommunicatorOptions options,
                                                    std::shared_ptr<const PeerHealth> health);

/// Waits for every rank of `comm` to arrive, under `timeout`; throws
/// TimeoutError naming `what` otherwise. Used before blocking MPI setup
/// calls that have no timeout of their own.
void rendezvous(MPI_Comm comm, Timeout timeout, const char* what);

}  // namespace dtrain::collectives::detail
