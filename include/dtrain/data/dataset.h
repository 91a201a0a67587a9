#pragma once
// Sharded HDF5 data sets: the on-disk format, a writer and a reader.
//
// A data set is a directory:
//
//   <dir>/manifest.json      written last; the data set exists once it does
//   <dir>/shard-00000.h5     one HDF5 dataset per field, shape [n, ...shape]
//   <dir>/shard-00001.h5     ...
//
// manifest.json holds format_version, name, total_samples, the fields
// ({name, dtype, shape} with the per-sample shape, and for integer fields
// the smallest and largest value, min and max), optional class_names, and
// per shard {file, samples, bytes, sha256}. Every field of a shard is
// chunked along the sample axis only (chunk = max(1, 256 KiB / sample bytes)
// samples, at most the shard's samples), uncompressed, so any HDF5 tool
// (h5dump, h5py) opens it as a plain array. See docs/data.md.
//
// Thread-safety: a DatasetWriter is used by one thread at a time. Dataset's
// const accessors and read() may be called from any thread; reads are
// serialized (HDF5's thread-safe build holds one global lock per call
// anyway, which is why the loader keeps all of them on one reader thread).

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace dtrain::data {

/// Element types a field can hold.
enum class DType { kUInt8, kInt8, kInt16, kInt32, kInt64, kFloat32, kFloat64 };

/// "uint8", "int8", "int16", "int32", "int64", "float32", "float64".
const char* dtype_name(DType dtype);
/// Inverse of dtype_name; throws InvalidArgument on an unknown name.
DType parse_dtype(const std::string& name);
/// Bytes of one element.
std::size_t dtype_size(DType dtype);

/// One field (column) of every sample.
struct FieldSpec {
  std::string name;
  DType dtype = DType::kUInt8;
  std::vector<std::int64_t> shape;  ///< Per sample; empty for a scalar.

  std::int64_t elements_per_sample() const;
  std::size_t bytes_per_sample() const { return elements_per_sample() * dtype_size(dtype); }
};

/// The smallest and largest value of an integer field over every sample.
struct ValueRange {
  std::int64_t min = 0;
  std::int64_t max = 0;
};

/// How the token ids of a text data set map back to text (manifest.json
/// "vocabulary"; see dtrain/data/text.h and docs/data.md).
enum class TokenLevel {
  kByte,  ///< id = one byte of the UTF-8 text, 0..255 (256 ids).
  kChar,  ///< id = one Unicode character, an index into code_points.
};

/// "byte" or "char"; parse_token_level is the inverse (InvalidArgument).
const char* token_level_name(TokenLevel level);
TokenLevel parse_token_level(const std::string& name);

struct Vocabulary {
  TokenLevel level = TokenLevel::kChar;
  /// kChar: id i stands for Unicode code point code_points[i]; strictly
  /// ascending. kByte: empty.
  std::vector<std::int64_t> code_points;

  /// Number of ids: 256 for kByte, code_points.size() for kChar.
  std::int64_t size() const;
};

struct ShardInfo {
  std::string file;  ///< Relative to the data set directory.
  std::int64_t samples = 0;
  std::int64_t bytes = 0;  ///< File size.
  std::string sha256;      ///< Lower-case hex digest of the file.
};

struct Manifest {
  static constexpr int kFormatVersion = 1;
  int format_version = kFormatVersion;
  std::string name;
  std::int64_t total_samples = 0;
  std::vector<FieldSpec> fields;
  std::vector<ShardInfo> shards;
  std::vector<std::string> class_names;  ///< Optional.
  std::optional<Vocabulary> vocabulary;  ///< Text data sets only.
  /// By field name: the range of every integer field, recorded by
  /// DatasetWriter ("min" and "max" in the field's entry) so that labels can
  /// be checked without reading them. Empty in data sets written before the
  /// range was recorded; Dataset::value_range() then reads the field.
  std::map<std::string, ValueRange> value_ranges;

  std::string to_json() const;
  /// Parses and checks the structure (not the files). Throws DataError
  /// naming `source` (the manifest's path) on anything malformed.
  static Manifest from_json(const std::string& text, const std::string& source);
};

/// What a writer produces.
struct DatasetSpec {
  std::string name;
  std::vector<FieldSpec> fields;
  std::vector<std::string> class_names;
  std::optional<Vocabulary> vocabulary;  ///< Written to the manifest as is.
  /// Samples per shard file (the last shard may hold fewer). Must be > 0.
  std::int64_t samples_per_shard = 10000;

  /// Throws InvalidArgument on an empty/duplicate field name, a non-positive
  /// dimension or samples_per_shard <= 0.
  void validate() const;
};

/// Chunk length (samples) the writer uses for a field: about 256 KiB per
/// chunk, at least 1 sample, at most `samples_per_shard`.
std::int64_t chunk_samples_for(const FieldSpec& field, std::int64_t samples_per_shard);

/// Writes a data set: samples are appended, shards roll over every
/// samples_per_shard samples, and finish() writes manifest.json last and
/// atomically (temporary name, fsync, rename), with the range of values of
/// every integer field. A writer destroyed before
/// finish() leaves shard files but no manifest, i.e. no data set.
class DatasetWriter {
 public:
  /// Creates `dir` if needed. Throws InvalidArgument if `dir` already holds a
  /// manifest.json or `spec` is invalid.
  DatasetWriter(std::string dir, DatasetSpec spec);
  ~DatasetWriter();
  DatasetWriter(const DatasetWriter&) = delete;
  DatasetWriter& operator=(const DatasetWriter&) = delete;

  /// Appends `count` samples. `fields[i]` points to count * bytes_per_sample()
  /// bytes of field i (in spec order), sample-major. Throws DataError on an
  /// HDF5 or file-system failure.
  void add(const std::vector<const void*>& fields, std::int64_t count);

  /// Closes the open shard, digests every shard and writes manifest.json.
  /// Throws InvalidArgument if no sample was added. Returns the manifest.
  Manifest finish();

  std::int64_t samples_written() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct OpenOptions {
  /// Recompute every shard's SHA-256 at open time (reads every byte once).
  /// Size, structure, dtype and shape checks always run.
  bool verify_digests = true;
};

/// A data set opened for reading. Dataset::open checks everything it can
/// before returning: the manifest parses and agrees with itself, every shard
/// exists with the recorded size (and digest), opens in HDF5 and holds every
/// field with the manifest's dtype and shape [samples, ...shape]. Each
/// failure is a DataError naming the file (and field).
class Dataset {
 public:
  static std::shared_ptr<Dataset> open(const std::string& dir, OpenOptions options = {});
  ~Dataset();
  Dataset(const Dataset&) = delete;
  Dataset& operator=(const Dataset&) = delete;

  const std::string& dir() const;
  const Manifest& manifest() const;
  std::int64_t size() const { return manifest().total_samples; }
  /// Index of field `name` in manifest().fields; throws InvalidArgument.
  int field_index(const std::string& name) const;
  /// First global sample index of each shard, plus total_samples at the end.
  const std::vector<std::int64_t>& shard_offsets() const;
  /// The shard holding global sample `index`.
  int shard_of(std::int64_t index) const;

  /// Chunk length (samples) of `field` in `shard`, as stored in the file.
  std::int64_t chunk_samples(int field, int shard) const;

  /// The smallest and largest value of integer field `field`: the
  /// manifest's, or, for a data set written before the range was recorded,
  /// found by reading the field once (then remembered). Throws
  /// InvalidArgument for a floating-point field, DataError on a read error.
  /// Thread-safe.
  ValueRange value_range(int field);

  /// Reads samples [start, start + count) of field `field` into `dst`
  /// (count * bytes_per_sample bytes). The range must lie in one shard.
  /// One HDF5 hyperslab read. Thread-safe (serialized). Throws DataError
  /// naming file and field.
  void read(int field, std::int64_t start, std::int64_t count, void* dst);

 private:
  struct Impl;
  explicit Dataset(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// Throws DataError, naming the data set and the field, unless field
/// `field` of `dataset` can hold class labels: one integer per sample (not
/// float32 or float64, not an array). The loader's check of its label field.
void check_label_field(const Dataset& dataset, const std::string& field);

/// check_label_field, and every value of the field lies in [0, classes).
/// Cheap for a data set whose manifest records the range; an older one is
/// read once (Dataset::value_range). Throws DataError naming the data set,
/// the field and the values outside the range. Meant for the moment a data
/// set is opened, before anything is trained or written.
void check_class_labels(Dataset& dataset, const std::string& field, std::int64_t classes);

/// Recomputes the SHA-256 of a file (lower-case hex). Throws DataError.
std::string sha256_file(const std::string& path);
/// The SHA-256 of `size` bytes in memory (lower-case hex).
std::string sha256_bytes(const void* data, std::size_t size);

}  // namespace dtrain::data
