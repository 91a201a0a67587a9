#pragma once
// What the GPT tests share: a tiny model, float64 scopes and the global
// batches, the same on every rank and at every layout.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cstdint>

#include "dtrain/train/strategy.h"
#include "examples/gpt/gpt.h"

namespace dtrain::gpt::fixtures {

constexpr std::int64_t kVocab = 11;  // uneven vocabulary blocks at tp 2
constexpr std::int64_t kContext = 8;
constexpr std::int64_t kGlobalBatch = 4;
constexpr std::uint64_t kSeed = 5;

/// `layers` blocks of 4 heads, embedding 16, dropout 0.1.
inline GptOptions tiny(std::int64_t layers, bool sequence_parallel) {
  GptOptions o;
  o.vocab_size = kVocab;
  o.layers = layers;
  o.heads = 4;
  o.embedding = 16;
  o.context = kContext;
  o.dropout = 0.1;
  o.sequence_parallel = sequence_parallel;
  o.init_seed = 3;
  return o;
}

/// float64 for the models built in a scope.
class DoubleScope {
 public:
  DoubleScope() : previous_(at::get_default_dtype()) {
    at::set_default_dtype(caffe2::TypeMeta::Make<double>());
  }
  ~DoubleScope() { at::set_default_dtype(previous_); }
  DoubleScope(const DoubleScope&) = delete;
  DoubleScope& operator=(const DoubleScope&) = delete;

 private:
  caffe2::TypeMeta previous_;
};

/// Global batch `step`: token ids [kGlobalBatch, kContext + 1].
inline at::Tensor global_tokens(std::int64_t step) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1000 + step);
  return at::randint(kVocab, {kGlobalBatch, kContext + 1}, gen, at::kLong);
}

/// This data rank's part of global batch `step`: inputs [B, kContext] and
/// next-token targets.
inline train::Batch local_batch(std::int64_t step, int data_rank, int data_world_size) {
  const std::int64_t local = kGlobalBatch / data_world_size;
  const at::Tensor tokens = global_tokens(step).narrow(0, data_rank * local, local);
  train::Batch batch;
  batch.inputs = tokens.narrow(1, 0, kContext).contiguous();
  batch.targets = tokens.narrow(1, 1, kContext).contiguous();
  return batch;
}

}  // namespace dtrain::gpt::fixtures
