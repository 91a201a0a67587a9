#pragma once
// TokenLoader: fixed-length windows of a token data set (dtrain/data/text.h)
// as inputs and next-token targets, this rank's share of each global batch,
// read ahead on background threads.
//
//   auto train = dtrain::data::Dataset::open("/data/fortunes/train");
//   dtrain::data::TokenLoaderOptions opt;
//   opt.context = 64;
//   opt.sampler.global_batch_size = 32;        // windows, over all dp ranks
//   dtrain::data::TokenLoader loader(train, opt, ctx.data_rank(), ctx.data_world_size());
//   dtrain::data::TokenBatch b = loader.next();   // inputs, targets: int64 [b, 64]
//
// Window w is tokens [w * stride, w * stride + context + 1) of the stream
// (stride = window_stride, by default context): inputs are its first
// context tokens, targets the last context, i.e. targets[i][t] =
// inputs[i][t + 1] for t < context - 1, and the last target is the first
// input of window w + 1. A stream of n tokens gives
// token_windows(n, context, stride) windows; the GlobalSampler permutes
// window indices exactly as DataLoader permutes image indices (same seed,
// epoch, global batch, drop_last, shuffle modes and dp split), and the
// state (epoch, consumed_samples) counts windows: save state(), resume with
// options.start, on any dp size dividing the global batch.
//
// It shares its machinery with DataLoader (src/data/loader_engine.h): one
// reader thread with the chunk cache, decode workers, bounded prefetch and
// the ordered hand-off; a window that crosses a chunk or shard boundary is
// put together by the reader.

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>

#include "dtrain/data/dataset.h"
#include "dtrain/data/loader.h"
#include "dtrain/data/sampler.h"

namespace dtrain::data {

struct TokenLoaderOptions {
  SamplerOptions sampler;  ///< global_batch_size counts windows.
  SamplerState start;      ///< Where to begin (a saved state() to resume).
  std::string token_field = "tokens";
  std::int64_t context = 64;  ///< Tokens per row of inputs and of targets (> 0).
  /// Tokens between the starts of windows w and w + 1 (> 0); 0 means
  /// `context`: every token is an input once per epoch.
  std::int64_t window_stride = 0;
  /// As LoaderOptions::cache_bytes: sized at least the (per-rank) stream,
  /// every chunk is read once per job (the fortunes: 2.2 MiB of uint8 tokens).
  std::size_t cache_bytes = std::size_t{512} << 20;
  int workers = 1;          ///< Decode threads (>= 1); a window is a copy and a widening.
  int prefetch_depth = 4;   ///< Batches read ahead (>= 1).
  bool pin_memory = false;  ///< As LoaderOptions::pin_memory.

  /// Throws InvalidArgument naming the option.
  void validate() const;
};

/// Windows of `context` + 1 tokens, starts `stride` apart, that a stream of
/// `tokens` tokens holds: 0 if tokens < context + 1, else
/// (tokens - context - 1) / stride + 1.
std::int64_t token_windows(std::int64_t tokens, std::int64_t context, std::int64_t stride);

struct TokenBatch {
  at::Tensor inputs;   ///< int64 [b, context]
  at::Tensor targets;  ///< int64 [b, context], the inputs shifted by one token
  at::Tensor indices;  ///< int64 [b], window indices in sampler order
  std::int64_t epoch = 0;
  std::int64_t batch_in_epoch = 0;  ///< Global batch number within the epoch.
};

class TokenLoader {
 public:
  /// Validates the options and the token field (check_token_field: one
  /// integer per sample, within the manifest's vocabulary) and starts the
  /// threads. Throws InvalidArgument when the data set holds fewer than
  /// context + 1 tokens or the global batch does not fit one epoch.
  TokenLoader(std::shared_ptr<Dataset> dataset, TokenLoaderOptions options, int dp_rank,
              int dp_size);
  /// Stops and joins the threads; never throws.
  ~TokenLoader();
  TokenLoader(const TokenLoader&) = delete;
  TokenLoader& operator=(const TokenLoader&) = delete;

  /// The next batch of this rank (blocks until it is ready); endless, epoch
  /// after epoch. A read error is rethrown here (and on every later call).
  TokenBatch next();
  /// The sampler state after the last batch next() returned.
  SamplerState state() const;
  std::int64_t batches_per_epoch() const;
  /// Windows in the stream (the sampler's total).
  std::int64_t windows() const;
  LoaderStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::data
