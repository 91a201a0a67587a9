// DataLoader: one HDF5 reader thread, a pool of decode/augment workers and a
// bounded, ordered hand-off to the training loop.

#include "dtrain/data/loader.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <thread>
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
  DTRAIN_CHECK_ARG(output == ImageOutput::kNormalizedFloat || output == ImageOutput::kRaw,
                   "LoaderOptions::output is ", static_cast<int>(output),
                   ", not an ImageOutput (kNormalizedFloat or kRaw)");
  for (double s : std) DTRAIN_CHECK_ARG(s != 0, "LoaderOptions::std holds a zero");
  DTRAIN_CHECK_ARG(!pin_memory || at::hasCUDA(),
                   "pin_memory needs a CUDA-enabled LibTorch; this one has no CUDA (set "
                   "pin_memory = false)");
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

at::ScalarType scalar_type_of(DType dtype) {
  switch (dtype) {
    case DType::kUInt8:
      return at::kByte;
    case DType::kInt8:
      return at::kChar;
    case DType::kInt16:
      return at::kShort;
    case DType::kInt32:
      return at::kInt;
    case DType::kInt64:
      return at::kLong;
    case DType::kFloat32:
      return at::kFloat;
    case DType::kFloat64:
      return at::kDouble;
  }
  return at::kByte;  // unreachable
}

// value * scale[c] + shift[c] per channel, as float32: what normalization means.
struct ChannelAffine {
  std::vector<float> scale, shift;
};

ChannelAffine channel_affine(const LoaderOptions& o, bool uint8, std::int64_t channels) {
  auto per_channel = [&](const std::vector<double>& v, double fallback, const char* what) {
    DTRAIN_CHECK_ARG(v.size() <= 1 || v.size() == static_cast<std::size_t>(channels),
                     "LoaderOptions::", what, " has ", v.size(), " values for ", channels,
                     " channels (give 1 or one per channel)");
    std::vector<double> out(static_cast<std::size_t>(channels), fallback);
    for (std::size_t c = 0; c < out.size(); ++c) {
      if (!v.empty()) out[c] = v.size() == 1 ? v[0] : v[c];
    }
    return out;
  };
  const auto mean = per_channel(o.mean, 0.0, "mean");
  const auto stdev = per_channel(o.std, 1.0, "std");
  const double scale = o.scale >= 0 ? o.scale : (uint8 ? 1.0 / 255 : 1.0);
  ChannelAffine a;
  for (std::size_t c = 0; c < mean.size(); ++c) {
    DTRAIN_CHECK_ARG(stdev[c] != 0, "LoaderOptions::std holds a zero");
    a.scale.push_back(static_cast<float>(scale / stdev[c]));
    a.shift.push_back(static_cast<float>(-mean[c] / stdev[c]));
  }
  return a;
}

// Normalization is v * s + b in float32 with the product rounded before the
// add: what normalize_images computes (a multiply, then an add). This
// library is compiled with -ffp-contract=off (src/data/CMakeLists.txt), so
// no target fuses the expression into one FMA with a single rounding; the
// plain expression vectorizes (measured 2.4x less decode time than a
// 256-entry table lookup for uint8).
template <typename T>
float normalized(T v, float s, float b) {
  return static_cast<float>(v) * s + b;
}

// The random choices of one sample's augmentation.
struct CropFlip {
  int dy = 0, dx = 0;
  bool flip = false;
};

CropFlip draw_crop_flip(const AugmentOptions& options, std::uint64_t seed, std::int64_t epoch,
                        std::int64_t sample) {
  // Fixed draw order (dy, dx, flip) whatever is enabled, from a stream that
  // depends on (seed, epoch, sample) only.
  detail::SplitMix64 rng(detail::mix(seed ^ 0xA06D3E7ULL, static_cast<std::uint64_t>(epoch),
                                     static_cast<std::uint64_t>(sample)));
  const int pad = options.crop_padding;
  CropFlip d;
  d.dy = static_cast<int>(rng.bounded(static_cast<std::uint64_t>(2 * pad + 1))) - pad;
  d.dx = static_cast<int>(rng.bounded(static_cast<std::uint64_t>(2 * pad + 1))) - pad;
  d.flip = (rng.next() & 1) != 0 && options.horizontal_flip;
  return d;
}

// dst[k] = src[-k] for k < n.
template <typename U>
void reverse_elements(const U* src, U* dst, int n) {
  int k = 0;
#if defined(__GNUC__)
  if constexpr (sizeof(U) == 1) {  // 8 bytes at a time: a byte swap reverses them
    for (; k + 8 <= n; k += 8) {
      std::uint64_t word;
      std::memcpy(&word, src - k - 7, 8);
      word = __builtin_bswap64(word);
      std::memcpy(dst + k, &word, 8);
    }
  }
#endif
  for (; k < n; ++k) dst[k] = src[-k];
}

// Row copies for crop_flip_plane: forward(src, dst, n) sets dst[k] =
// map(src[k]), reversed(src, dst, n) sets dst[k] = map(src[-k]).
template <typename Map>
struct MappedRows {
  Map map;
  template <typename In, typename Out>
  void forward(const In* src, Out* dst, int n) const {
    for (int k = 0; k < n; ++k) dst[k] = map(src[k]);
  }
  template <typename In, typename Out>
  void reversed(const In* src, Out* dst, int n) const {
    // Reversed into a small buffer first, so that map runs on a forward
    // (vectorizable) loop.
    constexpr int kPiece = 128;
    In piece[kPiece];
    for (int at = 0; at < n; at += kPiece) {
      const int m = std::min(kPiece, n - at);
      reverse_elements(src - at, piece, m);
      forward(piece, dst + at, m);
    }
  }
};

template <typename Map>
MappedRows<Map> mapped_rows(Map map) {
  return MappedRows<Map>{map};
}

// Raw values, moved unchanged (as unsigned integers of the element's size).
struct CopiedRows {
  template <typename U>
  void forward(const U* src, U* dst, int n) const {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(U));
  }
  template <typename U>
  void reversed(const U* src, U* dst, int n) const {
    reverse_elements(src, dst, n);
  }
};

// One plane of the augmented sample: dst[y][x] = map(src[y + dy][sx]) with
// sx = (flip ? width - 1 - x : x) + dx, or `pad` where that lies outside.
template <typename Out, typename In, typename Rows>
void crop_flip_plane(const In* src, Out* dst, int height, int width, const CropFlip& d, Out pad,
                     const Rows& rows) {
  // Output rows whose source row lies inside the image: [y0, y1); columns
  // whose source column does: [lo, hi).
  const int y0 = std::min(std::max(-d.dy, 0), height);
  const int y1 = std::max(std::min(height - d.dy, height), y0);
  int lo = d.flip ? d.dx : -d.dx;
  int hi = d.flip ? width + d.dx : width - d.dx;
  lo = std::min(std::max(lo, 0), width);
  hi = std::min(std::max(hi, lo), width);
  const auto at = [width](int y, int x) { return static_cast<std::ptrdiff_t>(y) * width + x; };
  std::fill(dst, dst + at(y0, 0), pad);
  std::fill(dst + at(y1, 0), dst + at(height, 0), pad);
  if (y1 == y0) return;
  if (hi > lo) {
    if (d.flip) {
      for (int y = y0; y < y1; ++y) {
        rows.reversed(src + at(y + d.dy, width - 1 + d.dx - lo), dst + at(y, lo), hi - lo);
      }
    } else {
      // Without a flip every kept pixel comes from the same offset
      // (dy * width + dx): one run from the first to the last kept pixel.
      // Its columns outside [lo, hi) wrap into the neighbouring rows; they
      // are padded below.
      const std::ptrdiff_t first = at(y0, lo), last = at(y1 - 1, hi);
      rows.forward(src + first + at(d.dy, d.dx), dst + first, static_cast<int>(last - first));
    }
  }
  for (int y = y0; y < y1; ++y) {
    Out* out = dst + at(y, 0);
    for (int x = 0; x < lo; ++x) out[x] = pad;
    for (int x = hi; x < width; ++x) out[x] = pad;
  }
}

}  // namespace

void augment_sample(const float* src, float* dst, int channels, int height, int width,
                    const std::vector<float>& pad_values, const AugmentOptions& options,
                    std::uint64_t seed, std::int64_t epoch, std::int64_t sample) {
  const CropFlip d = draw_crop_flip(options, seed, epoch, sample);
  const std::ptrdiff_t plane = static_cast<std::ptrdiff_t>(height) * width;
  for (int c = 0; c < channels; ++c) {
    crop_flip_plane(src + c * plane, dst + c * plane, height, width, d, pad_values[c],
                    mapped_rows([](float v) { return v; }));
  }
}

at::Tensor normalize_images(const at::Tensor& raw, const LoaderOptions& options) {
  DTRAIN_CHECK_ARG(raw.defined() && raw.dim() == 4,
                   "normalize_images needs raw images [b, C, H, W], got a tensor with ",
                   raw.defined() ? raw.dim() : 0, " dimensions");
  const at::ScalarType type = raw.scalar_type();
  DTRAIN_CHECK_ARG(type == at::kByte || type == at::kChar || type == at::kShort ||
                       type == at::kInt || type == at::kLong || type == at::kFloat ||
                       type == at::kDouble,
                   "normalize_images: images of dtype ", type,
                   " are no loader output (uint8, int8, int16, int32, int64, float32, float64)");
  const std::int64_t channels = raw.size(1);
  const ChannelAffine a = channel_affine(options, type == at::kByte, channels);
  auto on_device = [&](const std::vector<float>& v) {
    return at::tensor(at::ArrayRef<float>(v), at::TensorOptions().dtype(at::kFloat))
        .view({1, channels, 1, 1})
        .to(raw.device());
  };
  // Two operations, two roundings, like the loader's float output.
  return at::mul(raw.to(at::kFloat), on_device(a.scale)).add_(on_device(a.shift));
}

namespace {

template <typename T>
void normalize_plane(const unsigned char* raw, std::int64_t n, float scale, float shift,
                     float* out) {
  const T* v = reinterpret_cast<const T*>(raw);
  for (std::int64_t i = 0; i < n; ++i) out[i] = normalized(v[i], scale, shift);
}

template <typename T>
void normalize_augment_plane(const unsigned char* raw, int height, int width, const CropFlip& d,
                             float scale, float shift, float pad, float* out) {
  crop_flip_plane(reinterpret_cast<const T*>(raw), out, height, width, d, pad,
                  mapped_rows([scale, shift](T v) { return normalized(v, scale, shift); }));
}

// Crop/flip of raw elements moved as unsigned integers of their size (so
// any dtype), padding with 0.
template <typename U>
void augment_raw_planes(const unsigned char* raw, unsigned char* out, int channels, int height,
                        int width, const CropFlip& d) {
  const std::ptrdiff_t plane = static_cast<std::ptrdiff_t>(height) * width;
  const U* src = reinterpret_cast<const U*>(raw);
  U* dst = reinterpret_cast<U*>(out);
  for (int c = 0; c < channels; ++c) {
    crop_flip_plane(src + c * plane, dst + c * plane, height, width, d, U{0}, CopiedRows{});
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

// Samples are decoded in sampler order, i.e. from scattered places in the
// chunk cache, mostly not in the CPU caches: the worker prefetches the
// sample (at most 4 KiB of it) and the label it will decode kPrefetchAhead
// samples later.
constexpr std::int64_t kPrefetchAhead = 2;

void prefetch(const unsigned char* data, std::size_t bytes) {
#if defined(__GNUC__)
  const std::size_t n = std::min<std::size_t>(bytes, 4096);
  for (std::size_t at = 0; at < n; at += 64) __builtin_prefetch(data + at);
#else
  (void)data;
  (void)bytes;
#endif
}

// A cached chunk's bytes; shared by the cache and the batches that use it.
using ChunkBytes = std::shared_ptr<const unsigned char[]>;

// One chunk of one field of one shard in the reader's cache.
struct ChunkSlot {
  ChunkBytes data;                        // null while not cached
  std::size_t bytes = 0;                  // size of data
  std::int64_t stamp = -1;                // seq of the last batch that used the chunk
  const unsigned char* pinned = nullptr;  // the chunk's bytes that batch `stamp` holds
  ChunkSlot* newer = nullptr;             // LRU neighbours while cached
  ChunkSlot* older = nullptr;
};

// The chunks of one (field, shard), indexed by chunk number.
struct ChunkTable {
  int field = 0;
  std::int64_t shard_begin = 0, shard_samples = 0, chunk_len = 1;
  std::size_t sample_bytes = 0;
  std::vector<ChunkSlot> slots;
};

// One batch between the reader and a worker: where each sample's bytes are.
struct RawBatch {
  std::int64_t seq = 0;
  std::int64_t epoch = 0;
  std::int64_t batch_in_epoch = 0;
  SamplerState state_after;
  std::vector<std::int64_t> indices;             // sampler order
  std::vector<const unsigned char*> image_data;  // per sample, sampler order
  std::vector<const unsigned char*> label_data;
  std::vector<ChunkBytes> chunks;            // what the pointers point into (with the cache)
  std::vector<unsigned char> image_staging;  // or, without it: rows in sorted order
  std::vector<unsigned char> label_staging;
  std::exception_ptr error;
};

// Output memory recycled across batches. Fresh at::empty outputs of a few
// hundred KiB per batch are, under glibc malloc, often handed back to the
// kernel when freed and page-faulted in again for the next batch; that cost
// more than the decode itself. A block goes back to the pool when the last
// tensor made from it is destroyed (so a caller may keep batches as long as
// it likes).
class OutputPool : public std::enable_shared_from_this<OutputPool> {
 public:
  explicit OutputPool(std::size_t keep) : keep_(keep) {}
  ~OutputPool() {
    for (const Block& b : free_) std::free(b.data);
  }
  OutputPool(const OutputPool&) = delete;
  OutputPool& operator=(const OutputPool&) = delete;

  /// A 64-byte aligned block of `bytes` (> 0).
  std::shared_ptr<unsigned char> take(std::size_t bytes) {
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (std::size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].bytes == bytes) {
          data = free_[i].data;
          free_[i] = free_.back();
          free_.pop_back();
          break;
        }
      }
    }
    if (data == nullptr) {
      data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      if (data == nullptr) throw std::bad_alloc();
    }
    std::shared_ptr<OutputPool> self = shared_from_this();
    return std::shared_ptr<unsigned char>(
        static_cast<unsigned char*>(data),
        [self, bytes](unsigned char* p) { self->give_back(p, bytes); });
  }

 private:
  struct Block {
    void* data;
    std::size_t bytes;
  };

  void give_back(void* data, std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_.size() < keep_) {
        free_.push_back({data, bytes});
        return;
      }
    }
    std::free(data);
  }

  const std::size_t keep_;
  std::mutex mu_;
  std::vector<Block> free_;
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
  bool raw_output = false;
  std::shared_ptr<OutputPool> outputs;  // unused with pin_memory (CUDA's host allocator caches)
  std::vector<std::int64_t> shard_offsets;

  mutable std::mutex mu;
  std::condition_variable reader_cv, worker_cv, consumer_cv;
  std::deque<RawBatch> work;
  std::map<std::int64_t, Ready> ready;
  std::vector<std::vector<unsigned char>> spare_buffers;  // reused staging memory
  int in_flight = 0;                                      // read but not yet returned by next()
  bool reader_waiting = false;                            // for room to read ahead
  bool stop = false;
  std::int64_t next_seq = 0;
  SamplerState delivered;
  LoaderStats stats;
  std::thread reader;
  std::vector<std::thread> workers;
  // Reader thread only: the chunk cache. tables[kind * shards + shard], kind
  // 0 images and 1 labels, and an LRU list through the cached slots.
  std::vector<ChunkTable> tables;
  ChunkSlot* lru_newest = nullptr;
  ChunkSlot* lru_oldest = nullptr;
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

  void build_chunk_tables() {
    const int shards = static_cast<int>(shard_offsets.size()) - 1;
    for (int field : {image_field, label_field}) {
      for (int shard = 0; shard < shards; ++shard) {
        ChunkTable t;
        t.field = field;
        t.shard_begin = shard_offsets[shard];
        t.shard_samples = shard_offsets[shard + 1] - t.shard_begin;
        t.chunk_len = std::max<std::int64_t>(1, dataset->chunk_samples(field, shard));
        t.sample_bytes = dataset->manifest().fields[field].bytes_per_sample();
        t.slots.resize(static_cast<std::size_t>((t.shard_samples + t.chunk_len - 1) / t.chunk_len));
        tables.push_back(std::move(t));
      }
    }
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

  void lru_unlink(ChunkSlot& s) {
    (s.newer ? s.newer->older : lru_newest) = s.older;
    (s.older ? s.older->newer : lru_oldest) = s.newer;
    s.newer = s.older = nullptr;
  }

  void lru_push_newest(ChunkSlot& s) {
    s.newer = nullptr;
    s.older = lru_newest;
    (lru_newest ? lru_newest->newer : lru_oldest) = &s;
    lru_newest = &s;
  }

  // First use of chunk `number` by batch `raw`: from the cache (moved to the
  // LRU front) or read whole; either way `raw` shares ownership of it, so
  // evicting it later frees nothing a worker still reads.
  void use_chunk(ChunkTable& t, std::int64_t number, RawBatch& raw) {
    ChunkSlot& s = t.slots[static_cast<std::size_t>(number)];
    if (s.data) {
      ++hits;
      if (lru_newest != &s) {
        lru_unlink(s);
        lru_push_newest(s);
      }
    } else {
      const std::int64_t begin = number * t.chunk_len;
      const std::int64_t count = std::min(t.chunk_len, t.shard_samples - begin);
      const std::size_t bytes = static_cast<std::size_t>(count) * t.sample_bytes;
      std::shared_ptr<unsigned char[]> data(new unsigned char[bytes]);
      dataset->read(t.field, t.shard_begin + begin, count, data.get());
      ++reads;
      s.data = std::move(data);
      s.bytes = bytes;
      cache_used += bytes;
      lru_push_newest(s);
      while (cache_used > options.cache_bytes && lru_oldest != lru_newest) {
        ChunkSlot& victim = *lru_oldest;
        lru_unlink(victim);
        cache_used -= victim.bytes;
        victim.data.reset();  // batches that use it still hold it
      }
    }
    s.stamp = raw.seq;
    s.pinned = s.data.get();
    raw.chunks.push_back(s.data);
  }

  // Where sample `index` (in `shard`) of table kind 0 (images) or 1 (labels) lies.
  const unsigned char* sample_data(int kind, int shard, std::int64_t index, RawBatch& raw) {
    const std::size_t shards = shard_offsets.size() - 1;
    ChunkTable& t =
        tables[static_cast<std::size_t>(kind) * shards + static_cast<std::size_t>(shard)];
    const std::int64_t offset = index - t.shard_begin;
    const std::int64_t number = offset / t.chunk_len;
    const ChunkSlot& s = t.slots[static_cast<std::size_t>(number)];
    if (s.stamp != raw.seq) use_chunk(t, number, raw);
    return s.pinned + static_cast<std::size_t>(offset - number * t.chunk_len) * t.sample_bytes;
  }

  // With the cache: every chunk the batch needs is made resident (one HDF5
  // read per missing chunk, the LRU touched once per chunk per batch) and
  // each sample becomes a pointer into its chunk, in sampler order.
  void read_cached(RawBatch& raw) {
    const std::size_t n = raw.indices.size();
    raw.image_data.resize(n);
    raw.label_data.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      const std::int64_t index = raw.indices[i];
      DTRAIN_CHECK(index >= 0 && index < shard_offsets.back(), "sample index ", index,
                   " is outside the data set");
      const int shard =
          static_cast<int>(std::upper_bound(shard_offsets.begin(), shard_offsets.end(), index) -
                           shard_offsets.begin()) -
          1;
      raw.image_data[i] = sample_data(0, shard, index, raw);
      raw.label_data[i] = sample_data(1, shard, index, raw);
    }
  }

  // Without the cache: sorted, contiguous runs of one shard coalesced, one
  // HDF5 read per run into the staging buffers.
  void read_staged(RawBatch& raw) {
    const auto n = static_cast<std::int64_t>(raw.indices.size());
    std::vector<std::int64_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), std::int64_t{0});
    std::sort(order.begin(), order.end(),
              [&](std::int64_t a, std::int64_t b) { return raw.indices[a] < raw.indices[b]; });
    raw.image_staging = take_buffer(static_cast<std::size_t>(n) * image_bytes);
    raw.label_staging = take_buffer(static_cast<std::size_t>(n) * label_bytes);
    raw.image_data.resize(static_cast<std::size_t>(n));
    raw.label_data.resize(static_cast<std::size_t>(n));
    for (std::int64_t row = 0; row < n;) {
      const std::int64_t first = raw.indices[order[row]];
      const std::int64_t shard_end = shard_offsets[dataset->shard_of(first) + 1];
      std::int64_t len = 1;
      while (row + len < n && raw.indices[order[row + len]] == first + len &&
             first + len < shard_end) {
        ++len;
      }
      unsigned char* images = raw.image_staging.data() + row * image_bytes;
      unsigned char* labels = raw.label_staging.data() + row * label_bytes;
      dataset->read(image_field, first, len, images);
      dataset->read(label_field, first, len, labels);
      reads += 2;
      for (std::int64_t k = 0; k < len; ++k) {
        raw.image_data[order[row + k]] = images + k * image_bytes;
        raw.label_data[order[row + k]] = labels + k * label_bytes;
      }
      row += len;
    }
  }

  void read_batch(RawBatch& raw) {
    const auto start = Clock::now();
    reads = hits = 0;
    if (options.cache_bytes > 0) {
      read_cached(raw);
    } else {
      read_staged(raw);
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
        // With prefetch_depth batches in flight, sleep until half of them are
        // taken, then read ahead in a burst: one wake-up per depth/2 batches.
        std::unique_lock<std::mutex> lock(mu);
        if (!stop && in_flight >= options.prefetch_depth) {
          reader_waiting = true;
          reader_cv.wait(lock, [&] { return stop || in_flight <= options.prefetch_depth / 2; });
          reader_waiting = false;
        }
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

  // images [n,C,H,W], labels and indices [n]: pinned from CUDA's caching
  // host allocator, or one recycled block from `outputs`.
  void allocate_outputs(Batch& b, std::int64_t n, at::ScalarType image_type) {
    const std::vector<std::int64_t> image_shape{n, channels, height, width};
    const auto image_options = at::TensorOptions().dtype(image_type);
    const auto long_options = at::TensorOptions().dtype(at::kLong);
    if (options.pin_memory) {
      b.images = at::empty(image_shape, image_options.pinned_memory(true));
      b.labels = at::empty({n}, long_options.pinned_memory(true));
      b.indices = at::empty({n}, long_options.pinned_memory(true));
      return;
    }
    const std::size_t image_bytes_out =
        static_cast<std::size_t>(n) * channels * height * width * at::elementSize(image_type);
    const std::size_t labels_at = (image_bytes_out + 63) / 64 * 64;
    const std::size_t indices_at = labels_at + (static_cast<std::size_t>(n) * 8 + 63) / 64 * 64;
    std::shared_ptr<unsigned char> block =
        outputs->take(indices_at + static_cast<std::size_t>(n) * 8 + 64);
    const auto release = [block](void*) {};  // each tensor holds the block
    b.images = at::from_blob(block.get(), image_shape, release, image_options);
    b.labels = at::from_blob(block.get() + labels_at, {n}, release, long_options);
    b.indices = at::from_blob(block.get() + indices_at, {n}, release, long_options);
  }

  // One sample, stored bytes -> normalized float32 [C,H,W] in one pass; with
  // `d`, each output pixel is its crop/flip source pixel, normalized.
  void decode_float(const unsigned char* src, float* out, const CropFlip* d) const {
    const std::int64_t plane = static_cast<std::int64_t>(height) * width;
    const std::size_t plane_bytes = static_cast<std::size_t>(plane) * dtype_size(image_dtype);
    for (int c = 0; c < channels; ++c) {
      const unsigned char* in = src + c * plane_bytes;
      float* o = out + c * plane;
      const float s = scale[c], b = shift[c], pad = pad_values[c];
      switch (image_dtype) {
#define DTRAIN_LOADER_CASE(KIND, T)                                    \
  case DType::KIND:                                                    \
    if (d) {                                                           \
      normalize_augment_plane<T>(in, height, width, *d, s, b, pad, o); \
    } else {                                                           \
      normalize_plane<T>(in, plane, s, b, o);                          \
    }                                                                  \
    break;
        DTRAIN_LOADER_CASE(kUInt8, std::uint8_t)
        DTRAIN_LOADER_CASE(kInt8, std::int8_t)
        DTRAIN_LOADER_CASE(kInt16, std::int16_t)
        DTRAIN_LOADER_CASE(kInt32, std::int32_t)
        DTRAIN_LOADER_CASE(kInt64, std::int64_t)
        DTRAIN_LOADER_CASE(kFloat32, float)
        DTRAIN_LOADER_CASE(kFloat64, double)
#undef DTRAIN_LOADER_CASE
      }
    }
  }

  // One sample in the stored dtype; crop/flip moves the raw values.
  void decode_raw(const unsigned char* src, unsigned char* out, const CropFlip* d) const {
    if (!d) {
      std::memcpy(out, src, image_bytes);
      return;
    }
    switch (dtype_size(image_dtype)) {
      case 1:
        return augment_raw_planes<std::uint8_t>(src, out, channels, height, width, *d);
      case 2:
        return augment_raw_planes<std::uint16_t>(src, out, channels, height, width, *d);
      case 4:
        return augment_raw_planes<std::uint32_t>(src, out, channels, height, width, *d);
      default:
        return augment_raw_planes<std::uint64_t>(src, out, channels, height, width, *d);
    }
  }

  Batch decode(const RawBatch& raw) {
    const auto n = static_cast<std::int64_t>(raw.indices.size());
    const at::ScalarType image_type = raw_output ? scalar_type_of(image_dtype) : at::kFloat;
    Batch b;
    b.epoch = raw.epoch;
    b.batch_in_epoch = raw.batch_in_epoch;
    allocate_outputs(b, n, image_type);
    const std::size_t out_bytes = static_cast<std::size_t>(channels) * height * width *
                                  (raw_output ? dtype_size(image_dtype) : sizeof(float));
    auto* images = static_cast<unsigned char*>(b.images.data_ptr());
    std::int64_t* labels = b.labels.data_ptr<std::int64_t>();
    std::int64_t* indices = b.indices.data_ptr<std::int64_t>();
    for (std::int64_t i = 0; i < n; ++i) {
      if (i + kPrefetchAhead < n) {
        prefetch(raw.image_data[i + kPrefetchAhead], image_bytes);
        prefetch(raw.label_data[i + kPrefetchAhead], label_bytes);
      }
      CropFlip draw;
      if (augment) {
        draw = draw_crop_flip(options.augment, options.sampler.seed, raw.epoch, raw.indices[i]);
      }
      const CropFlip* d = augment ? &draw : nullptr;
      unsigned char* out = images + static_cast<std::size_t>(i) * out_bytes;
      if (raw_output) {
        decode_raw(raw.image_data[i], out, d);
      } else {
        decode_float(raw.image_data[i], reinterpret_cast<float*>(out), d);
      }
      labels[i] = label_value(label_dtype, raw.label_data[i]);
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
      raw.chunks.clear();  // evicted chunks are freed here, outside the lock
      bool wake_consumer = false;
      {
        std::lock_guard<std::mutex> lock(mu);
        stats.decode_seconds += seconds_since(start);
        if (raw.image_staging.capacity() > 0) {
          spare_buffers.push_back(std::move(raw.image_staging));
          spare_buffers.push_back(std::move(raw.label_staging));
        }
        ready.emplace(raw.seq, std::move(done));
        wake_consumer = raw.seq == next_seq;  // next() waits for that batch only
      }
      if (wake_consumer) consumer_cv.notify_all();
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
  s.shard_offsets = s.dataset->shard_offsets();
  const Manifest& m = s.dataset->manifest();
  s.image_field = s.dataset->field_index(s.options.image_field);
  s.label_field = s.dataset->field_index(s.options.label_field);
  const FieldSpec& img = m.fields[s.image_field];
  const FieldSpec& lab = m.fields[s.label_field];
  DTRAIN_CHECK_ARG(img.shape.size() == 2 || img.shape.size() == 3, "image field '", img.name,
                   "' of ", s.dataset->dir(),
                   " must have per-sample shape [C,H,W] or [H,W], it has ", img.shape.size(),
                   " dimensions");
  check_label_field(*s.dataset, lab.name);
  s.channels = img.shape.size() == 3 ? static_cast<int>(img.shape[0]) : 1;
  s.height = static_cast<int>(img.shape[img.shape.size() - 2]);
  s.width = static_cast<int>(img.shape[img.shape.size() - 1]);
  s.image_dtype = img.dtype;
  s.label_dtype = lab.dtype;
  s.image_bytes = img.bytes_per_sample();
  s.label_bytes = lab.bytes_per_sample();
  const ChannelAffine affine = channel_affine(s.options, img.dtype == DType::kUInt8, s.channels);
  s.scale = affine.scale;
  s.shift = affine.shift;
  for (int c = 0; c < s.channels; ++c) {
    s.pad_values.push_back(normalized(0.0f, s.scale[c], s.shift[c]));  // raw 0, normalized
  }
  s.raw_output = s.options.output == ImageOutput::kRaw;
  s.outputs = std::make_shared<OutputPool>(
      static_cast<std::size_t>(s.options.prefetch_depth + s.options.workers + 2));
  s.augment = s.options.augment.crop_padding > 0 || s.options.augment.horizontal_flip;
  if (s.options.cache_bytes > 0) s.build_chunk_tables();
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
  bool wake_reader = false;
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
    wake_reader = s.reader_waiting && s.in_flight <= s.options.prefetch_depth / 2;
  }
  if (wake_reader) s.reader_cv.notify_one();
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
