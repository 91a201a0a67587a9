// Recursive halving-doubling (Rabenseifner) all-reduce.
//
// Non-power-of-two sizes are folded first (as in MPICH): with p2 the largest
// power of two <= n and rem = n - p2, each even rank r < 2*rem sends its
// vector to r+1 and sits out; the odd one reduces both. The remaining p2
// ranks get "new ranks" 0..p2-1 and run the power-of-two algorithm; at the
// end the odd ranks send the result back to their even partners.
//
// Large messages: reduce-scatter by recursive halving (in step k, exchange
// half of the current block range with the partner at distance p2/2^(k+1),
// keep and reduce the other half; after log2(p2) steps new rank i owns block
// i), then all-gather by recursive doubling (the same exchanges in reverse).
// Each rank sends about 2 * (p2-1)/p2 of the message in 2*log2(p2) steps.
//
// Small messages (bytes * log2(p2) <= 64 KiB, or fewer elements than ranks):
// recursive doubling on the whole vector: log2(p2) exchange-and-reduce
// steps, the latency optimum.
//
// Both ranks of an exchange compute the same value: the lower new rank's
// operand goes first, which matters for min/max (signed zeros, NaNs).

#include <algorithm>
#include <cstring>

#include "dtrain/error.h"
#include "src/collectives/algorithms/algorithms.h"

namespace dtrain::collectives::detail {
namespace {

// Below this the whole vector is exchanged (recursive doubling).
// Recursive doubling sends log2(p2) whole vectors, halving-doubling about
// two; doubling takes half the steps. Below this many bytes times log2(p2),
// the saved steps (each a rendezvous handshake past Open MPI's 4 KiB eager
// limit) are worth more than the extra bytes (benchmarks/allreduce_perf).
constexpr std::size_t kDoublingMaxVolume = std::size_t{64} << 10;

inline char* offset(void* base, std::size_t elements, std::size_t element_size) {
  return static_cast<char*>(base) + elements * element_size;
}

// mine = (lower OP higher), where `theirs` is the partner's operand and
// `mine_is_lower` says whose operand goes first. `theirs` may be clobbered.
void reduce_ordered(const Reducer& reducer, void* mine, void* theirs, std::size_t count,
                    bool mine_is_lower) {
  if (mine_is_lower || !reducer.order_sensitive) {
    reducer(mine, theirs, count);
  } else {
    reducer(theirs, mine, count);
    std::memcpy(mine, theirs, count * reducer.element_size);
  }
}

}  // namespace

void rhd_all_reduce(Transport& transport, void* data, std::size_t count, const Reducer& reducer,
                    Scratch& scratch) {
  const int n = transport.size();
  const int r = transport.rank();
  if (n == 1 || count == 0) return;
  const std::size_t es = reducer.element_size;
  const std::size_t bytes = count * es;
  int p2 = 1;
  while (p2 * 2 <= n) p2 *= 2;
  const int rem = n - p2;

  // Fold the extra ranks into their odd neighbours.
  int new_rank;
  if (r < 2 * rem) {
    if (r % 2 == 0) {
      transport.isend(data, bytes, r + 1);
      transport.wait_all();
      new_rank = -1;
    } else {
      void* incoming = scratch.get(bytes);
      transport.wait(transport.irecv(incoming, bytes, r - 1));
      transport.wait_all();
      reduce_ordered(reducer, data, incoming, count, /*mine_is_lower=*/false);
      new_rank = r / 2;
    }
  } else {
    new_rank = r - rem;
  }
  auto real_rank = [rem](int nr) { return nr < rem ? nr * 2 + 1 : nr + rem; };

  if (new_rank >= 0 && p2 > 1) {
    int log2_p2 = 0;
    while ((1 << log2_p2) < p2) ++log2_p2;
    if (bytes * static_cast<std::size_t>(log2_p2) <= kDoublingMaxVolume ||
        count < static_cast<std::size_t>(p2)) {
      void* incoming = scratch.get(bytes);
      for (int mask = 1; mask < p2; mask <<= 1) {
        const int partner = new_rank ^ mask;
        transport.sendrecv(data, bytes, real_rank(partner), incoming, bytes, real_rank(partner));
        transport.wait_all();
        reduce_ordered(reducer, data, incoming, count, new_rank < partner);
      }
    } else {
      const Segments blocks{count, static_cast<std::size_t>(p2)};
      char* incoming = static_cast<char*>(scratch.get(blocks.length(0) * es * p2 / 2 + es * p2));
      int lo = 0;
      int hi = p2;
      for (int mask = p2 / 2; mask >= 1; mask >>= 1) {
        const int partner = new_rank ^ mask;
        const int mid = (lo + hi) / 2;
        const bool upper = (new_rank & mask) != 0;
        const int keep_lo = upper ? mid : lo;
        const int keep_hi = upper ? hi : mid;
        const int give_lo = upper ? lo : mid;
        const int give_hi = upper ? mid : hi;
        const std::size_t keep_begin = blocks.begin(keep_lo);
        const std::size_t keep_len = blocks.begin(keep_hi) - keep_begin;
        const std::size_t give_begin = blocks.begin(give_lo);
        const std::size_t give_len = blocks.begin(give_hi) - give_begin;
        transport.sendrecv(offset(data, give_begin, es), give_len * es, real_rank(partner),
                           incoming, keep_len * es, real_rank(partner));
        transport.wait_all();
        reduce_ordered(reducer, offset(data, keep_begin, es), incoming, keep_len,
                       new_rank < partner);
        lo = keep_lo;
        hi = keep_hi;
      }
      for (int mask = 1; mask < p2; mask <<= 1) {
        const int partner = new_rank ^ mask;
        const bool upper = (new_rank & mask) != 0;
        const int their_lo = upper ? lo - mask : hi;
        const int their_hi = upper ? lo : hi + mask;
        const std::size_t mine_begin = blocks.begin(lo);
        const std::size_t mine_len = blocks.begin(hi) - mine_begin;
        const std::size_t their_begin = blocks.begin(their_lo);
        const std::size_t their_len = blocks.begin(their_hi) - their_begin;
        transport.sendrecv(offset(data, mine_begin, es), mine_len * es, real_rank(partner),
                           offset(data, their_begin, es), their_len * es, real_rank(partner));
        transport.wait_all();
        lo = std::min(lo, their_lo);
        hi = std::max(hi, their_hi);
      }
    }
  }

  // Hand the result back to the ranks that sat out.
  if (r < 2 * rem) {
    if (r % 2 == 1) {
      transport.isend(data, bytes, r - 1);
    } else {
      transport.irecv(data, bytes, r + 1);
    }
    transport.wait_all();
  }
}

}  // namespace dtrain::collectives::detail
