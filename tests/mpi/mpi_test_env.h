#pragma once
// Shared by the mpi-labelled test binaries (see mpi_test_main.cpp).

#include <memory>

#include "dtrain/collectives/communicator.h"
#include "dtrain/runtime.h"

namespace dtrain::testing {

/// The process's Runtime, created by the shared MPI test main.
Runtime& runtime();

/// A world communicator shared by the tests of this binary (60 s timeout).
/// Tests that break a communicator on purpose create their own.
collectives::Communicator& world();

}  // namespace dtrain::testing
