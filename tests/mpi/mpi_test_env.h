#pragma once
// Shared by the mpi-labelled test binaries (see mpi_test_main.cpp).

#include <cstddef>
#include <memory>

#include "dtrain/collectives/communicator.h"
#include "dtrain/runtime.h"

namespace dtrain::testing {

/// The process's Runtime, created by the shared MPI test main.
Runtime& runtime();

/// A world communicator shared by the tests of this binary (60 s timeout).
/// Tests that break a communicator on purpose create their own.
collectives::Communicator& world();

/// Size of the "large" messages of the collective tests: 16 MiB, or
/// `--large-bytes=N` on the command line (the namespace cluster's run uses
/// 1 MiB: past the TCP eager limit, in a fraction of the time).
std::size_t large_message_bytes();

}  // namespace dtrain::testing
