// IDX conversion (gzip through zlib) and synthetic data sets.

#include "dtrain/data/convert.h"

#include <zlib.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/error.h"
#include "src/data/random.h"

namespace dtrain::data {

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

Idx read_idx(const std::string& path, int want_ndims) {
  // gzopen reads plain files transparently too.
  std::unique_ptr<gzFile_s, int (*)(gzFile)> file(gzopen(path.c_str(), "rb"), gzclose);
  DTRAIN_CHECK_T(DataError, file != nullptr, "cannot open IDX file ", path);
  auto read_exact = [&](void* dst, std::size_t n, const char* what) {
    std::size_t done = 0;
    while (done < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(n - done, 1u << 30));
      const int got = gzread(file.get(), static_cast<char*>(dst) + done, chunk);
      DTRAIN_CHECK_T(DataError, got > 0, "IDX file ", path, " is truncated or corrupt (reading ",
                     what, ")");
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
  return idx;
}

}  // namespace

Manifest convert_idx(const std::string& images_path, const std::string& labels_path,
                     const std::string& out_dir, const std::string& name, int shards,
                     const std::vector<std::string>& class_names) {
  DTRAIN_CHECK_ARG(shards > 0, "--shards must be > 0, got ", shards);
  const Idx images = read_idx(images_path, 3);
  const Idx labels = read_idx(labels_path, 1);
  DTRAIN_CHECK_T(DataError, images.dims[0] == labels.dims[0], images_path, " holds ",
                 images.dims[0], " images but ", labels_path, " holds ", labels.dims[0], " labels");
  DTRAIN_CHECK_T(DataError, images.dims[0] > 0, images_path, " holds no images");
  const std::int64_t n = images.dims[0];
  DatasetSpec spec;
  spec.name = name;
  spec.fields = {{"images", DType::kUInt8, {1, images.dims[1], images.dims[2]}},
                 {"labels", DType::kInt64, {}}};
  spec.class_names = class_names;
  spec.samples_per_shard = (n + shards - 1) / shards;
  std::vector<std::int64_t> wide(labels.data.begin(), labels.data.end());
  DatasetWriter writer(out_dir, spec);
  writer.add({images.data.data(), wide.data()}, n);
  return writer.finish();
}

void convert_fashion_mnist(const std::string& source_dir, const std::string& out_dir, int shards) {
  const auto& names = fashion_mnist_class_names();
  convert_idx(source_dir + "/train-images-idx3-ubyte.gz",
              source_dir + "/train-labels-idx1-ubyte.gz", out_dir + "/train", "fashion-mnist-train",
              shards, names);
  convert_idx(source_dir + "/t10k-images-idx3-ubyte.gz", source_dir + "/t10k-labels-idx1-ubyte.gz",
              out_dir + "/test", "fashion-mnist-test", shards, names);
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
