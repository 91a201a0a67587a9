#pragma once
// Heartbeat: tells a dead or cut-off peer from a slow one, within seconds.
//
// A collective's timeout has to be long, because a peer still computing its
// backward pass is slow, not dead (CommunicatorOptions::timeout defaults to
// 5 minutes). A host that dies or loses its link should end the job much
// sooner, and TCP alone does not say so: over a cut link, MPI's sends are
// retried for many minutes. So every rank runs a thread that sends a small
// UDP datagram every `interval` to its two neighbours on the ring of world
// ranks (r-1 and r+1) and watches that it hears from them. The thread beats
// however long its rank computes, so a slow rank is never taken for a dead
// one; a rank whose process died, whose host is down or whose link is cut
// falls silent.
//
// A neighbour silent for `timeout` is lost. The rank that noticed tells every
// rank (one datagram each, repeated over the next two intervals). One
// interval after a rank first learns of a loss, in which the other notices
// arrive (a lost host has neighbours on both sides), its PeerHealth fails:
// every op that waits or starts then ends with a CommError naming the op and
// the lost ranks and hosts. A rank that is in no op by then ends the job
// itself after a grace time (Runtime::abort_job, with the same text).
//
// Worked example, 3 hosts x 2 ranks, h2 (ranks 2 and 3) cut off: rank 1
// stops hearing rank 2, rank 4 stops hearing rank 3; `timeout` later each
// tells everyone; an interval later the ops of ranks 0, 1, 4 and 5 fail with
// "lost contact with ranks [2, 3] on host h2 (...)", and those of ranks 2
// and 3 with "lost contact with ranks [1] on host h1 and ranks [4] on host
// h3 (...)". At the defaults (0.5 s, 4 s) that is 4.5-5.5 s after the cut.
//
// A neighbour is watched only once it has been heard from: a network that
// drops the datagrams (a firewall) leaves that pair unwatched, with a
// warning, instead of failing healthy jobs. A rank that ends normally
// (~Runtime) says goodbye, and its neighbours stop watching it. Ranks on one
// host (same hostname) talk over 127.0.0.1; to a rank on another host a
// rank sends to that host's first address on a subnet of its own interfaces,
// else to its first address. Nothing compares clocks across hosts.

#include <memory>

#include "dtrain/runtime.h"
#include "src/collectives/mpi/mpi_backend.h"  // PeerHealth, world_all_gather

namespace dtrain::detail {

class Heartbeat {
 public:
  /// Collective over the whole job, where this process is `rank` of `size`
  /// (an all-gather of addresses). Off (the health never fails) when
  /// `options.interval` is 0 or the job has one rank, and, on every rank
  /// alike, when a rank cannot open its UDP socket (rank 0 warns).
  Heartbeat(int rank, int size, const HeartbeatOptions& options);
  /// Says goodbye to the neighbours and stops the thread. Never throws.
  ~Heartbeat();
  Heartbeat(const Heartbeat&) = delete;
  Heartbeat& operator=(const Heartbeat&) = delete;

  /// Shared with every communicator of the process.
  std::shared_ptr<collectives::detail::PeerHealth> health() const { return health_; }

 private:
  struct State;
  void loop();

  std::shared_ptr<collectives::detail::PeerHealth> health_;
  std::unique_ptr<State> state_;
};

}  // namespace dtrain::detail
