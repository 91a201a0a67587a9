#pragma once
// GlobalSampler: one global sample stream per (seed, epoch), cut into global
// batches, each split among the data-parallel ranks.
//
//   permutation(epoch)  a permutation of [0, total) that depends only on
//                       (seed, epoch, total, shuffle mode), never on the
//                       number of ranks or on the platform's <random>.
//   global batch k      permutation[k*B, (k+1)*B),  B = global_batch_size
//   dp rank r of D      reads [r*B/D, (r+1)*B/D) of each global batch
//
// Worked example: total 10, B = 4, D = 2, permutation 7 2 9 0 | 5 1 8 3 | 6 4
//   batch 0: rank 0 reads {7, 2}, rank 1 reads {9, 0}
//   batch 1: rank 0 reads {5, 1}, rank 1 reads {8, 3}
//   drop_last (default): the tail {6, 4} is dropped, 2 batches per epoch.
//   drop_last = false: batch 2 is {6, 4}; a partial batch of t samples is
//   split the same way, [r*t/D, (r+1)*t/D), so rank 0 reads {6}, rank 1 {4}
//   (ranks may get unequal, possibly empty, parts of the last batch).
//
// The whole state is (epoch, consumed_samples): consumed_samples counts the
// global samples of `epoch` already handed out (always a multiple of B
// except at the end of an epoch). Restoring a state with any D that divides
// B continues the exact same global stream.

#include <cstdint>
#include <string>
#include <vector>

namespace dtrain::data {

enum class ShuffleMode {
  kNone,       ///< 0, 1, 2, ... every epoch.
  kGlobal,     ///< A uniform permutation of all samples.
  kShardLocal  ///< Shards in shuffled order; within a shard, samples shuffled
               ///< inside windows of `shuffle_window` consecutive samples.
               ///< Reads stay local (I/O friendly); less random.
};

struct SamplerOptions {
  std::uint64_t seed = 0;
  std::int64_t global_batch_size = 1;  ///< B, summed over data-parallel ranks.
  bool drop_last = true;               ///< Drop a trailing partial global batch.
  ShuffleMode shuffle = ShuffleMode::kGlobal;
  std::int64_t shuffle_window = 4096;  ///< kShardLocal only.

  /// Throws InvalidArgument on B <= 0 or shuffle_window <= 0.
  void validate() const;
};

struct SamplerState {
  std::int64_t epoch = 0;
  std::int64_t consumed_samples = 0;

  /// "epoch=E consumed_samples=N"; parse() reads it back (InvalidArgument).
  std::string serialize() const;
  static SamplerState parse(const std::string& text);
  bool operator==(const SamplerState& o) const {
    return epoch == o.epoch && consumed_samples == o.consumed_samples;
  }
};

/// The permutation of [0, total) for (seed, epoch): Fisher-Yates driven by a
/// SplitMix64 stream seeded from (seed, epoch), with an unbiased bounded
/// integer of our own, so it is identical on every platform and rank.
std::vector<std::int64_t> shuffled_indices(std::int64_t total, std::uint64_t seed,
                                           std::int64_t epoch);

class GlobalSampler {
 public:
  /// `shard_sizes` (samples per shard, in order) is needed for kShardLocal
  /// and otherwise may hold just {total}. Throws InvalidArgument if the data
  /// set is empty, dp_rank is not in [0, dp_size) or B % dp_size != 0.
  GlobalSampler(std::vector<std::int64_t> shard_sizes, SamplerOptions options, int dp_rank,
                int dp_size);

  std::int64_t total_samples() const { return total_; }
  std::int64_t global_batch_size() const { return options_.global_batch_size; }
  int dp_rank() const { return dp_rank_; }
  int dp_size() const { return dp_size_; }
  /// Global batches per epoch (floor or ceil of total / B, by drop_last).
  std::int64_t batches_per_epoch() const;
  /// Samples an epoch hands out (total, less the tail under drop_last).
  std::int64_t samples_per_epoch() const;

  /// The epoch's full order (cached for the last epoch asked).
  const std::vector<std::int64_t>& permutation(std::int64_t epoch) const;
  /// Global batch `batch` of `epoch`.
  std::vector<std::int64_t> global_batch(std::int64_t epoch, std::int64_t batch) const;
  /// This rank's part of global batch `batch` of `epoch`.
  std::vector<std::int64_t> local_batch(std::int64_t epoch, std::int64_t batch) const;

  /// This rank's part of the next global batch; advances the state (to the
  /// next epoch after the last batch).
  std::vector<std::int64_t> next();

  SamplerState state() const { return state_; }
  /// Throws InvalidArgument if consumed_samples is negative, past the epoch,
  /// or not on a global batch boundary.
  void restore(const SamplerState& state);

 private:
  std::vector<std::int64_t> shard_sizes_;
  SamplerOptions options_;
  int dp_rank_;
  int dp_size_;
  std::int64_t total_ = 0;
  SamplerState state_;
  mutable std::int64_t cached_epoch_ = -1;
  mutable std::vector<std::int64_t> cached_permutation_;
};

}  // namespace dtrain::data
