#pragma once
// The on-disk format of a checkpoint: names, dtypes, the manifest and the
// HDF5 piece files. Private to src/checkpoint.

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/collectives/process_grid.h"
#include "src/checkpoint/file_image.h"
#include "src/io/hdf5.h"

namespace dtrain::checkpoint::detail {

constexpr const char* kFormatName = "dtrain-checkpoint";
/// The version written. 3: a piece may name the HDF5 dataset that holds it
/// (a file can hold several pieces of one tensor: ZeRO's share of a
/// parameter), the manifest records the grid that wrote it, optimizer state
/// is stored per parameter ("optim/<param>/<field>", also under ZeRO) and
/// RNG streams by grid coordinates ("rng/<stream>/<device>"). 2: the
/// manifest records each file's XXH3-128 ("xxh3_128"); 1: its SHA-256
/// ("sha256"). Versions kOldestFormatVersion..kFormatVersion are read; a
/// dtrain older than version 3 refuses a version-3 checkpoint, whose ZeRO
/// and RNG state it would not find.
constexpr int kFormatVersion = 3;
constexpr int kOldestFormatVersion = 1;
constexpr const char* kManifestName = "manifest.json";

/// "step-000001200" (the committed directory name of a step).
std::string step_dir_name(std::int64_t step);
/// ".tmp-step-000001200".
std::string tmp_dir_name(std::int64_t step);
/// "rank-00003.h5".
std::string rank_file_name(int rank);
/// Parses "step-<digits>"; -1 otherwise.
std::int64_t parse_step_dir_name(const std::string& name);

const char* dtype_name(at::ScalarType dtype);
/// CheckpointError for names not from dtype_name().
at::ScalarType parse_dtype(const std::string& name, const std::string& where);

/// The dataset of a tensor's k-th further piece in one file (k >= 1): names
/// of tensors never start with '.', so these never collide with them.
std::string extra_piece_dataset(int k);

/// One piece as written by a rank.
struct PieceRecord {
  std::string name;
  std::string dataset;  ///< the HDF5 dataset holding it; empty: `name`
  at::ScalarType dtype = at::kFloat;
  std::vector<std::int64_t> global_shape;
  std::vector<std::int64_t> offset;
  std::vector<std::int64_t> shape;
};

/// What one rank reports after writing its file.
struct FileRecord {
  FileInfo info;
  std::vector<PieceRecord> pieces;
  std::string error;  ///< non-empty: this rank failed to write
};

std::string serialize(const FileRecord& record);
FileRecord parse_file_record(const std::string& text);

struct Manifest {
  int version = kFormatVersion;
  std::int64_t step = 0;
  int world_size = 0;
  /// The layout that wrote it (version < 3: dp = world_size).
  collectives::GridShape grid;
  double created_unix = 0;
  std::map<std::string, std::string> metadata;
  std::vector<FileInfo> files;
  std::map<std::string, TensorInfo> tensors;
};

/// Builds the manifest from every rank's record; CheckpointError when two
/// ranks disagree on a tensor's dtype or global shape.
Manifest make_manifest(std::int64_t step, const std::map<std::string, std::string>& metadata,
                       const std::vector<FileRecord>& records, const collectives::GridShape& grid);
std::string serialize(const Manifest& manifest);
/// CheckpointError naming `source` when the text is not a valid manifest.
Manifest parse_manifest(const std::string& text, const std::string& source);

/// A piece to write: `data` is contiguous host memory.
struct PieceToWrite {
  PieceRecord record;
  at::Tensor data;
};

/// How long the parts of write_piece_file() took.
struct FileWriteTimes {
  double encode_seconds = 0;  ///< building the HDF5 file (its chunks written meanwhile)
  double write_seconds = 0;   ///< the writes left after that, and the digest
  double fsync_seconds = 0;
  bool direct_io = false;  ///< written with O_DIRECT
};

/// Writes the pieces to a new HDF5 file at `path` (chunked, Fletcher32 per
/// chunk) with root attributes (format, version, step, rank, world size);
/// returns its size and XXH3-128 digest. The file is built in `image` (HDF5's
/// core driver; the caller's buffer, reused across saves since fresh pages
/// are slow) and put on disk by an ImageFileWriter, each chunk as soon as it
/// is done, so a full disk or a file-size limit is a clean CheckpointError
/// naming the file (the partial file is removed) rather than a failing HDF5
/// close. `times`, if given, receives the time of each part.
FileInfo write_piece_file(const std::string& path, std::int64_t step, int rank, int world_size,
                          const std::vector<PieceToWrite>& pieces, const ImageWriteOptions& options,
                          FileImage& image, FileWriteTimes* times = nullptr);

/// Reads [start, start + count) of a piece of tensor `name`, stored as
/// `dataset`, from an open file into `out` (contiguous, count's shape, the
/// piece's dtype).
void read_piece(hid_t file, const std::string& path, const std::string& name,
                const std::string& dataset, const std::vector<std::int64_t>& start,
                const std::vector<std::int64_t>& count, at::Tensor& out);

/// Opens an HDF5 file read-only (CheckpointError naming it).
io::Handle open_piece_file(const std::string& path);

/// Durability helpers: fsync a file or a directory (CheckpointError on failure).
void fsync_path(const std::string& path, bool directory);
/// Writes `text` to `path` through a temporary file, fsync and rename.
void write_file_atomically(const std::string& path, const std::string& text, bool sync);

}  // namespace dtrain::checkpoint::detail
