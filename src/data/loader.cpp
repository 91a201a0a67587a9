// DataLoader: one HDF5 reader thread, a pool of decode/augment workers and a
// bounded, ordered hand-off to the training loop.

#include "dtrain/data/loader.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <list>
#include <map>
#include <mutex>
#include <numeric>
#include <thread>
#include <tuple>
#include <utility>

#include "dtrain/error.h"
#include "src/data/random.h"

namespace dtrain::data {

void LoaderOptions::validate() const {
  sampler.validate();
  DTRAIN_CHECK_ARG(workers >= 1, "LoaderOptions::workers must be >= 1, got ", workers);
  DTRAIN_CHECK_ARG(prefetch_depth >= 1, "LoaderOptions::prefetch_depth must be >= 1, got ",
                   prefetch_depth);
  DTRAIN_CHECK_ARG(augment.crop_padding >= 0, "crop_padding must be >= 0");
  for (double s : std) DTRAIN_CHECK_ARG(s != 0, "LoaderOptions::std holds a zero");
  DTRAIN_CHECK_ARG(!pin_memory || at::hasCUDA(),
                   "pin_memory needs a CUDA-enabled LibTorch; this one has no CUDA (set "
                   "pin_memory = false)");
}

void augment_sample(const float* src, float* dst, int channels, int height, int width,
                    const std::vector<float>& pad_values, const AugmentOptions& options,
                    std::uint64_t seed, std::int64_t epoch, std::int64_t sample) {
  // Fixed draw order (dy, dx, flip) whatever is enabled, from a stream that
  // depends on (seed, epoch, sample) only.
  detail::SplitMix64 rng(detail::mix(seed ^ 0xA06D3E7ULL, static_cast<std::uint64_t>(epoch),
                                     static_cast<std::uint64_t>(sample)));
  const int pad = options.crop_padding;
  const int dy = static_cast<int>(rng.bounded(static_cast<std::uint64_t>(2 * pad + 1))) - pad;
  const int dx = static_cast<int>(rng.bounded(static_cast<std::uint64_t>(2 * pad + 1))) - pad;
  const bool flip = (rng.next() & 1) != 0 && options.horizontal_flip;
  for (int c = 0; c < channels; ++c) {
    const float* plane = src + static_cast<std::ptrdiff_t>(c) * height * width;
    float* out = dst + static_cast<std::ptrdiff_t>(c) * height * width;
    for (int y = 0; y < height; ++y) {
      const int sy = y + dy;
      for (int x = 0; x < width; ++x) {
        const int sx = (flip ? width - 1 - x : x) + dx;
        out[y * width + x] = (sy >= 0 && sy < height && sx >= 0 && sx < width)
                                 ? plane[sy * width + sx]
                                 : pad_values[c];
      }
    }
  }
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

template <typename T>
void to_float(const unsigned char* raw, std::int64_t n, float* out) {
  const T* v = reinterpret_cast<const T*>(raw);
  for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(v[i]);
}

void convert_to_float(DType dtype, const unsigned char* raw, std::int64_t n, float* out) {
  switch (dtype) {
    case DType::kUInt8:
      return to_float<std::uint8_t>(raw, n, out);
    case DType::kInt8:
      return to_float<std::int8_t>(raw, n, out);
    case DType::kInt16:
      return to_float<std::int16_t>(raw, n, out);
    case DType::kInt32:
      return to_float<std::int32_t>(raw, n, out);
    case DType::kInt64:
      return to_float<std::int64_t>(raw, n, out);
    case DType::kFloat32:
      return to_float<float>(raw, n, out);
    case DType::kFloat64:
      return to_float<double>(raw, n, out);
  }
}

std::int64_t label_value(DType dtype, const unsigned char* raw) {
  switch (dtype) {
    case DType::kUInt8:
      return *raw;
    case DType::kInt8:
      return *reinterpret_cast<const std::int8_t*>(raw);
    case DType::kInt16:
      return *reinterpret_cast<const std::int16_t*>(raw);
    case DType::kInt32:
      return *reinterpret_cast<const std::int32_t*>(raw);
    case DType::kInt64:
      return *reinterpret_cast<const std::int64_t*>(raw);
    default:
      return 0;  // rejected at construction
  }
}

// One batch between the reader and a worker: raw bytes in sorted-index order.
struct RawBatch {
  std::int64_t seq = 0;
  std::int64_t epoch = 0;
  std::int64_t batch_in_epoch = 0;
  SamplerState state_after;
  std::vector<std::int64_t> indices;  // sampler order
  std::vector<std::int64_t> slot;     // sampler position -> row in the staging buffers
  std::vector<unsigned char> images;  // rows in sorted order
  std::vector<unsigned char> labels;
  std::exception_ptr error;
};

// A whole chunk of one field in the reader's cache.
struct CachedChunk {
  std::tuple<int, int, std::int64_t> key;  // shard, field, chunk number
  std::vector<unsigned char> data;
};

struct Ready {
  Batch batch;
  SamplerState state_after;
  std::exception_ptr error;
};

}  // namespace

struct DataLoader::Impl {
  std::shared_ptr<Dataset> dataset;
  LoaderOptions options;
  GlobalSampler sampler;  // advanced by the reader thread only
  int image_field = 0, label_field = 0;
  DType image_dtype = DType::kUInt8, label_dtype = DType::kInt64;
  int channels = 1, height = 1, width = 1;
  std::size_t image_bytes = 0, label_bytes = 0;
  std::vector<float> scale, shift, pad_values;  // per channel: x*scale + shift
  bool augment = false;

  mutable std::mutex mu;
  std::condition_variable reader_cv, worker_cv, consumer_cv;
  std::deque<RawBatch> work;
  std::map<std::int64_t, Ready> ready;
  std::vector<std::vector<unsigned char>> spare_buffers;  // reused staging memory
  int in_flight = 0;                                      // read but not yet returned by next()
  bool stop = false;
  std::int64_t next_seq = 0;
  SamplerState delivered;
  LoaderStats stats;
  std::thread reader;
  std::vector<std::thread> workers;
  // Reader thread only: LRU chunk cache (front = most recently used).
  std::list<CachedChunk> lru;
  std::map<std::tuple<int, int, std::int64_t>, std::list<CachedChunk>::iterator> cache_index;
  std::size_t cache_used = 0;
  std::int64_t reads = 0, hits = 0;  // flushed into stats per batch

  Impl(std::shared_ptr<Dataset> ds, LoaderOptions opt, int dp_rank, int dp_size)
      : dataset(std::move(ds)),
        options(std::move(opt)),
        sampler(shard_sizes(*dataset), options.sampler, dp_rank, dp_size) {}

  static std::vector<std::int64_t> shard_sizes(const Dataset& ds) {
    std::vector<std::int64_t> out;
    for (const auto& s : ds.manifest().shards) out.push_back(s.samples);
    return out;
  }

  std::vector<unsigned char> take_buffer(std::size_t bytes) {
    std::vector<unsigned char> b;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!spare_buffers.empty()) {
        b = std::move(spare_buffers.back());
        spare_buffers.pop_back();
      }
    }
    b.resize(bytes);
    return b;
  }

  const CachedChunk& chunk(int shard, int field, std::int64_t number, std::int64_t first,
                           std::int64_t count) {
    const auto key = std::make_tuple(shard, field, number);
    auto it = cache_index.find(key);
    if (it != cache_index.end()) {
      lru.splice(lru.begin(), lru, it->second);
      ++hits;
      return lru.front();
    }
    CachedChunk c;
    c.key = key;
    c.data.resize(static_cast<std::size_t>(count) *
                  dataset->manifest().fields[field].bytes_per_sample());
    dataset->read(field, first, count, c.data.data());
    ++reads;
    cache_used += c.data.size();
    lru.push_front(std::move(c));
    cache_index[key] = lru.begin();
    while (cache_used > options.cache_bytes && lru.size() > 1) {
      cache_used -= lru.back().data.size();
      cache_index.erase(lru.back().key);
      lru.pop_back();
    }
    return lru.front();
  }

  // Copies samples [first, first + count) of one shard into `dst`, chunk by
  // chunk through the cache (or one direct read without a cache).
  void read_run(int field, std::int64_t first, std::int64_t count, unsigned char* dst) {
    const std::size_t bytes = dataset->manifest().fields[field].bytes_per_sample();
    if (options.cache_bytes == 0) {
      dataset->read(field, first, count, dst);
      ++reads;
      return;
    }
    const int shard = dataset->shard_of(first);
    const std::int64_t shard_begin = dataset->shard_offsets()[shard];
    const std::int64_t shard_end = dataset->shard_offsets()[shard + 1];
    const std::int64_t chunk_len = dataset->chunk_samples(field, shard);
    for (std::int64_t pos = first; pos < first + count;) {
      const std::int64_t number = (pos - shard_begin) / chunk_len;
      const std::int64_t chunk_begin = shard_begin + number * chunk_len;
      const std::int64_t chunk_end = std::min(chunk_begin + chunk_len, shard_end);
      const CachedChunk& c = chunk(shard, field, number, chunk_begin, chunk_end - chunk_begin);
      const std::int64_t n = std::min(first + count, chunk_end) - pos;
      std::memcpy(dst, c.data.data() + static_cast<std::size_t>(pos - chunk_begin) * bytes,
                  static_cast<std::size_t>(n) * bytes);
      dst += static_cast<std::size_t>(n) * bytes;
      pos += n;
    }
  }

  // Reads this rank's samples: sorted, contiguous runs of one shard coalesced
  // and read chunk-aligned through the cache.
  void read_batch(RawBatch& raw) {
    const auto n = static_cast<std::int64_t>(raw.indices.size());
    std::vector<std::int64_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), std::int64_t{0});
    std::sort(order.begin(), order.end(),
              [&](std::int64_t a, std::int64_t b) { return raw.indices[a] < raw.indices[b]; });
    raw.slot.assign(static_cast<std::size_t>(n), 0);
    for (std::int64_t row = 0; row < n; ++row) raw.slot[order[row]] = row;
    raw.images = take_buffer(static_cast<std::size_t>(n) * image_bytes);
    raw.labels = take_buffer(static_cast<std::size_t>(n) * label_bytes);
    const auto& offsets = dataset->shard_offsets();
    const auto start = Clock::now();
    reads = hits = 0;
    for (std::int64_t row = 0; row < n;) {
      const std::int64_t first = raw.indices[order[row]];
      const std::int64_t shard_end = offsets[dataset->shard_of(first) + 1];
      std::int64_t len = 1;
      while (row + len < n && raw.indices[order[row + len]] == first + len &&
             first + len < shard_end) {
        ++len;
      }
      read_run(image_field, first, len, raw.images.data() + row * image_bytes);
      read_run(label_field, first, len, raw.labels.data() + row * label_bytes);
      row += len;
    }
    std::lock_guard<std::mutex> lock(mu);
    stats.read_seconds += seconds_since(start);
    stats.hyperslab_reads += reads;
    stats.cache_hits += hits;
    ++stats.batches_read;
  }

  void reader_loop() {
    for (std::int64_t seq = 0;; ++seq) {
      {
        std::unique_lock<std::mutex> lock(mu);
        reader_cv.wait(lock, [&] { return stop || in_flight < options.prefetch_depth; });
        if (stop) return;
      }
      RawBatch raw;
      raw.seq = seq;
      try {
        const SamplerState before = sampler.state();
        raw.epoch = before.epoch;
        raw.batch_in_epoch = before.consumed_samples / sampler.global_batch_size();
        raw.indices = sampler.next();
        raw.state_after = sampler.state();
        read_batch(raw);
      } catch (...) {
        raw.error = std::current_exception();
      }
      const bool failed = raw.error != nullptr;
      {
        std::lock_guard<std::mutex> lock(mu);
        ++in_flight;
        work.push_back(std::move(raw));
      }
      worker_cv.notify_one();
      if (failed) return;  // the error reaches next(); nothing after it is read
    }
  }

  Batch decode(RawBatch& raw) {
    const auto n = static_cast<std::int64_t>(raw.indices.size());
    auto float_options = at::TensorOptions().dtype(at::kFloat).pinned_memory(options.pin_memory);
    auto long_options = at::TensorOptions().dtype(at::kLong).pinned_memory(options.pin_memory);
    Batch b;
    b.epoch = raw.epoch;
    b.batch_in_epoch = raw.batch_in_epoch;
    b.images = at::empty({n, channels, height, width}, float_options);
    b.labels = at::empty({n}, long_options);
    b.indices = at::empty({n}, long_options);
    const std::int64_t plane = static_cast<std::int64_t>(height) * width;
    const std::int64_t per_sample = channels * plane;
    std::vector<float> scratch(augment ? static_cast<std::size_t>(per_sample) : 0);
    float* images = b.images.data_ptr<float>();
    std::int64_t* labels = b.labels.data_ptr<std::int64_t>();
    std::int64_t* indices = b.indices.data_ptr<std::int64_t>();
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t row = raw.slot[i];
      float* out = images + i * per_sample;
      float* target = augment ? scratch.data() : out;
      convert_to_float(image_dtype, raw.images.data() + row * image_bytes, per_sample, target);
      for (int c = 0; c < channels; ++c) {
        float* p = target + c * plane;
        for (std::int64_t k = 0; k < plane; ++k) p[k] = p[k] * scale[c] + shift[c];
      }
      if (augment) {
        augment_sample(scratch.data(), out, channels, height, width, pad_values, options.augment,
                       options.sampler.seed, raw.epoch, raw.indices[i]);
      }
      labels[i] = label_value(label_dtype, raw.labels.data() + row * label_bytes);
      indices[i] = raw.indices[i];
    }
    return b;
  }

  void worker_loop() {
    for (;;) {
      RawBatch raw;
      {
        std::unique_lock<std::mutex> lock(mu);
        worker_cv.wait(lock, [&] { return stop || !work.empty(); });
        if (stop) return;
        raw = std::move(work.front());
        work.pop_front();
      }
      Ready done;
      done.state_after = raw.state_after;
      done.error = raw.error;
      const auto start = Clock::now();
      if (!done.error) {
        try {
          done.batch = decode(raw);
        } catch (...) {
          done.error = std::current_exception();
        }
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        stats.decode_seconds += seconds_since(start);
        spare_buffers.push_back(std::move(raw.images));
        spare_buffers.push_back(std::move(raw.labels));
        ready.emplace(raw.seq, std::move(done));
      }
      consumer_cv.notify_all();
    }
  }
};

DataLoader::DataLoader(std::shared_ptr<Dataset> dataset, LoaderOptions options, int dp_rank,
                       int dp_size) {
  DTRAIN_CHECK_ARG(dataset != nullptr, "DataLoader needs a dataset");
  options.validate();
  impl_ = std::make_unique<Impl>(std::move(dataset), std::move(options), dp_rank, dp_size);
  Impl& s = *impl_;
  s.sampler.restore(s.options.start);
  s.delivered = s.options.start;
  const Manifest& m = s.dataset->manifest();
  s.image_field = s.dataset->field_index(s.options.image_field);
  s.label_field = s.dataset->field_index(s.options.label_field);
  const FieldSpec& img = m.fields[s.image_field];
  const FieldSpec& lab = m.fields[s.label_field];
  DTRAIN_CHECK_ARG(img.shape.size() == 2 || img.shape.size() == 3, "image field '", img.name,
                   "' of ", s.dataset->dir(),
                   " must have per-sample shape [C,H,W] or [H,W], it has ", img.shape.size(),
                   " dimensions");
  DTRAIN_CHECK_ARG(
      lab.shape.empty() && lab.dtype != DType::kFloat32 && lab.dtype != DType::kFloat64,
      "label field '", lab.name, "' of ", s.dataset->dir(),
      " must be an integer scalar per sample, it is ", dtype_name(lab.dtype), " with ",
      lab.shape.size(), " dimensions");
  s.channels = img.shape.size() == 3 ? static_cast<int>(img.shape[0]) : 1;
  s.height = static_cast<int>(img.shape[img.shape.size() - 2]);
  s.width = static_cast<int>(img.shape[img.shape.size() - 1]);
  s.image_dtype = img.dtype;
  s.label_dtype = lab.dtype;
  s.image_bytes = img.bytes_per_sample();
  s.label_bytes = lab.bytes_per_sample();
  auto per_channel = [&](const std::vector<double>& v, double fallback, const char* what) {
    DTRAIN_CHECK_ARG(v.size() <= 1 || v.size() == static_cast<std::size_t>(s.channels),
                     "LoaderOptions::", what, " has ", v.size(), " values for ", s.channels,
                     " channels (give 1 or one per channel)");
    std::vector<double> out(static_cast<std::size_t>(s.channels), fallback);
    for (int c = 0; c < s.channels; ++c) {
      if (!v.empty()) out[c] = v.size() == 1 ? v[0] : v[c];
    }
    return out;
  };
  const auto mean = per_channel(s.options.mean, 0.0, "mean");
  const auto stdev = per_channel(s.options.std, 1.0, "std");
  const double scale =
      s.options.scale >= 0 ? s.options.scale : (img.dtype == DType::kUInt8 ? 1.0 / 255 : 1.0);
  for (int c = 0; c < s.channels; ++c) {
    s.scale.push_back(static_cast<float>(scale / stdev[c]));
    s.shift.push_back(static_cast<float>(-mean[c] / stdev[c]));
    s.pad_values.push_back(s.shift.back());  // raw 0, normalized
  }
  s.augment = s.options.augment.crop_padding > 0 || s.options.augment.horizontal_flip;
  s.reader = std::thread([&s] { s.reader_loop(); });
  for (int w = 0; w < s.options.workers; ++w) s.workers.emplace_back([&s] { s.worker_loop(); });
}

DataLoader::~DataLoader() {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.stop = true;
  }
  s.reader_cv.notify_all();
  s.worker_cv.notify_all();
  s.consumer_cv.notify_all();
  if (s.reader.joinable()) s.reader.join();
  for (auto& w : s.workers) w.join();
}

Batch DataLoader::next() {
  Impl& s = *impl_;
  Ready done;
  {
    std::unique_lock<std::mutex> lock(s.mu);
    s.consumer_cv.wait(lock, [&] { return s.ready.count(s.next_seq) > 0; });
    auto it = s.ready.find(s.next_seq);
    // An error ends the stream: it stays queued, so every later call rethrows it.
    if (it->second.error) std::rethrow_exception(it->second.error);
    done = std::move(it->second);
    s.ready.erase(it);
    ++s.next_seq;
    --s.in_flight;
    s.delivered = done.state_after;
  }
  s.reader_cv.notify_one();
  return std::move(done.batch);
}

SamplerState DataLoader::state() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->delivered;
}

std::int64_t DataLoader::batches_per_epoch() const { return impl_->sampler.batches_per_epoch(); }

LoaderStats DataLoader::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

}  // namespace dtrain::data
