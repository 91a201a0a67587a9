// Hierarchical all-reduce; the algorithm is described in hier.h.

#include "src/collectives/algorithms/hier.h"

#include "dtrain/error.h"

namespace dtrain::collectives::detail {

void hier_all_reduce(const HierLinks& links, void* data, std::size_t count, const Reducer& reducer,
                     Scratch& scratch, std::size_t chunk_bytes) {
  const int local_size = links.node.size();
  const int local_rank = links.node.rank();
  DTRAIN_CHECK(links.node_shm.size() == local_size && links.node_shm.rank() == local_rank,
               "hier_all_reduce: the host's shared-memory group and transport differ");
  // 1. Inside the host: every local rank ends with the host's sum.
  shm_all_reduce(links.node_shm, data, count, reducer, links.node_waiter);
  // 2. Between hosts: slice `local_rank` with the same slice of the other hosts.
  const Segments slices{count, static_cast<std::size_t>(local_size)};
  const std::size_t es = reducer.element_size;
  char* slice = static_cast<char*>(data) + slices.begin(local_rank) * es;
  const std::size_t slice_count = slices.length(local_rank);
  const Algorithm between = choose_all_reduce_algorithm(
      std::nullopt, Algorithm::kAuto, slice_count * es, links.hosts.size(), /*shm=*/false);
  run_all_reduce(between, links.hosts, slice, slice_count, reducer, scratch, chunk_bytes);
  // 3. Inside the host: every local rank gets every slice (ring_all_gather's
  // segments are Segments{count, local_size}, the slices above).
  ring_all_gather(links.node, data, count, es, chunk_bytes);
}

}  // namespace dtrain::collectives::detail
