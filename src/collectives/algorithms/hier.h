#pragma once
// Hierarchical all-reduce (Algorithm::kHier) for ranks spread over several
// hosts, each host holding the same number L >= 2 of them: what NCCL and
// Horovod do between nodes. With H hosts and Segments{count, L} (segment j
// is "slice j"):
//
//   1. inside each host, through shared memory: an all-reduce, after which
//      every local rank holds its host's sum (no message leaves the host);
//   2. between hosts, over the point-to-point transport: local rank j of
//      every host all-reduces slice j with local rank j of the other hosts
//      (L all-reduces of H ranks side by side, each over 1/L of the data,
//      by the algorithm auto picks for that size on H ranks: rhd or ring);
//   3. inside each host: a ring all-gather of the slices.
//
// Worked example, 2 hosts x 2 ranks (world ranks 0,1 on h1 and 2,3 on h2),
// 8 elements: step 1 leaves h1's sum on ranks 0 and 1 and h2's on ranks 2
// and 3; step 2 all-reduces elements 0-3 between ranks 0 and 2 and elements
// 4-7 between ranks 1 and 3; step 3 gives ranks 0 and 1 (and 2 and 3) each
// other's half. Of the message, each rank sends 2(H-1)/H / L between hosts,
// against 2(n-1)/n for a flat ring over all n = H*L ranks: the slow links
// carry L times less.
//
// Every element is reduced in a fixed order (inside its host in rank order,
// then along a fixed chain of hosts) and then copied, so every rank ends
// with the same bits, run after run.

#include <cstddef>

#include "src/collectives/algorithms/algorithms.h"
#include "src/collectives/algorithms/shm.h"

namespace dtrain::collectives::detail {

/// The three groups one rank takes part in.
struct HierLinks {
  ShmGroup& node_shm;      ///< the ranks of this host, over shared memory
  ShmWaiter& node_waiter;  ///< waits of step 1 (deadline, roll call)
  Transport& node;         ///< the ranks of this host, point-to-point (step 3)
  Transport& hosts;        ///< local rank j of every host, in host order (step 2)
};

/// In-place all-reduce of `count` elements at `data` over every rank of
/// every host. kAvg reduces as a sum; the caller divides.
void hier_all_reduce(const HierLinks& links, void* data, std::size_t count, const Reducer& reducer,
                     Scratch& scratch, std::size_t chunk_bytes);

}  // namespace dtrain::collectives::detail
