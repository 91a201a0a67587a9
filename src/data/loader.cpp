// DataLoader: images and labels decoded, normalized and augmented on the
// workers of a LoaderEngine (src/data/loader_engine.h: the reader thread,
// chunk cache, prefetch and ordered hand-off).

#include "dtrain/data/loader.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>

#include "dtrain/error.h"
#include "src/data/loader_engine.h"
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

}  // namespace

// The image loader: per sample, the image and the label (one element each
// of their fields), decoded into [b, C, H, W] and [b] on the workers.
struct DataLoader::Impl {
  LoaderOptions options;
  DType image_dtype = DType::kUInt8, label_dtype = DType::kInt64;
  int channels = 1, height = 1, width = 1;
  std::size_t image_bytes = 0, label_bytes = 0;
  std::vector<float> scale, shift, pad_values;  // per channel: x*scale + shift
  bool augment = false;
  bool raw_output = false;
  // Last: its threads call decode(), so it stops before the state above goes.
  std::unique_ptr<detail::LoaderEngine> engine;

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

  std::vector<at::Tensor> decode(const detail::RawBatch& raw,
                                 detail::OutputAllocator& allocator) const {
    const auto n = static_cast<std::int64_t>(raw.indices.size());
    const at::ScalarType image_type = raw_output ? scalar_type_of(image_dtype) : at::kFloat;
    std::vector<at::Tensor> out = allocator.allocate(
        {{{n, channels, height, width}, image_type}, {{n}, at::kLong}, {{n}, at::kLong}});
    const std::size_t out_bytes = static_cast<std::size_t>(channels) * height * width *
                                  (raw_output ? dtype_size(image_dtype) : sizeof(float));
    auto* images = static_cast<unsigned char*>(out[0].data_ptr());
    std::int64_t* labels = out[1].data_ptr<std::int64_t>();
    std::int64_t* indices = out[2].data_ptr<std::int64_t>();
    const auto& image_data = raw.data[0];
    const auto& label_data = raw.data[1];
    for (std::int64_t i = 0; i < n; ++i) {
      if (i + kPrefetchAhead < n) {
        prefetch(image_data[i + kPrefetchAhead], image_bytes);
        prefetch(label_data[i + kPrefetchAhead], label_bytes);
      }
      CropFlip draw;
      if (augment) {
        draw = draw_crop_flip(options.augment, options.sampler.seed, raw.epoch, raw.indices[i]);
      }
      const CropFlip* d = augment ? &draw : nullptr;
      unsigned char* dst = images + static_cast<std::size_t>(i) * out_bytes;
      if (raw_output) {
        decode_raw(image_data[i], dst, d);
      } else {
        decode_float(image_data[i], reinterpret_cast<float*>(dst), d);
      }
      labels[i] = label_value(label_dtype, label_data[i]);
      indices[i] = raw.indices[i];
    }
    return out;
  }
};

DataLoader::DataLoader(std::shared_ptr<Dataset> dataset, LoaderOptions options, int dp_rank,
                       int dp_size) {
  DTRAIN_CHECK_ARG(dataset != nullptr, "DataLoader needs a dataset");
  options.validate();
  impl_ = std::make_unique<Impl>();
  Impl& s = *impl_;
  s.options = std::move(options);
  const Manifest& m = dataset->manifest();
  const int image_field = dataset->field_index(s.options.image_field);
  const int label_field = dataset->field_index(s.options.label_field);
  const FieldSpec& img = m.fields[image_field];
  const FieldSpec& lab = m.fields[label_field];
  DTRAIN_CHECK_ARG(img.shape.size() == 2 || img.shape.size() == 3, "image field '", img.name,
                   "' of ", dataset->dir(), " must have per-sample shape [C,H,W] or [H,W], it has ",
                   img.shape.size(), " dimensions");
  check_label_field(*dataset, lab.name);
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
  s.augment = s.options.augment.crop_padding > 0 || s.options.augment.horizontal_flip;
  std::vector<std::int64_t> shard_sizes;
  for (const auto& shard : m.shards) shard_sizes.push_back(shard.samples);
  const auto engine = detail::EngineOptions::of(s.options);
  s.engine = std::make_unique<detail::LoaderEngine>(
      std::move(dataset), engine,
      std::vector<detail::SampleRead>{{image_field, 1, 1}, {label_field, 1, 1}},
      std::move(shard_sizes),
      [&s](const detail::RawBatch& raw, detail::OutputAllocator& allocator) {
        return s.decode(raw, allocator);
      },
      dp_rank, dp_size);
}

DataLoader::~DataLoader() = default;

Batch DataLoader::next() {
  detail::Decoded d = impl_->engine->next();
  Batch b;
  b.images = std::move(d.tensors[0]);
  b.labels = std::move(d.tensors[1]);
  b.indices = std::move(d.tensors[2]);
  b.epoch = d.epoch;
  b.batch_in_epoch = d.batch_in_epoch;
  return b;
}

SamplerState DataLoader::state() const { return impl_->engine->state(); }

std::int64_t DataLoader::batches_per_epoch() const { return impl_->engine->batches_per_epoch(); }

LoaderStats DataLoader::stats() const { return impl_->engine->stats(); }

}  // namespace dtrain::data
