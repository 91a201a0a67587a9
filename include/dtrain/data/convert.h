#pragma once
// Producers of data sets: IDX (MNIST-style) conversion and synthetic data.
// Used by the dtrain-data tool, tests and benchmarks.

#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/data/dataset.h"

namespace dtrain::data {

/// Class names of Fashion-MNIST, label order.
const std::vector<std::string>& fashion_mnist_class_names();

/// Converts one IDX image file (magic 0x803, uint8 [n, rows, cols]) and its
/// label file (magic 0x801, uint8 [n]), gzip'd or not, into a data set with
/// fields images uint8 [1, rows, cols] and labels int64 [] in `out_dir`,
/// split into `shards` shards. Both files are read and checked whole before
/// anything is written. Throws DataError naming the file on a missing file,
/// a bad magic number, a truncated file, a failed gzip checksum (CRC-32) or
/// a count mismatch.
Manifest convert_idx(const std::string& images_path, const std::string& labels_path,
                     const std::string& out_dir, const std::string& name, int shards,
                     const std::vector<std::string>& class_names = {});

/// Converts Debian's dataset-fashion-mnist files in `source_dir`
/// ({train,t10k}-{images-idx3,labels-idx1}-ubyte.gz) into out_dir/train and
/// out_dir/test, all or nothing: the four files are read and checked first,
/// both splits are written into out_dir/.convert.tmp, and only then renamed
/// into place. A failure (a missing, truncated or corrupt file, a full
/// disk) publishes neither split, so a rerun with good files just works. A
/// split already in place (an earlier conversion stopped between the two
/// renames) is kept if it holds the same samples; if it differs, or both
/// splits are there, it throws InvalidArgument. A second conversion into
/// the same out_dir at the same time is refused (InvalidArgument).
void convert_fashion_mnist(const std::string& source_dir, const std::string& out_dir, int shards);

struct SyntheticSpec {
  std::int64_t samples = 1000;
  std::vector<std::int64_t> shape{3, 32, 32};  ///< Per-sample image shape.
  int classes = 10;
  int shards = 1;
  std::uint64_t seed = 0;
};

/// Synthetic images uint8 `shape` and labels int64 [] whose values are a
/// pure function of (seed, sample index): see synthetic_pixel/label.
Manifest generate_synthetic(const std::string& out_dir, const SyntheticSpec& spec);
std::uint8_t synthetic_pixel(std::uint64_t seed, std::int64_t sample, std::int64_t element);
std::int64_t synthetic_label(std::uint64_t seed, std::int64_t sample, int classes);

}  // namespace dtrain::data
