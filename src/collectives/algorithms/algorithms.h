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

/// Under Algorithm::kAuto, messages above this size go to the ring (two
/// ranks, and more than two).
inline constexpr std::size_t kAutoRingMinBytesTwoRanks = std::size_t{1} << 20;
inline constexpr std::size_t kAutoRingMinBytesManyRanks = std::size_t{8} << 20;
/// With shared memory, kAuto runs kShm on 2 ranks and, on more, above this.
inline constexpr std::size_t kAutoShmMinBytesManyRanks = std::size_t{128} << 10;

/// With ranks on several hosts, kAuto runs kHier above this size.
inline constexpr std::size_t kAutoHierMinBytes = 0;

/// What Algorithm::kAuto runs for a message of `bytes` bytes on `world_size`
/// ranks. `shm`: every rank is on one host and the communicator has shared
/// memory (then kShm may be chosen). `hier_ranks_per_host`: 0, or the
/// communicator spans hosts that each hold this many ranks (>= 2) and has
/// the shared memory kHier needs (then kHier may be chosen). kShm is never
/// chosen across hosts. Never returns kAuto or kNative. Same answer on every
/// rank.
Algorithm choose_all_reduce_algorithm(std::size_t bytes, int world_size, bool shm = false,
                                      int hier_ranks_per_host = 0);

/// Runs `algorithm` (not kAuto, not kNative).
void run_all_reduce(Algorithm algorithm, Transport& transport, void* data, std::size_t count,
                    const Reducer& reducer, Scratch& scratch, std::size_t chunk_bytes);

}  // namespace dtrain::collectives::detail
