// DataLoader: values and order against the sampler, resume, deterministic
// augmentation whatever the worker count, raw output and normalize_images,
// chunk eviction while batches are in flight, option errors.

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cstring>
#include <string>
#include <vector>

#include "dtrain/data/loader.h"
#include "dtrain/error.h"
#include "tests/unit/data_test_util.h"

namespace dtrain::data {
namespace {

using testing::ScratchDir;

LoaderOptions raw_values(std::int64_t global_batch, std::uint64_t seed) {
  LoaderOptions o;
  o.sampler.global_batch_size = global_batch;
  o.sampler.seed = seed;
  o.scale = 1.0;  // images come out as their stored values
  return o;
}

void expect_pattern(const Batch& b, std::int64_t per_sample) {
  const auto n = b.indices.size(0);
  ASSERT_EQ(b.images.size(0), n);
  ASSERT_EQ(b.labels.size(0), n);
  auto images = b.images.reshape({n, per_sample});
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t idx = b.indices[i].item<std::int64_t>();
    EXPECT_EQ(b.labels[i].item<std::int64_t>(), testing::pattern_label(idx));
    for (std::int64_t e = 0; e < per_sample; ++e) {
      ASSERT_EQ(images[i][e].item<float>(), testing::pattern_pixel(idx, e)) << idx << "," << e;
    }
  }
}

TEST(DataLoader, RoundTripInSamplerOrderOnEveryRank) {
  ScratchDir dir;
  testing::make_pattern_dataset(dir.path(), 97, 20, {2, 3, 3});
  auto ds = Dataset::open(dir.path());
  for (int world : {1, 3}) {
    for (int rank = 0; rank < world; ++rank) {
      LoaderOptions o = raw_values(12, 3);
      o.sampler.drop_last = false;
      o.sampler.shuffle = rank % 2 ? ShuffleMode::kShardLocal : ShuffleMode::kGlobal;
      o.workers = 2;
      DataLoader loader(ds, o, rank, world);
      GlobalSampler reference({20, 20, 20, 20, 17}, o.sampler, rank, world);
      for (int step = 0; step < 12; ++step) {  // crosses into epoch 1
        const Batch b = loader.next();
        const std::vector<std::int64_t> want = reference.next();
        ASSERT_EQ(b.indices.size(0), static_cast<std::int64_t>(want.size()));
        for (std::size_t i = 0; i < want.size(); ++i) {
          EXPECT_EQ(b.indices[static_cast<std::int64_t>(i)].item<std::int64_t>(), want[i]);
        }
        EXPECT_EQ(b.images.sizes(),
                  (at::IntArrayRef{static_cast<std::int64_t>(want.size()), 2, 3, 3}));
        EXPECT_EQ(b.images.scalar_type(), at::kFloat);
        EXPECT_EQ(b.labels.scalar_type(), at::kLong);
        EXPECT_EQ(b.epoch, step / 9);
        expect_pattern(b, 18);
        EXPECT_EQ(loader.state(), reference.state());
      }
    }
  }
}

TEST(DataLoader, ResumeFromStateContinuesTheStream) {
  ScratchDir dir;
  testing::make_pattern_dataset(dir.path(), 64, 16);
  auto ds = Dataset::open(dir.path());
  LoaderOptions o = raw_values(8, 11);
  o.augment.crop_padding = 1;
  o.augment.horizontal_flip = true;
  std::vector<at::Tensor> uninterrupted;
  SamplerState at_5;
  {
    DataLoader loader(ds, o, 0, 1);
    for (int s = 0; s < 12; ++s) {
      if (s == 5) at_5 = loader.state();
      uninterrupted.push_back(loader.next().images);
    }
  }
  for (int world : {1, 2, 4}) {
    o.start = at_5;
    std::vector<std::unique_ptr<DataLoader>> ranks;
    for (int r = 0; r < world; ++r) ranks.push_back(std::make_unique<DataLoader>(ds, o, r, world));
    for (int s = 5; s < 12; ++s) {
      std::vector<at::Tensor> parts;
      for (auto& l : ranks) parts.push_back(l->next().images);
      EXPECT_TRUE(at::equal(at::cat(parts), uninterrupted[s]))
          << "step " << s << " world " << world;
    }
  }
}

TEST(DataLoader, AugmentationIndependentOfWorkerCount) {
  ScratchDir dir;
  testing::make_pattern_dataset(dir.path(), 200, 64, {3, 8, 8});
  auto ds = Dataset::open(dir.path());
  LoaderOptions o = raw_values(16, 7);
  o.mean = {0.1, 0.2, 0.3};
  o.std = {0.5};
  o.scale = -1;
  o.augment.crop_padding = 3;
  o.augment.horizontal_flip = true;
  std::vector<at::Tensor> reference;
  for (int workers : {1, 2, 4}) {
    o.workers = workers;
    o.prefetch_depth = workers + 1;
    DataLoader loader(ds, o, 0, 1);
    for (int s = 0; s < 20; ++s) {
      at::Tensor images = loader.next().images;
      if (workers == 1) {
        reference.push_back(images);
      } else {
        EXPECT_TRUE(at::equal(images, reference[s])) << "workers " << workers << " step " << s;
      }
    }
  }
  // Not a no-op: some sample differs from its un-augmented, normalized self.
  o.augment = {};
  DataLoader plain(ds, o, 0, 1);
  EXPECT_FALSE(at::equal(plain.next().images, reference[0]));
}

TEST(DataLoader, ChunkCacheSizeDoesNotChangeResults) {
  ScratchDir dir;
  testing::make_pattern_dataset(dir.path(), 150, 40, {1, 6, 6});
  auto ds = Dataset::open(dir.path());
  std::vector<at::Tensor> reference;
  for (std::size_t cache : {std::size_t{512} << 20, std::size_t{0}, std::size_t{100}}) {
    LoaderOptions o = raw_values(20, 9);
    o.cache_bytes = cache;  // default, off, smaller than one chunk (evicts always)
    DataLoader loader(ds, o, 0, 1);
    for (int s = 0; s < 15; ++s) {
      const Batch b = loader.next();
      expect_pattern(b, 36);
      if (cache == (std::size_t{512} << 20)) {
        reference.push_back(b.images);
      } else {
        EXPECT_TRUE(at::equal(b.images, reference[s])) << "cache " << cache << " step " << s;
      }
    }
    EXPECT_GT(loader.stats().hyperslab_reads, 0);
  }
}

// Same dtype, shape and bytes (so -0.0 != 0.0 and NaNs compare by bits).
::testing::AssertionResult bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) {
    return ::testing::AssertionFailure()
           << a.scalar_type() << a.sizes() << " vs " << b.scalar_type() << b.sizes();
  }
  const at::Tensor ca = a.contiguous(), cb = b.contiguous();
  if (std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) != 0) {
    return ::testing::AssertionFailure() << "the bytes differ";
  }
  return ::testing::AssertionSuccess();
}

// The stored pattern values of the samples in `indices`, [n, per_sample] int64.
at::Tensor pattern_images(const at::Tensor& indices, std::int64_t per_sample) {
  const at::Tensor e = at::arange(per_sample, at::kLong).unsqueeze(0);
  return at::remainder(indices.unsqueeze(1) * 131 + e * 7, 251);
}

// `f` must throw an InvalidArgument whose message contains `part`.
template <typename F>
void expect_invalid(F f, const std::string& part) {
  try {
    f();
    ADD_FAILURE() << "no InvalidArgument (expected one mentioning '" << part << "')";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST(DataLoader, RawOutputNormalizesToTheFloatOutputBitwise) {
  ScratchDir dir;
  testing::make_pattern_dataset(dir.path(), 180, 50, {3, 7, 9});
  auto ds = Dataset::open(dir.path());
  for (bool augment : {false, true}) {
    for (int variant = 0; variant < 3; ++variant) {
      LoaderOptions o = raw_values(24, 13);
      o.scale = -1;  // 1/255 for uint8
      o.workers = 3;
      if (variant == 0) {  // per channel
        o.mean = {0.2860, 0.5, 0.93};
        o.std = {0.3530, 0.21, 0.07};
      } else if (variant == 1) {  // explicit scale, one value for all channels
        o.scale = 0.37;
        o.mean = {-1.5};
        o.std = {2.75};
      }  // variant 2: defaults (mean 0: the shift is -0.0, pads must still agree)
      o.augment.crop_padding = augment ? 3 : 0;
      o.augment.horizontal_flip = augment;
      DataLoader floats(ds, o, 0, 1);
      LoaderOptions raw_options = o;
      raw_options.output = ImageOutput::kRaw;
      raw_options.workers = 2;
      DataLoader raws(ds, raw_options, 0, 1);
      for (int step = 0; step < 10; ++step) {  // crosses into epoch 1
        const Batch f = floats.next();
        const Batch r = raws.next();
        ASSERT_TRUE(at::equal(f.indices, r.indices));
        ASSERT_TRUE(at::equal(f.labels, r.labels));
        ASSERT_EQ(r.images.scalar_type(), at::kByte);
        ASSERT_EQ(r.images.sizes(), f.images.sizes());
        const at::Tensor stored = pattern_images(r.indices, 3 * 7 * 9);
        if (!augment) {
          EXPECT_TRUE(at::equal(r.images.reshape({r.images.size(0), -1}).to(at::kLong), stored));
        } else {  // the raw crop/flip (byte moves) against augment_sample on floats
          const at::Tensor src = stored.to(at::kFloat).contiguous();
          at::Tensor want = at::empty_like(src);
          for (std::int64_t i = 0; i < src.size(0); ++i) {
            augment_sample(src[i].data_ptr<float>(), want[i].data_ptr<float>(), 3, 7, 9, {0, 0, 0},
                           o.augment, o.sampler.seed, r.epoch, r.indices[i].item<std::int64_t>());
          }
          EXPECT_TRUE(at::equal(r.images.reshape({r.images.size(0), -1}).to(at::kFloat), want));
        }
        EXPECT_TRUE(bitwise_equal(normalize_images(r.images, raw_options), f.images))
            << "augment " << augment << " variant " << variant << " step " << step;
      }
    }
  }
}

TEST(DataLoader, SmallCacheEvictsWhileBatchesAreInFlight) {
  // 32 KiB samples: 8 per 256 KiB chunk, 4 chunks per shard. A cache below
  // two chunks evicts nearly every chunk while up to 4 batches that point
  // into it are queued for the workers.
  ScratchDir dir;
  testing::make_pattern_dataset(dir.path(), 96, 32, {2, 128, 128});
  auto ds = Dataset::open(dir.path());
  ASSERT_EQ(ds->chunk_samples(0, 0), 8);
  const std::int64_t per_sample = 2 * 128 * 128;
  for (ImageOutput output : {ImageOutput::kNormalizedFloat, ImageOutput::kRaw}) {
    LoaderOptions o = raw_values(12, 21);
    o.output = output;
    o.workers = 3;
    o.prefetch_depth = 4;
    o.augment.horizontal_flip = true;
    o.augment.crop_padding = 1;
    DataLoader big(ds, o, 0, 1);
    o.cache_bytes = (std::size_t{256} << 10) + (std::size_t{100} << 10);  // < 2 chunks
    DataLoader small(ds, o, 0, 1);
    o.augment = {};
    DataLoader plain(ds, o, 0, 1);
    for (int step = 0; step < 24; ++step) {  // three epochs
      const Batch a = big.next();
      const Batch b = small.next();
      const Batch p = plain.next();
      EXPECT_TRUE(bitwise_equal(a.images, b.images)) << "step " << step;
      EXPECT_TRUE(at::equal(a.labels, b.labels));
      EXPECT_TRUE(at::equal(p.images.reshape({p.images.size(0), -1}).to(at::kLong),
                            pattern_images(p.indices, per_sample)))
          << "step " << step;
      EXPECT_TRUE(at::equal(p.labels, p.indices * 3 + 1));
    }
    EXPECT_GT(small.stats().hyperslab_reads, big.stats().hyperslab_reads);
  }
}

TEST(DataLoader, HeldBatchesStayValid) {
  // Output memory is recycled; a batch the caller still holds must not be.
  ScratchDir dir;
  testing::make_pattern_dataset(dir.path(), 100, 30, {1, 5, 5});
  auto ds = Dataset::open(dir.path());
  for (ImageOutput output : {ImageOutput::kNormalizedFloat, ImageOutput::kRaw}) {
    LoaderOptions o = raw_values(10, 4);
    o.output = output;
    o.workers = 2;
    o.prefetch_depth = 2;
    DataLoader loader(ds, o, 0, 1);
    std::vector<Batch> held;
    for (int step = 0; step < 40; ++step) {
      held.push_back(loader.next());
      if (step % 3 == 0) held.erase(held.begin());  // some go back to the pool
    }
    for (const Batch& b : held) {
      EXPECT_TRUE(at::equal(b.images.reshape({b.images.size(0), -1}).to(at::kLong),
                            pattern_images(b.indices, 25)));
      EXPECT_TRUE(at::equal(b.labels, b.indices * 3 + 1));
    }
  }
}

// Element i of make_typed_dataset: negative and large values (within T's range).
template <typename T>
T typed_value(std::int64_t i) {
  if constexpr (sizeof(T) == 1) {
    return static_cast<T>(i % 251 - 125);
  } else {
    return static_cast<T>((static_cast<double>(i % 997) - 500.0) * 31.25);
  }
}

// Images of `dtype` [2,5,6] holding typed_value<T>(element index).
template <typename T>
void make_typed_dataset(const std::string& dir, DType dtype, std::int64_t samples) {
  DatasetSpec spec;
  spec.name = "typed";
  spec.fields = {{"images", dtype, {2, 5, 6}}, {"labels", DType::kInt32, {}}};
  spec.samples_per_shard = 17;
  std::vector<T> pixels(static_cast<std::size_t>(samples * 60));
  std::vector<std::int32_t> labels(static_cast<std::size_t>(samples));
  for (std::size_t i = 0; i < pixels.size(); ++i) {
    pixels[i] = typed_value<T>(static_cast<std::int64_t>(i));
  }
  for (std::int64_t i = 0; i < samples; ++i) labels[i] = static_cast<std::int32_t>(i % 5);
  DatasetWriter writer(dir, spec);
  writer.add({pixels.data(), labels.data()}, samples);
  writer.finish();
}

template <typename T>
void check_raw_dtype(DType dtype, at::ScalarType expected) {
  ScratchDir dir;
  make_typed_dataset<T>(dir.path(), dtype, 50);
  auto ds = Dataset::open(dir.path());
  for (bool augment : {false, true}) {
    LoaderOptions o = raw_values(10, 8);
    o.mean = {3.5, -1.25};
    o.std = {250.0, 0.5};
    o.augment.crop_padding = augment ? 2 : 0;
    o.augment.horizontal_flip = augment;
    o.workers = 2;
    DataLoader floats(ds, o, 0, 1);
    o.output = ImageOutput::kRaw;
    DataLoader raws(ds, o, 0, 1);
    for (int step = 0; step < 7; ++step) {
      const Batch f = floats.next();
      const Batch r = raws.next();
      ASSERT_EQ(r.images.scalar_type(), expected) << dtype_name(dtype);
      EXPECT_EQ(r.images.sizes(), (at::IntArrayRef{10, 2, 5, 6}));
      if (!augment) {
        for (std::int64_t i = 0; i < r.images.size(0); ++i) {
          const std::int64_t idx = r.indices[i].item<std::int64_t>();
          const T* got = static_cast<const T*>(r.images[i].contiguous().data_ptr());
          for (std::int64_t e = 0; e < 60; ++e) {
            const T want = typed_value<T>(idx * 60 + e);
            ASSERT_EQ(got[e], want) << dtype_name(dtype) << " sample " << idx << " element " << e;
          }
        }
      }
      EXPECT_TRUE(bitwise_equal(normalize_images(r.images, o), f.images))
          << dtype_name(dtype) << " augment " << augment << " step " << step;
    }
  }
}

TEST(DataLoader, RawOutputKeepsTheStoredDtype) {
  check_raw_dtype<std::int16_t>(DType::kInt16, at::kShort);
  check_raw_dtype<float>(DType::kFloat32, at::kFloat);
  check_raw_dtype<double>(DType::kFloat64, at::kDouble);
  check_raw_dtype<std::int8_t>(DType::kInt8, at::kChar);
}

TEST(DataLoader, NormalizeImagesRejectsWhatNoLoaderProduces) {
  LoaderOptions o;
  o.mean = {0.1, 0.2, 0.3};
  o.std = {0.5};
  const at::Tensor ok = at::zeros({2, 3, 4, 4}, at::kByte);
  EXPECT_EQ(normalize_images(ok, o).scalar_type(), at::kFloat);
  expect_invalid([&] { normalize_images(at::zeros({3, 4, 4}, at::kByte), o); }, "[b, C, H, W]");
  expect_invalid(
      [&] {
        normalize_images(at::zeros({2, 2, 4, 4}, at::kByte), o);
      },
      "3 values for 2 channels");
  expect_invalid([&] { normalize_images(at::zeros({2, 3, 4, 4}, at::kBool), o); }, "dtype");
  o.std = {0.5, 0.0, 1.0};
  expect_invalid([&] { normalize_images(ok, o); }, "zero");
}

TEST(DataLoader, AugmentSampleFlipAndCrop) {
  // 1 channel 2x3: flip mirrors each row; padding value fills shifted-in pixels.
  const std::vector<float> src{1, 2, 3, 4, 5, 6};
  std::vector<float> dst(6);
  AugmentOptions flip_only;
  flip_only.horizontal_flip = true;
  int flipped = 0;
  for (std::int64_t sample = 0; sample < 64; ++sample) {
    augment_sample(src.data(), dst.data(), 1, 2, 3, {-1}, flip_only, 1, 0, sample);
    if (dst == std::vector<float>{3, 2, 1, 6, 5, 4}) {
      ++flipped;
    } else {
      EXPECT_EQ(dst, src);
    }
  }
  EXPECT_GT(flipped, 16);
  EXPECT_LT(flipped, 48);
  AugmentOptions crop;
  crop.crop_padding = 1;
  for (std::int64_t sample = 0; sample < 32; ++sample) {
    augment_sample(src.data(), dst.data(), 1, 2, 3, {-1}, crop, 1, 0, sample);
    for (float v : dst) EXPECT_TRUE(v == -1 || (v >= 1 && v <= 6));
    std::vector<float> again(6);
    augment_sample(src.data(), again.data(), 1, 2, 3, {-1}, crop, 1, 0, sample);
    EXPECT_EQ(dst, again);
  }
}

TEST(DataLoader, AugmentSampleMatchesThePerPixelDefinition) {
  // Every output is, for some shift |dy|, |dx| <= padding and flip, the
  // per-pixel definition dst[y][x] = src[y + dy][(flip ? w-1-x : x) + dx]
  // (-1 outside), including paddings wider than the image.
  struct Shape {
    int c, h, w, padding;
  };
  for (const Shape& shape : {Shape{1, 2, 3, 1}, Shape{2, 5, 7, 3}, Shape{1, 6, 1, 2},
                             Shape{3, 4, 9, 11}, Shape{1, 28, 28, 4}}) {
    const int plane = shape.h * shape.w;
    std::vector<float> src(static_cast<std::size_t>(shape.c * plane));
    for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<float>(i + 1);
    const std::vector<float> pads(static_cast<std::size_t>(shape.c), -1.0f);
    AugmentOptions options;
    options.crop_padding = shape.padding;
    options.horizontal_flip = true;
    std::vector<float> dst(src.size()), want(src.size());
    for (std::int64_t sample = 0; sample < 40; ++sample) {
      augment_sample(src.data(), dst.data(), shape.c, shape.h, shape.w, pads, options, 3, 1,
                     sample);
      bool found = false;
      for (int dy = -shape.padding; dy <= shape.padding && !found; ++dy) {
        for (int dx = -shape.padding; dx <= shape.padding && !found; ++dx) {
          for (bool flip : {false, true}) {
            for (int c = 0; c < shape.c; ++c) {
              for (int y = 0; y < shape.h; ++y) {
                for (int x = 0; x < shape.w; ++x) {
                  const int sy = y + dy, sx = (flip ? shape.w - 1 - x : x) + dx;
                  want[c * plane + y * shape.w + x] =
                      sy >= 0 && sy < shape.h && sx >= 0 && sx < shape.w
                          ? src[c * plane + sy * shape.w + sx]
                          : -1.0f;
                }
              }
            }
            if (want == dst) found = true;
          }
        }
      }
      EXPECT_TRUE(found) << shape.c << "x" << shape.h << "x" << shape.w << " padding "
                         << shape.padding << " sample " << sample;
    }
  }
}

TEST(DataLoader, RejectsBadOptions) {
  ScratchDir dir;
  testing::make_pattern_dataset(dir.path(), 30, 30);
  auto ds = Dataset::open(dir.path());
  LoaderOptions o = raw_values(10, 0);
  EXPECT_THROW(DataLoader(ds, o, 0, 3), InvalidArgument);  // 10 % 3
  o.image_field = "pixels";
  EXPECT_THROW(DataLoader(ds, o, 0, 1), InvalidArgument);
  o.image_field = "labels";  // scalar: not an image
  EXPECT_THROW(DataLoader(ds, o, 0, 1), InvalidArgument);
  o = raw_values(10, 0);
  o.mean = {1, 2};  // 1 channel
  EXPECT_THROW(DataLoader(ds, o, 0, 1), InvalidArgument);
  o = raw_values(10, 0);
  o.workers = 0;
  EXPECT_THROW(DataLoader(ds, o, 0, 1), InvalidArgument);
  o = raw_values(10, 0);
  o.output = static_cast<ImageOutput>(7);
  expect_invalid([&] { DataLoader(ds, o, 0, 1); }, "ImageOutput");
  o = raw_values(10, 0);
  o.pin_memory = true;
  if (!at::hasCUDA()) {
    EXPECT_THROW(DataLoader(ds, o, 0, 1), InvalidArgument);
  }
}

}  // namespace
}  // namespace dtrain::data
