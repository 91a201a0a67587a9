#pragma once
// The machinery every loader shares (internal): the GlobalSampler stream, one
// reader thread that makes every HDF5 call, the chunk cache (or, without it,
// coalesced staged reads), a pool of decode workers, bounded prefetch and the
// ordered hand-off. A loader says what each sample reads (SampleRead) and
// how a batch of read bytes becomes tensors (DecodeFn); DataLoader (images
// and labels) and TokenLoader (windows of a token stream) are the two.
// See docs/data.md, "Loader design".

#include <ATen/ATen.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <vector>

#include "dtrain/data/dataset.h"
#include "dtrain/data/loader.h"
#include "dtrain/data/sampler.h"

namespace dtrain::data::detail {

/// What sample `s` of the sampler's stream reads from one field: elements
/// [s * stride, s * stride + length) of the field, where an element is one
/// of the data set's samples. An image data set reads stride = length = 1
/// (sample s is stored sample s); a token stream stored one token per sample
/// reads a window, stride = context and length = context + 1. A span may
/// cross chunk and shard boundaries.
struct SampleRead {
  int field = 0;
  std::int64_t stride = 1;
  std::int64_t length = 1;
};

struct EngineOptions {
  SamplerOptions sampler;
  SamplerState start;
  std::size_t cache_bytes = 0;  ///< 0: staged reads, no cache.
  int workers = 1;
  int prefetch_depth = 1;
  bool pin_memory = false;

  /// The engine's part of a loader's options (LoaderOptions,
  /// TokenLoaderOptions: the fields of the same names).
  template <typename LoaderOptionsT>
  static EngineOptions of(const LoaderOptionsT& o) {
    EngineOptions e;
    e.sampler = o.sampler;
    e.start = o.start;
    e.cache_bytes = o.cache_bytes;
    e.workers = o.workers;
    e.prefetch_depth = o.prefetch_depth;
    e.pin_memory = o.pin_memory;
    return e;
  }
};

/// A cached chunk's bytes; shared by the cache and the batches that use it.
using ChunkBytes = std::shared_ptr<const unsigned char[]>;

/// One batch between the reader and a worker: where each sample's bytes are.
struct RawBatch {
  std::int64_t seq = 0;
  std::int64_t epoch = 0;
  std::int64_t batch_in_epoch = 0;
  SamplerState state_after;
  std::vector<std::int64_t> indices;  ///< sampler order
  /// [read][sample]: the sample's span of that read, contiguous, in sampler
  /// order: a pointer into a cached chunk, into `staging`, or into `spill`.
  std::vector<std::vector<const unsigned char*>> data;
  std::vector<ChunkBytes> chunks;  ///< what the pointers point into (with the cache)
  std::vector<std::vector<unsigned char>> staging;  ///< [read], without the cache
  /// Spans that cross a chunk or shard boundary, copied together (cache only).
  std::vector<std::unique_ptr<unsigned char[]>> spill;
  std::exception_ptr error;
};

/// Memory for a batch's output tensors.
class OutputAllocator {
 public:
  struct Spec {
    std::vector<std::int64_t> shape;
    at::ScalarType type = at::kLong;
  };
  virtual ~OutputAllocator() = default;
  /// Tensors of the given shapes and types: pinned (pin_memory) or sharing
  /// one recycled block that returns to the loader when all are destroyed.
  virtual std::vector<at::Tensor> allocate(const std::vector<Spec>& specs) = 0;
};

/// Turns a read batch into its output tensors; runs on a worker thread, may
/// run for several batches at once (so it must only read shared state).
using DecodeFn = std::function<std::vector<at::Tensor>(const RawBatch&, OutputAllocator&)>;

struct Decoded {
  std::vector<at::Tensor> tensors;
  std::int64_t epoch = 0;
  std::int64_t batch_in_epoch = 0;
};

class LoaderEngine {
 public:
  /// `sampler_shard_sizes`: samples of the sampler's stream per shard (for
  /// ShuffleMode::kShardLocal), summing to the stream's length. Throws
  /// InvalidArgument on bad options (the sampler's checks) and starts the
  /// threads.
  LoaderEngine(std::shared_ptr<Dataset> dataset, EngineOptions options,
               std::vector<SampleRead> reads, std::vector<std::int64_t> sampler_shard_sizes,
               DecodeFn decode, int dp_rank, int dp_size);
  /// Stops and joins the threads; never throws.
  ~LoaderEngine();
  LoaderEngine(const LoaderEngine&) = delete;
  LoaderEngine& operator=(const LoaderEngine&) = delete;

  /// The next batch, in sampler order; rethrows a read or decode error (and
  /// again on every later call).
  Decoded next();
  SamplerState state() const;
  std::int64_t batches_per_epoch() const;
  LoaderStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::data::detail
