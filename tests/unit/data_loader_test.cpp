// DataLoader: values and order against the sampler, resume, deterministic
// augmentation whatever the worker count, option errors.

#include <gtest/gtest.h>

#include <ATen/ATen.h>

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
  o.pin_memory = true;
  if (!at::hasCUDA()) {
    EXPECT_THROW(DataLoader(ds, o, 0, 1), InvalidArgument);
  }
}

}  // namespace
}  // namespace dtrain::data
