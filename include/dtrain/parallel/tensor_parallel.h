#pragma once
// Tensor-parallel layers (Megatron-LM's), as LibTorch modules over the
// tensor-parallel communicator, built from the regions of tensor_regions.h.
//
//   ColumnParallelLinear    y = x W^T + b, W [out, in] split by rows (output
//                           features): each rank computes its slice of y.
//                           Input: whole (copy_to_tp_region) or, with
//                           sequence parallelism, a sequence shard (all-gathered).
//                           Output: this rank's slice, or gathered whole.
//   RowParallelLinear       y = x W^T + b, W split by columns (input
//                           features): each rank computes a partial sum;
//                           the sum is all-reduced, or reduce-scattered into
//                           sequence shards. Input: this rank's slice of the
//                           features (input_is_parallel) or whole (sliced).
//   VocabParallelEmbedding  the table [vocab, dim] split by rows; each rank
//                           looks up the ids in its rows, zeros elsewhere;
//                           the sum is all-reduced (or reduce-scattered).
//                           logits(h): h E^T over this rank's rows, for a
//                           tied output layer and vocab_parallel_cross_entropy.
//   SequenceParallelLayerNorm  LayerNorm over a sequence shard; the
//                           gradients of its (replicated) weight and bias are
//                           summed over the tp ranks in backward.
//
// A Megatron MLP is ColumnParallelLinear (no gather) -> activation ->
// RowParallelLinear (input_is_parallel): one all-reduce forward, one
// backward. With sequence parallelism the same MLP takes and returns
// sequence shards: all-gather + reduce-scatter forward, all-gather +
// reduce-scatter backward (as many bytes as the two all-reduces), plus a
// small all-reduce in backward for each replicated parameter that sees
// only a shard (the row-parallel bias, the LayerNorm's weight and bias).
//
// Initialization: each layer draws one full master weight (and bias) of the
// global shape from its own generator, seeded with options.init_seed, in
// LibTorch's default dtype, and keeps this rank's slice. So a model built
// with tp = k starts bitwise equal to the one built with tp = 1 from the
// same seeds. Give every layer its own seed.
//
// Placements: every layer lists the placements of its split tensors
// (placements(); global shapes, split dimension, this rank's block), and
// tensor_parallel_layout(model) collects them for a whole model under the
// names of model.named_parameters(), so checkpoints store the global tensors
// and any tp size loads what another wrote (docs/parallel.md).
//
// A vocabulary that the tp size does not divide is split into contiguous
// blocks whose sizes differ by one at most (vocab_range); where a collective
// needs equal pieces (gather_logits) each block is padded to the largest
// one and the padding is dropped after, and vocab_parallel_cross_entropy
// masks padded columns out of the softmax, so the result is that of the
// dense vocabulary exactly.
//
// Errors: a tp size that does not divide the split dimension (the output
// features of a column-parallel layer, the input features of a
// row-parallel one), a vocabulary smaller than the tp size, and a sequence
// length that the sequence-parallel size does not divide are
// InvalidArgument naming the numbers, at construction or before anything is
// communicated.
//
// The communicator must outlive the layers and every backward pass through
// them. The layers' collectives are blocking and issued in forward and
// backward order, so every rank of the group must run the same layers in the
// same order (as with any collective).

#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "dtrain/collectives/communicator.h"
#include "dtrain/parallel/placement.h"
#include "dtrain/parallel/rng.h"

namespace dtrain::parallel {

/// What every tensor-parallel layer tells checkpoints.
class TensorParallelModule {
 public:
  virtual ~TensorParallelModule() = default;
  /// The placements of this module's own split parameters, by their local
  /// names ("weight", "bias"). Parameters not listed are whole copies.
  virtual std::map<std::string, Placement> placements() const = 0;
};

/// The placements of every tensor-parallel layer in `model` (itself
/// included), keyed by the names model.named_parameters() gives them.
/// global_name is left unset (global names = local names).
ModuleLayout tensor_parallel_layout(const torch::nn::Module& model);

/// The rows of a vocabulary that one tp rank holds.
struct VocabRange {
  std::int64_t start = 0;   ///< first row
  std::int64_t size = 0;    ///< rows held
  std::int64_t padded = 0;  ///< the largest block, ceil(vocab / parts)
};
/// Block `index` of `parts` of `vocab_size` rows: the first vocab % parts
/// blocks have one row more. InvalidArgument if vocab_size < parts.
VocabRange vocab_range(std::int64_t vocab_size, int index, int parts);

struct ColumnParallelLinearOptions {
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;  ///< global; tp must divide it
  bool bias = true;
  /// All-gather the output slices into the whole output (last dimension).
  bool gather_output = false;
  /// The input is this rank's shard of `sequence_dim`: all-gathered in
  /// forward, its gradient reduce-scattered in backward.
  bool sequence_parallel = false;
  std::int64_t sequence_dim = 0;
  /// Seed of the master weight's generator.
  std::uint64_t init_seed = 0;
  /// 0: weight and bias uniform in +-1/sqrt(in_features) (as
  /// torch::nn::Linear); > 0: weight normal(0, init_std), bias zero.
  double init_std = 0;
};

class ColumnParallelLinearImpl : public torch::nn::Cloneable<ColumnParallelLinearImpl>,
                                 public TensorParallelModule {
 public:
  ColumnParallelLinearImpl(ColumnParallelLinearOptions options,
                           std::shared_ptr<collectives::Communicator> tp);
  void reset() override;
  /// [..., in_features] (a sequence shard with sequence_parallel) ->
  /// [..., out_features / tp] (or [..., out_features] with gather_output).
  at::Tensor forward(const at::Tensor& input);
  std::map<std::string, Placement> placements() const override;

  ColumnParallelLinearOptions options;
  std::shared_ptr<collectives::Communicator> tp;
  at::Tensor weight;  ///< [out_features / tp, in_features]
  at::Tensor bias;    ///< [out_features / tp], or undefined
};
TORCH_MODULE(ColumnParallelLinear);

struct RowParallelLinearOptions {
  std::int64_t in_features = 0;  ///< global; tp must divide it
  std::int64_t out_features = 0;
  bool bias = true;  ///< whole on every rank, added once after the sum
  /// The input is already this rank's slice of the features (the output of
  /// a ColumnParallelLinear without gather); otherwise it is whole and
  /// sliced here.
  bool input_is_parallel = true;
  /// The output is reduce-scattered into shards of `sequence_dim` instead
  /// of all-reduced.
  bool sequence_parallel = false;
  std::int64_t sequence_dim = 0;
  std::uint64_t init_seed = 0;
  /// As ColumnParallelLinearOptions::init_std.
  double init_std = 0;
};

class RowParallelLinearImpl : public torch::nn::Cloneable<RowParallelLinearImpl>,
                              public TensorParallelModule {
 public:
  RowParallelLinearImpl(RowParallelLinearOptions options,
                        std::shared_ptr<collectives::Communicator> tp);
  void reset() override;
  /// [..., in_features / tp] (input_is_parallel) or [..., in_features] ->
  /// [..., out_features] (a sequence shard with sequence_parallel).
  at::Tensor forward(const at::Tensor& input);
  std::map<std::string, Placement> placements() const override;

  RowParallelLinearOptions options;
  std::shared_ptr<collectives::Communicator> tp;
  at::Tensor weight;  ///< [out_features, in_features / tp]
  at::Tensor bias;    ///< [out_features], whole, or undefined
};
TORCH_MODULE(RowParallelLinear);

struct VocabParallelEmbeddingOptions {
  std::int64_t num_embeddings = 0;  ///< the vocabulary; at least the tp size
  std::int64_t embedding_dim = 0;
  /// The output is reduce-scattered into shards of `sequence_dim` (and
  /// logits() takes a sequence shard).
  bool sequence_parallel = false;
  std::int64_t sequence_dim = 0;
  std::uint64_t init_seed = 0;
  /// 0: normal(0, 1) (as torch::nn::Embedding); > 0: normal(0, init_std).
  double init_std = 0;
};

class VocabParallelEmbeddingImpl : public torch::nn::Cloneable<VocabParallelEmbeddingImpl>,
                                   public TensorParallelModule {
 public:
  VocabParallelEmbeddingImpl(VocabParallelEmbeddingOptions options,
                             std::shared_ptr<collectives::Communicator> tp);
  void reset() override;
  /// Ids (int64, any shape, each in [0, num_embeddings): InvalidArgument
  /// otherwise) -> [..., embedding_dim].
  at::Tensor forward(const at::Tensor& ids);
  /// A tied output layer: `hidden` [..., embedding_dim] (whole, or a
  /// sequence shard with sequence_parallel) times this rank's rows ->
  /// this rank's logits [..., range().size], for vocab_parallel_cross_entropy.
  at::Tensor logits(const at::Tensor& hidden);
  /// The whole logits [..., num_embeddings] from every rank's
  /// logits() (all-gathered, each block padded to range().padded for the
  /// collective and the padding dropped). For sampling; training never
  /// needs it.
  at::Tensor gather_logits(const at::Tensor& local_logits);
  /// This rank's rows.
  VocabRange range() const;
  std::map<std::string, Placement> placements() const override;

  VocabParallelEmbeddingOptions options;
  std::shared_ptr<collectives::Communicator> tp;
  at::Tensor weight;  ///< [range().size, embedding_dim]
};
TORCH_MODULE(VocabParallelEmbedding);

struct SequenceParallelLayerNormOptions {
  std::int64_t normalized_size = 0;  ///< the last dimension
  double eps = 1e-5;
  /// The input is a sequence shard: the gradients of weight and bias are
  /// summed over the tp ranks in backward (one all-reduce of both). Off: a
  /// plain LayerNorm on a whole input, no communication.
  bool sequence_parallel = true;
};

/// LayerNorm with weight and bias (named as torch::nn::LayerNorm's), whole
/// on every tp rank.
class SequenceParallelLayerNormImpl : public torch::nn::Cloneable<SequenceParallelLayerNormImpl> {
 public:
  SequenceParallelLayerNormImpl(SequenceParallelLayerNormOptions options,
                                std::shared_ptr<collectives::Communicator> tp);
  void reset() override;
  at::Tensor forward(const at::Tensor& input);

  SequenceParallelLayerNormOptions options;
  std::shared_ptr<collectives::Communicator> tp;
  at::Tensor weight;
  at::Tensor bias;
};
TORCH_MODULE(SequenceParallelLayerNorm);

/// Cross-entropy over a vocabulary split across the tp ranks, without
/// gathering the logits: all-reduces the row maxima, then the target logit
/// and the sum of exponentials together (two all-reduces, [N] and [N, 2]);
/// the backward is local (softmax minus one-hot of this rank's columns).
///
/// `local_logits` [..., w]: this rank's columns of the logits over
/// vocab_range(vocab_size, comm.rank(), comm.size()), w = its size, or w =
/// its padded size with the columns past its size ignored (masked out of
/// the softmax; their gradient is zero). `target` [...] int64 in
/// [0, vocab_size) (InvalidArgument otherwise). Returns the per-element loss
/// [...], in the logits' dtype; reduce it (mean) as the model needs.
at::Tensor vocab_parallel_cross_entropy(const at::Tensor& local_logits, const at::Tensor& target,
                                        std::int64_t vocab_size, collectives::Communicator& comm);

/// Which part of a tensor split over tp ranks this rank holds, for dropout.
struct TensorSplit {
  std::int64_t dim = -1;  ///< -1: the tensor is whole (replicated over tp)
  int index = 0;          ///< this rank's part
  int parts = 1;          ///< equal parts along dim
  /// Part comm.rank() of comm.size() along `dim`.
  static TensorSplit over(const collectives::Communicator& comm, std::int64_t dim);
};

/// Dropout whose mask does not depend on the tp size: the mask of the whole
/// tensor (input's shape with `split.dim` times `split.parts`) is drawn
/// from rng's kTensorShared stream, the same on every rank of the tp group,
/// and this rank keeps its part. So a replicated region draws the same mask
/// on every tp rank, and a split region (heads, hidden features, sequence
/// shards) draws the tp = 1 mask, sliced: a model trains with dropout on at
/// tp = k as at tp = 1 (with the same seed and dp, pp coordinates). Every
/// rank draws the whole mask (cheap next to the layers around it).
/// Not training or p == 0: the input itself. InvalidArgument unless
/// 0 <= p < 1.
at::Tensor tensor_parallel_dropout(const at::Tensor& input, double p, bool training,
                                   RngStreams& rng, TensorSplit split = {});
/// The same with the whole mask drawn from `generator` (CPU): a caller that
/// keys its masks itself (by layer and call, say, so that they do not
/// depend on the order in which pipeline stages run) passes a generator
/// seeded alike on every rank of the tp group.
at::Tensor tensor_parallel_dropout(const at::Tensor& input, double p, bool training,
                                   at::Generator& generator, TensorSplit split = {});

}  // namespace dtrain::parallel
