#pragma once
// All-reduce, reduce-scatter and all-gather through memory shared by the
// ranks of one node (Algorithm::kShm).
//
// Each rank owns a region of a shared mapping: a control block and two
// slots of `slot_bytes`. A message is cut into pieces that fit a slot, one
// "round" each; rounds are numbered across ops (of all three kinds), and
// round k uses slot k % 2 and stamp k % 2. Every round begins alike: rank r
// copies into its slot what its peers will read, writes a stamp describing
// the op (collective, element count, dtype, reduction) and publishes
// `posted = k`; then it waits until every rank posted k and checks their
// stamps. What follows depends on the collective:
//
//   all-reduce (Segments{len, n} over the piece): rank r posted every
//   segment s != r; it reduces segment r: data[r] OP= the peers' slot
//   segment r, in rank order; copies the result into its own slot's segment
//   r and publishes `reduced = k`; once every rank reduced k, it copies each
//   peer p's slot segment p into data[p].
//
//   reduce-scatter (a piece of each of the n blocks): rank r posted the
//   piece of every block p != r, at position p (p < r) or p - 1 (p > r) of
//   its slot; it writes out = its own piece of block r, OP= each peer's
//   piece for r, in rank order.
//
//   all-gather (a piece of this rank's block): rank r posted its piece; it
//   copies each peer's piece into block p of the output.
//
// No rank waits for its peers to finish reading: rank r writes slot k % 2
// again in round k+2 only after every peer posted round k+1, which a peer
// does only after it finished round k, the last round that read that slot.
// A stamp is read by the peers in the round it describes, so it follows the
// same rule (two stamps for two slots: a peer may still be checking stamp k
// when rank r writes stamp k+1).
//
// Every element is reduced once, by one rank, in a fixed order, then
// copied: the result is bitwise identical on every rank and from run to
// run. Each rank moves about 4.5x an all-reduce's piece through memory for
// 2 ranks (the ring over MPI's copy-in/copy-out shared memory: about 5.5x,
// in 32 KiB fragments), and with slots that fit in the caches the slot
// traffic stays out of DRAM. The counters are C++ atomics in the shared
// mapping (release on publish, acquire on wait); no system call is made per
// op.
//
// A rank waiting for a peer spins for a few microseconds (peers in the same
// op arrive within them), then sleeps on the peer's futex word, which every
// publish bumps and wakes: a rank waiting for a slow peer (one still in its
// backward pass) takes no CPU from the processes sharing its cores. Between
// sleeps (at most 2 ms each) it calls a ShmWaiter, which the MPI backend
// implements with the op's deadline and its roll call, so a dead or absent
// peer gives a TimeoutError, not a hang. Ranks that pass different counts,
// dtypes or reductions, or that are in different collectives, get a
// CommError naming both sides, never a wrong result.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "src/collectives/algorithms/element_type.h"

namespace dtrain::collectives::detail {

/// What a waiting rank is waiting for (names the phase in errors).
class ShmWaiter {
 public:
  virtual ~ShmWaiter() = default;
  /// Called repeatedly while `peer` has not reached `phase` (between
  /// back-off pauses). Throws to end the op (deadline passed, peer gone).
  virtual void idle(const char* phase, int peer) = 0;
};

/// Which collective a round belongs to (in stamps and errors).
enum class ShmCollective : std::uint32_t { kAllReduce, kReduceScatter, kAllGather };

/// The start of each rank's region; counters on their own cache lines.
struct alignas(64) ShmControl {
  struct alignas(64) Counter {
    std::atomic<std::uint64_t> value{0};
  };
  /// What the op of a round is (written before `posted`).
  struct alignas(64) OpStamp {
    std::uint64_t round = 0;
    std::uint64_t count = 0;  ///< all-reduce: elements; the others: elements per rank
    std::uint32_t collective = 0;
    std::uint32_t type = 0;
    std::uint32_t op = 0;  ///< kNoReduction for all-gather
  };
  static constexpr std::uint32_t kNoReduction = ~std::uint32_t{0};
  /// Bumped on every publish; peers that wait longer than a short spin
  /// sleep on it (a futex in the shared mapping) instead of polling.
  struct alignas(64) Wake {
    std::atomic<std::uint32_t> word{0};
    std::atomic<std::uint32_t> sleepers{0};
  };
  Counter posted, reduced;
  Wake wake;
  OpStamp stamps[2];  ///< stamps[round % 2]
};
static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "shared-memory counters need lock-free atomics");
static_assert(sizeof(std::atomic<std::uint32_t>) == 4, "a futex word is 32 bits");

/// Bytes of one rank's region: the control block, then two slots.
std::size_t shm_region_bytes(std::size_t slot_bytes);

/// The smallest slot a group of `size` ranks can use: a reduce-scatter
/// round puts a piece for each peer into it, at least one 8-byte element.
std::size_t shm_min_slot_bytes(int size);

/// One rank's view of the ranks' regions (laid out by the caller, which owns
/// the mapping). Zero-filled memory is a valid initial state.
class ShmGroup {
 public:
  /// `regions[p]` is rank p's region as mapped in this process.
  ShmGroup(int rank, std::vector<void*> regions, std::size_t slot_bytes);

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return static_cast<int>(regions_.size()); }
  std::size_t slot_bytes() const noexcept { return slot_bytes_; }

  ShmControl& control(int p) const noexcept { return *static_cast<ShmControl*>(regions_[p]); }
  char* slot(int p, std::uint64_t round) const noexcept;

  /// Rounds run so far (the same on every rank that ran the same ops).
  std::uint64_t& round() noexcept { return round_; }

 private:
  int rank_;
  std::vector<void*> regions_;
  std::size_t slot_bytes_;
  std::uint64_t round_ = 0;
};

/// In-place all-reduce of `count` elements at `data` over the group. kAvg
/// reduces as a sum; the caller divides. Every op takes at least one round,
/// so even a 0-element op checks that the ranks agree.
void shm_all_reduce(ShmGroup& group, void* data, std::size_t count, const Reducer& reducer,
                    ShmWaiter& waiter);

/// Reduce-scatter: `input` holds size() blocks of `block_count` elements,
/// rank-major; `output` (block_count elements, not overlapping `input`)
/// receives block rank() reduced over the ranks. kAvg reduces as a sum; the
/// caller divides. At least one round, as above.
void shm_reduce_scatter(ShmGroup& group, const void* input, void* output, std::size_t block_count,
                        const Reducer& reducer, ShmWaiter& waiter);

/// In-place all-gather: `data` holds size() blocks of `block_count` elements
/// of `type`, rank-major; on entry block rank() is this rank's, on return
/// every block is its rank's. At least one round, as above.
void shm_all_gather(ShmGroup& group, void* data, std::size_t block_count, ElementType type,
                    ShmWaiter& waiter);

}  // namespace dtrain::collectives::detail
