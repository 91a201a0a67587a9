// DatasetWriter and Dataset: shards written and read through the HDF5 C API.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/data/dataset.h"
#include "dtrain/error.h"
#include "src/io/hdf5.h"

namespace dtrain::data {

namespace fs = std::filesystem;
constexpr io::Check<DataError> check;
using io::Handle;

namespace {

constexpr const char* kManifestName = "manifest.json";

// Little-endian standard types on disk, native types in memory.
hid_t file_type(DType dtype) {
  switch (dtype) {
    case DType::kUInt8:
      return H5T_STD_U8LE;
    case DType::kInt8:
      return H5T_STD_I8LE;
    case DType::kInt16:
      return H5T_STD_I16LE;
    case DType::kInt32:
      return H5T_STD_I32LE;
    case DType::kInt64:
      return H5T_STD_I64LE;
    case DType::kFloat32:
      return H5T_IEEE_F32LE;
    case DType::kFloat64:
      return H5T_IEEE_F64LE;
  }
  return H5I_INVALID_HID;
}

hid_t memory_type(DType dtype) {
  switch (dtype) {
    case DType::kUInt8:
      return H5T_NATIVE_UINT8;
    case DType::kInt8:
      return H5T_NATIVE_INT8;
    case DType::kInt16:
      return H5T_NATIVE_INT16;
    case DType::kInt32:
      return H5T_NATIVE_INT32;
    case DType::kInt64:
      return H5T_NATIVE_INT64;
    case DType::kFloat32:
      return H5T_NATIVE_FLOAT;
    case DType::kFloat64:
      return H5T_NATIVE_DOUBLE;
  }
  return H5I_INVALID_HID;
}

std::string shard_file_name(int index) {
  char name[32];
  std::snprintf(name, sizeof(name), "shard-%05d.h5", index);
  return name;
}

// fsync a file or directory by path; throws DataError.
void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  DTRAIN_CHECK_T(DataError, fd >= 0, "cannot open ", path, " to fsync: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  DTRAIN_CHECK_T(DataError, rc == 0, "fsync of ", path, " failed: ", std::strerror(err));
}

bool is_integer(DType dtype) { return dtype != DType::kFloat32 && dtype != DType::kFloat64; }

template <typename T>
void widen_range(const void* data, std::size_t count, std::optional<ValueRange>& range) {
  if (count == 0) return;
  const T* values = static_cast<const T*>(data);
  const auto [lo, hi] = std::minmax_element(values, values + count);
  const ValueRange seen{static_cast<std::int64_t>(*lo), static_cast<std::int64_t>(*hi)};
  range = range ? ValueRange{std::min(range->min, seen.min), std::max(range->max, seen.max)} : seen;
}

// Widens `range` by `count` elements of integer type `dtype` at `data`.
void widen_range(DType dtype, const void* data, std::size_t count,
                 std::optional<ValueRange>& range) {
  switch (dtype) {
    case DType::kUInt8:
      return widen_range<std::uint8_t>(data, count, range);
    case DType::kInt8:
      return widen_range<std::int8_t>(data, count, range);
    case DType::kInt16:
      return widen_range<std::int16_t>(data, count, range);
    case DType::kInt32:
      return widen_range<std::int32_t>(data, count, range);
    case DType::kInt64:
      return widen_range<std::int64_t>(data, count, range);
    case DType::kFloat32:
    case DType::kFloat64:
      return;
  }
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

}  // namespace

// ---------------------------------------------------------------------------
// DatasetWriter
// ---------------------------------------------------------------------------

struct DatasetWriter::Impl {
  std::string dir;
  DatasetSpec spec;
  Handle file;
  std::vector<Handle> datasets;  // one per field of the open shard
  std::string shard_path;
  std::int64_t in_shard = 0;
  std::int64_t total = 0;
  std::vector<ShardInfo> shards;
  std::vector<std::optional<ValueRange>> ranges;  // per field; integer fields only
  bool finished = false;

  void open_shard() {
    io::ErrorScope quiet;
    const std::string name = shard_file_name(static_cast<int>(shards.size()));
    shard_path = dir + "/" + name;
    file = io::file_handle(
        check(H5Fcreate(shard_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), "H5Fcreate",
              shard_path));
    datasets.clear();
    for (const FieldSpec& f : spec.fields) {
      std::vector<hsize_t> dims{0}, maxdims{static_cast<hsize_t>(spec.samples_per_shard)};
      std::vector<hsize_t> chunk{
          static_cast<hsize_t>(chunk_samples_for(f, spec.samples_per_shard))};
      for (std::int64_t d : f.shape) {
        dims.push_back(static_cast<hsize_t>(d));
        maxdims.push_back(static_cast<hsize_t>(d));
        chunk.push_back(static_cast<hsize_t>(d));
      }
      Handle space = io::space_handle(
          check(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), maxdims.data()),
                "H5Screate_simple", shard_path, f.name));
      Handle dcpl =
          io::plist_handle(check(H5Pcreate(H5P_DATASET_CREATE), "H5Pcreate", shard_path, f.name));
      check(H5Pset_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data()), "H5Pset_chunk",
            shard_path, f.name);
      check(H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER), "H5Pset_fill_time", shard_path,
            f.name);
      // No modification times in the object headers: the same samples give
      // the same bytes (and SHA-256) whenever they are written.
      check(H5Pset_obj_track_times(dcpl.get(), 0), "H5Pset_obj_track_times", shard_path, f.name);
      datasets.push_back(
          io::dataset_handle(check(H5Dcreate2(file.get(), f.name.c_str(), file_type(f.dtype),
                                              space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                                   "H5Dcreate2", shard_path, f.name)));
    }
    in_shard = 0;
  }

  void close_shard() {
    if (!file.valid()) return;
    {
      io::ErrorScope quiet;
      datasets.clear();
      const herr_t rc = H5Fclose(file.get());
      // Released either way; a failed close means the shard may be incomplete.
      file = Handle();
      check(rc, "H5Fclose", shard_path);
    }
    fsync_path(shard_path);
    ShardInfo info;
    info.file = fs::path(shard_path).filename().string();
    info.samples = in_shard;
    info.bytes = static_cast<std::int64_t>(fs::file_size(shard_path));
    info.sha256 = sha256_file(shard_path);
    shards.push_back(info);
    in_shard = 0;
  }
};

DatasetWriter::DatasetWriter(std::string dir, DatasetSpec spec) : impl_(std::make_unique<Impl>()) {
  spec.validate();
  std::error_code ec;
  fs::create_directories(dir, ec);
  DTRAIN_CHECK_ARG(!ec && fs::is_directory(dir), "cannot create data set directory '", dir,
                   "': ", ec.message());
  DTRAIN_CHECK_ARG(!fs::exists(dir + "/" + kManifestName), "'", dir,
                   "' already holds a data set (manifest.json); choose an empty directory");
  impl_->dir = std::move(dir);
  impl_->spec = std::move(spec);
  impl_->ranges.resize(impl_->spec.fields.size());
}

DatasetWriter::~DatasetWriter() = default;  // Handles close the open shard; no manifest.

std::int64_t DatasetWriter::samples_written() const { return impl_->total; }

void DatasetWriter::add(const std::vector<const void*>& fields, std::int64_t count) {
  Impl& s = *impl_;
  DTRAIN_CHECK_ARG(!s.finished, "DatasetWriter::add after finish()");
  DTRAIN_CHECK_ARG(fields.size() == s.spec.fields.size(), "DatasetWriter::add got ", fields.size(),
                   " field pointers for ", s.spec.fields.size(), " fields");
  DTRAIN_CHECK_ARG(count >= 0, "DatasetWriter::add: negative count");
  std::int64_t done = 0;
  while (done < count) {
    if (!s.file.valid()) s.open_shard();
    const std::int64_t n = std::min(count - done, s.spec.samples_per_shard - s.in_shard);
    io::ErrorScope quiet;
    for (std::size_t i = 0; i < fields.size(); ++i) {
      const FieldSpec& f = s.spec.fields[i];
      const hid_t dset = s.datasets[i].get();
      std::vector<hsize_t> extent{static_cast<hsize_t>(s.in_shard + n)};
      std::vector<hsize_t> start{static_cast<hsize_t>(s.in_shard)}, block{static_cast<hsize_t>(n)};
      for (std::int64_t d : f.shape) {
        extent.push_back(static_cast<hsize_t>(d));
        start.push_back(0);
        block.push_back(static_cast<hsize_t>(d));
      }
      check(H5Dset_extent(dset, extent.data()), "H5Dset_extent", s.shard_path, f.name);
      Handle space =
          io::space_handle(check(H5Dget_space(dset), "H5Dget_space", s.shard_path, f.name));
      check(H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, start.data(), nullptr, block.data(),
                                nullptr),
            "H5Sselect_hyperslab", s.shard_path, f.name);
      Handle mem = io::space_handle(
          check(H5Screate_simple(static_cast<int>(block.size()), block.data(), nullptr),
                "H5Screate_simple", s.shard_path, f.name));
      const auto* src = static_cast<const unsigned char*>(fields[i]) +
                        static_cast<std::size_t>(done) * f.bytes_per_sample();
      check(H5Dwrite(dset, memory_type(f.dtype), mem.get(), space.get(), H5P_DEFAULT, src),
            "H5Dwrite", s.shard_path, f.name);
    }
    s.in_shard += n;
    s.total += n;
    done += n;
    if (s.in_shard == s.spec.samples_per_shard) s.close_shard();
  }
  for (std::size_t i = 0; i < fields.size(); ++i) {
    const FieldSpec& f = s.spec.fields[i];
    widen_range(f.dtype, fields[i], static_cast<std::size_t>(count * f.elements_per_sample()),
                s.ranges[i]);
  }
}

Manifest DatasetWriter::finish() {
  Impl& s = *impl_;
  DTRAIN_CHECK_ARG(!s.finished, "DatasetWriter::finish called twice");
  DTRAIN_CHECK_ARG(s.total > 0, "data set '", s.spec.name, "' in ", s.dir,
                   " has no samples; add samples before finish()");
  s.close_shard();
  Manifest m;
  m.name = s.spec.name;
  m.total_samples = s.total;
  m.fields = s.spec.fields;
  m.shards = s.shards;
  m.class_names = s.spec.class_names;
  m.vocabulary = s.spec.vocabulary;
  for (std::size_t i = 0; i < m.fields.size(); ++i) {
    if (s.ranges[i]) m.value_ranges[m.fields[i].name] = *s.ranges[i];
  }
  // Written last, atomically: a reader sees either no data set or all of it.
  const std::string final_path = s.dir + "/" + kManifestName;
  const std::string tmp_path = final_path + ".tmp";
  {
    std::ofstream out(tmp_path, std::ios::trunc);
    out << m.to_json();
    out.flush();
    DTRAIN_CHECK_T(DataError, out.good(), "cannot write ", tmp_path);
  }
  fsync_path(tmp_path);
  DTRAIN_CHECK_T(DataError, std::rename(tmp_path.c_str(), final_path.c_str()) == 0,
                 "cannot rename ", tmp_path, " to ", final_path, ": ", std::strerror(errno));
  fsync_path(s.dir);
  s.finished = true;
  return m;
}

// ---------------------------------------------------------------------------
// Dataset
// ---------------------------------------------------------------------------

struct Dataset::Impl {
  std::string dir;
  Manifest manifest;
  std::vector<std::int64_t> offsets;
  std::vector<std::string> paths;
  std::vector<Handle> files;
  std::vector<std::vector<Handle>> datasets;      // [shard][field]
  std::vector<std::vector<Handle>> spaces;        // [shard][field], file dataspaces
  std::vector<std::vector<std::int64_t>> chunks;  // [shard][field], chunk length in samples
  // read() changes the selection of the shared file dataspaces; HDF5 would
  // serialize the calls anyway.
  std::mutex read_mutex;
  // Ranges found by reading, for fields the manifest has none for.
  std::mutex range_mutex;
  std::map<int, ValueRange> read_ranges;

  void check_dataset(int shard, int field_index) {
    const FieldSpec& f = manifest.fields[field_index];
    const std::string& path = paths[shard];
    const hid_t dset = datasets[shard][field_index].get();
    Handle type = io::type_handle(check(H5Dget_type(dset), "H5Dget_type", path, f.name));
    const H5T_class_t cls = H5Tget_class(type.get());
    const bool is_float = f.dtype == DType::kFloat32 || f.dtype == DType::kFloat64;
    const bool is_unsigned = f.dtype == DType::kUInt8;
    const bool type_ok = (is_float ? cls == H5T_FLOAT : cls == H5T_INTEGER) &&
                         H5Tget_size(type.get()) == dtype_size(f.dtype) &&
                         (is_float || (H5Tget_sign(type.get()) == H5T_SGN_NONE) == is_unsigned);
    DTRAIN_CHECK_T(DataError, type_ok, path, " field '", f.name,
                   "': the HDF5 element type does not match the manifest's dtype ",
                   dtype_name(f.dtype));
    const hid_t space = spaces[shard][field_index].get();
    const int rank = H5Sget_simple_extent_ndims(space);
    std::vector<hsize_t> dims(rank > 0 ? rank : 0);
    if (rank > 0) H5Sget_simple_extent_dims(space, dims.data(), nullptr);
    std::vector<std::int64_t> got(dims.begin(), dims.end());
    std::vector<std::int64_t> want{manifest.shards[shard].samples};
    want.insert(want.end(), f.shape.begin(), f.shape.end());
    DTRAIN_CHECK_T(DataError, got == want, path, " field '", f.name, "' has shape ",
                   shape_text(got), " but the manifest says ", shape_text(want),
                   " (samples, per-sample shape)");
    // Chunk length along the sample axis (contiguous layout: the whole shard).
    Handle dcpl =
        io::plist_handle(check(H5Dget_create_plist(dset), "H5Dget_create_plist", path, f.name));
    std::int64_t chunk = want[0];
    if (H5Pget_layout(dcpl.get()) == H5D_CHUNKED) {
      std::vector<hsize_t> chunk_dims(dims.size());
      check(H5Pget_chunk(dcpl.get(), static_cast<int>(chunk_dims.size()), chunk_dims.data()),
            "H5Pget_chunk", path, f.name);
      chunk = static_cast<std::int64_t>(chunk_dims[0]);
    }
    chunks[shard].push_back(std::max<std::int64_t>(1, chunk));
  }
};

Dataset::Dataset(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Dataset::~Dataset() {
  if (!impl_) return;
  io::ErrorScope quiet;
  impl_->spaces.clear();
  impl_->datasets.clear();
  impl_->files.clear();
}

std::shared_ptr<Dataset> Dataset::open(const std::string& dir, OpenOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  const std::string manifest_path = dir + "/" + kManifestName;
  DTRAIN_CHECK_T(DataError, fs::is_directory(dir), "data set directory '", dir, "' does not exist");
  std::ifstream in(manifest_path);
  DTRAIN_CHECK_T(DataError, in.good(), "no ", kManifestName, " in '", dir,
                 "': not a dtrain data set, or its writer did not finish");
  std::stringstream text;
  text << in.rdbuf();
  impl->manifest = Manifest::from_json(text.str(), manifest_path);
  const Manifest& m = impl->manifest;

  io::ErrorScope quiet;
  Handle dapl = io::plist_handle(check(H5Pcreate(H5P_DATASET_ACCESS), "H5Pcreate", dir));
  // No chunk cache: an uncompressed chunk is then read straight from the file
  // for exactly the selected bytes, instead of whole 256 KiB chunks being
  // copied through the cache for a random 1-sample read.
  check(H5Pset_chunk_cache(dapl.get(), H5D_CHUNK_CACHE_NSLOTS_DEFAULT, 0, 1.0),
        "H5Pset_chunk_cache", dir);
  impl->offsets.push_back(0);
  for (std::size_t s = 0; s < m.shards.size(); ++s) {
    const ShardInfo& shard = m.shards[s];
    const std::string path = dir + "/" + shard.file;
    impl->paths.push_back(path);
    impl->offsets.push_back(impl->offsets.back() + shard.samples);
    std::error_code ec;
    const auto size = fs::file_size(path, ec);
    DTRAIN_CHECK_T(DataError, !ec, "shard file ", path, " listed in ", manifest_path,
                   " is missing (", ec.message(), ")");
    DTRAIN_CHECK_T(DataError, static_cast<std::int64_t>(size) == shard.bytes, "shard file ", path,
                   " has ", size, " bytes but the manifest records ", shard.bytes,
                   " (truncated or rewritten)");
    if (options.verify_digests) {
      const std::string digest = sha256_file(path);
      DTRAIN_CHECK_T(DataError, digest == shard.sha256, "shard file ", path,
                     " is corrupt: its SHA-256 is ", digest, " but the manifest records ",
                     shard.sha256);
    }
    impl->files.push_back(io::file_handle(
        check(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), "H5Fopen", path)));
    impl->datasets.emplace_back();
    impl->spaces.emplace_back();
    impl->chunks.emplace_back();
    for (std::size_t f = 0; f < m.fields.size(); ++f) {
      const std::string& field = m.fields[f].name;
      const hid_t id = H5Dopen2(impl->files.back().get(), field.c_str(), dapl.get());
      if (id < 0) {
        io::fail<DataError>("H5Dopen2 (the shard has no dataset for this field?)", path, field);
      }
      impl->datasets.back().push_back(io::dataset_handle(id));
      impl->spaces.back().push_back(
          io::space_handle(check(H5Dget_space(id), "H5Dget_space", path, field)));
      impl->check_dataset(static_cast<int>(s), static_cast<int>(f));
    }
  }
  return std::shared_ptr<Dataset>(new Dataset(std::move(impl)));
}

const std::string& Dataset::dir() const { return impl_->dir; }
const Manifest& Dataset::manifest() const { return impl_->manifest; }
const std::vector<std::int64_t>& Dataset::shard_offsets() const { return impl_->offsets; }

int Dataset::field_index(const std::string& name) const {
  const auto& fields = impl_->manifest.fields;
  for (std::size_t i = 0; i < fields.size(); ++i) {
    if (fields[i].name == name) return static_cast<int>(i);
  }
  DTRAIN_THROW(InvalidArgument, "data set ", impl_->dir, " has no field '", name, "'");
}

std::int64_t Dataset::chunk_samples(int field, int shard) const {
  return impl_->chunks.at(static_cast<std::size_t>(shard)).at(static_cast<std::size_t>(field));
}

int Dataset::shard_of(std::int64_t index) const {
  const auto& off = impl_->offsets;
  DTRAIN_CHECK_ARG(index >= 0 && index < off.back(), "sample index ", index,
                   " is outside the data set (", off.back(), " samples)");
  return static_cast<int>(std::upper_bound(off.begin(), off.end(), index) - off.begin()) - 1;
}

ValueRange Dataset::value_range(int field) {
  Impl& s = *impl_;
  DTRAIN_CHECK_ARG(field >= 0 && field < static_cast<int>(s.manifest.fields.size()),
                   "bad field index ", field);
  const FieldSpec& f = s.manifest.fields[field];
  DTRAIN_CHECK_ARG(is_integer(f.dtype), "field '", f.name, "' of ", s.dir, " is ",
                   dtype_name(f.dtype), "; value ranges are kept for integer fields only");
  const auto recorded = s.manifest.value_ranges.find(f.name);
  if (recorded != s.manifest.value_ranges.end()) return recorded->second;
  std::lock_guard<std::mutex> lock(s.range_mutex);
  const auto known = s.read_ranges.find(field);
  if (known != s.read_ranges.end()) return known->second;
  // Written before ranges were recorded: read the field once, in blocks of
  // about 8 MiB, shard by shard.
  const std::int64_t per_sample = f.elements_per_sample();
  const std::int64_t block = std::max<std::int64_t>(
      1, (std::int64_t{8} << 20) / static_cast<std::int64_t>(f.bytes_per_sample()));
  std::vector<unsigned char> buffer;
  std::optional<ValueRange> range;
  for (std::size_t shard = 0; shard + 1 < s.offsets.size(); ++shard) {
    for (std::int64_t first = s.offsets[shard]; first < s.offsets[shard + 1]; first += block) {
      const std::int64_t n = std::min(block, s.offsets[shard + 1] - first);
      buffer.resize(static_cast<std::size_t>(n) * f.bytes_per_sample());
      read(field, first, n, buffer.data());
      widen_range(f.dtype, buffer.data(), static_cast<std::size_t>(n * per_sample), range);
    }
  }
  const ValueRange result = range.value_or(ValueRange{});
  s.read_ranges[field] = result;
  return result;
}

void check_label_field(const Dataset& dataset, const std::string& field) {
  const FieldSpec& f = dataset.manifest().fields[dataset.field_index(field)];
  DTRAIN_CHECK_T(DataError, is_integer(f.dtype) && f.shape.empty(), "label field '", field, "' of ",
                 dataset.dir(), " is ", dtype_name(f.dtype), " with per-sample shape ",
                 shape_text(f.shape),
                 "; class labels must be one integer per sample (uint8, int8, int16, int32 or "
                 "int64, shape []): write the data set again with integer labels");
}

void check_class_labels(Dataset& dataset, const std::string& field, std::int64_t classes) {
  check_label_field(dataset, field);
  const ValueRange range = dataset.value_range(dataset.field_index(field));
  if (range.min >= 0 && range.max < classes) return;
  const auto& names = dataset.manifest().class_names;
  DTRAIN_THROW(
      DataError, "label field '", field, "' of ", dataset.dir(), " holds values from ", range.min,
      " to ", range.max, ", but ", classes, " classes need labels in [0, ", classes, ")",
      names.empty() ? std::string(" (manifest.json lists no class_names)")
                    : " (manifest.json lists " + std::to_string(names.size()) + " class_names)",
      ": fix the labels or the class_names and write the data set again");
}

void Dataset::read(int field, std::int64_t start, std::int64_t count, void* dst) {
  Impl& s = *impl_;
  DTRAIN_CHECK_ARG(field >= 0 && field < static_cast<int>(s.manifest.fields.size()),
                   "bad field index ", field);
  if (count <= 0) return;
  const int shard = shard_of(start);
  DTRAIN_CHECK_ARG(start + count <= s.offsets[shard + 1], "read of samples [", start, ", ",
                   start + count, ") crosses the end of shard ", s.paths[shard]);
  const FieldSpec& f = s.manifest.fields[field];
  std::lock_guard<std::mutex> lock(s.read_mutex);
  io::ErrorScope quiet;
  const hid_t space = s.spaces[shard][field].get();
  std::vector<hsize_t> offset{static_cast<hsize_t>(start - s.offsets[shard])};
  std::vector<hsize_t> block{static_cast<hsize_t>(count)};
  for (std::int64_t d : f.shape) {
    offset.push_back(0);
    block.push_back(static_cast<hsize_t>(d));
  }
  check(H5Sselect_hyperslab(space, H5S_SELECT_SET, offset.data(), nullptr, block.data(), nullptr),
        "H5Sselect_hyperslab", s.paths[shard], f.name);
  // The memory space has the selection's shape: with a flat one HDF5 falls
  // back to element-by-element iteration (~50x slower).
  Handle mem = io::space_handle(
      check(H5Screate_simple(static_cast<int>(block.size()), block.data(), nullptr),
            "H5Screate_simple", s.paths[shard], f.name));
  check(H5Dread(s.datasets[shard][field].get(), memory_type(f.dtype), mem.get(), space, H5P_DEFAULT,
                dst),
        "H5Dread", s.paths[shard], f.name);
}

}  // namespace dtrain::data
