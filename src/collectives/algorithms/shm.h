#pragma once
// All-reduce through memory shared by the ranks of one node (Algorithm::kShm).
//
// Each rank owns a region of a shared mapping: a control block and two
// slots of `slot_bytes`. A message is cut into pieces of at most one slot,
// one "round" each; rounds are numbered across ops, and round k uses slot
// k % 2. With Segments{len, n} over the piece, round k on rank r is:
//
//   1. copy every segment s != r of its data into its slot; publish
//      `posted = k` with a stamp describing the op (checked by the peers);
//   2. wait until every rank posted k; reduce segment r: data[r] OP= the
//      peers' slot segment r, in rank order; copy the result into its own
//      slot's segment r; publish `reduced = k`;
//   3. wait until every rank reduced k; copy each peer p's slot segment p
//      into data[p].
//
// No rank waits for its peers to finish reading: a rank starts round k+1
// only after every peer reduced round k, which a peer does only after it
// finished round k-1, the last round that read the slot round k+1 writes.
// (Two slots are needed because consecutive rounds may split the slot into
// different segments.) Likewise the stamp of round k is read by the peers
// in their step 2, before they publish `reduced = k`.
//
// Every element is reduced once, by one rank, in a fixed order, then
// copied: the result is bitwise identical on every rank and from run to
// run. Each rank moves about 4.5x the piece through memory for 2 ranks (the
// ring over MPI's copy-in/copy-out shared memory: about 5.5x, in 32 KiB
// fragments), and with slots that fit in the caches the slot traffic stays
// out of DRAM. The counters are C++ atomics in the shared mapping
// (release on publish, acquire on wait); no system call is made per op.
//
// A rank waiting for a peer spins for a few microseconds (peers in the same
// op arrive within them), then sleeps on the peer's futex word, which every
// publish bumps and wakes: a rank waiting for a slow peer (one still in its
// backward pass) takes no CPU from the processes sharing its cores. Between
// sleeps (at most 2 ms each) it calls a ShmWaiter, which the MPI backend
// implements with the op's deadline and its roll call, so a dead or absent
// peer gives a TimeoutError, not a hang. Ranks that pass different counts, dtypes or
// reductions get a CommError naming both sides, never a wrong result.

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

/// The start of each rank's region; counters on their own cache lines.
struct alignas(64) ShmControl {
  struct alignas(64) Counter {
    std::atomic<std::uint64_t> value{0};
  };
  /// What the op of a round is (written before `posted`).
  struct alignas(64) OpStamp {
    std::uint64_t round = 0;
    std::uint64_t count = 0;
    std::uint32_t type = 0;
    std::uint32_t op = 0;
  };
  /// Bumped on every publish; peers that wait longer than a short spin
  /// sleep on it (a futex in the shared mapping) instead of polling.
  struct alignas(64) Wake {
    std::atomic<std::uint32_t> word{0};
    std::atomic<std::uint32_t> sleepers{0};
  };
  Counter posted, reduced;
  Wake wake;
  OpStamp stamp;
};
static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "shared-memory counters need lock-free atomics");
static_assert(sizeof(std::atomic<std::uint32_t>) == 4, "a futex word is 32 bits");

/// Bytes of one rank's region: the control block, then two slots.
std::size_t shm_region_bytes(std::size_t slot_bytes);

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

}  // namespace dtrain::collectives::detail
