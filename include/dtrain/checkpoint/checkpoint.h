#pragma once
// Sharded, verified, atomically committed checkpoints.
//
// Layout of a checkpoint directory (see docs/checkpoints.md):
//
//   <directory>/step-000001200/      one committed checkpoint
//       rank-00000.h5                what rank 0 wrote (HDF5, opens in h5py)
//       rank-00001.h5                ...
//       manifest.json                written last: step, world size and
//                                    grid (dp x pp x tp), user metadata,
//                                    every file's size and digest (XXH3-128;
//                                    SHA-256 in format version 1), and for
//                                    every tensor its dtype, global shape and
//                                    pieces (file, dataset, offset, shape)
//   <directory>/.tmp-step-000001300/ a save in progress (never loaded)
//
// Every tensor is stored by its global name as one or more pieces of the
// global tensor: a piece has the global shape and its offset in it, so a
// checkpoint written by one layout (N ranks, any dp x pp x tp) can be read
// back by any other, each rank reading the region its placement asks for
// (Checkpoint::read(name, offset, shape)). Each rank declares what it holds
// with a placement (parallel/placement.h); each piece is written exactly
// once: a piece several ranks hold (a weight replicated over dp) by one of
// them, chosen from what every rank declared and spread by size, a piece
// only one rank holds (a tensor-parallel block, a ZeRO share) by that rank.
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

#include "dtrain/collectives/process_grid.h"
#include "dtrain/parallel/placement.h"

namespace dtrain::checkpoint {

/// What one rank contributes to a checkpoint: tensors by global name, each
/// with its placement. Names are paths made of [A-Za-z0-9_.-] segments
/// separated by '/', for example "model/fc.weight", not starting with '.';
/// they must not depend on the rank's pipeline stage.
class StateDict {
 public:
  struct Entry {
    std::string name;
    at::Tensor tensor;
    parallel::Placement placement;
  };

  /// `tensor` is the part of the global tensor `name` that `placement`
  /// describes (its local_shape()). Ranks may hold the same part only along
  /// the placement's replicated_over axes (they must then hold identical
  /// values); parts held by different ranks must not otherwise overlap. A
  /// rank may add no part of a tensor. InvalidArgument (naming the tensor)
  /// for a bad name, an unsupported dtype, a name added twice or a
  /// placement that does not fit the tensor.
  void add(const std::string& name, const at::Tensor& tensor, parallel::Placement placement);

  /// Shorthands:
  /// the whole tensor, identical on every rank that adds it
  /// (Placement::replicated); one of them writes it;
  void add_replicated(const std::string& name, const at::Tensor& tensor);
  /// this rank's block of the global tensor `name` of `global_shape`,
  /// starting at `offset` (one entry per dimension), held by no other rank
  /// (Placement::block);
  void add_shard(const std::string& name, const at::Tensor& piece,
                 std::vector<std::int64_t> global_shape, std::vector<std::int64_t> offset);
  /// a per-rank tensor: row [rank] of a global tensor of shape
  /// [world_size, tensor.sizes()...].
  void add_per_rank(const std::string& name, const at::Tensor& tensor, int rank, int world_size);

  const std::vector<Entry>& entries() const { return entries_; }
  bool empty() const { return entries_.empty(); }

 private:
  std::vector<Entry> entries_;
};

/// One stored piece of a tensor.
struct PieceInfo {
  std::string file;     ///< file name inside the checkpoint directory
  std::string dataset;  ///< the HDF5 dataset in `file`: the tensor's name, or
                        ///< ".pieces/<k>" for its further pieces in one file
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
  /// Number of ranks that wrote it, and their layout (format version < 3:
  /// dp = world_size()).
  int world_size() const;
  const collectives::GridShape& grid() const;
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

/// Points of a save at which CheckpointOptions::fault_hook is called.
enum class SavePhase {
  /// Every rank: its file is written (and synced); nothing is committed.
  kAfterWrite,
  /// Rank 0: the manifest is written in the temporary directory, which is
  /// not yet renamed to step-<N>.
  kBeforeRename,
};

/// "after_write", "before_rename".
const char* to_string(SavePhase phase);
/// The inverse of to_string(); InvalidArgument naming the phases otherwise.
SavePhase parse_save_phase(const std::string& name);

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
  /// Fault injection, for tests (the idea of LevelDB's Env): called at each
  /// SavePhase of every save with the step being saved, on the thread that
  /// writes (the background thread of an async save). An exception it throws
  /// fails that save the way a write error would (CheckpointError on every
  /// rank; the previous checkpoints stay as they were); it may also end the
  /// process, to test a crash at that point, or block, to hold a save
  /// there. Unset (the default): nothing is called. Test programs run from
  /// outside set it from DTRAIN_FAULT_CHECKPOINT (dtrain/env.h); the
  /// library never reads that variable.
  std::function<void(SavePhase phase, std::int64_t step)> fault_hook;

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

/// Writes checkpoints of one job. All ranks of the context's world construct
/// it together and call save()/latest_valid() together, in the same order.
class CheckpointManager {
 public:
  /// Collective. Creates the directory, checks that every rank can write to
  /// it (CheckpointError naming the directory and the reason, on every rank,
  /// if any rank cannot) and removes leftovers of interrupted saves. Uses a
  /// communicator of its own (split from the context's world), so background
  /// saves never interleave with the caller's collectives. The context's
  /// grid decides which ranks may hold copies of a piece (the placements'
  /// replicated_over axes) and is recorded in the manifest.
  CheckpointManager(CheckpointOptions options, const parallel::ParallelContext& context);
  /// The same for a plain data-parallel job over `comm` (dp = comm->size(),
  /// pp = tp = 1), without building a grid.
  CheckpointManager(CheckpointOptions options,
                    const std::shared_ptr<collectives::Communicator>& comm);
  /// Waits for a pending save; its error is reported as a warning.
  ~CheckpointManager();
  CheckpointManager(const CheckpointManager&) = delete;
  CheckpointManager& operator=(const CheckpointManager&) = delete;

  /// Collective. Saves `state` as checkpoint `step` with `metadata` (rank 0's
  /// is stored). Waits for the previous save first and rethrows its error.
  /// Which rank writes each piece is decided from every rank's declarations,
  /// gathered when they change (the first save, or a save whose tensors,
  /// shapes or placements differ from the previous one on any rank): then
  /// InvalidArgument, on every rank and before anything is written, if two
  /// ranks hold the same piece along an axis it is not replicated over.
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
  CheckpointManager(CheckpointOptions options,
                    const std::shared_ptr<collectives::Communicator>& comm,
                    const collectives::GridShape& grid);
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
