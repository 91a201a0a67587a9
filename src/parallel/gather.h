#pragma once
// Small collectives over strings and the choice of writers, shared by
// ParallelContext and CheckpointManager (which runs them on a communicator
// of its own). Private to dtrain.

#include <optional>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/collectives/process_grid.h"
#include "dtrain/parallel/parallel_context.h"

namespace dtrain::parallel::detail {

/// Collective: every rank's `mine`, in rank order.
std::vector<std::string> all_gather_strings(collectives::Communicator& comm,
                                            const std::string& mine,
                                            std::optional<collectives::Timeout> timeout = {});

/// Collective: ParallelContext::choose_writers() over `comm`, whose rank r is
/// the grid's rank r (world order) in a grid of `shape`.
std::vector<bool> choose_writers(collectives::Communicator& comm,
                                 const collectives::GridShape& shape,
                                 const std::vector<ReplicaDeclaration>& mine,
                                 std::optional<collectives::Timeout> timeout = {});

}  // namespace dtrain::parallel::detail
