// Shared-memory all-reduce; the protocol is described in shm.h.

#include "src/collectives/algorithms/shm.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "dtrain/error.h"
#include "src/collectives/algorithms/algorithms.h"
#include "src/collectives/algorithms/backoff.h"

namespace dtrain::collectives::detail {
namespace {

constexpr std::size_t kControlBytes = 4096;  // keeps the slots page-aligned
static_assert(sizeof(ShmControl) <= kControlBytes, "ShmControl outgrew its page");

// Waits until counter `which` of every rank reaches `round`.
void wait_all(const ShmGroup& g, ShmControl::Counter ShmControl::*which, std::uint64_t round,
              const char* phase, ShmWaiter& waiter) {
  for (int p = 0; p < g.size(); ++p) {
    if (p == g.rank()) continue;
    const std::atomic<std::uint64_t>& value = (g.control(p).*which).value;
    if (value.load(std::memory_order_acquire) >= round) continue;
    Backoff backoff;
    std::uint32_t polls = 0;
    while (value.load(std::memory_order_acquire) < round) {
      if (++polls % 256 == 0) waiter.idle(phase, p);
      backoff.pause();
    }
  }
}

void copy(char* dst, const char* src, std::size_t bytes) {
  if (bytes > 0) std::memcpy(dst, src, bytes);  // data may be null when empty
}

const char* reduce_name(std::uint32_t op) { return to_string(static_cast<ReduceOp>(op)); }
const char* type_name(std::uint32_t type) { return to_string(static_cast<ElementType>(type)); }

// The peers posted this round: they must be in the same op as this rank.
void check_same_op(const ShmGroup& g, std::uint64_t round, const ShmControl::OpStamp& mine) {
  for (int p = 0; p < g.size(); ++p) {
    if (p == g.rank()) continue;
    const ShmControl::OpStamp& theirs = g.control(p).stamp;
    if (theirs.round == round && theirs.count == mine.count && theirs.type == mine.type &&
        theirs.op == mine.op) {
      continue;
    }
    DTRAIN_THROW(CommError, "all_reduce(shm): rank ", p, " is in an all_reduce of ", theirs.count,
                 " x ", type_name(theirs.type), " (", reduce_name(theirs.op), "), rank ", g.rank(),
                 " in one of ", mine.count, " x ", type_name(mine.type), " (", reduce_name(mine.op),
                 "); the ranks passed tensors of different sizes or dtypes, or issued their "
                 "collectives in different orders");
  }
}

}  // namespace

std::size_t shm_region_bytes(std::size_t slot_bytes) { return kControlBytes + 2 * slot_bytes; }

ShmGroup::ShmGroup(int rank, std::vector<void*> regions, std::size_t slot_bytes)
    : rank_(rank), regions_(std::move(regions)), slot_bytes_(slot_bytes) {
  DTRAIN_CHECK(rank_ >= 0 && rank_ < size(), "ShmGroup: rank ", rank_, " of ", size());
  DTRAIN_CHECK(slot_bytes_ >= 64 && slot_bytes_ % 64 == 0,
               "ShmGroup: slot size must be a positive multiple of 64 bytes, got ", slot_bytes_);
  new (regions_[rank_]) ShmControl();  // this rank's counters start at round 0
}

char* ShmGroup::slot(int p, std::uint64_t round) const noexcept {
  return static_cast<char*>(regions_[p]) + kControlBytes + (round % 2) * slot_bytes_;
}

void shm_all_reduce(ShmGroup& g, void* data, std::size_t count, const Reducer& reducer,
                    ShmWaiter& waiter) {
  const int n = g.size();
  const int me = g.rank();
  const std::size_t es = reducer.element_size;
  const std::size_t piece_max = g.slot_bytes() / es;
  const std::size_t pieces = std::max<std::size_t>(1, (count + piece_max - 1) / piece_max);
  ShmControl& mine = g.control(me);
  char* base = static_cast<char*>(data);
  for (std::size_t k = 0; k < pieces; ++k) {
    const std::uint64_t round = ++g.round();
    const std::size_t first = k * piece_max;
    const std::size_t len = std::min(piece_max, count - std::min(count, first));
    char* piece = base + first * es;
    const Segments seg{len, static_cast<std::size_t>(n)};
    auto at = [&](char* buffer, std::size_t s) { return buffer + seg.begin(s) * es; };
    auto bytes = [&](std::size_t s) { return seg.length(s) * es; };

    // 1. Copy in the segments the peers reduce.
    char* own = g.slot(me, round);
    for (int s = 0; s < n; ++s) {
      if (s != me) copy(at(own, s), at(piece, s), bytes(s));
    }
    ShmControl::OpStamp& stamp = mine.stamp;
    stamp.round = round;
    stamp.count = count;
    stamp.type = static_cast<std::uint32_t>(reducer.type);
    stamp.op = static_cast<std::uint32_t>(reducer.op);
    mine.posted.value.store(round, std::memory_order_release);

    // 2. Reduce this rank's segment, in rank order, and publish it.
    wait_all(g, &ShmControl::posted, round, "post its data", waiter);
    check_same_op(g, round, stamp);
    for (int p = 0; p < n; ++p) {
      if (p != me && seg.length(me) > 0) {
        reducer(at(piece, me), at(g.slot(p, round), me), seg.length(me));
      }
    }
    copy(at(own, me), at(piece, me), bytes(me));
    mine.reduced.value.store(round, std::memory_order_release);

    // 3. Collect the other segments.
    wait_all(g, &ShmControl::reduced, round, "reduce its segment", waiter);
    for (int p = 0; p < n; ++p) {
      if (p != me) copy(at(piece, p), at(g.slot(p, round), p), bytes(p));
    }
  }
}

}  // namespace dtrain::collectives::detail
