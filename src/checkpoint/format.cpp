// The checkpoint format: names, dtypes, manifest JSON and HDF5 piece files.

#include "src/checkpoint/format.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "dtrain/error.h"
#include "src/checkpoint/checksums.h"
#include "src/io/hdf5.h"

namespace dtrain::checkpoint::detail {

namespace fs = std::filesystem;
using io::Handle;
// HDF5 failures here are CheckpointErrors naming the file and the tensor.
constexpr io::Check<CheckpointError> check;
using json = nlohmann::json;

namespace {

std::string pad(std::int64_t value, int width) {
  std::string digits = std::to_string(value);
  if (static_cast<int>(digits.size()) < width) {
    digits.insert(0, static_cast<std::size_t>(width) - digits.size(), '0');
  }
  return digits;
}

struct DTypeEntry {
  at::ScalarType dtype;
  const char* name;
};
constexpr DTypeEntry kDTypes[] = {
    {at::kFloat, "float32"},     {at::kDouble, "float64"}, {at::kHalf, "float16"},
    {at::kBFloat16, "bfloat16"}, {at::kLong, "int64"},     {at::kInt, "int32"},
    {at::kShort, "int16"},       {at::kChar, "int8"},      {at::kByte, "uint8"},
    {at::kBool, "bool"},
};

// Standard little-endian types on disk. 16-bit floats are stored as their
// bit patterns (uint16) with a "dtype" attribute: HDF5 1.10 has no half type.
hid_t file_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return H5T_IEEE_F32LE;
    case at::kDouble:
      return H5T_IEEE_F64LE;
    case at::kHalf:
    case at::kBFloat16:
      return H5T_STD_U16LE;
    case at::kLong:
      return H5T_STD_I64LE;
    case at::kInt:
      return H5T_STD_I32LE;
    case at::kShort:
      return H5T_STD_I16LE;
    case at::kChar:
      return H5T_STD_I8LE;
    case at::kByte:
    case at::kBool:
      return H5T_STD_U8LE;
    default:
      return H5I_INVALID_HID;
  }
}

hid_t memory_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return H5T_NATIVE_FLOAT;
    case at::kDouble:
      return H5T_NATIVE_DOUBLE;
    case at::kHalf:
    case at::kBFloat16:
      return H5T_NATIVE_UINT16;
    case at::kLong:
      return H5T_NATIVE_INT64;
    case at::kInt:
      return H5T_NATIVE_INT32;
    case at::kShort:
      return H5T_NATIVE_INT16;
    case at::kChar:
      return H5T_NATIVE_INT8;
    case at::kByte:
    case at::kBool:
      return H5T_NATIVE_UINT8;
    default:
      return H5I_INVALID_HID;
  }
}

void write_string_attribute(hid_t object, const char* name, const std::string& value,
                            const std::string& path) {
  Handle type(check(H5Tcopy(H5T_C_S1), "H5Tcopy", path), H5Tclose);
  check(H5Tset_size(type.get(), value.empty() ? 1 : value.size()), "H5Tset_size", path);
  Handle space(check(H5Screate(H5S_SCALAR), "H5Screate", path), H5Sclose);
  Handle attr(check(H5Acreate2(object, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                    "H5Acreate2", path, name),
              H5Aclose);
  check(H5Awrite(attr.get(), type.get(), value.c_str()), "H5Awrite", path, name);
}

// A scalar attribute for one value, a 1-d array otherwise (or when `array`).
void write_int_attribute(hid_t object, const char* name, const std::vector<std::int64_t>& values,
                         const std::string& path, bool array = false) {
  const hsize_t n = values.size();
  Handle space(
      check(values.size() == 1 && !array ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, nullptr),
            "H5Screate", path),
      H5Sclose);
  Handle attr(check(H5Acreate2(object, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                    "H5Acreate2", path, name),
              H5Aclose);
  check(H5Awrite(attr.get(), H5T_NATIVE_INT64, values.data()), "H5Awrite", path, name);
}

// Chunks of about 1 MiB: whole trailing dimensions, cut along the leading
// ones. A chunk is [1, ..., 1, rows, dims[split + 1], ...], so each one is a
// contiguous run of the row-major tensor. Example: float32 [3, 1000, 512]
// (2000 bytes a row of 512) gives split 1 and rows 524: chunks [1, 524, 512],
// two along dimension 1 (the second holds 476 rows, padded) for each of the 3.
struct ChunkLayout {
  std::vector<hsize_t> chunk;  // the chunk shape given to HDF5
  std::size_t split = 0;       // the dimension cut into `rows`
  hsize_t rows = 1;
};

ChunkLayout chunk_layout(const std::vector<hsize_t>& dims, std::size_t element_size) {
  constexpr std::size_t kTarget = std::size_t{1} << 20;
  ChunkLayout layout;
  layout.chunk = dims;
  for (std::size_t i = 0; i < dims.size(); ++i) {
    std::size_t rest = element_size;
    for (std::size_t j = i + 1; j < dims.size(); ++j) rest *= dims[j];
    if (rest <= kTarget || i + 1 == dims.size()) {
      layout.split = i;
      layout.rows = std::min(dims[i], std::max<hsize_t>(1, kTarget / rest));
      layout.chunk[i] = layout.rows;
      break;
    }
    layout.chunk[i] = 1;
  }
  return layout;
}

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "chunks are written as they lie in memory, which must be little-endian like the "
              "file types");

// Writes the chunks of a piece's (contiguous, little-endian) data, each
// followed by its Fletcher32 (exactly what HDF5's filter would store), with
// H5Dwrite_chunk: HDF5's own filter path copies every chunk twice and
// checksums it a word at a time. An edge chunk is padded with zeros (HDF5's
// default fill value) to the full chunk shape, as HDF5 stores it.
void write_chunks(hid_t dset, const std::vector<hsize_t>& dims, const ChunkLayout& layout,
                  const char* data, std::size_t element_size, std::vector<char>& buffer,
                  ImageFileWriter& writer, const std::string& path, const std::string& name) {
  const std::size_t split = layout.split;
  hsize_t outer = 1;
  for (std::size_t d = 0; d < split; ++d) outer *= dims[d];
  std::size_t row_bytes = element_size;
  for (std::size_t d = split + 1; d < dims.size(); ++d) row_bytes *= dims[d];
  const std::size_t chunk_bytes = layout.rows * row_bytes;
  buffer.resize(chunk_bytes + 4);
  std::vector<hsize_t> offset(dims.size(), 0);
  for (hsize_t o = 0; o < outer; ++o) {
    hsize_t rest = o;  // o's coordinates in dims[0, split)
    for (std::size_t d = split; d-- > 0;) {
      offset[d] = rest % dims[d];
      rest /= dims[d];
    }
    for (hsize_t start = 0; start < dims[split]; start += layout.rows) {
      const std::size_t bytes = std::min<hsize_t>(layout.rows, dims[split] - start) * row_bytes;
      const char* source = data + (o * dims[split] + start) * row_bytes;
      std::uint32_t checksum = 0;
      if (bytes == chunk_bytes) {
        checksum = copy_with_fletcher32(buffer.data(), source, bytes);
      } else {
        std::memcpy(buffer.data(), source, bytes);
        std::memset(buffer.data() + bytes, 0, chunk_bytes - bytes);
        checksum = fletcher32(buffer.data(), chunk_bytes);
      }
      for (int b = 0; b < 4; ++b) {
        buffer[chunk_bytes + b] = static_cast<char>((checksum >> (8 * b)) & 0xff);
      }
      offset[split] = start;
      check(H5Dwrite_chunk(dset, H5P_DEFAULT, /*filters=*/0, offset.data(), buffer.size(),
                           buffer.data()),
            "H5Dwrite_chunk", path, name);
      // HDF5 never touches a written chunk again: it can go to disk now.
      unsigned filters = 0;
      haddr_t address = HADDR_UNDEF;
      hsize_t stored = 0;
      check(H5Dget_chunk_info_by_coord(dset, offset.data(), &filters, &address, &stored),
            "H5Dget_chunk_info_by_coord", path, name);
      writer.final_range(address, address + stored);
    }
  }
}

json to_json(const std::vector<std::int64_t>& v) { return json(v); }

std::vector<std::int64_t> shape_of(const json& j, const char* key, const std::string& where) {
  DTRAIN_CHECK_T(CheckpointError, j.contains(key) && j.at(key).is_array(), where, ": '", key,
                 "' is missing or not an array");
  std::vector<std::int64_t> out;
  for (const auto& v : j.at(key)) {
    DTRAIN_CHECK_T(CheckpointError, v.is_number_integer() && v.get<std::int64_t>() >= 0, where,
                   ": '", key, "' holds a value that is not a non-negative integer");
    out.push_back(v.get<std::int64_t>());
  }
  return out;
}

// The manifest key of every file's digest in a format version.
const char* digest_of_version(int version) { return version >= 2 ? kDigestXxh3 : kDigestSha256; }

}  // namespace

std::string step_dir_name(std::int64_t step) { return "step-" + pad(step, 9); }
std::string tmp_dir_name(std::int64_t step) { return ".tmp-" + step_dir_name(step); }
std::string rank_file_name(int rank) { return "rank-" + pad(rank, 5) + ".h5"; }
std::string extra_piece_dataset(int k) { return ".pieces/" + std::to_string(k); }

std::int64_t parse_step_dir_name(const std::string& name) {
  if (name.size() <= 5 || name.compare(0, 5, "step-") != 0 || name.size() > 5 + 18) return -1;
  std::int64_t step = 0;
  for (std::size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

const char* dtype_name(at::ScalarType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.name;
  }
  return nullptr;
}

at::ScalarType parse_dtype(const std::string& name, const std::string& where) {
  for (const auto& d : kDTypes) {
    if (name == d.name) return d.dtype;
  }
  DTRAIN_THROW(CheckpointError, where, ": unknown dtype '", name, "'");
}

std::string serialize(const FileRecord& record) {
  json pieces = json::array();
  for (const PieceRecord& p : record.pieces) {
    pieces.push_back({{"name", p.name},
                      {"dataset", p.dataset},
                      {"dtype", dtype_name(p.dtype)},
                      {"global_shape", to_json(p.global_shape)},
                      {"offset", to_json(p.offset)},
                      {"shape", to_json(p.shape)}});
  }
  return json{{"file", record.info.file},
              {"rank", record.info.rank},
              {"bytes", record.info.bytes},
              {"digest_algorithm", record.info.digest_algorithm},
              {"digest", record.info.digest},
              {"error", record.error},
              {"pieces", pieces}}
      .dump();
}

FileRecord parse_file_record(const std::string& text) {
  const json j = json::parse(text);
  FileRecord r;
  r.info.file = j.at("file").get<std::string>();
  r.info.rank = j.at("rank").get<int>();
  r.info.bytes = j.at("bytes").get<std::uint64_t>();
  r.info.digest_algorithm = j.at("digest_algorithm").get<std::string>();
  r.info.digest = j.at("digest").get<std::string>();
  r.error = j.at("error").get<std::string>();
  for (const auto& p : j.at("pieces")) {
    PieceRecord piece;
    piece.name = p.at("name").get<std::string>();
    piece.dataset = p.at("dataset").get<std::string>();
    piece.dtype = parse_dtype(p.at("dtype").get<std::string>(), "file record");
    piece.global_shape = p.at("global_shape").get<std::vector<std::int64_t>>();
    piece.offset = p.at("offset").get<std::vector<std::int64_t>>();
    piece.shape = p.at("shape").get<std::vector<std::int64_t>>();
    r.pieces.push_back(std::move(piece));
  }
  return r;
}

Manifest make_manifest(std::int64_t step, const std::map<std::string, std::string>& metadata,
                       const std::vector<FileRecord>& records, const collectives::GridShape& grid) {
  Manifest m;
  m.step = step;
  m.world_size = static_cast<int>(records.size());
  m.grid = grid;
  DTRAIN_CHECK_T(CheckpointError, grid.world_size() == m.world_size, "a grid of ",
                 grid.world_size(), " ranks wrote ", m.world_size, " files");
  m.created_unix =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  m.metadata = metadata;
  for (const FileRecord& r : records) {
    m.files.push_back(r.info);
    for (const PieceRecord& p : r.pieces) {
      auto [it, inserted] = m.tensors.try_emplace(p.name);
      TensorInfo& t = it->second;
      if (inserted) {
        t.name = p.name;
        t.dtype = p.dtype;
        t.global_shape = p.global_shape;
      }
      DTRAIN_CHECK_T(CheckpointError, t.dtype == p.dtype && t.global_shape == p.global_shape,
                     "tensor '", p.name, "': rank ", r.info.rank,
                     " wrote a piece whose dtype or global shape differs from another rank's");
      for (const PieceInfo& other : t.pieces) {
        bool overlap = true;
        for (std::size_t d = 0; d < p.offset.size(); ++d) {
          overlap = overlap && p.offset[d] < other.offset[d] + other.shape[d] &&
                    other.offset[d] < p.offset[d] + p.shape[d];
        }
        DTRAIN_CHECK_T(CheckpointError, !overlap, "tensor '", p.name, "': rank ", r.info.rank,
                       " wrote a piece that overlaps one in ", other.file);
      }
      t.pieces.push_back({r.info.file, p.dataset.empty() ? p.name : p.dataset, p.offset, p.shape});
    }
  }
  return m;
}

std::string serialize(const Manifest& m) {
  json files = json::array();
  for (const FileInfo& f : m.files) {
    DTRAIN_CHECK_T(CheckpointError, f.digest_algorithm == digest_of_version(kFormatVersion),
                   "file ", f.file, " has a ", f.digest_algorithm, " digest; format version ",
                   kFormatVersion, " records ", digest_of_version(kFormatVersion));
    files.push_back(
        {{"file", f.file}, {"rank", f.rank}, {"bytes", f.bytes}, {f.digest_algorithm, f.digest}});
  }
  json tensors = json::object();
  for (const auto& [name, t] : m.tensors) {
    json pieces = json::array();
    for (const PieceInfo& p : t.pieces) {
      json piece = {{"file", p.file}, {"offset", to_json(p.offset)}, {"shape", to_json(p.shape)}};
      if (p.dataset != name) piece["dataset"] = p.dataset;  // absent: the tensor's name
      pieces.push_back(std::move(piece));
    }
    tensors[name] = {{"dtype", dtype_name(t.dtype)},
                     {"global_shape", to_json(t.global_shape)},
                     {"pieces", pieces}};
  }
  return json{{"format", kFormatName},
              {"version", kFormatVersion},
              {"step", m.step},
              {"world_size", m.world_size},
              {"grid", {{"dp", m.grid.dp}, {"pp", m.grid.pp}, {"tp", m.grid.tp}}},
              {"created_unix", m.created_unix},
              {"metadata", m.metadata},
              {"files", files},
              {"tensors", tensors}}
             .dump(1) +
         "\n";
}

Manifest parse_manifest(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    DTRAIN_THROW(CheckpointError, source, ": not valid JSON (", e.what(), ")");
  }
  Manifest m;
  try {
    DTRAIN_CHECK_T(CheckpointError, j.is_object() && j.value("format", "") == kFormatName, source,
                   ": not a dtrain checkpoint manifest (no \"format\": \"", kFormatName, "\")");
    m.version = j.value("version", 0);
    DTRAIN_CHECK_T(CheckpointError,
                   m.version >= kOldestFormatVersion && m.version <= kFormatVersion, source,
                   ": format version ", m.version, " is not supported (this build reads ",
                   kOldestFormatVersion, " to ", kFormatVersion,
                   m.version > kFormatVersion ? "; a newer dtrain wrote it" : "", ")");
    const char* digest_key = digest_of_version(m.version);
    m.step = j.at("step").get<std::int64_t>();
    m.world_size = j.at("world_size").get<int>();
    m.grid = {m.world_size, 1, 1};
    if (j.contains("grid")) {
      const json& g = j.at("grid");
      m.grid = {g.at("dp").get<int>(), g.at("pp").get<int>(), g.at("tp").get<int>()};
      DTRAIN_CHECK_T(
          CheckpointError,
          m.grid.dp >= 1 && m.grid.pp >= 1 && m.grid.tp >= 1 && m.grid.world_size() == m.world_size,
          source, ": the grid dp ", m.grid.dp, " x pp ", m.grid.pp, " x tp ", m.grid.tp,
          " does not have world_size ", m.world_size, " ranks");
    }
    m.created_unix = j.value("created_unix", 0.0);
    m.metadata = j.at("metadata").get<std::map<std::string, std::string>>();
    std::set<std::string> file_names;
    for (const auto& f : j.at("files")) {
      FileInfo info;
      info.file = f.at("file").get<std::string>();
      info.rank = f.at("rank").get<int>();
      info.bytes = f.at("bytes").get<std::uint64_t>();
      info.digest_algorithm = digest_key;
      info.digest = f.at(digest_key).get<std::string>();
      DTRAIN_CHECK_T(
          CheckpointError,
          info.file.find('/') == std::string::npos && info.file.find("..") == std::string::npos,
          source, ": file name '", info.file, "' is not a plain file name");
      file_names.insert(info.file);
      m.files.push_back(std::move(info));
    }
    for (const auto& [name, t] : j.at("tensors").items()) {
      const std::string where = source + " tensor '" + name + "'";
      TensorInfo info;
      info.name = name;
      info.dtype = parse_dtype(t.at("dtype").get<std::string>(), where);
      info.global_shape = shape_of(t, "global_shape", where);
      for (const auto& p : t.at("pieces")) {
        PieceInfo piece{p.at("file").get<std::string>(), p.value("dataset", name),
                        shape_of(p, "offset", where), shape_of(p, "shape", where)};
        DTRAIN_CHECK_T(CheckpointError, !piece.dataset.empty(), where,
                       ": a piece names an empty dataset");
        DTRAIN_CHECK_T(CheckpointError, file_names.count(piece.file) == 1, where,
                       ": a piece is in '", piece.file, "', which the manifest does not list");
        DTRAIN_CHECK_T(CheckpointError,
                       piece.offset.size() == info.global_shape.size() &&
                           piece.shape.size() == info.global_shape.size(),
                       where, ": a piece's offset or shape has the wrong number of dimensions");
        for (std::size_t d = 0; d < piece.shape.size(); ++d) {
          DTRAIN_CHECK_T(CheckpointError, piece.offset[d] + piece.shape[d] <= info.global_shape[d],
                         where, ": a piece reaches past the global shape in dimension ", d);
        }
        info.pieces.push_back(std::move(piece));
      }
      m.tensors.emplace(name, std::move(info));
    }
  } catch (const json::exception& e) {
    DTRAIN_THROW(CheckpointError, source, ": malformed manifest (", e.what(), ")");
  }
  DTRAIN_CHECK_T(CheckpointError, m.world_size > 0 && !m.files.empty(), source,
                 ": the manifest lists no files");
  return m;
}

namespace {

// The whole HDF5 file, built in `image` (its chunks handed to `writer` as
// they are done); returns its size.
std::size_t build_image(FileImage& image, ImageFileWriter& writer, const std::string& path,
                        std::int64_t step, int rank, int world_size,
                        const std::vector<PieceToWrite>& pieces) {
  io::ErrorScope quiet;
  std::size_t payload = 0;
  for (const auto& p : pieces) payload += p.data.nbytes();
  // Room for the data, padded edge chunks and metadata: rarely grown.
  image.reserve(payload + payload / 64 + (std::size_t{4} << 20));
  Handle fapl(check(H5Pcreate(H5P_FILE_ACCESS), "H5Pcreate", path), H5Pclose);
  // The core driver zeroes each increment as the file grows into it: small
  // steps keep that next to the writes that follow, in cache.
  check(H5Pset_fapl_core(fapl.get(), std::size_t{1} << 20, /*backing_store=*/0), "H5Pset_fapl_core",
        path);
  image.attach(fapl.get(), path);
  Handle file(
      check(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), "H5Fcreate", path),
      H5Fclose);
  write_string_attribute(file.get(), "format", kFormatName, path);
  write_int_attribute(file.get(), "version", {kFormatVersion}, path);
  write_int_attribute(file.get(), "step", {step}, path);
  write_int_attribute(file.get(), "rank", {rank}, path);
  write_int_attribute(file.get(), "world_size", {world_size}, path);
  Handle lcpl(check(H5Pcreate(H5P_LINK_CREATE), "H5Pcreate", path), H5Pclose);
  check(H5Pset_create_intermediate_group(lcpl.get(), 1), "H5Pset_create_intermediate_group", path);

  for (const PieceToWrite& piece : pieces) {
    const PieceRecord& r = piece.record;
    DTRAIN_CHECK_T(CheckpointError, piece.data.is_contiguous() && piece.data.is_cpu(), path,
                   " tensor '", r.name, "': the data to write is not a contiguous CPU tensor");
    // A 0-d tensor is stored as [1]. (Made in one step: GCC 14 reports a
    // false -Wfree-nonheap-object for a push_back after the range copy.)
    const std::vector<hsize_t> dims = r.shape.empty()
                                          ? std::vector<hsize_t>{1}
                                          : std::vector<hsize_t>(r.shape.begin(), r.shape.end());
    Handle space(check(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                       "H5Screate_simple", path, r.name),
                 H5Sclose);
    Handle dcpl(check(H5Pcreate(H5P_DATASET_CREATE), "H5Pcreate", path, r.name), H5Pclose);
    // No object timestamps: the same state gives the same bytes (and digest).
    check(H5Pset_obj_track_times(dcpl.get(), 0), "H5Pset_obj_track_times", path, r.name);
    const std::int64_t numel = piece.data.numel();
    ChunkLayout layout;
    if (numel > 0) {
      layout = chunk_layout(dims, piece.data.element_size());
      check(H5Pset_chunk(dcpl.get(), static_cast<int>(layout.chunk.size()), layout.chunk.data()),
            "H5Pset_chunk", path, r.name);
      // Readers (this library, h5py) check every chunk they read against it.
      check(H5Pset_fletcher32(dcpl.get()), "H5Pset_fletcher32", path, r.name);
    }
    const std::string& dataset = r.dataset.empty() ? r.name : r.dataset;
    Handle dset(check(H5Dcreate2(file.get(), dataset.c_str(), file_type(r.dtype), space.get(),
                                 lcpl.get(), dcpl.get(), H5P_DEFAULT),
                      "H5Dcreate2", path, r.name),
                H5Dclose);
    if (numel > 0) {
      write_chunks(dset.get(), dims, layout, static_cast<const char*>(piece.data.data_ptr()),
                   piece.data.element_size(), image.chunk_buffer(), writer, path, r.name);
    }
    write_string_attribute(dset.get(), "dtype", dtype_name(r.dtype), path);
    if (dataset != r.name) write_string_attribute(dset.get(), "tensor", r.name, path);
    if (!r.global_shape.empty()) {
      write_int_attribute(dset.get(), "global_shape", r.global_shape, path, true);
      write_int_attribute(dset.get(), "offset", r.offset, path, true);
    }
  }
  check(H5Fflush(file.get(), H5F_SCOPE_LOCAL), "H5Fflush", path);
  // The size of the file (its end of allocated space); nothing is copied.
  const ssize_t size = check(H5Fget_file_image(file.get(), nullptr, 0), "H5Fget_file_image", path);
  file.reset();  // the image stays in `image`
  return static_cast<std::size_t>(size);
}

}  // namespace

FileInfo write_piece_file(const std::string& path, std::int64_t step, int rank, int world_size,
                          const std::vector<PieceToWrite>& pieces, const ImageWriteOptions& options,
                          FileImage& image, FileWriteTimes* times) {
  const auto encode_start = std::chrono::steady_clock::now();
  ImageFileWriter writer(path, image, options);
  const std::size_t size = build_image(image, writer, path, step, rank, world_size, pieces);
  const double encode_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - encode_start).count();
  const ImageWriteResult written = writer.finish(size);
  FileInfo info;
  info.rank = rank;
  info.file = fs::path(path).filename().string();
  info.bytes = size;
  info.digest_algorithm = kDigestXxh3;
  info.digest = written.digest;
  if (times != nullptr) {
    times->encode_seconds = encode_seconds;
    times->write_seconds = written.write_seconds;
    times->fsync_seconds = written.fsync_seconds;
    times->direct_io = written.direct_io;
  }
  return info;
}

io::Handle open_piece_file(const std::string& path) {
  io::ErrorScope quiet;
  DTRAIN_CHECK_T(CheckpointError, fs::is_regular_file(path), "checkpoint file ", path,
                 " is missing");
  return io::file_handle(
      check(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), "H5Fopen", path));
}

void read_piece(hid_t file, const std::string& path, const std::string& name,
                const std::string& dataset, const std::vector<std::int64_t>& start,
                const std::vector<std::int64_t>& count, at::Tensor& out) {
  io::ErrorScope quiet;
  Handle dset(check(H5Dopen2(file, dataset.c_str(), H5P_DEFAULT), "H5Dopen2", path, name),
              H5Dclose);
  Handle space(check(H5Dget_space(dset.get()), "H5Dget_space", path, name), H5Sclose);
  const int ndims =
      check(H5Sget_simple_extent_ndims(space.get()), "H5Sget_simple_extent_ndims", path, name);
  const int expected = start.empty() ? 1 : static_cast<int>(start.size());
  DTRAIN_CHECK_T(CheckpointError, ndims == expected, path, " tensor '", name, "' has ", ndims,
                 " dimensions in the file but the manifest says ", expected);
  if (out.numel() == 0) return;
  if (!start.empty()) {
    std::vector<hsize_t> s(start.begin(), start.end()), c(count.begin(), count.end());
    std::vector<hsize_t> dims(s.size());
    H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    for (std::size_t d = 0; d < dims.size(); ++d) {
      DTRAIN_CHECK_T(CheckpointError, s[d] + c[d] <= dims[d], path, " tensor '", name,
                     "' is smaller in the file than the manifest says");
    }
    check(H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, s.data(), nullptr, c.data(), nullptr),
          "H5Sselect_hyperslab", path, name);
    Handle mem(check(H5Screate_simple(static_cast<int>(c.size()), c.data(), nullptr),
                     "H5Screate_simple", path, name),
               H5Sclose);
    check(H5Dread(dset.get(), memory_type(out.scalar_type()), mem.get(), space.get(), H5P_DEFAULT,
                  out.data_ptr()),
          "H5Dread (corrupt chunk or I/O error)", path, name);
  } else {
    check(H5Dread(dset.get(), memory_type(out.scalar_type()), H5S_ALL, H5S_ALL, H5P_DEFAULT,
                  out.data_ptr()),
          "H5Dread (corrupt chunk or I/O error)", path, name);
  }
}

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  DTRAIN_CHECK_T(CheckpointError, fd >= 0, "cannot open ", path,
                 " to fsync it: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  DTRAIN_CHECK_T(CheckpointError, rc == 0, "fsync of ", path, " failed: ", std::strerror(err));
}

void write_file_atomically(const std::string& path, const std::string& text, bool sync) {
  const std::string tmp = path + ".tmp";
  {
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    DTRAIN_CHECK_T(CheckpointError, f != nullptr, "cannot create ", tmp, ": ",
                   std::strerror(errno));
    const std::size_t written = std::fwrite(text.data(), 1, text.size(), f);
    const bool ok = written == text.size() && std::fflush(f) == 0;
    const int err = errno;
    const bool synced = !sync || ::fsync(::fileno(f)) == 0;
    std::fclose(f);
    if (!ok || !synced) {
      std::remove(tmp.c_str());
      DTRAIN_THROW(CheckpointError, "writing ", tmp, " failed: ", std::strerror(err));
    }
  }
  DTRAIN_CHECK_T(CheckpointError, std::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename ",
                 tmp, " to ", path, ": ", std::strerror(errno));
}

}  // namespace dtrain::checkpoint::detail
