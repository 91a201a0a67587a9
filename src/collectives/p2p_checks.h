#pragma once
// Argument checks of batch_send_recv shared by every backend, on plain
// descriptors so that each backend can call them with its own tensor
// representation (at::Tensor for MPI, DeviceBuffer for NCCL).

#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/error.h"

namespace dtrain::collectives::detail {

/// Tags of point-to-point messages are in [0, kMaxUserTag).
constexpr int kMaxUserTag = 1'000'000;

/// One op of a batch as the checks see it. [begin, end) is the memory the op
/// reads (send) or writes (recv); empty for zero elements.
struct P2PCheckItem {
  bool is_recv = false;
  int peer = -1;
  int tag = 0;
  std::uintptr_t begin = 0;
  std::uintptr_t end = 0;
};

/// "send to rank 1, tag 3" / "recv from rank 0, tag 0" (op `index` of the batch).
inline std::string describe_p2p_item(const P2PCheckItem& item, std::size_t index) {
  return ::dtrain::detail::str_cat("op ", index, " (", item.is_recv ? "recv from" : "send to",
                                   " rank ", item.peer, ", tag ", item.tag, ")");
}

/// Throws InvalidArgument naming `op`, the communicator and the offending
/// op(s) when the batch is empty, a peer or tag is out of range, a receive
/// overlaps the memory of another op of the batch, or a message to this rank
/// lacks its receive from this rank (same tag, in the same batch).
inline void check_p2p_batch(const char* op, const std::vector<P2PCheckItem>& items, int rank,
                            int size, const std::string& comm_name) {
  DTRAIN_CHECK_ARG(!items.empty(), op, " on communicator '", comm_name,
                   "': the list of ops is empty; pass at least one send or recv");
  for (std::size_t i = 0; i < items.size(); ++i) {
    const P2PCheckItem& a = items[i];
    DTRAIN_CHECK_ARG(a.peer >= 0 && a.peer < size, op, ": ", describe_p2p_item(a, i),
                     ": peer rank ", a.peer, " is not a rank of communicator '", comm_name,
                     "' (size ", size, ")");
    DTRAIN_CHECK_ARG(a.tag >= 0 && a.tag < kMaxUserTag, op, ": ", describe_p2p_item(a, i), ": tag ",
                     a.tag, " is outside [0, ", kMaxUserTag, ")");
  }
  for (std::size_t i = 0; i < items.size(); ++i) {
    const P2PCheckItem& a = items[i];
    if (!a.is_recv || a.begin == a.end) continue;
    for (std::size_t j = 0; j < items.size(); ++j) {
      const P2PCheckItem& b = items[j];
      if (j == i || b.begin == b.end || (b.is_recv && j < i)) continue;
      const bool overlap = a.begin < b.end && b.begin < a.end;
      DTRAIN_CHECK_ARG(!overlap, op, " on communicator '", comm_name,
                       "': ", describe_p2p_item(a, i), " receives into memory that ",
                       describe_p2p_item(b, j), b.is_recv ? " also receives into" : " sends from",
                       "; give each receive its own tensor");
    }
  }
  // A message to this rank can only be received by this very batch: the
  // communicator runs one batch at a time.
  for (std::size_t i = 0; i < items.size(); ++i) {
    const P2PCheckItem& a = items[i];
    if (a.peer != rank) continue;
    int balance = 0;
    for (const P2PCheckItem& b : items) {
      if (b.peer == rank && b.tag == a.tag) balance += b.is_recv ? 1 : -1;
    }
    DTRAIN_CHECK_ARG(balance == 0, op, " on communicator '", comm_name,
                     "': ", describe_p2p_item(a, i), " is a message to this rank (", rank,
                     "), but the batch has ", balance < 0 ? "fewer receives" : "fewer sends",
                     " than ", balance < 0 ? "sends" : "receives", " to itself on tag ", a.tag,
                     "; put the matching send and recv in the same batch");
  }
}

}  // namespace dtrain::collectives::detail
