#pragma once
// Runtime: process-wide setup of the transports dtrain uses (MPI today).
//
// Create exactly one Runtime at the top of main() and pass it (or the
// communicators it creates) to the rest of the program; dtrain has no
// mutable globals. Destroying it finalizes MPI if the Runtime initialized it.
//
//   int main(int argc, char** argv) {
//     dtrain::Runtime runtime(&argc, &argv);
//     auto world = runtime.world();
//     ...
//   }
//
// The same binary runs with or without mpirun/srun: started on its own it is
// a world of one rank.

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "dtrain/collectives/types.h"
#include "dtrain/env.h"  // LaunchInfo, detect_launch()

namespace dtrain {

namespace collectives {
class Communicator;
}
namespace detail {
class Heartbeat;
}

/// How the process's allocator is set up for training (docs/configuration.md).
///
/// A training step allocates and frees the same activations and gradients
/// every step. glibc's malloc serves blocks above a threshold with mmap and
/// returns a freed heap top above another to the kernel; both thresholds
/// move with the allocation history, so some processes hand their step's
/// memory back and fault it in again (zeroed) every step, others do not. On a
/// 2-rank CPU job that made one rank 4-9% slower, and its peer waited.
/// Fixing both thresholds (which also stops them from moving) keeps freed
/// blocks in the process for the next step; memory stays at the peak a step
/// needs. Blocks above `mmap_threshold` (glibc's maximum, 32 MiB) still come
/// and go with mmap.
struct MallocPolicy {
  bool tune = false;   ///< Whether Runtime sets the thresholds below.
  std::string reason;  ///< Why (or why not), for logs.
  std::size_t mmap_threshold = 0;
  std::size_t trim_threshold = 0;
};

/// Decides from the environment: tunes unless DTRAIN_MALLOC_TUNING=0, or
/// the user set glibc's own knobs (MALLOC_MMAP_THRESHOLD_,
/// MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, MALLOC_MMAP_MAX_, or
/// glibc.malloc.* in GLIBC_TUNABLES), which are then left as they are.
/// Throws InvalidArgument on a malformed DTRAIN_MALLOC_TUNING.
MallocPolicy plan_malloc_policy();

/// Applies a plan made by plan_malloc_policy() (nothing if !tune). Returns
/// false if the C library refused (or is not glibc). Process-wide.
bool apply_malloc_policy(const MallocPolicy& policy);

/// The heartbeat between the ranks of a job: how fast a dead or cut-off
/// host ends the job, whatever the collectives' timeouts (a slow rank never
/// trips it: it beats from a thread of its own). Every rank sends a UDP
/// datagram every `interval` to its two neighbours among the world ranks;
/// a neighbour silent for `timeout` is lost, every rank is told, and every
/// op then ends with a CommError naming the lost ranks and their hosts.
/// Details: docs/configuration.md, src/runtime/heartbeat.h.
struct HeartbeatOptions {
  /// Between two datagrams to each neighbour (DTRAIN_HEARTBEAT_MS). 0 turns
  /// the heartbeat off.
  std::chrono::milliseconds interval{500};
  /// A neighbour silent this long is lost (DTRAIN_HEARTBEAT_TIMEOUT_MS); at
  /// least 2 x interval.
  std::chrono::milliseconds timeout{4000};

  void validate() const;
};

class Runtime {
 public:
  /// Applies plan_malloc_policy() (see MallocPolicy), then initializes MPI
  /// with MPI_THREAD_MULTIPLE (each communicator runs ops on
  /// its own thread). Throws CommError if the MPI library cannot provide that
  /// level. MPI_COMM_WORLD and every communicator dtrain creates run under
  /// MPI_ERRORS_RETURN: a failed MPI call becomes a CommError carrying MPI's
  /// message, never an abort. If MPI is already initialized (by the
  /// application), checks its thread level and leaves MPI_COMM_WORLD's error
  /// handler and finalization to the application (dtrain's own
  /// communicators still return errors). Then starts the heartbeat
  /// (`heartbeat`, with the DTRAIN_HEARTBEAT_* overrides): collective, every
  /// process of the job must create its Runtime. At most one Runtime may
  /// exist in a process.
  Runtime(int* argc, char*** argv, HeartbeatOptions heartbeat = {});
  Runtime() : Runtime(nullptr, nullptr) {}
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  /// This process's rank in the whole job.
  int rank() const noexcept { return rank_; }
  /// Number of processes in the whole job.
  int size() const noexcept { return size_; }
  const LaunchInfo& launch() const noexcept { return launch_; }
  /// What the constructor did to the allocator (MallocPolicy).
  const MallocPolicy& malloc_policy() const noexcept { return malloc_policy_; }

  /// Creates a new communicator over every process of the job. Collective:
  /// every process must call it, in the same order. The DTRAIN_* environment
  /// overrides (see docs/configuration.md) are applied on top of `options`.
  std::shared_ptr<collectives::Communicator> world(collectives::CommunicatorOptions options = {});

  /// The heartbeat's settings after the environment's overrides.
  const HeartbeatOptions& heartbeat() const noexcept { return heartbeat_options_; }

  /// Ends the whole job now (MPI_Abort) after writing `reason` to stderr with
  /// this process's rank, as "[dtrain rank R] aborting the job: REASON" (the
  /// line dtrain-launch reads). For use after a CommError/TimeoutError, so
  /// that the launcher sees the failure promptly instead of ranks hanging.
  /// The first caller in a process proceeds, later ones (other threads) wait
  /// for it. If MPI_Abort has not ended the process after 10 s (a launcher
  /// that cannot reach a lost host), the process exits by itself.
  [[noreturn]] static void abort_job(int exit_code, std::string_view reason) noexcept;

 private:
  bool owns_mpi_ = false;
  int rank_ = 0;
  int size_ = 1;
  LaunchInfo launch_;
  MallocPolicy malloc_policy_;
  HeartbeatOptions heartbeat_options_;
  std::unique_ptr<detail::Heartbeat> heartbeat_;  // before MPI_Finalize: stopped first
};

}  // namespace dtrain
