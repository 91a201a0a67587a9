// IDX conversion (gzip through zlib) and synthetic data sets.

#include "dtrain/data/convert.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/error.h"
#include "src/data/publish.h"
#include "src/data/random.h"

namespace dtrain::data {

namespace fs = std::filesystem;

const std::vector<std::string>& fashion_mnist_class_names() {
  static const std::vector<std::string> kNames{"T-shirt/top", "Trouser",   "Pullover", "Dress",
                                               "Coat",        "Sandal",    "Shirt",    "Sneaker",
                                               "Bag",         "Ankle boot"};
  return kNames;
}

namespace {

// An IDX file: big-endian magic (0, 0, type 0x08 = uint8, ndims), dims, data.
struct Idx {
  std::vector<std::int64_t> dims;
  std::vector<std::uint8_t> data;
};

// An image file and its label file, read and checked against each other.
struct IdxSplit {
  std::string images_path;
  std::string labels_path;
  Idx images;
  Idx labels;
};

// Reads a whole IDX file, gzip'd or plain (gzopen reads plain files
// transparently), and checks all of it: the magic number, exactly as many
// bytes as the dimensions declare, and for gzip the end of the stream with
// its CRC-32 and length. A file that passes is complete and undamaged.
Idx read_idx(const std::string& path, int want_ndims) {
  std::error_code ec;
  DTRAIN_CHECK_T(DataError, fs::is_regular_file(path, ec), "IDX file ", path,
                 " does not exist (or is not a file)");
  gzFile file = gzopen(path.c_str(), "rb");
  DTRAIN_CHECK_T(DataError, file != nullptr, "cannot open IDX file ", path, ": ",
                 std::strerror(errno));
  std::unique_ptr<gzFile_s, int (*)(gzFile)> closer(file, gzclose);
  // What zlib says went wrong; a CRC or length mismatch means a damaged file.
  auto gzip_problem = [&](const char* what) {
    int code = Z_OK;
    const char* message = gzerror(file, &code);
    std::string text = message != nullptr ? message : "";
    if (text.rfind(path + ": ", 0) == 0) text.erase(0, path.size() + 2);  // zlib names the file
    if (code == Z_DATA_ERROR && (text.find("incorrect data check") != std::string::npos ||
                                 text.find("incorrect length check") != std::string::npos)) {
      return ::dtrain::detail::str_cat(
          "IDX file ", path, " failed its gzip checksum (", text,
          "): the file is corrupt; download or reinstall it (for Debian's "
          "files: apt-get install --reinstall dataset-fashion-mnist)");
    }
    if (code == Z_BUF_ERROR) {
      return ::dtrain::detail::str_cat(
          "IDX file ", path, " is truncated: its gzip stream ends early (", "reading ", what, ")");
    }
    if (code != Z_OK) {
      return ::dtrain::detail::str_cat("IDX file ", path, " is corrupt: gzip reports '", text,
                                       "' (reading ", what, ")");
    }
    return ::dtrain::detail::str_cat("IDX file ", path, " is truncated (reading ", what, ")");
  };
  auto read_exact = [&](void* dst, std::size_t n, const char* what) {
    std::size_t done = 0;
    while (done < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(n - done, 1u << 30));
      const int got = gzread(file, static_cast<char*>(dst) + done, chunk);
      if (got <= 0) throw DataError(gzip_problem(what));
      done += static_cast<std::size_t>(got);
    }
  };
  unsigned char magic[4];
  read_exact(magic, 4, "magic number");
  DTRAIN_CHECK_T(
      DataError, magic[0] == 0 && magic[1] == 0 && magic[2] == 0x08 && magic[3] == want_ndims,
      "IDX file ", path, " has magic 0x", std::hex, (magic[2] << 8 | magic[3]), std::dec,
      ", want 0x8", want_ndims, "0", want_ndims, " (uint8 with ", want_ndims, " dimensions)");
  Idx idx;
  std::int64_t count = 1;
  for (int d = 0; d < want_ndims; ++d) {
    unsigned char b[4];
    read_exact(b, 4, "dimensions");
    idx.dims.push_back(std::int64_t{b[0]} << 24 | std::int64_t{b[1]} << 16 |
                       std::int64_t{b[2]} << 8 | std::int64_t{b[3]});
    count *= idx.dims.back();
  }
  idx.data.resize(static_cast<std::size_t>(count));
  if (count > 0) read_exact(idx.data.data(), idx.data.size(), "data");
  // The end: no more data, and (gzip) a trailer whose CRC-32 and length match.
  unsigned char extra = 0;
  const int more = gzread(file, &extra, 1);
  if (more < 0) throw DataError(gzip_problem("the gzip trailer"));
  DTRAIN_CHECK_T(DataError, more == 0, "IDX file ", path,
                 " holds more data than its header declares (", count, " bytes)");
  const int closed = gzclose(closer.release());
  DTRAIN_CHECK_T(DataError, closed == Z_OK, "IDX file ", path,
                 closed == Z_BUF_ERROR ? " is truncated: its gzip stream ends early"
                                       : " could not be read to its end",
                 " (gzclose returned ", closed, ")");
  return idx;
}

IdxSplit read_split(const std::string& images_path, const std::string& labels_path) {
  IdxSplit split{images_path, labels_path, read_idx(images_path, 3), read_idx(labels_path, 1)};
  DTRAIN_CHECK_T(DataError, split.images.dims[0] == split.labels.dims[0], images_path, " holds ",
                 split.images.dims[0], " images but ", labels_path, " holds ", split.labels.dims[0],
                 " labels");
  DTRAIN_CHECK_T(DataError, split.images.dims[0] > 0, images_path, " holds no images");
  return split;
}

DatasetSpec split_spec(const IdxSplit& split, const std::string& name, int shards,
                       const std::vector<std::string>& class_names) {
  const std::int64_t n = split.images.dims[0];
  DatasetSpec spec;
  spec.name = name;
  spec.fields = {{"images", DType::kUInt8, {1, split.images.dims[1], split.images.dims[2]}},
                 {"labels", DType::kInt64, {}}};
  spec.class_names = class_names;
  spec.samples_per_shard = (n + shards - 1) / shards;
  return spec;
}

Manifest write_split(const IdxSplit& split, const std::string& out_dir, const std::string& name,
                     int shards, const std::vector<std::string>& class_names) {
  DTRAIN_CHECK_ARG(shards > 0, "--shards must be > 0, got ", shards);
  std::vector<std::int64_t> wide(split.labels.data.begin(), split.labels.data.end());
  DatasetWriter writer(out_dir, split_spec(split, name, shards, class_names));
  writer.add({split.images.data.data(), wide.data()}, split.images.dims[0]);
  return writer.finish();
}

// True if `dir` holds a data set (every digest verified) with exactly the
// fields, class names and samples that write_split would write for `split`;
// the shard layout may differ.
bool holds_split(const std::string& dir, const IdxSplit& split,
                 const std::vector<std::string>& class_names) {
  const auto ds = Dataset::open(dir, {true});
  const Manifest& m = ds->manifest();
  const DatasetSpec want = split_spec(split, m.name, 1, class_names);
  if (m.total_samples != split.images.dims[0] || m.class_names != class_names ||
      m.fields.size() != want.fields.size()) {
    return false;
  }
  for (std::size_t i = 0; i < want.fields.size(); ++i) {
    const FieldSpec& a = m.fields[i];
    const FieldSpec& b = want.fields[i];
    if (a.name != b.name || a.dtype != b.dtype || a.shape != b.shape) return false;
  }
  const std::size_t image_bytes = want.fields[0].bytes_per_sample();
  std::vector<std::uint8_t> images;
  std::vector<std::int64_t> labels;
  const auto& offsets = ds->shard_offsets();
  for (std::size_t shard = 0; shard + 1 < offsets.size(); ++shard) {
    const std::int64_t first = offsets[shard];
    const std::int64_t n = offsets[shard + 1] - first;
    images.resize(static_cast<std::size_t>(n) * image_bytes);
    labels.resize(static_cast<std::size_t>(n));
    ds->read(0, first, n, images.data());
    ds->read(1, first, n, labels.data());
    if (!std::equal(images.begin(), images.end(),
                    split.images.data.begin() + static_cast<std::ptrdiff_t>(first * image_bytes)) ||
        !std::equal(labels.begin(), labels.end(),
                    split.labels.data.begin() + static_cast<std::ptrdiff_t>(first))) {
      return false;
    }
  }
  return true;
}

}  // namespace

Manifest convert_idx(const std::string& images_path, const std::string& labels_path,
                     const std::string& out_dir, const std::string& name, int shards,
                     const std::vector<std::string>& class_names) {
  DTRAIN_CHECK_ARG(shards > 0, "--shards must be > 0, got ", shards);
  return write_split(read_split(images_path, labels_path), out_dir, name, shards, class_names);
}

void convert_fashion_mnist(const std::string& source_dir, const std::string& out_dir, int shards) {
  DTRAIN_CHECK_ARG(shards > 0, "--shards must be > 0, got ", shards);
  struct Target {
    const char* split;   // output subdirectory
    const char* prefix;  // of the IDX file names
    const char* name;    // of the data set
  };
  const Target targets[] = {{"train", "train", "fashion-mnist-train"},
                            {"test", "t10k", "fashion-mnist-test"}};
  const auto& names = fashion_mnist_class_names();
  detail::SplitPublisher publisher(out_dir, {targets[0].split, targets[1].split});

  // 1. Read and check all four files (magic, sizes, gzip checksums).
  std::vector<IdxSplit> splits;
  for (const Target& t : targets) {
    const std::string prefix = source_dir + "/" + t.prefix;
    splits.push_back(
        read_split(prefix + "-images-idx3-ubyte.gz", prefix + "-labels-idx1-ubyte.gz"));
  }
  // A split that is already there stays if it holds the same samples: an
  // earlier conversion stopped between publishing its two splits.
  for (std::size_t i = 0; i < splits.size(); ++i) {
    DTRAIN_CHECK_ARG(
        !publisher.published(i) || holds_split(publisher.final_dir(i), splits[i], names), "'",
        publisher.final_dir(i), "' already holds a data set that differs from ", source_dir,
        "; remove it or choose another --out");
  }

  // 2. Write the missing splits into the staging directory, never read as a
  // data set; 3. publish them, a rename per split, once all are written.
  for (std::size_t i = 0; i < splits.size(); ++i) {
    if (publisher.published(i)) continue;
    write_split(splits[i], publisher.staging_dir(i), targets[i].name, shards, names);
  }
  publisher.publish();
}

std::uint8_t synthetic_pixel(std::uint64_t seed, std::int64_t sample, std::int64_t element) {
  return static_cast<std::uint8_t>(
      detail::mix(seed, static_cast<std::uint64_t>(sample), static_cast<std::uint64_t>(element)) >>
      56);
}

std::int64_t synthetic_label(std::uint64_t seed, std::int64_t sample, int classes) {
  return static_cast<std::int64_t>(
      detail::mix(seed ^ 0x1AB3L, static_cast<std::uint64_t>(sample), ~0ULL) %
      static_cast<std::uint64_t>(classes));
}

Manifest generate_synthetic(const std::string& out_dir, const SyntheticSpec& spec) {
  DTRAIN_CHECK_ARG(spec.samples > 0, "--samples must be > 0");
  DTRAIN_CHECK_ARG(spec.classes > 0, "--classes must be > 0");
  DTRAIN_CHECK_ARG(spec.shards > 0, "--shards must be > 0");
  DatasetSpec ds;
  ds.name = "synthetic";
  ds.fields = {{"images", DType::kUInt8, spec.shape}, {"labels", DType::kInt64, {}}};
  for (int c = 0; c < spec.classes; ++c) ds.class_names.push_back("class-" + std::to_string(c));
  ds.samples_per_shard = (spec.samples + spec.shards - 1) / spec.shards;
  DTRAIN_CHECK_ARG(ds.samples_per_shard * (spec.shards - 1) < spec.samples, "--shards ",
                   spec.shards, " is too many for ", spec.samples,
                   " samples (a shard would be empty)");
  ds.validate();
  const std::int64_t per_sample = ds.fields[0].elements_per_sample();
  DatasetWriter writer(out_dir, ds);
  // Generated and appended in blocks so memory stays bounded.
  const std::int64_t block = std::max<std::int64_t>(1, (std::int64_t{16} << 20) / per_sample);
  std::vector<std::uint8_t> pixels;
  std::vector<std::int64_t> labels;
  for (std::int64_t first = 0; first < spec.samples; first += block) {
    const std::int64_t n = std::min(block, spec.samples - first);
    pixels.resize(static_cast<std::size_t>(n * per_sample));
    labels.resize(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) {
      labels[i] = synthetic_label(spec.seed, first + i, spec.classes);
      for (std::int64_t e = 0; e < per_sample; ++e) {
        pixels[i * per_sample + e] = synthetic_pixel(spec.seed, first + i, e);
      }
    }
    writer.add({pixels.data(), labels.data()}, n);
  }
  return writer.finish();
}

}  // namespace dtrain::data
