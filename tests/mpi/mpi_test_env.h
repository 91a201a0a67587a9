#pragma once
// Shared by the mpi-labelled test binaries (see mpi_test_main.cpp).

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

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

/// A new world communicator of its own name and timeout, for tests that need
/// their own (one that may fail, or other options).
std::shared_ptr<collectives::Communicator> fresh_world(
    const std::string& name, collectives::Timeout timeout = std::chrono::seconds(60));

/// A new, empty temporary directory with the same path on every rank of
/// `comm` (rank 0 makes it), named `<prefix>-XXXXXX`.
std::string shared_temp_dir(collectives::Communicator& comm, const std::string& prefix);

}  // namespace dtrain::testing
