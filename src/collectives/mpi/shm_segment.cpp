#include "src/collectives/mpi/shm_segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "src/collectives/mpi/mpi_error.h"

namespace dtrain::collectives::detail {
namespace {

// All ranks agree on `ok` (logical and).
bool all_ok(MPI_Comm comm, bool ok) {
  int mine = ok ? 1 : 0;
  int all = 0;
  DTRAIN_MPI_CHECK(MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, comm));
  return all == 1;
}

}  // namespace

std::unique_ptr<ShmSegment> ShmSegment::create(MPI_Comm comm, std::size_t slot_bytes) {
  int rank = 0;
  int size = 1;
  DTRAIN_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  DTRAIN_MPI_CHECK(MPI_Comm_size(comm, &size));
  if (size == 1 || slot_bytes == 0) return nullptr;
  if (slot_bytes < shm_min_slot_bytes(size)) {
    if (rank == 0) {
      std::fprintf(stderr,
                   "[dtrain] warning: shm_slot_bytes %zu is too small for %d ranks (at least %zu); "
                   "this communicator uses the ring instead of shared memory\n",
                   slot_bytes, size, shm_min_slot_bytes(size));
    }
    return nullptr;
  }

  MPI_Comm node = MPI_COMM_NULL;
  DTRAIN_MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
  int node_size = 0;
  DTRAIN_MPI_CHECK(MPI_Comm_size(node, &node_size));
  DTRAIN_MPI_CHECK(MPI_Comm_free(&node));
  if (!all_ok(comm, node_size == size)) return nullptr;

  const std::size_t region = shm_region_bytes(slot_bytes);
  const std::size_t bytes = region * static_cast<std::size_t>(size);
  // Rank 0 creates the object under a name unique on the node and tells the
  // others; the name is unlinked once every rank has it mapped.
  static std::atomic<unsigned> counter{0};
  char name[64] = {};
  bool ok = true;
  if (rank == 0) {
    std::snprintf(name, sizeof(name), "/dtrain-%ld-%u", static_cast<long>(getpid()),
                  counter.fetch_add(1));
    const int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    // Reserve the pages now: a sparse object on a full /dev/shm (containers
    // often mount only 64 MiB) would fail later with SIGBUS on first touch.
    int error = fd < 0 ? errno : 0;
    if (error == 0 && ftruncate(fd, static_cast<off_t>(bytes)) != 0) error = errno;
    if (error == 0) error = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
    if (fd >= 0) close(fd);
    ok = error == 0;
    if (!ok) {
      std::fprintf(stderr,
                   "[dtrain] warning: no shared memory for the shm collectives (%zu bytes in "
                   "/dev/shm: %s); this communicator uses the ring instead\n",
                   bytes, std::strerror(error));
      if (fd >= 0) shm_unlink(name);
      name[0] = '\0';
    }
  }
  DTRAIN_MPI_CHECK(MPI_Bcast(name, sizeof(name), MPI_CHAR, 0, comm));
  void* base = MAP_FAILED;
  if (name[0] != '\0') {
    const int fd = shm_open(name, O_RDWR, 0);
    if (fd >= 0) {
      base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      close(fd);
    }
  }
  ok = all_ok(comm, base != MAP_FAILED);
  if (rank == 0 && name[0] != '\0') shm_unlink(name);
  if (!ok) {
    if (base != MAP_FAILED) munmap(base, bytes);
    return nullptr;
  }
  std::vector<void*> regions;
  for (int p = 0; p < size; ++p) regions.push_back(static_cast<char*>(base) + region * p);
  ShmGroup group(rank, std::move(regions), slot_bytes);
  // No rank touches a peer's counters before the peer initialized them.
  DTRAIN_MPI_CHECK(MPI_Barrier(comm));
  return std::unique_ptr<ShmSegment>(new ShmSegment(base, bytes, std::move(group)));
}

ShmSegment::~ShmSegment() { munmap(base_, bytes_); }

}  // namespace dtrain::collectives::detail
