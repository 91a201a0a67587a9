// Shared-memory all-reduce, reduce-scatter and all-gather; the protocol is
// described in shm.h.

#include "src/collectives/algorithms/shm.h"

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <new>
#include <string>

#include "dtrain/error.h"
#include "src/collectives/algorithms/algorithms.h"
#include "src/collectives/algorithms/backoff.h"

namespace dtrain::collectives::detail {
namespace {

constexpr std::size_t kControlBytes = 4096;  // keeps the slots page-aligned
static_assert(sizeof(ShmControl) <= kControlBytes, "ShmControl outgrew its page");

using Clock = std::chrono::steady_clock;

// Spinning longer than this costs more than a futex round trip (a few
// microseconds) would save.
constexpr auto kSpinFor = std::chrono::microseconds(20);
constexpr long kSleepNanos = 2'000'000;  // between ShmWaiter::idle calls

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Sleeps while `word` still holds `seen` (or until woken / the timeout).
void sleep_on(std::atomic<std::uint32_t>& word, std::uint32_t seen) {
#if defined(__linux__)
  // Not FUTEX_PRIVATE: the word lives in memory shared between processes.
  const timespec timeout{0, kSleepNanos};
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT, seen, &timeout, nullptr,
          0);
#else
  (void)word;
  (void)seen;
  Backoff backoff;
  for (int i = 0; i < 4096; ++i) backoff.pause();
#endif
}

void wake_all(std::atomic<std::uint32_t>& word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE, INT32_MAX, nullptr,
          nullptr, 0);
#else
  (void)word;
#endif
}

// Sets this rank's counter to `round` and wakes peers sleeping on it. With
// the waiter's order (sleepers++, read the word, re-check the counter, then
// sleep only if the word is unchanged), all seq_cst, a wake-up is never lost.
void publish(ShmControl& mine, ShmControl::Counter& counter, std::uint64_t round) {
  counter.value.store(round, std::memory_order_seq_cst);
  mine.wake.word.fetch_add(1, std::memory_order_seq_cst);
  if (mine.wake.sleepers.load(std::memory_order_seq_cst) > 0) wake_all(mine.wake.word);
}

// Waits until counter `which` of every rank reaches `round`.
void wait_all(const ShmGroup& g, ShmControl::Counter ShmControl::*which, std::uint64_t round,
              const char* phase, ShmWaiter& waiter) {
  for (int p = 0; p < g.size(); ++p) {
    if (p == g.rank()) continue;
    ShmControl& peer = g.control(p);
    const std::atomic<std::uint64_t>& value = (peer.*which).value;
    if (value.load(std::memory_order_acquire) >= round) continue;
    const auto spin_until = Clock::now() + kSpinFor;
    for (std::uint32_t i = 1; value.load(std::memory_order_acquire) < round; ++i) {
      if (i % 64 == 0 && Clock::now() >= spin_until) break;
      cpu_relax();
    }
    while (value.load(std::memory_order_acquire) < round) {
      peer.wake.sleepers.fetch_add(1, std::memory_order_seq_cst);
      const std::uint32_t seen = peer.wake.word.load(std::memory_order_seq_cst);
      if (value.load(std::memory_order_seq_cst) < round) sleep_on(peer.wake.word, seen);
      peer.wake.sleepers.fetch_sub(1, std::memory_order_seq_cst);
      if (value.load(std::memory_order_acquire) < round) waiter.idle(phase, p);
    }
  }
}

void copy(char* dst, const char* src, std::size_t bytes) {
  if (bytes > 0) std::memcpy(dst, src, bytes);  // data may be null when empty
}

const char* type_name(std::uint32_t type) { return to_string(static_cast<ElementType>(type)); }

const char* collective_name(std::uint32_t collective) {
  switch (static_cast<ShmCollective>(collective)) {
    case ShmCollective::kAllReduce:
      return "all_reduce";
    case ShmCollective::kReduceScatter:
      return "reduce_scatter";
    case ShmCollective::kAllGather:
      return "all_gather";
  }
  return "unknown collective";
}

// "an all_reduce of 100 x float32 (sum)", "a all_gather" never.
std::string describe(const ShmControl::OpStamp& stamp) {
  const char* name = collective_name(stamp.collective);
  std::string out = (name[0] == 'a' ? "an " : "a ") + std::string(name) + " of " +
                    std::to_string(stamp.count) + " x " + type_name(stamp.type);
  if (stamp.op != ShmControl::kNoReduction) {
    out += std::string(" (") + to_string(static_cast<ReduceOp>(stamp.op)) + ")";
  }
  return out;
}

// The first half of every round: publishes this rank's stamp (a copy of
// `op` for this round) and `posted = round`, waits until every peer posted
// the round, and checks that the peers are in the same op. The caller has
// filled its slot. Ranks that disagree get a CommError before anything of
// the round is read.
void post_and_check(ShmGroup& g, std::uint64_t round, const ShmControl::OpStamp& op,
                    ShmWaiter& waiter) {
  ShmControl& mine = g.control(g.rank());
  ShmControl::OpStamp& stamp = mine.stamps[round % 2];
  stamp = op;
  stamp.round = round;
  publish(mine, mine.posted, round);
  wait_all(g, &ShmControl::posted, round, "post its data", waiter);
  for (int p = 0; p < g.size(); ++p) {
    if (p == g.rank()) continue;
    const ShmControl::OpStamp& theirs = g.control(p).stamps[round % 2];
    if (theirs.round == round && theirs.count == stamp.count &&
        theirs.collective == stamp.collective && theirs.type == stamp.type &&
        theirs.op == stamp.op) {
      continue;
    }
    DTRAIN_THROW(CommError, collective_name(stamp.collective), "(shm): rank ", p, " is in ",
                 describe(theirs), ", rank ", g.rank(), " in ", describe(stamp),
                 "; the ranks passed tensors of different sizes or dtypes, or issued their "
                 "collectives in different orders");
  }
}

ShmControl::OpStamp make_stamp(ShmCollective collective, std::size_t count, ElementType type,
                               std::uint32_t op) {
  ShmControl::OpStamp stamp;
  stamp.count = count;
  stamp.collective = static_cast<std::uint32_t>(collective);
  stamp.type = static_cast<std::uint32_t>(type);
  stamp.op = op;
  return stamp;
}

// Rounds of `per_round` elements that `count` elements take (at least one).
std::size_t rounds_for(std::size_t count, std::size_t per_round) {
  return std::max<std::size_t>(1, (count + per_round - 1) / per_round);
}

}  // namespace

std::size_t shm_region_bytes(std::size_t slot_bytes) { return kControlBytes + 2 * slot_bytes; }

std::size_t shm_min_slot_bytes(int size) {
  const std::size_t peer_bytes = 8 * static_cast<std::size_t>(std::max(1, size - 1));
  return std::max<std::size_t>(64, (peer_bytes + 63) / 64 * 64);
}

ShmGroup::ShmGroup(int rank, std::vector<void*> regions, std::size_t slot_bytes)
    : rank_(rank), regions_(std::move(regions)), slot_bytes_(slot_bytes) {
  DTRAIN_CHECK(rank_ >= 0 && rank_ < size(), "ShmGroup: rank ", rank_, " of ", size());
  DTRAIN_CHECK(slot_bytes_ >= 64 && slot_bytes_ % 64 == 0,
               "ShmGroup: slot size must be a positive multiple of 64 bytes, got ", slot_bytes_);
  DTRAIN_CHECK(slot_bytes_ >= shm_min_slot_bytes(size()), "ShmGroup: a slot of ", slot_bytes_,
               " bytes cannot hold an element for each of ", size() - 1, " peers");
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
  const std::size_t pieces = rounds_for(count, piece_max);
  const ShmControl::OpStamp op = make_stamp(ShmCollective::kAllReduce, count, reducer.type,
                                            static_cast<std::uint32_t>(reducer.op));
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

    // 1. Copy in the segments the peers reduce; post them.
    char* own = g.slot(me, round);
    for (int s = 0; s < n; ++s) {
      if (s != me) copy(at(own, s), at(piece, s), bytes(s));
    }
    post_and_check(g, round, op, waiter);

    // 2. Reduce this rank's segment, in rank order, and publish it.
    for (int p = 0; p < n; ++p) {
      if (p != me && seg.length(me) > 0) {
        reducer(at(piece, me), at(g.slot(p, round), me), seg.length(me));
      }
    }
    copy(at(own, me), at(piece, me), bytes(me));
    publish(mine, mine.reduced, round);

    // 3. Collect the other segments.
    wait_all(g, &ShmControl::reduced, round, "reduce its segment", waiter);
    for (int p = 0; p < n; ++p) {
      if (p != me) copy(at(piece, p), at(g.slot(p, round), p), bytes(p));
    }
  }
}

void shm_reduce_scatter(ShmGroup& g, const void* input, void* output, std::size_t block_count,
                        const Reducer& reducer, ShmWaiter& waiter) {
  const int n = g.size();
  const int me = g.rank();
  const std::size_t es = reducer.element_size;
  // A slot holds one piece for each peer: peer p's at position p (p < me)
  // or p - 1 (p > me).
  const std::size_t piece_max =
      g.slot_bytes() / (es * static_cast<std::size_t>(std::max(1, n - 1)));
  auto position = [](int p, int owner) { return static_cast<std::size_t>(p < owner ? p : p - 1); };
  const std::size_t pieces = rounds_for(block_count, piece_max);
  const ShmControl::OpStamp op = make_stamp(ShmCollective::kReduceScatter, block_count,
                                            reducer.type, static_cast<std::uint32_t>(reducer.op));
  const char* in = static_cast<const char*>(input);
  char* out = static_cast<char*>(output);
  for (std::size_t k = 0; k < pieces; ++k) {
    const std::uint64_t round = ++g.round();
    const std::size_t first = k * piece_max;
    const std::size_t len = std::min(piece_max, block_count - std::min(block_count, first));
    auto piece_of_block = [&](int p) { return in + (p * block_count + first) * es; };

    char* own = g.slot(me, round);
    for (int p = 0; p < n; ++p) {
      if (p != me) copy(own + position(p, me) * piece_max * es, piece_of_block(p), len * es);
    }
    post_and_check(g, round, op, waiter);

    // This rank's block: its own piece, then the peers' in rank order.
    char* target = out + first * es;
    copy(target, piece_of_block(me), len * es);
    for (int p = 0; p < n; ++p) {
      if (p != me && len > 0) {
        reducer(target, g.slot(p, round) + position(me, p) * piece_max * es, len);
      }
    }
  }
}

void shm_all_gather(ShmGroup& g, void* data, std::size_t block_count, ElementType type,
                    ShmWaiter& waiter) {
  const int n = g.size();
  const int me = g.rank();
  const std::size_t es = element_size(type);
  const std::size_t piece_max = g.slot_bytes() / es;
  const std::size_t pieces = rounds_for(block_count, piece_max);
  const ShmControl::OpStamp op =
      make_stamp(ShmCollective::kAllGather, block_count, type, ShmControl::kNoReduction);
  char* base = static_cast<char*>(data);
  for (std::size_t k = 0; k < pieces; ++k) {
    const std::uint64_t round = ++g.round();
    const std::size_t first = k * piece_max;
    const std::size_t len = std::min(piece_max, block_count - std::min(block_count, first));
    auto piece_of_block = [&](int p) { return base + (p * block_count + first) * es; };

    copy(g.slot(me, round), piece_of_block(me), len * es);
    post_and_check(g, round, op, waiter);
    for (int p = 0; p < n; ++p) {
      if (p != me) copy(piece_of_block(p), g.slot(p, round), len * es);
    }
  }
}

}  // namespace dtrain::collectives::detail
