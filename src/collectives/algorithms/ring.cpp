// Ring algorithms.
//
// All-reduce = reduce-scatter + all-gather around the ring r -> r+1. The
// message is cut into n segments (Segments{count, n}). In reduce-scatter step
// s, rank r sends segment (r-s-1) to its right neighbour and receives segment
// (r-s-2) from its left neighbour, which it reduces into its own copy; after
// n-1 steps rank r holds the full reduction of segment r. Each segment is
// reduced along a fixed chain of ranks, once, so the result is the same on
// every rank. The all-gather then passes the finished segments around the
// ring in n-1 more steps. Every rank sends and receives 2(n-1)/n of the
// message: bandwidth-optimal.
//
// Within a step the segment moves in chunks of chunk_bytes, received into a
// small ring of scratch slots (kPipelineDepth of them), so the reduction of
// chunk k overlaps the transfer of chunks k+1..k+depth-1.

#include <algorithm>

#include "dtrain/error.h"
#include "src/collectives/algorithms/algorithms.h"

namespace dtrain::collectives::detail {
namespace {

constexpr std::size_t kPipelineDepth = 4;
// Keeps every message well below MPI's int count limit.
constexpr std::size_t kMaxMessageBytes = std::size_t{64} << 20;

inline std::size_t wrap(long long value, int n) {
  long long m = value % n;
  return static_cast<std::size_t>(m < 0 ? m + n : m);
}

inline char* offset(void* base, std::size_t elements, std::size_t element_size) {
  return static_cast<char*>(base) + elements * element_size;
}

// Posts sends of [begin, begin+len) elements in messages of at most
// `message_elems` elements.
void send_range(Transport& transport, void* data, std::size_t begin, std::size_t len,
                std::size_t element_size, std::size_t message_elems, int peer) {
  for (std::size_t off = 0; off < len; off += message_elems) {
    const std::size_t n = std::min(message_elems, len - off);
    transport.isend(offset(data, begin + off, element_size), n * element_size, peer);
  }
}

void recv_range(Transport& transport, void* data, std::size_t begin, std::size_t len,
                std::size_t element_size, std::size_t message_elems, int peer) {
  for (std::size_t off = 0; off < len; off += message_elems) {
    const std::size_t n = std::min(message_elems, len - off);
    transport.irecv(offset(data, begin + off, element_size), n * element_size, peer);
  }
}

// One reduce-scatter step: sends segment `send_seg` to the right, receives
// segment `recv_seg` from the left chunk by chunk and reduces it in place.
// With `forward`, each finished chunk is also sent on to the right at once
// (the first all-gather step of an all-reduce, overlapped with the last
// reduce-scatter step), and the left neighbour's forwarded chunks of
// `forward_recv_seg` are received straight into `data`.
struct RingStep {
  Transport& transport;
  void* data;
  const Reducer& reducer;
  char* slots;
  std::size_t chunk;  // elements
  int left;
  int right;
};

void reduce_scatter_step(const RingStep& ring, const Segments& seg, std::size_t send_seg,
                         std::size_t recv_seg, bool forward, std::size_t forward_recv_seg) {
  Transport& transport = ring.transport;
  const std::size_t es = ring.reducer.element_size;
  const std::size_t chunk = ring.chunk;
  send_range(transport, ring.data, seg.begin(send_seg), seg.length(send_seg), es, chunk,
             ring.right);

  const std::size_t recv_begin = seg.begin(recv_seg);
  const std::size_t recv_len = seg.length(recv_seg);
  const std::size_t n_chunks = (recv_len + chunk - 1) / chunk;
  Transport::Request pending[kPipelineDepth] = {};
  auto slot = [&](std::size_t c) { return ring.slots + (c % kPipelineDepth) * chunk * es; };
  auto chunk_len = [&](std::size_t c) { return std::min(chunk, recv_len - c * chunk); };
  // Receives are posted in the order the left neighbour sends: all of this
  // step's reduce-scatter chunks first, then its forwarded chunks.
  bool forward_posted = !forward;
  auto post_forward_receives = [&] {
    recv_range(transport, ring.data, seg.begin(forward_recv_seg), seg.length(forward_recv_seg), es,
               chunk, ring.left);
    forward_posted = true;
  };
  auto post = [&](std::size_t c) {
    pending[c % kPipelineDepth] = transport.irecv(slot(c), chunk_len(c) * es, ring.left);
    if (c + 1 == n_chunks && !forward_posted) post_forward_receives();
  };
  if (n_chunks == 0 && !forward_posted) post_forward_receives();
  for (std::size_t c = 0; c < std::min(n_chunks, kPipelineDepth); ++c) post(c);
  for (std::size_t c = 0; c < n_chunks; ++c) {
    transport.wait(pending[c % kPipelineDepth]);
    char* target = offset(ring.data, recv_begin + c * chunk, es);
    ring.reducer(target, slot(c), chunk_len(c));
    if (forward) transport.isend(target, chunk_len(c) * es, ring.right);
    if (c + kPipelineDepth < n_chunks) post(c + kPipelineDepth);
  }
  // The next step sends the segment reduced here; this step's sends must
  // have left before any buffer they read is changed.
  transport.wait_all();
}

RingStep make_ring(Transport& transport, void* data, const Reducer& reducer, Scratch& scratch,
                   std::size_t chunk_bytes) {
  const int n = transport.size();
  const int r = transport.rank();
  const std::size_t es = reducer.element_size;
  const std::size_t chunk = std::max<std::size_t>(1, chunk_bytes / es);
  char* slots = static_cast<char*>(scratch.get(kPipelineDepth * chunk * es));
  return RingStep{transport, data, reducer, slots, chunk, (r + n - 1) % n, (r + 1) % n};
}

// All-gather steps first_step..n-2 around the ring: in step s rank r sends
// segment (r-s) to the right and receives segment (r-s-1) from the left,
// straight into `data`.
void all_gather_steps(Transport& transport, void* data, std::size_t count, std::size_t element_size,
                      std::size_t chunk_bytes, int first_step) {
  const int n = transport.size();
  const int r = transport.rank();
  if (n == 1 || count == 0) return;
  const std::size_t message_elems =
      std::max<std::size_t>(1, std::max(chunk_bytes, kMaxMessageBytes) / element_size);
  const int right = (r + 1) % n;
  const int left = (r + n - 1) % n;
  const Segments seg{count, static_cast<std::size_t>(n)};
  for (int step = first_step; step < n - 1; ++step) {
    const std::size_t send_seg = wrap(static_cast<long long>(r) - step, n);
    const std::size_t recv_seg = wrap(static_cast<long long>(r) - step - 1, n);
    recv_range(transport, data, seg.begin(recv_seg), seg.length(recv_seg), element_size,
               message_elems, left);
    send_range(transport, data, seg.begin(send_seg), seg.length(send_seg), element_size,
               message_elems, right);
    transport.wait_all();
  }
}

}  // namespace

void ring_reduce_scatter(Transport& transport, void* data, std::size_t count,
                         const Reducer& reducer, Scratch& scratch, std::size_t chunk_bytes) {
  const int n = transport.size();
  const int r = transport.rank();
  if (n == 1 || count == 0) return;
  const RingStep ring = make_ring(transport, data, reducer, scratch, chunk_bytes);
  const Segments seg{count, static_cast<std::size_t>(n)};
  for (int step = 0; step < n - 1; ++step) {
    reduce_scatter_step(ring, seg, wrap(static_cast<long long>(r) - step - 1, n),
                        wrap(static_cast<long long>(r) - step - 2, n), false, 0);
  }
}

void ring_all_gather(Transport& transport, void* data, std::size_t count, std::size_t element_size,
                     std::size_t chunk_bytes) {
  all_gather_steps(transport, data, count, element_size, chunk_bytes, /*first_step=*/0);
}

void ring_all_reduce(Transport& transport, void* data, std::size_t count, const Reducer& reducer,
                     Scratch& scratch, std::size_t chunk_bytes) {
  const int n = transport.size();
  const int r = transport.rank();
  if (n == 1 || count == 0) return;
  const RingStep ring = make_ring(transport, data, reducer, scratch, chunk_bytes);
  const Segments seg{count, static_cast<std::size_t>(n)};
  for (int step = 0; step < n - 1; ++step) {
    // The last step finishes segment r; its chunks go on to the right as
    // soon as they are reduced (all-gather step 0), while segment r-1
    // arrives from the left the same way.
    const bool last = step == n - 2;
    reduce_scatter_step(ring, seg, wrap(static_cast<long long>(r) - step - 1, n),
                        wrap(static_cast<long long>(r) - step - 2, n), last,
                        wrap(static_cast<long long>(r) - 1, n));
  }
  // All-gather steps 1..n-2 (step 0 was overlapped above).
  all_gather_steps(transport, data, count, reducer.element_size, chunk_bytes, /*first_step=*/1);
}

}  // namespace dtrain::collectives::detail
