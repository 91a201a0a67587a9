#pragma once
// GPT: a decoder-only transformer (GPT-2's layout, nanoGPT's sizes) built
// from the tensor-parallel layers of dtrain/parallel/tensor_parallel.h, for
// dtrain-gpt and its tests.
//
//   ids [B, T] -> embedding: wte (VocabParallelEmbedding) + wpe -> dropout
//     -> blocks.0 .. blocks.{L-1}:  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
//     -> ln_f -> head: wte's logits (the tied output layer) -> this rank's logits
//
// Inside a block activations are [T, B, C] (sequence first, as Megatron-LM
// lays them out), so that sequence parallelism splits them into contiguous
// shards. Between the layers (embedding, blocks, ln_f, head) they are
// batch first, [B, T, C] ([B, T / tp, C] with sequence parallelism): any
// two layers can be pipeline stages apart, and the pipeline cuts
// microbatches and sends activations along dimension 0 (layers()).
//
//   attn  qkv: ColumnParallelLinear(C, 3C): its output features are ordered
//         by head ([head][q, k, v][head dim]), so tp rank r holds the q, k
//         and v of heads [r H/tp, (r + 1) H/tp) and runs them alone; causal
//         softmax attention; dropout on the attention weights (split over
//         heads); proj: RowParallelLinear(C, C) on this rank's heads; dropout.
//   mlp   fc: ColumnParallelLinear(C, 4C) -> GELU -> proj: RowParallelLinear
//         (4C, C) -> dropout.
//
// One tp all-reduce per region boundary in forward and one in backward
// (attention and MLP each: copy in, reduce out). With sequence_parallel the
// LayerNorms, dropouts and residual adds run on sequence shards [T/tp, B, C]
// and the boundaries are all-gathers and reduce-scatters instead.
//
// Dropout draws the whole tensor's mask at any tp size
// (tensor_parallel_dropout), so training with dropout on at tp = k matches
// tp = 1. The masks are keyed, not streamed: each call of the embedding or
// of a block draws from a generator seeded with (init_seed, the dp
// coordinate, the layer, the layer's call count). The count is a buffer
// ("dropout_calls", in checkpoints), so the masks do not depend on which
// pipeline stage runs the layer or in what order the stages run, and a
// resumed run draws what an uninterrupted one would.
//
// Initialization: GPT-2's (normal(0, 0.02), the residual projections
// 0.02 / sqrt(2 L), zero biases, LayerNorms 1 and 0); each layer draws its
// full master weight from its own seed (GptOptions::init_seed and the
// layer's index), so a model built at tp = k starts bitwise equal to the one
// built at tp = 1. Weights are in LibTorch's default dtype.
//
// Names: the parameters' names are the model's global names at every tp and
// pp size ("embedding.wte.weight", "embedding.wpe", "blocks.3.attn.qkv.weight",
// "ln_f.weight"); layers() lists the model as pipeline layers under those
// names, the tied output layer "head" holding embedding.wte.weight as
// "head.weight" (the pipeline's tied-weight support keeps the copies of the
// first and last stage equal; checkpoints store it once, under its first
// name).
//
// Errors (InvalidArgument naming the numbers, at construction, before
// anything is communicated): a tp size that does not divide the heads (so
// each rank runs whole heads, which splits C and the MLP's 4C evenly too),
// heads that do not divide C, a context that the
// sequence-parallel size does not divide; in forward, ids of another shape
// or longer than the context, or a sequence length that the
// sequence-parallel size does not divide.

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/parallel/pipeline/partition.h"
#include "dtrain/parallel/rng.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "dtrain/train/strategy.h"

namespace dtrain::gpt {

struct GptOptions {
  std::int64_t vocab_size = 0;  ///< at least the tp size
  std::int64_t layers = 4;
  std::int64_t heads = 4;        ///< the tp size must divide it
  std::int64_t embedding = 128;  ///< C; heads must divide it
  std::int64_t context = 64;     ///< T at most; the sequence-parallel size must divide it
  double dropout = 0.0;          ///< on embeddings, attention weights and residual branches
  bool sequence_parallel = false;
  std::uint64_t init_seed = 0;

  /// InvalidArgument naming the numbers unless the sizes fit `tp`.
  void validate(int tp) const;
};

/// "vocab 96, 4 layers, 4 heads, embedding 128, context 64".
std::string describe(const GptOptions& options);

/// Causal self-attention, this rank's heads.
class AttentionImpl : public torch::nn::Cloneable<AttentionImpl> {
 public:
  AttentionImpl(const GptOptions& options, std::uint64_t seed,
                std::shared_ptr<collectives::Communicator> tp,
                std::shared_ptr<parallel::RngStreams> rng);
  void reset() override;
  /// [T, B, C] (a sequence shard with sequence parallelism) -> the same;
  /// dropout masks from `dropout` (the block's generator of this call).
  at::Tensor forward(const at::Tensor& x, at::Generator& dropout);

  GptOptions options;
  std::uint64_t seed;
  std::shared_ptr<collectives::Communicator> tp;
  std::shared_ptr<parallel::RngStreams> rng;
  parallel::ColumnParallelLinear qkv{nullptr};
  parallel::RowParallelLinear proj{nullptr};
};
TORCH_MODULE(Attention);

class MlpImpl : public torch::nn::Cloneable<MlpImpl> {
 public:
  MlpImpl(const GptOptions& options, std::uint64_t seed,
          std::shared_ptr<collectives::Communicator> tp, std::shared_ptr<parallel::RngStreams> rng);
  void reset() override;
  at::Tensor forward(const at::Tensor& x, at::Generator& dropout);

  GptOptions options;
  std::uint64_t seed;
  std::shared_ptr<collectives::Communicator> tp;
  std::shared_ptr<parallel::RngStreams> rng;
  parallel::ColumnParallelLinear fc{nullptr};
  parallel::RowParallelLinear proj{nullptr};
};
TORCH_MODULE(Mlp);

/// The dropout generator of one call of a layer: seeded with (init_seed,
/// the dp coordinate of `rng`, `layer`, the count in `calls`), which it
/// increments. The same on every rank of a tp group and at every pp split.
at::Generator dropout_generator(const GptOptions& options, const parallel::RngStreams& rng,
                                std::uint64_t layer, at::Tensor& calls);

/// Token and position embeddings and their dropout: ids [B, T] -> [B, T, C]
/// ([B, T / tp, C] with sequence parallelism).
class EmbeddingImpl : public torch::nn::Cloneable<EmbeddingImpl> {
 public:
  EmbeddingImpl(const GptOptions& options, std::shared_ptr<collectives::Communicator> tp,
                std::shared_ptr<parallel::RngStreams> rng);
  void reset() override;
  at::Tensor forward(const at::Tensor& ids);

  GptOptions options;
  std::shared_ptr<collectives::Communicator> tp;
  std::shared_ptr<parallel::RngStreams> rng;
  parallel::VocabParallelEmbedding wte{nullptr};
  at::Tensor wpe;            ///< [context, C], whole on every rank
  at::Tensor dropout_calls;  ///< int64 scalar buffer
};
TORCH_MODULE(Embedding);

/// One pre-LayerNorm transformer block.
class BlockImpl : public torch::nn::Cloneable<BlockImpl> {
 public:
  BlockImpl(const GptOptions& options, std::int64_t index,
            std::shared_ptr<collectives::Communicator> tp,
            std::shared_ptr<parallel::RngStreams> rng);
  void reset() override;
  /// [B, T, C] (a sequence shard [B, T / tp, C]) -> the same.
  at::Tensor forward(const at::Tensor& x);

  GptOptions options;
  std::int64_t index;
  std::shared_ptr<collectives::Communicator> tp;
  std::shared_ptr<parallel::RngStreams> rng;
  parallel::SequenceParallelLayerNorm ln1{nullptr};
  Attention attn{nullptr};
  parallel::SequenceParallelLayerNorm ln2{nullptr};
  Mlp mlp{nullptr};
  at::Tensor dropout_calls;  ///< int64 scalar buffer
};
TORCH_MODULE(Block);

/// The tied output layer: [B, T, C] (a sequence shard) -> this rank's logits
/// [T, B, its vocabulary block] through the token embedding's weight, which
/// it registers as "weight" (the same tensor).
class HeadImpl : public torch::nn::Module, public parallel::TensorParallelModule {
 public:
  explicit HeadImpl(parallel::VocabParallelEmbedding wte);
  at::Tensor forward(const at::Tensor& x);
  std::map<std::string, parallel::Placement> placements() const override;

  parallel::VocabParallelEmbedding wte;  ///< not registered: its weight is
  at::Tensor weight;
};
TORCH_MODULE(Head);

class GptImpl : public torch::nn::Cloneable<GptImpl> {
 public:
  /// `tp`: the tensor-parallel communicator (one rank: the dense model);
  /// `rng`: the streams dropout draws from. Both outlive the model.
  GptImpl(GptOptions options, std::shared_ptr<collectives::Communicator> tp,
          std::shared_ptr<parallel::RngStreams> rng);
  void reset() override;
  /// Token ids [B, T] (int64, T <= context) -> this rank's logits
  /// [T, B, its vocabulary block] (wte->range()), for vocab_parallel_loss:
  /// the layers() in order.
  at::Tensor forward(const at::Tensor& ids);

  /// The model as pipeline layers (partition.h), sharing this model's
  /// modules: "embedding", "blocks.0" .. "blocks.{L-1}", "ln_f", "head".
  std::vector<parallel::pipeline::Layer> layers() const;

  GptOptions options;
  std::shared_ptr<collectives::Communicator> tp;
  std::shared_ptr<parallel::RngStreams> rng;
  Embedding embedding{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  parallel::SequenceParallelLayerNorm ln_f{nullptr};
  Head head{nullptr};  ///< not registered: it holds embedding->wte's weight
};
TORCH_MODULE(Gpt);

/// The cut of GptImpl::layers() into `stages` pipeline stages of
/// L / stages blocks each, the embedding with the first, ln_f and the head
/// with the last. InvalidArgument naming the numbers unless `stages`
/// divides the layers.
parallel::pipeline::StagePartition pipeline_partition(const GptOptions& options, int stages);

/// The training objective over the tp group's logits (GptImpl::forward's
/// output) and next-token targets [B, T]: the mean cross-entropy (loss),
/// its sum (loss_sum) and the tokens whose target is the arg max (correct),
/// computed without gathering the logits (vocab_parallel_cross_entropy; the
/// arg max by two all-reduces of [T, B]). Collective over `tp`: every rank
/// of the group calls each function. `tp` outlives the objective.
train::Objective vocab_parallel_objective(std::int64_t vocab_size,
                                          std::shared_ptr<collectives::Communicator> tp);

/// Samples `tokens` ids after `prompt` (ids, at least one): each step feeds
/// the last `context` ids (right-padded to the full context, which causal
/// attention ignores, so that sequence parallelism's shards stay whole),
/// gathers the last position's logits over tp and draws from their softmax
/// at `temperature` with a generator seeded with `seed` (the same draw on
/// every rank). Collective over the model's tp group; eval mode, no grad.
std::vector<std::int64_t> sample(Gpt& model, const std::vector<std::int64_t>& prompt,
                                 std::int64_t tokens, double temperature, std::uint64_t seed);

}  // namespace dtrain::gpt
