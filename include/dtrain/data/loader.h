#pragma once
// DataLoader: this rank's batches of a Dataset, in GlobalSampler order,
// read ahead on background threads.
//
//   auto ds = dtrain::data::Dataset::open("/data/fmnist/train");
//   dtrain::data::LoaderOptions opt;
//   opt.sampler.global_batch_size = 256;      // over all dp ranks
//   opt.mean = {0.286}; opt.std = {0.353};
//   dtrain::data::DataLoader loader(ds, opt, grid.coord().dp, grid.shape().dp);
//   for (int step = 0; step < steps; ++step) {
//     dtrain::data::Batch b = loader.next();   // images [b,C,H,W] f32, labels [b] i64
//     ...
//     if (checkpoint_now) save(loader.state());  // restore with options.start
//   }
//
// With opt.output = ImageOutput::kRaw the images keep their stored dtype
// (uint8 for Fashion-MNIST: 4x fewer bytes to write and to copy to the GPU)
// and are normalized on the device:
//
//   at::Tensor x = dtrain::data::normalize_images(b.images.to(at::kCUDA), opt);
//
// Pipeline (see docs/data.md): one reader thread makes every HDF5 call
// (HDF5's thread-safe build serializes all calls behind one global lock).
// With the chunk cache (cache_bytes > 0) it makes sure every chunk a batch
// needs is cached (one hyperslab read per missing chunk) and hands the
// workers, per sample, a pointer into the cached chunk, with shared
// ownership of the batch's chunks so that an eviction cannot free bytes a
// worker still reads. Without the cache it sorts the batch's indices,
// coalesces contiguous indices of one shard into runs and reads each run
// with one hyperslab read into a staging buffer. `workers` decode threads
// then convert, normalize and augment each sample in one pass, straight into
// the output tensors in sampler order. At most `prefetch_depth` batches are
// read ahead. Augmentation draws from a random stream seeded by (seed,
// epoch, sample index) only, so the output never depends on the number of
// workers or on thread timing.

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
  /// many pixels (0: off). The padding is raw value 0 (normalized like any
  /// pixel in ImageOutput::kNormalizedFloat).
  int crop_padding = 0;
  bool horizontal_flip = false;  ///< Mirror left-right with probability 1/2.
};

/// What Batch::images holds.
enum class ImageOutput {
  /// float32, (value * scale - mean[c]) / std[c]: ready for a CPU model.
  kNormalizedFloat,
  /// The stored dtype and values (uint8 for image data sets), augmented but
  /// not normalized: a quarter of the bytes for uint8, for loaders that
  /// feed a GPU. normalize_images() then gives, bitwise, what
  /// kNormalizedFloat would have produced.
  kRaw,
};

struct LoaderOptions {
  SamplerOptions sampler;
  SamplerState start;                  ///< Where to begin (a saved state() to resume).
  std::string image_field = "images";  ///< [C,H,W] or [H,W] per sample, any dtype.
  std::string label_field = "labels";  ///< Scalar per sample, integer dtype.
  /// Pixels become (value * scale - mean[c]) / std[c], computed in float32
  /// as value * (scale / std[c]) + (-mean[c] / std[c]), rounded after the
  /// multiply and after the add. scale < 0 picks 1/255 for uint8 images and
  /// 1 otherwise. Empty mean/std: 0 and 1. One value applies to every
  /// channel; otherwise one per channel. With ImageOutput::kRaw the loader
  /// does not normalize; normalize_images() applies these values.
  double scale = -1;
  std::vector<double> mean;
  std::vector<double> std;
  AugmentOptions augment;
  ImageOutput output = ImageOutput::kNormalizedFloat;  ///< What Batch::images holds.
  /// Memory for the reader's chunk cache (LRU over whole chunks, ~256 KiB
  /// each). Reads are chunk-aligned: a missing chunk is read whole, once,
  /// and the workers decode samples straight from the cached chunks. Sized
  /// at least the data set (per rank), every chunk is read once per job.
  /// The batches in flight (up to prefetch_depth) keep the chunks they use
  /// alive even after eviction, so a cache smaller than the chunks of those
  /// batches is exceeded by them: with a small cache prefer
  /// ShuffleMode::kShardLocal, or 0. 0: no cache, one hyperslab read per run
  /// of contiguous samples into a per-batch staging buffer.
  std::size_t cache_bytes = std::size_t{512} << 20;
  int workers = 2;         ///< Decode/augment threads (>= 1).
  int prefetch_depth = 4;  ///< Batches read ahead (>= 1).
  /// Allocate outputs (in either output mode) in pinned memory; needs a
  /// CUDA-enabled LibTorch (InvalidArgument otherwise).
  bool pin_memory = false;

  void validate() const;
};

/// Without pin_memory the three tensors share one block of memory that the
/// loader reuses for a later batch once all three are destroyed (keep them
/// as long as needed; their storage cannot be resized in place).
struct Batch {
  /// [b, C, H, W] ([b, 1, H, W] for [H,W] samples), augmented. kNormalizedFloat:
  /// float32, normalized. kRaw: the stored dtype (at::kByte for uint8) and
  /// values, padding value 0; normalize_images(images, options) turns it into
  /// the kNormalizedFloat tensor, bitwise.
  at::Tensor images;
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
  std::int64_t cache_hits = 0;       ///< Chunks a batch found in the cache.
  double read_seconds = 0;           ///< Reader thread time preparing batches (HDF5 reads, cache).
  double decode_seconds = 0;         ///< Summed over the worker threads.
};

class DataLoader {
 public:
  /// Validates options and the fields (InvalidArgument naming the field;
  /// DataError from check_label_field for a label field that is not one
  /// integer per sample) and starts the threads. Several loaders may share
  /// one Dataset.
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

/// Normalizes a batch of raw images (Batch::images from a loader with
/// ImageOutput::kRaw and these `options`), on the tensor's device:
/// raw.to(float32) * scale_c + shift_c per channel with scale_c =
/// float(scale / std[c]) and shift_c = float(-mean[c] / std[c]) (scale < 0:
/// 1/255 for uint8 `raw`, 1 otherwise), a multiply and an add rounded
/// separately, exactly as the loader computes kNormalizedFloat output.
/// `raw` must be [b, C, H, W] of an integer or floating dtype with C
/// matching mean/std (InvalidArgument otherwise). Returns a new float32
/// tensor on raw's device.
at::Tensor normalize_images(const at::Tensor& raw, const LoaderOptions& options);

/// Deterministic augmentation of one sample, as the loader applies it
/// (exposed for tests): `src` holds C*H*W normalized floats, `dst` receives
/// the augmented sample; the random choices come from (seed, epoch, sample).
void augment_sample(const float* src, float* dst, int channels, int height, int width,
                    const std::vector<float>& pad_values, const AugmentOptions& options,
                    std::uint64_t seed, std::int64_t epoch, std::int64_t sample);

}  // namespace dtrain::data
