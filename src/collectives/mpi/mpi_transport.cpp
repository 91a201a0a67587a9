#include "src/collectives/mpi/mpi_transport.h"

#include <sched.h>

#include <algorithm>
#include <climits>
#include <new>
#include <sstream>
#include <thread>

#include "dtrain/error.h"
#include "src/collectives/algorithms/backoff.h"
#include "src/collectives/mpi/mpi_error.h"

namespace dtrain::collectives::detail {
namespace {

using Clock = std::chrono::steady_clock;

// Roll-call messages on the diag communicator: {kind, seq}.
constexpr int kQueryTag = 1;  // "I gave up on op #seq; where are you?"
constexpr int kReplyTag = 2;  // "I am waiting in op #seq."
constexpr std::int64_t kNotInOp = -1;
// A waiting rank answers roll calls and checks its deadline every 256 polls,
// and at least this often: on a loaded machine each back-off sleep can take
// milliseconds, and 256 of them would leave a live peer unheard.
constexpr auto kDiagInterval = std::chrono::milliseconds(5);
// How long a roll call waits for the peers' answers: a tenth of the op's
// timeout, within these bounds. A live peer answers from its polling loop,
// which a loaded machine can keep off the core for a few hundred
// milliseconds; only the missing ranks make a roll call wait this long.
constexpr auto kMinRollCallWindow = std::chrono::milliseconds(500);
constexpr auto kMaxRollCallWindow = std::chrono::milliseconds(1000);

}  // namespace

std::string OpDescriptor::str() const {
  std::string out = op;
  out += "(";
  auto item = [&out](const std::string& text) {
    if (out.back() != '(') out += ", ";
    out += text;
  };
  if (algorithm != nullptr) item(algorithm);
  if (reduce != nullptr) item(reduce);
  if (root >= 0) item("root " + std::to_string(root));
  if (peer >= 0)
    item(std::string(std::string(op) == "recv" ? "from" : "to") + " rank " + std::to_string(peer));
  if (tag >= 0) item("tag " + std::to_string(tag));
  if (std::string(op) == "split")
    item("color " + std::to_string(color) + ", key " + std::to_string(key));
  if (sends >= 0) item(std::to_string(sends) + " sends, " + std::to_string(recvs) + " recvs");
  if (has_tensor) item(std::to_string(count) + " x " + to_string(type));
  return out + ")";
}

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<std::size_t>(len));
}

void throw_mpi_error(int code, const char* call, const std::string& context) {
  DTRAIN_THROW(CommError, call, " failed", context.empty() ? "" : " (", context,
               context.empty() ? "" : ")", ": ", mpi_error_string(code));
}

MpiTransport::MpiTransport(MPI_Comm comm, MPI_Comm diag_comm, std::string comm_name,
                           std::shared_ptr<const PeerHealth> health, std::vector<int> rank_names)
    : comm_(comm),
      diag_comm_(diag_comm),
      comm_name_(std::move(comm_name)),
      rank_names_(std::move(rank_names)),
      health_(std::move(health)) {
  DTRAIN_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  DTRAIN_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  void* tag_ub = nullptr;
  int flag = 0;
  DTRAIN_MPI_CHECK(MPI_Comm_get_attr(comm_, MPI_TAG_UB, &tag_ub, &flag));
  if (flag && tag_ub != nullptr) tag_space_ = std::min(*static_cast<int*>(tag_ub), 1 << 30);
  diag_out_.assign(static_cast<std::size_t>(size_) * 2, 0);
  diag_requests_.assign(static_cast<std::size_t>(size_), MPI_REQUEST_NULL);
  pending_.reserve(64);
}

MpiTransport::~MpiTransport() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  bool in_flight = false;
  for (MPI_Request& request : diag_requests_) {
    if (request == MPI_REQUEST_NULL) continue;
    int done = 0;
    if (!finalized) MPI_Test(&request, &done, MPI_STATUS_IGNORE);
    if (done) continue;
    in_flight = true;
    if (!finalized) MPI_Request_free(&request);  // MPI still reads diag_out_
  }
  if (in_flight) {
    auto* kept = new (std::nothrow) std::vector<std::int64_t>();
    if (kept != nullptr) kept->swap(diag_out_);
  }
}

void MpiTransport::begin_op(OpInfo info) {
  op_ = std::move(info);
  tag_ = static_cast<int>(op_.seq % static_cast<std::uint64_t>(tag_space_));
  pending_.clear();
  polls_since_diag_ = 0;
  last_diag_ = op_.deadline - op_.timeout;  // the op's start
  heard_.assign(static_cast<std::size_t>(size_), kNotInOp - 1);
  gave_up_peer_ = -1;
  notified_peers_ = false;
}

void MpiTransport::end_op() { pending_.clear(); }

bool MpiTransport::abandon_op() noexcept {
  // Peers still waiting in this op would otherwise sit out their whole
  // timeout: tell them we gave up.
  if (!notified_peers_) {
    try {
      notify_peers();
    } catch (...) {
    }
  }
  bool all_released = true;
  for (Pending& p : pending_) {
    if (p.done || p.request == MPI_REQUEST_NULL) continue;
    if (p.is_recv) {
      MPI_Cancel(&p.request);
      MPI_Status status;
      int flag = 0;
      // A cancelled receive completes at once; one that is already being
      // filled cannot be cancelled and stays pending.
      for (int i = 0; i < 1000 && !flag; ++i) MPI_Test(&p.request, &flag, &status);
      int cancelled = 0;
      if (flag) MPI_Test_cancelled(&status, &cancelled);
      if (!flag) {
        all_released = false;
        MPI_Request_free(&p.request);
      }
    } else {
      MPI_Request_free(&p.request);  // small sends finish on their own
    }
  }
  pending_.clear();
  return all_released;
}

Transport::Request MpiTransport::post(void* data, std::size_t bytes, int peer, int tag,
                                      bool is_recv) {
  DTRAIN_CHECK_T(CommError, bytes <= static_cast<std::size_t>(INT_MAX), "message of ", bytes,
                 " bytes to/from rank ", peer, " exceeds MPI's 2 GiB message limit");
  Pending p;
  p.peer = peer;
  p.bytes = bytes;
  p.is_recv = is_recv;
  const int count = static_cast<int>(bytes);
  if (is_recv) {
    DTRAIN_MPI_CHECK(MPI_Irecv(data, count, MPI_BYTE, peer, tag, comm_, &p.request));
  } else {
    DTRAIN_MPI_CHECK(MPI_Isend(data, count, MPI_BYTE, peer, tag, comm_, &p.request));
  }
  pending_.push_back(p);
  return pending_.size() - 1;
}

Transport::Request MpiTransport::isend(const void* data, std::size_t bytes, int peer) {
  return post(const_cast<void*>(data), bytes, peer, tag_, false);
}

Transport::Request MpiTransport::irecv(void* data, std::size_t bytes, int peer) {
  return post(data, bytes, peer, tag_, true);
}

Transport::Request MpiTransport::isend_tagged(const void* data, std::size_t bytes, int peer,
                                              int tag) {
  return post(const_cast<void*>(data), bytes, peer, tag, false);
}

Transport::Request MpiTransport::irecv_tagged(void* data, std::size_t bytes, int peer, int tag) {
  return post(data, bytes, peer, tag, true);
}

bool MpiTransport::test(Pending& p) {
  if (p.done) return true;
  int flag = 0;
  MPI_Status status;
  const int rc = MPI_Test(&p.request, &flag, &status);
  if (rc != MPI_SUCCESS) {
    std::ostringstream context;
    context << op_label() << " on '" << comm_name_ << "', " << (p.is_recv ? "from" : "to")
            << " rank " << name_of(p.peer);
    if (rc == MPI_ERR_TRUNCATE) {
      DTRAIN_THROW(CommError, op_.what.str(), " on communicator '", comm_name_, "': rank ",
                   name_of(p.peer), " sent more than the ", p.bytes,
                   " bytes expected; the ranks passed tensors of different sizes or dtypes");
    }
    throw_mpi_error(rc, "MPI_Test", context.str());
  }
  if (!flag) return false;
  p.done = true;
  if (p.is_recv) {
    int received = 0;
    MPI_Get_count(&status, MPI_BYTE, &received);
    DTRAIN_CHECK_T(CommError, static_cast<std::size_t>(received) == p.bytes, op_.what.str(),
                   " on communicator '", comm_name_, "': received ", received, " bytes from rank ",
                   name_of(p.peer), ", expected ", p.bytes,
                   "; the ranks passed tensors of different sizes or dtypes");
  }
  return true;
}

void MpiTransport::wait(Request request) {
  Pending& p = pending_.at(request);
  Backoff backoff;
  while (!test(p)) {
    if (diag_due()) {
      service_diag();
      if (should_give_up()) {
        // Name every peer this op still waits for, not just this request's.
        std::ostringstream waiting;
        bool first = true;
        for (const Pending& q : pending_) {
          if (q.done || !q.is_recv) continue;
          waiting << (first ? "" : ", ") << "receive from rank " << name_of(q.peer);
          first = false;
        }
        fail_timeout(waiting.str());
      }
    }
    backoff.pause();
  }
}

std::vector<Transport::Request> MpiTransport::wait_some(std::vector<Request>& requests) {
  std::vector<Request> done;
  Backoff backoff;
  while (true) {
    for (std::size_t i = 0; i < requests.size();) {
      if (test(pending_.at(requests[i]))) {
        done.push_back(requests[i]);
        requests.erase(requests.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
    if (!done.empty() || requests.empty()) return done;
    if (diag_due()) {
      service_diag();
      if (should_give_up()) {
        std::ostringstream waiting;
        for (Request r : requests) {
          const Pending& q = pending_.at(r);
          waiting << (waiting.tellp() > 0 ? ", " : "") << (q.is_recv ? "receive from" : "send to")
                  << " rank " << q.peer;
        }
        fail_timeout(waiting.str());
      }
    }
    backoff.pause();
  }
}

void MpiTransport::wait_all() {
  for (Request r = 0; r < pending_.size(); ++r) wait(r);
  pending_.clear();
}

void MpiTransport::wait_native(MPI_Request* request) {
  Backoff backoff;
  int flag = 0;
  while (true) {
    MPI_Status status;
    const int rc = MPI_Test(request, &flag, &status);
    if (rc != MPI_SUCCESS) throw_mpi_error(rc, "MPI_Test", op_.what.str());
    if (flag) return;
    if (diag_due()) {
      service_diag();
      if (should_give_up()) fail_timeout("the MPI library's collective");
    }
    backoff.pause();
  }
}

void MpiTransport::idle(const char* phase, int peer) {
  service_diag();
  if (should_give_up()) {
    fail_timeout("rank " + std::to_string(name_of(peer)) + " to " + phase + " (shared memory)");
  }
}

bool MpiTransport::diag_due() {
  ++polls_since_diag_;
  if (polls_since_diag_ % 256 == 0) return true;
  // The clock is read every 8th poll only: most waits of small messages end
  // within the first few polls.
  return polls_since_diag_ % 8 == 0 && Clock::now() - last_diag_ >= kDiagInterval;
}

void MpiTransport::service_diag() {
  last_diag_ = Clock::now();
  while (true) {
    int flag = 0;
    MPI_Status status;
    DTRAIN_MPI_CHECK(MPI_Iprobe(MPI_ANY_SOURCE, kQueryTag, diag_comm_, &flag, &status));
    if (!flag) return;
    std::int64_t query[2] = {0, 0};
    DTRAIN_MPI_CHECK(MPI_Recv(query, 2, MPI_INT64_T, status.MPI_SOURCE, kQueryTag, diag_comm_,
                              MPI_STATUS_IGNORE));
    const int peer = status.MPI_SOURCE;
    // Reply with the op we are in, if the previous reply to this peer has left.
    int sent = 1;
    if (diag_requests_[peer] != MPI_REQUEST_NULL) {
      MPI_Test(&diag_requests_[peer], &sent, MPI_STATUS_IGNORE);
    }
    if (sent) {
      diag_out_[2 * peer] = kReplyTag;
      diag_out_[2 * peer + 1] = static_cast<std::int64_t>(op_.seq);
      MPI_Isend(&diag_out_[2 * peer], 2, MPI_INT64_T, peer, kReplyTag, diag_comm_,
                &diag_requests_[peer]);
    }
    heard_[static_cast<std::size_t>(peer)] = query[1];
    if (query[1] == static_cast<std::int64_t>(op_.seq) && gave_up_peer_ < 0) gave_up_peer_ = peer;
  }
}

bool MpiTransport::should_give_up() {
  return gave_up_peer_ >= 0 || Clock::now() >= op_.deadline || (health_ && health_->failed());
}

int MpiTransport::name_of(int peer) const {
  return rank_names_.empty() ? peer : rank_names_[static_cast<std::size_t>(peer)];
}

std::string MpiTransport::op_label() const {
  if (op_.seq == ~std::uint64_t{0}) return op_.what.str();
  return op_.what.str() + " #" + std::to_string(op_.seq);
}

void MpiTransport::notify_peers() {
  notified_peers_ = true;
  for (int peer = 0; peer < size_; ++peer) {
    if (peer == rank_) continue;
    int sent = 1;
    if (diag_requests_[peer] != MPI_REQUEST_NULL)
      MPI_Test(&diag_requests_[peer], &sent, MPI_STATUS_IGNORE);
    if (!sent) continue;
    diag_out_[2 * peer] = kQueryTag;
    diag_out_[2 * peer + 1] = static_cast<std::int64_t>(op_.seq);
    MPI_Isend(&diag_out_[2 * peer], 2, MPI_INT64_T, peer, kQueryTag, diag_comm_,
              &diag_requests_[peer]);
  }
}

void MpiTransport::fail_timeout(const std::string& waiting_on) {
  if (health_ && health_->failed()) {
    // The heartbeat knows who is gone; a roll call would only wait for them.
    notify_peers();
    std::ostringstream msg;
    msg << op_label() << " on communicator '" << comm_name_ << "' (rank " << name_of(rank_);
    if (rank_names_.empty()) msg << " of " << size_;
    msg << ") was ended: " << health_->failure();
    if (!waiting_on.empty()) msg << "; this rank was waiting on " << waiting_on;
    DTRAIN_THROW(CommError, msg.str());
  }
  // Roll call: ask every peer which op it is in. Live peers that are waiting
  // in an op answer from their own polling loop; a peer that is dead, hung
  // outside dtrain, or idle does not answer.
  notify_peers();
  // Peers that queried us already told us where they are.
  std::vector<std::int64_t>& heard = heard_;
  heard[static_cast<std::size_t>(rank_)] = static_cast<std::int64_t>(op_.seq);
  const auto window = std::clamp(op_.timeout / 10, kMinRollCallWindow, kMaxRollCallWindow);
  const auto until = Clock::now() + window;
  int missing = 0;
  for (std::int64_t h : heard) missing += h < kNotInOp ? 1 : 0;
  while (missing > 0 && Clock::now() < until) {
    for (int tag : {kReplyTag, kQueryTag}) {
      int flag = 0;
      MPI_Status status;
      if (MPI_Iprobe(MPI_ANY_SOURCE, tag, diag_comm_, &flag, &status) != MPI_SUCCESS || !flag)
        continue;
      std::int64_t msg[2] = {0, 0};
      MPI_Recv(msg, 2, MPI_INT64_T, status.MPI_SOURCE, tag, diag_comm_, MPI_STATUS_IGNORE);
      auto& slot = heard[static_cast<std::size_t>(status.MPI_SOURCE)];
      if (slot < kNotInOp) --missing;
      slot = msg[1];
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }

  std::ostringstream not_heard;
  std::ostringstream elsewhere;
  std::ostringstream same;
  for (int peer = 0; peer < size_; ++peer) {
    const std::int64_t s = heard[static_cast<std::size_t>(peer)];
    if (peer == rank_) continue;
    if (s < kNotInOp) {
      not_heard << (not_heard.tellp() > 0 ? ", " : "") << name_of(peer);
    } else if (s == kNotInOp) {
      elsewhere << (elsewhere.tellp() > 0 ? ", " : "") << "rank " << name_of(peer)
                << " is in a send/recv";
    } else if (s == static_cast<std::int64_t>(op_.seq)) {
      same << (same.tellp() > 0 ? ", " : "") << name_of(peer);
    } else {
      elsewhere << (elsewhere.tellp() > 0 ? ", " : "") << "rank " << name_of(peer) << " is in op #"
                << s;
    }
  }
  std::ostringstream msg;
  msg << op_label() << " on communicator '" << comm_name_ << "' (rank " << name_of(rank_);
  if (rank_names_.empty()) msg << " of " << size_;
  msg << ") ";
  if (gave_up_peer_ >= 0 && Clock::now() < op_.deadline) {
    msg << "was ended because rank " << name_of(gave_up_peer_)
        << " gave up on it (after an error or its own timeout)";
  } else {
    msg << "did not finish within " << op_.timeout.count() << " ms";
  }
  msg << "; ranks not heard from: [" << not_heard.str() << "]";
  if (elsewhere.tellp() > 0) msg << "; " << elsewhere.str();
  if (same.tellp() > 0) msg << "; ranks also waiting in this op: [" << same.str() << "]";
  if (!waiting_on.empty()) msg << "; this rank was waiting on " << waiting_on;
  DTRAIN_THROW(TimeoutError, msg.str());
}

}  // namespace dtrain::collectives::detail
