#pragma once
// Sharded, verified, atomically committed checkpoints.
//
// Layout of a checkpoint directory (see docs/checkpoints.md):
//
//   <directory>/step-000001200/      one committed checkpoint
//       rank-00000.h5                what rank 0 wrote (HDF5, opens in h5py)
//       rank-00001.h5                ...
//       manifest.json                written last: step, world size, user
//                                    metadata, every file's size and digest
//                                    (XXH3-128; SHA-256 in format version 1),
//                                    and for every tensor its dtype, global
//                                    shape and pieces (file, offset, shape)
//   <directory>/.tmp-step-000001300/ a save in progress (never loaded)
//
// Every tensor is stored as one or more pieces of a global tensor: a piece
// has the global shape and its offset in it, so a checkpoint written by N
// ranks can be read back by any number of ranks, each reading the region it
// owns (Checkpoint::read(name, offset, shape)). Replicated tensors (model
// weights under data parallelism) are written once, spread over the ranks by
// size; sharded tensors (ZeRO-1 optimizer state, later tensor-/pipeline-
// parallel weights) are written by their owner.
//
// Saving (CheckpointManager::save, collective over the manager's ranks):
//   1. asynchronous: copy this rank's pieces into host staging buffers
//      (reused across saves); synchronous: use contiguous CPU tensors as they
//      are;
//   2. build <.tmp-step-N>/rank-R.h5 in memory (chunked, Fletcher32 per
//      chunk), write it (O_DIRECT by default) while digesting it on a second
//      thread, fsync it (all in a background thread when async);
//   3. all ranks exchange their file records; if any rank failed, nothing is
//      committed and every rank gets the same CheckpointError;
//   4. rank 0 writes manifest.json, fsyncs it and the directory, renames
//      .tmp-step-N to step-N and fsyncs the parent; then it deletes the
//      oldest checkpoints beyond keep_last (manifest first).
// A crash at any point leaves the previous checkpoints as they were and at
// most a .tmp directory, which is never loaded. The next manager removes it,
// or, if rank 0 had already written its manifest (every rank had agreed) and
// it verifies, completes the rename. A directory without manifest.json is not
// a checkpoint. Deleting the oldest never deletes the checkpoint just saved.
//
// Resuming (CheckpointManager::latest_valid, collective): the newest
// checkpoint whose manifest parses and whose files all have the recorded size
// and digest (the ranks share the digest work); a broken one is skipped with
// a warning naming the bad file. A step-N directory without a manifest can
// only come from damage (the rename follows the manifest): it is not loaded,
// and rank 0 warns naming it.
//
// The checkpoint directory must be visible to every rank at the same path
// (a shared file system across nodes).

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace dtrain::collectives {
class Communicator;
}

namespace dtrain::checkpoint {

/// What one rank contributes to a checkpoint. Names are paths made of
/// [A-Za-z0-9_.-] segments separated by '/', for example "model/fc.weight";
/// each becomes an HDF5 dataset of that path.
class StateDict {
 public:
  enum class Kind {
    kReplicated,  ///< identical on every rank; written once, by one rank
    kShard,       ///< this rank's piece of a global tensor
  };
  struct Entry {
    std::string name;
    at::Tensor tensor;
    Kind kind = Kind::kReplicated;
    std::vector<std::int64_t> global_shape;  ///< kShard only
    std::vector<std::int64_t> offset;        ///< kShard only
  };

  /// A tensor every rank holds identically (same name, shape and dtype on all
  /// ranks, added in the same order). One rank writes it.
  void add_replicated(const std::string& name, const at::Tensor& tensor);
  /// This rank's piece of the global tensor `name` of `global_shape`,
  /// starting at `offset` (one entry per dimension). Pieces of all ranks
  /// must not overlap. A rank may add no piece of a tensor.
  void add_shard(const std::string& name, const at::Tensor& piece,
                 std::vector<std::int64_t> global_shape, std::vector<std::int64_t> offset);
  /// A per-rank tensor (e.g. RNG state): the piece [rank] of a global tensor
  /// of shape [world_size, tensor.sizes()...].
  void add_per_rank(const std::string& name, const at::Tensor& tensor, int rank, int world_size);

  const std::vector<Entry>& entries() const { return entries_; }
  bool empty() const { return entries_.empty(); }

 private:
  void add(Entry entry);
  std::vector<Entry> entries_;
};

/// One stored piece of a tensor.
struct PieceInfo {
  std::string file;  ///< file name inside the checkpoint directory
  std::vector<std::int64_t> offset;
  std::vector<std::int64_t> shape;
};

struct TensorInfo {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<std::int64_t> global_shape;
  std::vector<PieceInfo> pieces;
};

struct FileInfo {
  std::string file;
  int rank = 0;
  std::uint64_t bytes = 0;
  /// How `digest` was computed: "xxh3_128" (XXH3, 128 bits; written by this
  /// version) or "sha256" (checkpoints of format version 1).
  std::string digest_algorithm;
  std::string digest;  ///< of the whole file, lower-case hex
};

/// A committed checkpoint, opened for reading. Opening parses the manifest
/// only; verify() checks the files. Reads check every chunk's Fletcher32
/// checksum. Thread-compatible (one thread at a time).
class Checkpoint {
 public:
  /// Throws CheckpointError if `directory` has no manifest.json or it is
  /// malformed (the message names the file and what is wrong).
  static Checkpoint open(const std::string& directory);

  const std::string& directory() const;
  std::int64_t step() const;
  /// Number of ranks that wrote it.
  int world_size() const;
  const std::map<std::string, std::string>& metadata() const;
  /// The metadata value of `key`; CheckpointError naming the key if absent.
  const std::string& metadata(const std::string& key) const;
  const std::vector<FileInfo>& files() const;
  std::vector<std::string> tensor_names() const;
  bool contains(const std::string& name) const;
  /// CheckpointError naming the tensor if absent.
  const TensorInfo& info(const std::string& name) const;

  /// Checks that every file exists with the recorded size and digest.
  /// Throws CheckpointError naming the first bad file.
  void verify() const;
  /// The same for one file of files().
  void verify_file(const FileInfo& file) const;

  /// The whole tensor `name` (assembled from its pieces).
  at::Tensor read(const std::string& name) const;
  /// The region [offset, offset + shape) of the global tensor `name`. Throws
  /// CheckpointError if the pieces do not cover it or a chunk is corrupt.
  at::Tensor read(const std::string& name, const std::vector<std::int64_t>& offset,
                  const std::vector<std::int64_t>& shape) const;

  struct Impl;

 private:
  explicit Checkpoint(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

struct CheckpointOptions {
  std::string directory;  ///< created if missing; must be writable by every rank
  /// Committed checkpoints to keep (the newest); older ones are deleted
  /// after each commit. >= 1.
  int keep_last = 3;
  /// save() returns after copying the state to host memory; the files are
  /// written and committed by a background thread. The next save() (or
  /// wait()) waits for it and rethrows its error. Needs HDF5's thread-safe
  /// build (Debian's is); with another, saves are synchronous.
  bool async = true;
  /// fsync files and directories before committing. Off only for tests of
  /// throughput on throwaway directories.
  bool fsync = true;
  /// Write the rank files with O_DIRECT, past the page cache: the bytes go
  /// from the (reused) file image to the device, with no page-cache pages
  /// to fill first, and fsync has little left to flush. Where the file
  /// system refuses O_DIRECT (tmpfs on older kernels, some FUSE file
  /// systems), the files are written through the page cache instead.
  bool direct_io = true;
  /// Timeout of the collectives that agree on a commit; they wait for the
  /// slowest rank's whole write (unset: 30 minutes).
  std::optional<std::chrono::milliseconds> timeout;
  /// Receives warnings (a checkpoint skipped on resume, a leftover removed).
  /// Unset: written to stderr with the rank.
  std::function<void(const std::string&)> on_warning;

  void validate() const;
};

/// Timing of one save, as seen by the caller.
struct SaveStats {
  double stall_seconds = 0;  ///< time save() blocked the caller
  double wait_seconds = 0;   ///< of which waiting for the previous async save
  std::uint64_t bytes = 0;   ///< bytes this rank stages and writes
};

/// Timing of the last completed write (background or not).
struct WriteStats {
  std::int64_t step = -1;
  double write_seconds = 0;  ///< this rank's file, all of it: the three parts below
  /// Building the HDF5 file in memory (copies, Fletcher32); its chunks are
  /// written to disk meanwhile.
  double encode_seconds = 0;
  /// The writes left once the file is built (HDF5's metadata, the edges of
  /// the chunk runs, chunks still queued) and the file's digest alongside.
  double io_seconds = 0;
  double fsync_seconds = 0;   ///< fsync of the file
  double commit_seconds = 0;  ///< agreement, manifest, rename
  std::uint64_t bytes = 0;    ///< size of this rank's file
  bool direct_io = false;     ///< the file was written with O_DIRECT
};

struct CheckpointEntry {
  std::int64_t step = 0;
  std::string directory;
};

/// Writes checkpoints of one job. All ranks of `comm` construct it together
/// and call save()/latest_valid() together, in the same order.
class CheckpointManager {
 public:
  /// Collective. Creates the directory, checks that every rank can write to
  /// it (CheckpointError naming the directory and the reason, on every rank,
  /// if any rank cannot) and removes leftovers of interrupted saves. Uses a
  /// communicator of its own (split from `comm`), so background saves never
  /// interleave with the caller's collectives.
  CheckpointManager(CheckpointOptions options,
                    const std::shared_ptr<collectives::Communicator>& comm);
  /// Waits for a pending save; its error is reported as a warning.
  ~CheckpointManager();
  CheckpointManager(const CheckpointManager&) = delete;
  CheckpointManager& operator=(const CheckpointManager&) = delete;

  /// Collective. Saves `state` as checkpoint `step` with `metadata` (rank 0's
  /// is stored). Waits for the previous save first and rethrows its error.
  /// Synchronous mode: returns once the checkpoint is committed.
  SaveStats save(std::int64_t step, const StateDict& state,
                 const std::map<std::string, std::string>& metadata = {});
  /// Waits for a pending background save; rethrows its error.
  void wait();
  /// The last completed write's timing (after wait()).
  WriteStats last_write() const;

  /// Collective. The newest committed checkpoint that verifies, or nullopt.
  /// Broken ones are skipped with a warning naming the bad file; rank 0
  /// warns about every step-N directory without a manifest
  /// (list_damaged_checkpoints).
  std::optional<CheckpointEntry> latest_valid();
  /// Committed checkpoints (those with a manifest), oldest first. Local.
  std::vector<CheckpointEntry> list() const;

  const CheckpointOptions& options() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

/// Committed checkpoints under `directory` (directories step-N with a
/// manifest.json), oldest first. Missing directory: empty.
std::vector<CheckpointEntry> list_checkpoints(const std::string& directory);

/// Directories step-N under `directory` without a manifest.json, oldest
/// first. A save renames its directory to step-N only after writing the
/// manifest, so these come only from damage (a deleted or lost manifest).
/// They are never loaded; resume and `dtrain-ckpt verify` report them.
std::vector<CheckpointEntry> list_damaged_checkpoints(const std::string& directory);

/// What is wrong with one of list_damaged_checkpoints() and what to do, as
/// resume and `dtrain-ckpt verify` say it (names the directory).
std::string damaged_checkpoint_message(const CheckpointEntry& entry);

}  // namespace dtrain::checkpoint
