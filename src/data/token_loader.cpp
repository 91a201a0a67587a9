// TokenLoader: windows of a token stream, read by a LoaderEngine (one span
// of context + 1 tokens per window) and widened into inputs and targets.

#include "dtrain/data/token_loader.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "dtrain/data/text.h"
#include "dtrain/error.h"
#include "src/data/loader_engine.h"

namespace dtrain::data {

void TokenLoaderOptions::validate() const {
  sampler.validate();
  DTRAIN_CHECK_ARG(context > 0, "TokenLoaderOptions::context must be > 0, got ", context);
  DTRAIN_CHECK_ARG(window_stride >= 0, "TokenLoaderOptions::window_stride must be >= 0, got ",
                   window_stride);
  DTRAIN_CHECK_ARG(workers >= 1, "TokenLoaderOptions::workers must be >= 1, got ", workers);
  DTRAIN_CHECK_ARG(prefetch_depth >= 1, "TokenLoaderOptions::prefetch_depth must be >= 1, got ",
                   prefetch_depth);
  DTRAIN_CHECK_ARG(!pin_memory || at::hasCUDA(),
                   "pin_memory needs a CUDA-enabled LibTorch; this one has no CUDA (set "
                   "pin_memory = false)");
}

std::int64_t token_windows(std::int64_t tokens, std::int64_t context, std::int64_t stride) {
  DTRAIN_CHECK_ARG(context > 0 && stride > 0, "token_windows: context ", context, " and stride ",
                   stride, " must be > 0");
  return tokens < context + 1 ? 0 : (tokens - context - 1) / stride + 1;
}

namespace {

template <typename T>
void widen_window(const unsigned char* raw, std::int64_t context, std::int64_t* inputs,
                  std::int64_t* targets) {
  const T* tokens = reinterpret_cast<const T*>(raw);
  for (std::int64_t t = 0; t < context; ++t) inputs[t] = tokens[t];
  for (std::int64_t t = 0; t < context; ++t) targets[t] = tokens[t + 1];
}

}  // namespace

struct TokenLoader::Impl {
  std::int64_t context = 0;
  std::int64_t windows = 0;
  DType dtype = DType::kUInt8;
  // Last: its threads call decode(), so it stops before the state above goes.
  std::unique_ptr<detail::LoaderEngine> engine;

  std::vector<at::Tensor> decode(const detail::RawBatch& raw,
                                 detail::OutputAllocator& allocator) const {
    const auto n = static_cast<std::int64_t>(raw.indices.size());
    std::vector<at::Tensor> out = allocator.allocate(
        {{{n, context}, at::kLong}, {{n, context}, at::kLong}, {{n}, at::kLong}});
    std::int64_t* inputs = out[0].data_ptr<std::int64_t>();
    std::int64_t* targets = out[1].data_ptr<std::int64_t>();
    std::int64_t* indices = out[2].data_ptr<std::int64_t>();
    for (std::int64_t i = 0; i < n; ++i) {
      const unsigned char* window = raw.data[0][static_cast<std::size_t>(i)];
      std::int64_t* in = inputs + i * context;
      std::int64_t* tg = targets + i * context;
      switch (dtype) {
        case DType::kUInt8:
          widen_window<std::uint8_t>(window, context, in, tg);
          break;
        case DType::kInt8:
          widen_window<std::int8_t>(window, context, in, tg);
          break;
        case DType::kInt16:
          widen_window<std::int16_t>(window, context, in, tg);
          break;
        case DType::kInt32:
          widen_window<std::int32_t>(window, context, in, tg);
          break;
        default:
          widen_window<std::int64_t>(window, context, in, tg);
          break;
      }
      indices[i] = raw.indices[static_cast<std::size_t>(i)];
    }
    return out;
  }
};

TokenLoader::TokenLoader(std::shared_ptr<Dataset> dataset, TokenLoaderOptions options, int dp_rank,
                         int dp_size) {
  DTRAIN_CHECK_ARG(dataset != nullptr, "TokenLoader needs a dataset");
  options.validate();
  const int field = dataset->field_index(options.token_field);
  check_token_field(*dataset, options.token_field);
  impl_ = std::make_unique<Impl>();
  Impl& s = *impl_;
  s.context = options.context;
  s.dtype = dataset->manifest().fields[field].dtype;
  const std::int64_t stride = options.window_stride > 0 ? options.window_stride : options.context;
  const std::int64_t tokens = dataset->size();
  s.windows = token_windows(tokens, s.context, stride);
  DTRAIN_CHECK_ARG(s.windows > 0, dataset->dir(), " holds ", tokens,
                   " tokens, fewer than one window of context + 1 = ", s.context + 1,
                   ": choose a smaller context");
  // The sampler's shards, for ShuffleMode::kShardLocal: a window belongs to
  // the shard of its first token. Shard s holds tokens [o_s, o_s+1), so its
  // windows are w in [ceil(o_s / stride), ceil(o_s+1 / stride)), cut at
  // `windows`. E.g. 2 shards of 100 tokens, context = stride = 64: windows
  // start at tokens 0, 64 and 128; shard 0 has w = 0 and 1 (w = 1 reads
  // tokens 64..128, across the shard boundary), shard 1 has w = 2.
  std::vector<std::int64_t> window_shards;
  const auto& offsets = dataset->shard_offsets();
  const auto first_window = [&](std::int64_t token) {
    return std::min(s.windows, (token + stride - 1) / stride);
  };
  for (std::size_t k = 0; k + 1 < offsets.size(); ++k) {
    window_shards.push_back(first_window(offsets[k + 1]) - first_window(offsets[k]));
  }
  const auto engine = detail::EngineOptions::of(options);
  s.engine = std::make_unique<detail::LoaderEngine>(
      std::move(dataset), engine, std::vector<detail::SampleRead>{{field, stride, s.context + 1}},
      std::move(window_shards),
      [&s](const detail::RawBatch& raw, detail::OutputAllocator& allocator) {
        return s.decode(raw, allocator);
      },
      dp_rank, dp_size);
}

TokenLoader::~TokenLoader() = default;

TokenBatch TokenLoader::next() {
  detail::Decoded d = impl_->engine->next();
  TokenBatch b;
  b.inputs = std::move(d.tensors[0]);
  b.targets = std::move(d.tensors[1]);
  b.indices = std::move(d.tensors[2]);
  b.epoch = d.epoch;
  b.batch_in_epoch = d.batch_in_epoch;
  return b;
}

SamplerState TokenLoader::state() const { return impl_->engine->state(); }

std::int64_t TokenLoader::batches_per_epoch() const { return impl_->engine->batches_per_epoch(); }

std::int64_t TokenLoader::windows() const { return impl_->windows; }

LoaderStats TokenLoader::stats() const { return impl_->engine->stats(); }

}  // namespace dtrain::data
