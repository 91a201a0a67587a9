#pragma once
// DataLoader: this rank's batches of a Dataset, in GlobalSampler order,
// read ahead on background threads.
//
//   auto ds = dtrain::data::Dataset::open("/data/fmnist/train");
//   dtrain::data::LoaderOptions opt;
//   opt.sampler.global_batch_size = 256;      // over all dp ranks
//   opt.mean = {0.286}; opt.std = {0.353};
//   dtrain::data::DataLoader loader(ds, opt, grid.dp_rank(), grid.dp_size());
//   for (int step = 0; step < steps; ++step) {
//     dtrain::data::Batch b = loader.next();   // images [b,C,H,W] f32, labels [b] i64
//     ...
//     if (checkpoint_now) save(loader.state());  // restore with options.start
//   }
//
// Pipeline (see docs/data.md): one reader thread makes every HDF5 call
// (HDF5's thread-safe build serializes all calls behind one global lock).
// For each batch it sorts this rank's sample indices, coalesces contiguous
// indices of one shard into runs, reads each run chunk-aligned through an
// LRU cache of whole chunks (one hyperslab read per missing chunk; without
// the cache, one hyperslab read per run), and hands the raw
// bytes to `workers` decode threads, which convert to float, normalize and
// augment into the output tensors in sampler order. At most
// `prefetch_depth` batches are read ahead. Augmentation draws from a random
// stream seeded by (seed, epoch, sample index) only, so the output never
// depends on the number of workers or on thread timing.

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/data/dataset.h"
#include "dtrain/data/sampler.h"

namespace dtrain::data {

struct AugmentOptions {
  /// Random crop of the original size after zero-padding each side by this
  /// many pixels (0: off). The padding is raw value 0, normalized like any pixel.
  int crop_padding = 0;
  bool horizontal_flip = false;  ///< Mirror left-right with probability 1/2.
};

struct LoaderOptions {
  SamplerOptions sampler;
  SamplerState start;                  ///< Where to begin (a saved state() to resume).
  std::string image_field = "images";  ///< [C,H,W] or [H,W] per sample, any dtype.
  std::string label_field = "labels";  ///< Scalar per sample, integer dtype.
  /// Pixels become (value * scale - mean[c]) / std[c]. scale < 0 picks 1/255
  /// for uint8 images and 1 otherwise. Empty mean/std: 0 and 1. One value
  /// applies to every channel; otherwise one per channel.
  double scale = -1;
  std::vector<double> mean;
  std::vector<double> std;
  AugmentOptions augment;
  /// Memory for the reader's chunk cache (LRU over whole chunks, ~256 KiB
  /// each). Reads are chunk-aligned: a missing chunk is read whole, once,
  /// and later samples of it are copied from memory. Sized at least the
  /// data set (per rank), every chunk is read once per job; with a small
  /// cache prefer ShuffleMode::kShardLocal. 0: no cache, one hyperslab
  /// read per run of contiguous samples.
  std::size_t cache_bytes = std::size_t{512} << 20;
  int workers = 2;         ///< Decode/augment threads (>= 1).
  int prefetch_depth = 4;  ///< Batches read ahead (>= 1).
  /// Allocate outputs in pinned memory; needs a CUDA-enabled LibTorch
  /// (InvalidArgument otherwise).
  bool pin_memory = false;

  void validate() const;
};

struct Batch {
  at::Tensor images;   ///< float32 [b, C, H, W]
  at::Tensor labels;   ///< int64 [b]
  at::Tensor indices;  ///< int64 [b], global sample indices, sampler order
  std::int64_t epoch = 0;
  std::int64_t batch_in_epoch = 0;  ///< Global batch number within the epoch.
};

/// Counters for tuning (see docs/data.md): when read_seconds is close to
/// the wall time, the single HDF5 reader thread is the bottleneck.
struct LoaderStats {
  std::int64_t batches_read = 0;
  std::int64_t hyperslab_reads = 0;  ///< Dataset::read calls (HDF5 reads).
  std::int64_t cache_hits = 0;       ///< Chunk pieces served from the cache.
  double read_seconds = 0;           ///< Reader thread time inside HDF5 reads.
  double decode_seconds = 0;         ///< Summed over the worker threads.
};

class DataLoader {
 public:
  /// Validates options and the fields (InvalidArgument naming the field) and
  /// starts the threads. Several loaders may share one Dataset.
  DataLoader(std::shared_ptr<Dataset> dataset, LoaderOptions options, int dp_rank, int dp_size);
  /// Stops and joins the threads; never throws.
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  /// The next batch of this rank (blocks until it is ready). The stream is
  /// endless: after an epoch's last batch comes epoch + 1. A read or decode
  /// error is rethrown here (DataError naming file and field).
  Batch next();

  /// The sampler state after the last batch next() returned: save it with a
  /// checkpoint and pass it as LoaderOptions::start to resume (with any dp
  /// size that divides the global batch).
  SamplerState state() const;
  std::int64_t batches_per_epoch() const;
  LoaderStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Deterministic augmentation of one sample, as the loader applies it
/// (exposed for tests): `src` holds C*H*W normalized floats, `dst` receives
/// the augmented sample; the random choices come from (seed, epoch, sample).
void augment_sample(const float* src, float* dst, int channels, int height, int width,
                    const std::vector<float>& pad_values, const AugmentOptions& options,
                    std::uint64_t seed, std::int64_t epoch, std::int64_t sample);

}  // namespace dtrain::data
