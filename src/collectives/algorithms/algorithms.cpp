// Scratch buffers and the choice of the all-reduce algorithm (kAuto included).

#include "src/collectives/algorithms/algorithms.h"

#include <cstdlib>
#include <new>

#include "dtrain/error.h"

namespace dtrain::collectives::detail {

void Scratch::Free::operator()(void* p) const noexcept { std::free(p); }

void* Scratch::get(std::size_t bytes) {
  if (bytes <= capacity_ && data_) return data_.get();
  // Grow geometrically so a slowly growing workload reallocates O(log n) times.
  std::size_t capacity = std::max<std::size_t>(bytes, capacity_ + capacity_ / 2);
  capacity = (capacity + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, capacity);
  if (p == nullptr) throw std::bad_alloc();
  data_.reset(p);
  capacity_ = capacity;
  return p;
}

namespace {

// kAuto's crossovers: messages above these sizes go to the ring (two
// ranks, and more than two); with shared memory, kShm on 2 ranks and, on
// more, above kShmMinBytesManyRanks.
constexpr std::size_t kRingMinBytesTwoRanks = std::size_t{1} << 20;
constexpr std::size_t kRingMinBytesManyRanks = std::size_t{8} << 20;
constexpr std::size_t kShmMinBytesManyRanks = std::size_t{128} << 10;
// With ranks on several hosts, kHier above this size.
constexpr std::size_t kHierMinBytes = 0;

// Crossover measured with benchmarks/allreduce_perf on 2-core VMs (2 and 4
// ranks over Open MPI's shared-memory copy-in/copy-out transport; tables in
// docs/collectives.md): rhd (whole-vector doubling when small, halving-
// doubling above) leads while its few steps matter more than the ring's
// lower traffic: up to about 1 MiB on 2 ranks, where both move the same
// bytes, and up to about 16 MiB on 4 ranks; above that the ring leads.
// tree never led by a margin the noise of these machines could not explain.
// Where the ranks share memory, shm led on 2 ranks at every size (up to
// 4.7-7.7x MPI_Allreduce at 64 MiB); with 4 ranks on 2 cores it led from
// 256 KiB up but lost below, where waking a descheduled peer costs more
// than the few messages rhd sends.
// Across hosts (hier_ranks_per_host >= 2) hier led at every size measured
// on the namespace cluster (docs/collectives.md); kShm needs every rank on
// one host and is never chosen otherwise.
Algorithm auto_all_reduce_algorithm(std::size_t bytes, int world_size, bool shm,
                                    int hier_ranks_per_host) {
  if (world_size <= 1) return Algorithm::kRing;
  if (hier_ranks_per_host >= 2 && bytes > kHierMinBytes) return Algorithm::kHier;
  if (shm && hier_ranks_per_host == 0 && (world_size == 2 || bytes > kShmMinBytesManyRanks)) {
    return Algorithm::kShm;
  }
  const std::size_t ring_above = world_size == 2 ? kRingMinBytesTwoRanks : kRingMinBytesManyRanks;
  return bytes <= ring_above ? Algorithm::kRhd : Algorithm::kRing;
}

}  // namespace

Algorithm choose_all_reduce_algorithm(std::optional<Algorithm> requested, Algorithm configured,
                                      std::size_t bytes, int world_size, bool shm,
                                      int hier_ranks_per_host) {
  const Algorithm algorithm = requested.value_or(configured);
  if (algorithm == Algorithm::kAuto) {
    return auto_all_reduce_algorithm(bytes, world_size, shm, hier_ranks_per_host);
  }
  if (algorithm == Algorithm::kShm && !shm) return Algorithm::kRing;
  if (algorithm == Algorithm::kHier && hier_ranks_per_host < 2) return Algorithm::kRing;
  return algorithm;
}

// Reduce-scatter and all-gather have only the ring over point-to-point
// besides shm, and shm moves fewer bytes for them just as for all-reduce;
// with more ranks than cores the same wake-up cost makes small ones slower
// (tables in docs/collectives.md), so the same rule applies.
Algorithm choose_scatter_gather_algorithm(std::size_t bytes, int world_size, bool shm) {
  return auto_all_reduce_algorithm(bytes, world_size, shm, 0) == Algorithm::kShm ? Algorithm::kShm
                                                                                 : Algorithm::kRing;
}

void run_all_reduce(Algorithm algorithm, Transport& transport, void* data, std::size_t count,
                    const Reducer& reducer, Scratch& scratch, std::size_t chunk_bytes) {
  switch (algorithm) {
    case Algorithm::kRing:
      return ring_all_reduce(transport, data, count, reducer, scratch, chunk_bytes);
    case Algorithm::kTree:
      return tree_all_reduce(transport, data, count, reducer, scratch, chunk_bytes);
    case Algorithm::kRhd:
      return rhd_all_reduce(transport, data, count, reducer, scratch);
    case Algorithm::kAuto:
    case Algorithm::kNative:
    case Algorithm::kShm:
    case Algorithm::kHier:
      break;
  }
  DTRAIN_THROW(Error, "run_all_reduce: ", to_string(algorithm),
               " is not a point-to-point algorithm");
}

}  // namespace dtrain::collectives::detail
