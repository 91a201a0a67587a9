#pragma once
// MPI implementation of the algorithms' Transport, plus the deadline,
// polling and failure diagnosis shared by every op of the MPI backend.
//
// Used only from the communicator's progress thread. Waiting polls
// MPI_Test with a back-off (spin, then yield, then short sleeps) so that an
// idle wait does not steal a core from the training thread, and checks the
// op's deadline. When the deadline passes it runs a "roll call" on a
// separate MPI communicator to find out which ranks are alive and in which
// op, and raises a TimeoutError that names them.

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/collectives/algorithms/element_type.h"
#include "src/collectives/algorithms/shm.h"
#include "src/collectives/algorithms/transport.h"
#include "src/collectives/peer_health.h"

namespace dtrain::collectives::detail {

/// What an op is, kept as plain fields and formatted only when an error or
/// a log needs the text (formatting costs more than a small op takes).
struct OpDescriptor {
  const char* op = "";
  const char* algorithm = nullptr;  ///< all_reduce, reduce_scatter, all_gather
  const char* reduce = nullptr;     ///< reducing ops only
  std::size_t count = 0;
  ElementType type = ElementType::kUInt8;
  bool has_tensor = true;
  int root = -1;  ///< broadcast
  int peer = -1;  ///< send/recv
  int tag = -1;   ///< send/recv
  int color = 0;  ///< split
  int key = 0;    ///< split

  /// batch_send_recv: how many sends and receives the batch has.
  int sends = -1;
  int recvs = -1;

  /// e.g. "all_reduce(ring, sum, 1024 x float32)".
  std::string str() const;
};

/// What the op currently running is, for tags and error messages.
struct OpInfo {
  std::uint64_t seq = 0;  ///< Position in the communicator's op order.
  OpDescriptor what;
  std::chrono::steady_clock::time_point deadline;
  std::chrono::milliseconds timeout{0};
};

class MpiTransport final : public Transport, public ShmWaiter {
 public:
  /// `comm` carries the op's messages; `diag_comm` (same group) the roll
  /// call. Neither is owned. `rank_names`, when given, are the numbers by
  /// which errors name the ranks of `comm` (their ranks in the communicator
  /// `comm` is a part of); by default their ranks in `comm`.
  /// `health` (may be null): once it has failed, waits end with a CommError
  /// naming the op and what the heartbeat lost.
  MpiTransport(MPI_Comm comm, MPI_Comm diag_comm, std::string comm_name,
               std::shared_ptr<const PeerHealth> health, std::vector<int> rank_names = {});
  /// A roll-call message still in flight keeps its buffer: it is let go of
  /// without being freed.
  ~MpiTransport() override;
  MpiTransport(const MpiTransport&) = delete;
  MpiTransport& operator=(const MpiTransport&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Request isend(const void* data, std::size_t bytes, int peer) override;
  Request irecv(void* data, std::size_t bytes, int peer) override;
  void wait(Request request) override;
  void wait_all() override;
  /// Blocks until at least one of `requests` has completed (under the op's
  /// deadline, like wait); removes the completed ones from `requests` and
  /// returns them.
  std::vector<Request> wait_some(std::vector<Request>& requests);

  /// Starts an op: sets its tag (from seq), deadline and description.
  void begin_op(OpInfo info);
  /// The op begun last.
  const OpInfo& op() const noexcept { return op_; }
  /// Ends an op that succeeded. All requests must have completed.
  void end_op();
  /// After a failure: cancels what can be cancelled and forgets the rest.
  /// Returns false if some receive could not be cancelled (its buffer may
  /// still be written by MPI and must be kept alive).
  bool abandon_op() noexcept;

  /// Waits for a request of an MPI nonblocking collective (MPI_Iallreduce...)
  /// under the op's deadline. On timeout the request is left pending.
  void wait_native(MPI_Request* request);

  /// While a shm collective waits for `peer`: answers roll calls and ends
  /// the op (TimeoutError) when its deadline passed or a peer gave up.
  void idle(const char* phase, int peer) override;

  /// Point-to-point with a caller-chosen tag on `comm` (user send/recv).
  Request isend_tagged(const void* data, std::size_t bytes, int peer, int tag);
  Request irecv_tagged(void* data, std::size_t bytes, int peer, int tag);

 private:
  struct Pending {
    MPI_Request request = MPI_REQUEST_NULL;
    int peer = -1;
    std::size_t bytes = 0;
    bool is_recv = false;
    bool done = false;
  };

  Request post(void* data, std::size_t bytes, int peer, int tag, bool is_recv);
  /// True once `pending` has completed; throws CommError on an MPI error or a
  /// size mismatch.
  bool test(Pending& pending);
  /// Called at each poll of a wait: true when it is time to answer roll
  /// calls and check the deadline (every 256 polls, and every few
  /// milliseconds however slow the polls are).
  bool diag_due();
  /// Called while polling: answers roll-call queries from peers and notes
  /// whether a peer gave up on this very op.
  void service_diag();
  /// True when this op must end: its deadline passed or a peer gave up on it.
  bool should_give_up();
  /// Ends the op: TimeoutError naming who was not heard from (after a roll
  /// call), or CommError naming what the heartbeat lost.
  [[noreturn]] void fail_timeout(const std::string& waiting_on);
  /// Sends every peer a roll-call query for the current op (at most one
  /// diag message per peer in flight). Peers waiting in the same op end it.
  void notify_peers();
  std::string op_label() const;
  /// How errors name rank `peer` of this transport.
  int name_of(int peer) const;

  MPI_Comm comm_;
  MPI_Comm diag_comm_;
  std::string comm_name_;
  std::vector<int> rank_names_;
  std::shared_ptr<const PeerHealth> health_;
  int rank_ = 0;
  int size_ = 1;
  int tag_space_ = 32767;
  int tag_ = 0;
  OpInfo op_;
  std::vector<Pending> pending_;
  // Roll-call state: one small buffer per peer for replies and queries (sends
  // of at most one message per peer are in flight).
  std::vector<std::int64_t> diag_out_;
  std::vector<MPI_Request> diag_requests_;
  // What each peer last told us about its current op (roll call), and
  // whether one of them gave up on our op.
  std::vector<std::int64_t> heard_;
  int gave_up_peer_ = -1;
  bool notified_peers_ = false;
  std::uint32_t polls_since_diag_ = 0;
  std::chrono::steady_clock::time_point last_diag_;
};

}  // namespace dtrain::collectives::detail
