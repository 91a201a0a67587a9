// Binary-tree algorithms, chunked and pipelined.
//
// Ranks form a binary tree over "virtual ranks" v = (rank - root) mod n:
// parent (v-1)/2, children 2v+1 and 2v+2. All-reduce reduces each chunk up
// the tree to rank 0 (a node adds its children's chunks to its own, then
// forwards the sum), then broadcasts the result back down. A chunk travels
// as soon as it is ready, so for large messages the tree is a pipeline;
// for small ones (one chunk) it costs 2*ceil(log2(n+1)) message latencies.
// Each element is reduced once per tree node in a fixed order, and the root's
// result is copied down, so all ranks get identical bits.

#include <algorithm>

#include "dtrain/error.h"
#include "src/collectives/algorithms/algorithms.h"

namespace dtrain::collectives::detail {
namespace {

constexpr std::size_t kPipelineDepth = 4;

struct TreeNode {
  int parent = -1;  // real rank, -1 at the root
  int children[2] = {-1, -1};
  int n_children = 0;
};

TreeNode tree_node(int rank, int size, int root) {
  const int v = (rank - root + size) % size;
  TreeNode node;
  if (v != 0) node.parent = ((v - 1) / 2 + root) % size;
  for (int c = 2 * v + 1; c <= 2 * v + 2; ++c) {
    if (c < size) node.children[node.n_children++] = (c + root) % size;
  }
  return node;
}

// Receives every chunk from `parent` straight into `data` (keeping up to
// kPipelineDepth receives posted) and forwards each to the children.
void broadcast_chunks(Transport& transport, char* data, std::size_t bytes, std::size_t chunk,
                      const TreeNode& node) {
  const std::size_t n_chunks = (bytes + chunk - 1) / chunk;
  auto chunk_len = [&](std::size_t c) { return std::min(chunk, bytes - c * chunk); };
  Transport::Request pending[kPipelineDepth] = {};
  auto post = [&](std::size_t c) {
    pending[c % kPipelineDepth] = transport.irecv(data + c * chunk, chunk_len(c), node.parent);
  };
  if (node.parent >= 0) {
    for (std::size_t c = 0; c < std::min(n_chunks, kPipelineDepth); ++c) post(c);
  }
  for (std::size_t c = 0; c < n_chunks; ++c) {
    if (node.parent >= 0) {
      transport.wait(pending[c % kPipelineDepth]);
      if (c + kPipelineDepth < n_chunks) post(c + kPipelineDepth);
    }
    for (int k = 0; k < node.n_children; ++k) {
      transport.isend(data + c * chunk, chunk_len(c), node.children[k]);
    }
  }
  transport.wait_all();
}

}  // namespace

void tree_all_reduce(Transport& transport, void* data_raw, std::size_t count,
                     const Reducer& reducer, Scratch& scratch, std::size_t chunk_bytes) {
  const int n = transport.size();
  if (n == 1 || count == 0) return;
  const std::size_t es = reducer.element_size;
  const std::size_t chunk = std::max<std::size_t>(1, chunk_bytes / es);
  const std::size_t n_chunks = (count + chunk - 1) / chunk;
  const TreeNode node = tree_node(transport.rank(), n, /*root=*/0);
  char* data = static_cast<char*>(data_raw);
  char* slots = static_cast<char*>(scratch.get(2 * kPipelineDepth * chunk * es));
  auto slot = [&](int child, std::size_t c) {
    return slots +
           (static_cast<std::size_t>(child) * kPipelineDepth + c % kPipelineDepth) * chunk * es;
  };
  auto chunk_len = [&](std::size_t c) { return std::min(chunk, count - c * chunk); };

  // Reduce phase: children's partial sums flow up, chunk by chunk.
  Transport::Request pending[2][kPipelineDepth] = {};
  auto post = [&](int k, std::size_t c) {
    pending[k][c % kPipelineDepth] =
        transport.irecv(slot(k, c), chunk_len(c) * es, node.children[k]);
  };
  for (int k = 0; k < node.n_children; ++k) {
    for (std::size_t c = 0; c < std::min(n_chunks, kPipelineDepth); ++c) post(k, c);
  }
  for (std::size_t c = 0; c < n_chunks; ++c) {
    for (int k = 0; k < node.n_children; ++k) {
      transport.wait(pending[k][c % kPipelineDepth]);
      reducer(data + c * chunk * es, slot(k, c), chunk_len(c));
      if (c + kPipelineDepth < n_chunks) post(k, c + kPipelineDepth);
    }
    if (node.parent >= 0) transport.isend(data + c * chunk * es, chunk_len(c) * es, node.parent);
  }
  // Our partial sums must have left before the broadcast overwrites them.
  transport.wait_all();

  // Broadcast phase: the root's result flows down.
  broadcast_chunks(transport, data, count * es, chunk * es, node);
}

void tree_broadcast(Transport& transport, void* data, std::size_t bytes, int root,
                    std::size_t chunk_bytes) {
  const int n = transport.size();
  if (n == 1 || bytes == 0) return;
  DTRAIN_CHECK_ARG(root >= 0 && root < n, "broadcast root ", root, " is not a rank of a ", n,
                   "-rank communicator");
  broadcast_chunks(transport, static_cast<char*>(data), bytes,
                   std::max<std::size_t>(1, chunk_bytes), tree_node(transport.rank(), n, root));
}

}  // namespace dtrain::collectives::detail
