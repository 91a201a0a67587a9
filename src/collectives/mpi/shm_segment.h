#pragma once
// The shared mapping behind Algorithm::kShm: one POSIX shared-memory object
// per communicator whose ranks all run on one node, mapped by every rank
// and unlinked as soon as all have mapped it (nothing is left in /dev/shm,
// even when a process is killed).

#include <mpi.h>

#include <cstddef>
#include <memory>

#include "src/collectives/algorithms/shm.h"

namespace dtrain::collectives::detail {

class ShmSegment {
 public:
  /// Collective over `comm`. Returns nullptr, on every rank alike, when the
  /// communicator has one rank, spans nodes, `slot_bytes` is 0 or below
  /// shm_min_slot_bytes (rank 0 warns on stderr), or the
  /// object could not be created, reserved (a full /dev/shm: rank 0 warns on
  /// stderr) or mapped by every rank (kShm then runs as kRing).
  static std::unique_ptr<ShmSegment> create(MPI_Comm comm, std::size_t slot_bytes);

  ~ShmSegment();
  ShmSegment(const ShmSegment&) = delete;
  ShmSegment& operator=(const ShmSegment&) = delete;

  ShmGroup& group() noexcept { return group_; }

 private:
  ShmSegment(void* base, std::size_t bytes, ShmGroup group)
      : base_(base), bytes_(bytes), group_(std::move(group)) {}

  void* base_;
  std::size_t bytes_;
  ShmGroup group_;
};

}  // namespace dtrain::collectives::detail
