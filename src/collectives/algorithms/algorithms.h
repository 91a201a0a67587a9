#pragma once
// CPU collective algorithms over a Transport. Each takes a contiguous
// buffer, an element count and a type-erased Reducer; all are correct for any
// world size (odd, non-power-of-two) and any count (zero, smaller than or
// not divisible by the world size). All ranks must pass the same count and
// reducer. Scratch memory comes from a Scratch that the caller keeps across
// calls, so the steady state allocates nothing.
//
// Results are identical on every rank (each element is reduced once, in a
// fixed order, and then copied), so replicas never drift apart.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "dtrain/collectives/types.h"
#include "src/collectives/algorithms/element_type.h"
#include "src/collectives/algorithms/transport.h"

namespace dtrain::collectives::detail {

/// A grow-only, 64-byte aligned buffer reused across calls.
class Scratch {
 public:
  /// Returns at least `bytes` bytes; contents are unspecified. Invalidates
  /// earlier pointers only when it has to grow.
  void* get(std::size_t bytes);
  std::size_t capacity() const noexcept { return capacity_; }
  /// Gives up ownership without freeing (after a failed op, MPI may still
  /// write into the buffer).
  void leak() noexcept {
    (void)data_.release();
    capacity_ = 0;
  }

 private:
  struct Free {
    void operator()(void* p) const noexcept;
  };
  std::unique_ptr<void, Free> data_;
  std::size_t capacity_ = 0;
};

/// Balanced partition of `count` elements into `parts` segments:
/// segment i is [begin(i), begin(i+1)); the first count % parts segments
/// have one element more than the others.
struct Segments {
  std::size_t count;
  std::size_t parts;
  std::size_t begin(std::size_t i) const noexcept {
    const std::size_t base = count / parts;
    const std::size_t extra = count % parts;
    return base * i + (i < extra ? i : extra);
  }
  std::size_t length(std::size_t i) const noexcept { return begin(i + 1) - begin(i); }
};

/// Ring reduce-scatter, in place: on return rank r's segment r (of
/// Segments{count, size}) holds the reduction over all ranks; other segments
/// hold partial sums.
void ring_reduce_scatter(Transport& transport, void* data, std::size_t count,
                         const Reducer& reducer, Scratch& scratch, std::size_t chunk_bytes);

/// Ring all-gather, in place: on entry rank r's segment r is valid; on
/// return every segment is.
void ring_all_gather(Transport& transport, void* data, std::size_t count, std::size_t element_size,
                     std::size_t chunk_bytes);

void ring_all_reduce(Transport& transport, void* data, std::size_t count, const Reducer& reducer,
                     Scratch& scratch, std::size_t chunk_bytes);

void tree_all_reduce(Transport& transport, void* data, std::size_t count, const Reducer& reducer,
                     Scratch& scratch, std::size_t chunk_bytes);

void rhd_all_reduce(Transport& transport, void* data, std::size_t count, const Reducer& reducer,
                    Scratch& scratch);

/// Broadcast from `root` down a binary tree, chunked and pipelined.
void tree_broadcast(Transport& transport, void* data, std::size_t bytes, int root,
                    std::size_t chunk_bytes);

/// The algorithm one all-reduce runs: the only place that decides it.
///  - `requested` (AllReduceOptions::algorithm) wins; without it the
///    communicator's `configured` default (CommunicatorOptions::
///    allreduce_algorithm, which DTRAIN_ALLREDUCE_ALGO may have set).
///  - kAuto picks from the message's `bytes`, the `world_size` and whether
///    the communicator has shared memory (`shm`), with the crossovers
///    measured by benchmarks/allreduce_perf (algorithms.cpp,
///    docs/collectives.md).
///  - `shm`: every rank is on this host and the communicator has shared
///    memory. `hier_ranks_per_host`: 0, or the communicator spans several
///    hosts that each hold this many ranks (>= 2) and has the shared memory
///    kHier needs. kAuto picks kHier where it can run, and never kShm across
///    hosts.
///  - kShm on a communicator without shared memory, and kHier where it
///    cannot run, run as kRing.
/// Never returns kAuto; returns kNative only when it was asked for, kShm
/// only when `shm`, and kHier only when `hier_ranks_per_host` >= 2. Depends
/// only on values that are the same on every rank, so every rank runs the
/// same algorithm.
Algorithm choose_all_reduce_algorithm(std::optional<Algorithm> requested, Algorithm configured,
                                      std::size_t bytes, int world_size, bool shm,
                                      int hier_ranks_per_host = 0);

/// What Algorithm::kAuto runs for a reduce-scatter or all-gather of `bytes`
/// bytes in all (the larger of its two buffers): kShm wherever
/// an all-reduce of that size picks kShm under kAuto, else kRing.
Algorithm choose_scatter_gather_algorithm(std::size_t bytes, int world_size, bool shm);

/// Runs `algorithm` (not kAuto, not kNative).
void run_all_reduce(Algorithm algorithm, Transport& transport, void* data, std::size_t count,
                    const Reducer& reducer, Scratch& scratch, std::size_t chunk_bytes);

}  // namespace dtrain::collectives::detail
