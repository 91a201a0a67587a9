// The distributed loaders across real ranks: every rank's batches, gathered,
// are the global batches of a one-process sampler, with the stored values;
// resuming on this world size from a state saved at another continues the
// same stream. The same for the TokenLoader's windows of a token stream.

#include <gtest/gtest.h>
#include <mpi.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/data/loader.h"
#include "dtrain/data/token_loader.h"
#include "tests/mpi/mpi_test_env.h"
#include "tests/unit/data_test_util.h"

namespace dtrain::data {
namespace {

// Rank 0 makes the data set in a scratch directory all ranks can see.
class DistributedLoader : public ::testing::Test {
 protected:
  void SetUp() override {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    char path[512] = {};
    if (rank_ == 0) {
      scratch_ = std::make_unique<testing::ScratchDir>();
      testing::make_pattern_dataset(scratch_->path(), 250, 60, {1, 5, 5});
      std::snprintf(path, sizeof(path), "%s", scratch_->path().c_str());
    }
    MPI_Bcast(path, sizeof(path), MPI_CHAR, 0, MPI_COMM_WORLD);
    dir_ = path;
    dataset_ = Dataset::open(dir_);
  }
  void TearDown() override {
    dataset_.reset();
    MPI_Barrier(MPI_COMM_WORLD);  // nobody reads while rank 0 removes the files
    scratch_.reset();
  }

  // Concatenation of every rank's `local` tensor in rank order.
  at::Tensor gather(const at::Tensor& local) {
    const int n = static_cast<int>(local.numel());
    std::vector<int> counts(size_), displs(size_);
    MPI_Allgather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, MPI_COMM_WORLD);
    int total = 0;
    for (int r = 0; r < size_; ++r) {
      displs[r] = total;
      total += counts[r];
    }
    at::Tensor out = at::empty({total}, local.options());
    at::Tensor in = local.contiguous();
    const MPI_Datatype type = local.scalar_type() == at::kFloat ? MPI_FLOAT : MPI_INT64_T;
    MPI_Allgatherv(in.data_ptr(), n, type, out.data_ptr(), counts.data(), displs.data(), type,
                   MPI_COMM_WORLD);
    return out;
  }

  int rank_ = 0, size_ = 1;
  std::string dir_;
  std::unique_ptr<testing::ScratchDir> scratch_;
  std::shared_ptr<Dataset> dataset_;
};

TEST_F(DistributedLoader, RanksTogetherReadTheGlobalBatches) {
  for (bool drop_last : {true, false}) {
    LoaderOptions o;
    o.sampler.global_batch_size = 24;  // divisible by 1, 2, 3, 4
    o.sampler.seed = 17;
    o.sampler.drop_last = drop_last;
    o.scale = 1.0;
    o.workers = 2;
    DataLoader loader(dataset_, o, rank_, size_);
    GlobalSampler one_process({60, 60, 60, 60, 10}, o.sampler, 0, 1);
    std::vector<std::int64_t> seen;
    for (std::int64_t step = 0; step < loader.batches_per_epoch(); ++step) {
      const Batch b = loader.next();
      const at::Tensor indices = gather(b.indices);
      const at::Tensor labels = gather(b.labels);
      const at::Tensor images = gather(b.images.reshape({-1}));
      const std::vector<std::int64_t> want = one_process.global_batch(0, step);
      ASSERT_EQ(indices.numel(), static_cast<std::int64_t>(want.size()));
      for (std::size_t i = 0; i < want.size(); ++i) {
        const auto k = static_cast<std::int64_t>(i);
        EXPECT_EQ(indices[k].item<std::int64_t>(), want[i]);
        EXPECT_EQ(labels[k].item<std::int64_t>(), testing::pattern_label(want[i]));
        EXPECT_EQ(images[k * 25 + 7].item<float>(), testing::pattern_pixel(want[i], 7));
        seen.push_back(want[i]);
      }
    }
    std::sort(seen.begin(), seen.end());
    EXPECT_EQ(std::unique(seen.begin(), seen.end()), seen.end());
    EXPECT_EQ(static_cast<std::int64_t>(seen.size()), drop_last ? 240 : 250);
  }
}

TEST_F(DistributedLoader, ResumeOnThisWorldSizeFromAnyStep) {
  LoaderOptions o;
  o.sampler.global_batch_size = 12;
  o.sampler.seed = 4;
  o.augment.crop_padding = 1;
  o.augment.horizontal_flip = true;
  // The uninterrupted stream, computed by one process (every rank alike).
  std::vector<at::Tensor> stream;
  std::vector<SamplerState> states;
  {
    DataLoader single(dataset_, o, 0, 1);
    for (int s = 0; s < 26; ++s) {  // crosses an epoch boundary (20 batches/epoch)
      states.push_back(single.state());
      stream.push_back(single.next().images.reshape({-1}));
    }
  }
  for (int at_step : {0, 7, 19, 20}) {
    o.start = states[at_step];
    DataLoader resumed(dataset_, o, rank_, size_);
    for (int s = at_step; s < at_step + 4; ++s) {
      const at::Tensor all = gather(resumed.next().images.reshape({-1}));
      EXPECT_TRUE(at::equal(all, stream[s])) << "resumed at " << at_step << ", step " << s;
    }
  }
}

// Windows of a token stream: the ranks' parts of each step are disjoint and
// together the one-process global batch (indices, inputs and targets); an
// epoch reads every window once; resuming here from a one-process state
// continues the one-process stream.
TEST_F(DistributedLoader, TokenWindowsSplitAcrossRanksAndResume) {
  char path[512] = {};
  std::unique_ptr<testing::ScratchDir> scratch;
  if (rank_ == 0) {
    scratch = std::make_unique<testing::ScratchDir>();
    testing::make_token_dataset(scratch->path(), 5000, 1200);
    std::snprintf(path, sizeof(path), "%s", scratch->path().c_str());
  }
  MPI_Bcast(path, sizeof(path), MPI_CHAR, 0, MPI_COMM_WORLD);
  {
    const auto tokens = Dataset::open(path);
    TokenLoaderOptions o;
    o.context = 24;
    o.sampler.global_batch_size = 12;  // divisible by 1, 2, 3, 4
    o.sampler.seed = 21;
    TokenLoader single(tokens, o, 0, 1);
    TokenLoader mine(tokens, o, rank_, size_);
    ASSERT_EQ(mine.windows(), 208);  // (5000 - 25) / 24 + 1
    std::vector<std::int64_t> seen;
    std::vector<SamplerState> states;
    std::vector<at::Tensor> stream;
    for (std::int64_t step = 0; step < mine.batches_per_epoch() + 3; ++step) {
      states.push_back(single.state());
      const TokenBatch want = single.next();
      const TokenBatch b = mine.next();
      EXPECT_EQ(b.indices.size(0), 12 / size_);
      EXPECT_TRUE(at::equal(gather(b.indices), want.indices)) << "step " << step;
      EXPECT_TRUE(at::equal(gather(b.inputs.reshape({-1})), want.inputs.reshape({-1})));
      EXPECT_TRUE(at::equal(gather(b.targets.reshape({-1})), want.targets.reshape({-1})));
      stream.push_back(want.inputs.clone());
      if (b.epoch == 0) {
        for (std::int64_t i = 0; i < b.indices.size(0); ++i) {
          seen.push_back(b.indices[i].item<std::int64_t>());
        }
      }
    }
    // Across ranks, epoch 0 read 204 distinct windows (17 steps of 12).
    const at::Tensor all = gather(at::tensor(seen, at::kLong));
    std::vector<std::int64_t> sorted(all.data_ptr<std::int64_t>(),
                                     all.data_ptr<std::int64_t>() + all.numel());
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(std::unique(sorted.begin(), sorted.end()), sorted.end());
    EXPECT_EQ(sorted.size(), 204u);
    for (int at_step : {5, 17}) {
      o.start = states[at_step];
      TokenLoader resumed(tokens, o, rank_, size_);
      for (int s = at_step; s < at_step + 2; ++s) {
        EXPECT_TRUE(at::equal(gather(resumed.next().inputs.reshape({-1})), stream[s].reshape({-1})))
            << "resumed at " << at_step;
      }
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);  // nobody reads while rank 0 removes the files
}

}  // namespace
}  // namespace dtrain::data
