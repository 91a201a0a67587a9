// GlobalSampler: deterministic, world-size independent global sample order.

#include "dtrain/data/sampler.h"

#include <cstdio>
#include <numeric>
#include <utility>

#include "dtrain/error.h"
#include "src/data/random.h"

namespace dtrain::data {

void SamplerOptions::validate() const {
  DTRAIN_CHECK_ARG(global_batch_size > 0, "global_batch_size must be > 0, got ", global_batch_size);
  DTRAIN_CHECK_ARG(shuffle_window > 0, "shuffle_window must be > 0, got ", shuffle_window);
}

std::string SamplerState::serialize() const {
  return "epoch=" + std::to_string(epoch) + " consumed_samples=" + std::to_string(consumed_samples);
}

SamplerState SamplerState::parse(const std::string& text) {
  SamplerState s;
  long long epoch = 0, consumed = 0;
  char tail = 0;
  DTRAIN_CHECK_ARG(std::sscanf(text.c_str(), "epoch=%lld consumed_samples=%lld%c", &epoch,
                               &consumed, &tail) == 2,
                   "malformed sampler state '", text, "' (want 'epoch=E consumed_samples=N')");
  s.epoch = epoch;
  s.consumed_samples = consumed;
  return s;
}

namespace {
// Fisher-Yates over `v` (uniform over all orders) driven by `rng`.
void fisher_yates(std::vector<std::int64_t>& v, std::size_t begin, std::size_t end,
                  detail::SplitMix64& rng) {
  for (std::size_t i = end - begin; i > 1; --i) {
    const std::size_t j = static_cast<std::size_t>(rng.bounded(i));
    std::swap(v[begin + i - 1], v[begin + j]);
  }
}
}  // namespace

std::vector<std::int64_t> shuffled_indices(std::int64_t total, std::uint64_t seed,
                                           std::int64_t epoch) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(total));
  std::iota(v.begin(), v.end(), std::int64_t{0});
  detail::SplitMix64 rng(detail::mix(seed, static_cast<std::uint64_t>(epoch), 0x5A3F1E));
  fisher_yates(v, 0, v.size(), rng);
  return v;
}

GlobalSampler::GlobalSampler(std::vector<std::int64_t> shard_sizes, SamplerOptions options,
                             int dp_rank, int dp_size)
    : shard_sizes_(std::move(shard_sizes)),
      options_(options),
      dp_rank_(dp_rank),
      dp_size_(dp_size) {
  options_.validate();
  for (std::int64_t n : shard_sizes_) {
    DTRAIN_CHECK_ARG(n >= 0, "negative shard size ", n);
    total_ += n;
  }
  DTRAIN_CHECK_ARG(total_ > 0, "cannot sample from an empty data set");
  DTRAIN_CHECK_ARG(dp_size > 0 && dp_rank >= 0 && dp_rank < dp_size, "dp_rank ", dp_rank,
                   " is not in [0, dp_size = ", dp_size, ")");
  DTRAIN_CHECK_ARG(options_.global_batch_size % dp_size == 0, "global batch size ",
                   options_.global_batch_size, " is not divisible by the data-parallel size ",
                   dp_size, "; choose a global batch that is a multiple of it");
  DTRAIN_CHECK_ARG(samples_per_epoch() > 0, "global batch size ", options_.global_batch_size,
                   " is larger than the data set (", total_,
                   " samples) and drop_last is set: an epoch would be empty");
}

std::int64_t GlobalSampler::batches_per_epoch() const {
  const std::int64_t b = options_.global_batch_size;
  return options_.drop_last ? total_ / b : (total_ + b - 1) / b;
}

std::int64_t GlobalSampler::samples_per_epoch() const {
  return options_.drop_last ? total_ / options_.global_batch_size * options_.global_batch_size
                            : total_;
}

const std::vector<std::int64_t>& GlobalSampler::permutation(std::int64_t epoch) const {
  if (cached_epoch_ == epoch) return cached_permutation_;
  std::vector<std::int64_t> v;
  switch (options_.shuffle) {
    case ShuffleMode::kNone:
      v.resize(static_cast<std::size_t>(total_));
      std::iota(v.begin(), v.end(), std::int64_t{0});
      break;
    case ShuffleMode::kGlobal:
      v = shuffled_indices(total_, options_.seed, epoch);
      break;
    case ShuffleMode::kShardLocal: {
      // Shard order shuffled; then each shard's samples shuffled within
      // windows of `shuffle_window` consecutive samples.
      std::vector<std::int64_t> offsets{0};
      for (std::int64_t n : shard_sizes_) offsets.push_back(offsets.back() + n);
      const auto order =
          shuffled_indices(static_cast<std::int64_t>(shard_sizes_.size()), options_.seed, epoch);
      detail::SplitMix64 rng(
          detail::mix(options_.seed, static_cast<std::uint64_t>(epoch), 0xC0FFEE));
      v.reserve(static_cast<std::size_t>(total_));
      for (std::int64_t s : order) {
        const std::size_t begin = v.size();
        for (std::int64_t i = offsets[s]; i < offsets[s + 1]; ++i) v.push_back(i);
        const auto window = static_cast<std::size_t>(options_.shuffle_window);
        for (std::size_t w = begin; w < v.size(); w += window) {
          fisher_yates(v, w, std::min(v.size(), w + window), rng);
        }
      }
      break;
    }
  }
  cached_permutation_ = std::move(v);
  cached_epoch_ = epoch;
  return cached_permutation_;
}

std::vector<std::int64_t> GlobalSampler::global_batch(std::int64_t epoch,
                                                      std::int64_t batch) const {
  DTRAIN_CHECK_ARG(batch >= 0 && batch < batches_per_epoch(), "batch ", batch,
                   " is outside the epoch (", batches_per_epoch(), " batches)");
  const auto& perm = permutation(epoch);
  const std::int64_t begin = batch * options_.global_batch_size;
  const std::int64_t end = std::min(begin + options_.global_batch_size, total_);
  return {perm.begin() + begin, perm.begin() + end};
}

std::vector<std::int64_t> GlobalSampler::local_batch(std::int64_t epoch, std::int64_t batch) const {
  const std::vector<std::int64_t> global = global_batch(epoch, batch);
  const auto t = static_cast<std::int64_t>(global.size());
  const std::int64_t begin = dp_rank_ * t / dp_size_;
  const std::int64_t end = (dp_rank_ + 1) * t / dp_size_;
  return {global.begin() + begin, global.begin() + end};
}

std::vector<std::int64_t> GlobalSampler::next() {
  const std::int64_t batch = state_.consumed_samples / options_.global_batch_size;
  std::vector<std::int64_t> out = local_batch(state_.epoch, batch);
  state_.consumed_samples =
      std::min(state_.consumed_samples + options_.global_batch_size, samples_per_epoch());
  if (state_.consumed_samples >= samples_per_epoch()) {
    ++state_.epoch;
    state_.consumed_samples = 0;
  }
  return out;
}

void GlobalSampler::restore(const SamplerState& state) {
  DTRAIN_CHECK_ARG(state.epoch >= 0 && state.consumed_samples >= 0 &&
                       state.consumed_samples < samples_per_epoch() &&
                       state.consumed_samples % options_.global_batch_size == 0,
                   "sampler state '", state.serialize(), "' does not fit this sampler (",
                   samples_per_epoch(), " samples per epoch, global batch ",
                   options_.global_batch_size, "); was it saved with another global batch size?");
  state_ = state;
}

}  // namespace dtrain::data
