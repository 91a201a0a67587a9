// GlobalSampler: coverage, determinism, world-size independence, resume.

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>
#include <tuple>
#include <vector>

#include "dtrain/data/sampler.h"
#include "dtrain/error.h"

namespace dtrain::data {
namespace {

using Indices = std::vector<std::int64_t>;

// Every rank's next() for one step, concatenated in rank order.
Indices step_all_ranks(std::vector<GlobalSampler>& ranks) {
  Indices out;
  for (auto& r : ranks) {
    const Indices part = r.next();
    out.insert(out.end(), part.begin(), part.end());
  }
  return out;
}

std::vector<GlobalSampler> make_ranks(const std::vector<std::int64_t>& shards,
                                      const SamplerOptions& o, int world, SamplerState start = {}) {
  std::vector<GlobalSampler> ranks;
  for (int r = 0; r < world; ++r) {
    ranks.emplace_back(shards, o, r, world);
    ranks.back().restore(start);
  }
  return ranks;
}

struct Case {
  std::int64_t total;
  int world;
  std::int64_t batch_per_rank;
  std::uint64_t seed;
};

std::vector<Case> cases() {
  std::vector<Case> out;
  for (std::int64_t total : {1, 7, 64, 100, 1000}) {
    for (int world : {1, 2, 3, 4}) {
      for (std::int64_t b : {1, 3, 8}) {
        for (std::uint64_t seed : {0ULL, 12345ULL}) {
          if (b * world <= total) out.push_back({total, world, b, seed});
        }
      }
    }
  }
  return out;
}

TEST(DataSampler, ShuffledIndicesIsADeterministicPermutation) {
  for (std::int64_t n : {0, 1, 2, 17, 1000}) {
    Indices p = shuffled_indices(n, 7, 3);
    EXPECT_EQ(p, shuffled_indices(n, 7, 3));
    Indices sorted = p;
    std::sort(sorted.begin(), sorted.end());
    Indices iota(static_cast<std::size_t>(n));
    std::iota(iota.begin(), iota.end(), 0);
    EXPECT_EQ(sorted, iota);
  }
  EXPECT_NE(shuffled_indices(1000, 7, 3), shuffled_indices(1000, 7, 4));
  EXPECT_NE(shuffled_indices(1000, 7, 3), shuffled_indices(1000, 8, 3));
  // Pinned values: the order must never change across platforms or releases.
  EXPECT_EQ(shuffled_indices(8, 1, 0), (Indices{1, 6, 3, 5, 0, 2, 7, 4}));
}

TEST(DataSampler, EachSampleOncePerEpochAcrossRanks) {
  for (const Case& c : cases()) {
    for (bool drop_last : {false, true}) {
      for (ShuffleMode mode :
           {ShuffleMode::kGlobal, ShuffleMode::kShardLocal, ShuffleMode::kNone}) {
        SCOPED_TRACE(::testing::Message() << "total " << c.total << " world " << c.world << " b "
                                          << c.batch_per_rank << " seed " << c.seed << " drop "
                                          << drop_last << " mode " << static_cast<int>(mode));
        SamplerOptions o;
        o.seed = c.seed;
        o.global_batch_size = c.batch_per_rank * c.world;
        o.drop_last = drop_last;
        o.shuffle = mode;
        o.shuffle_window = 5;
        const std::vector<std::int64_t> shards{c.total / 3, c.total - c.total / 3};
        auto ranks = make_ranks(shards, o, c.world);
        const std::int64_t steps = ranks[0].batches_per_epoch();
        Indices seen;
        for (std::int64_t s = 0; s < steps; ++s) {
          const Indices got = step_all_ranks(ranks);
          EXPECT_EQ(got, ranks[0].global_batch(0, s));
          seen.insert(seen.end(), got.begin(), got.end());
        }
        EXPECT_EQ(ranks[0].state(), (SamplerState{1, 0}));
        const std::set<std::int64_t> unique(seen.begin(), seen.end());
        EXPECT_EQ(unique.size(), seen.size()) << "a sample was handed out twice";
        const std::int64_t b = o.global_batch_size;
        EXPECT_EQ(static_cast<std::int64_t>(seen.size()), drop_last ? c.total / b * b : c.total);
        // Under drop_last exactly the epoch's tail is missing.
        const Indices& perm = ranks[0].permutation(0);
        EXPECT_TRUE(std::equal(seen.begin(), seen.end(), perm.begin()));
      }
    }
  }
}

TEST(DataSampler, GlobalBatchesIdenticalForAnyWorldSize) {
  SamplerOptions o;
  o.seed = 99;
  o.global_batch_size = 12;
  const std::vector<std::int64_t> shards{50, 50, 37};
  for (int world : {2, 3, 4, 6, 12}) {
    auto many = make_ranks(shards, o, world);
    auto reference = make_ranks(shards, o, 1);
    for (int step = 0; step < 30; ++step) {  // crosses epoch boundaries
      EXPECT_EQ(step_all_ranks(many), step_all_ranks(reference)) << "world " << world;
    }
  }
}

TEST(DataSampler, ResumeAtAnyStepEqualsUninterrupted) {
  SamplerOptions o;
  o.seed = 5;
  o.global_batch_size = 8;
  const std::vector<std::int64_t> shards{45, 30};
  auto uninterrupted = make_ranks(shards, o, 2);
  std::vector<Indices> stream;
  std::vector<SamplerState> states;
  for (int s = 0; s < 25; ++s) {
    states.push_back(uninterrupted[0].state());
    stream.push_back(step_all_ranks(uninterrupted));
  }
  for (int at = 0; at < 25; ++at) {
    for (int world : {1, 2, 4, 8}) {  // same or different dp size, same B
      const SamplerState saved = SamplerState::parse(states[at].serialize());
      auto resumed = make_ranks(shards, o, world, saved);
      for (int s = at; s < 25; ++s) {
        EXPECT_EQ(step_all_ranks(resumed), stream[s]) << "resumed at " << at << " world " << world;
      }
    }
  }
}

TEST(DataSampler, RejectsBadArguments) {
  SamplerOptions o;
  o.global_batch_size = 10;
  EXPECT_THROW(GlobalSampler({100}, o, 0, 3), InvalidArgument);  // 10 % 3 != 0
  try {
    GlobalSampler({100}, o, 0, 4);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("not divisible"), std::string::npos) << e.what();
  }
  EXPECT_THROW(GlobalSampler({0}, o, 0, 1), InvalidArgument);    // empty
  EXPECT_THROW(GlobalSampler({100}, o, 2, 2), InvalidArgument);  // rank out of range
  EXPECT_THROW(GlobalSampler({5}, o, 0, 1), InvalidArgument);    // epoch empty under drop_last
  GlobalSampler ok({100}, o, 0, 2);
  EXPECT_THROW(ok.restore({0, 5}), InvalidArgument);    // not on a batch boundary
  EXPECT_THROW(ok.restore({0, 100}), InvalidArgument);  // past the epoch
  EXPECT_THROW(SamplerState::parse("epoch=x"), InvalidArgument);
  o.global_batch_size = 0;
  EXPECT_THROW(GlobalSampler({100}, o, 0, 1), InvalidArgument);
}

}  // namespace
}  // namespace dtrain::data
