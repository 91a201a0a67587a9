#include "examples/gpt/gpt.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "dtrain/error.h"
#include "dtrain/parallel/tensor_regions.h"

namespace dtrain::gpt {

namespace {

using parallel::TensorSplit;

constexpr double kInitStd = 0.02;

// The seed of one layer's master weight: distinct for every layer of one
// model, the same at every tp size.
std::uint64_t layer_seed(std::uint64_t model_seed, std::uint64_t layer) {
  return model_seed * 1000003ULL + layer;
}

// The dropout split of a tensor that is whole on every tp rank, or a
// sequence shard (dimension 0) with sequence parallelism.
TensorSplit activation_split(const GptOptions& o, const collectives::Communicator& tp) {
  return o.sequence_parallel ? TensorSplit::over(tp, 0) : TensorSplit{};
}

// splitmix64's finalizer: a seed per (model seed, dp, layer, call).
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// [B, T, C] <-> [T, B, C], contiguous.
at::Tensor swap_batch_and_sequence(const at::Tensor& x) { return x.transpose(0, 1).contiguous(); }

at::Tensor call_counter() { return at::zeros({}, at::TensorOptions().dtype(at::kLong)); }

parallel::SequenceParallelLayerNorm layer_norm(const GptOptions& o,
                                               std::shared_ptr<collectives::Communicator> tp) {
  parallel::SequenceParallelLayerNormOptions ln;
  ln.normalized_size = o.embedding;
  ln.sequence_parallel = o.sequence_parallel;
  return parallel::SequenceParallelLayerNorm(ln, std::move(tp));
}

}  // namespace

void GptOptions::validate(int tp) const {
  DTRAIN_CHECK_ARG(vocab_size >= 1, "GPT: the vocabulary size must be >= 1, got ", vocab_size);
  DTRAIN_CHECK_ARG(layers >= 1 && heads >= 1 && embedding >= 1 && context >= 1,
                   "GPT: layers, heads, embedding and context must be >= 1, got ", layers, ", ",
                   heads, ", ", embedding, ", ", context);
  DTRAIN_CHECK_ARG(embedding % heads == 0, "GPT: the embedding size ", embedding,
                   " is not divisible by the number of heads ", heads,
                   "; choose sizes where heads divides the embedding");
  DTRAIN_CHECK_ARG(dropout >= 0 && dropout < 1, "GPT: dropout must be in [0, 1), got ", dropout);
  DTRAIN_CHECK_ARG(tp >= 1, "GPT: the tensor-parallel size must be >= 1, got ", tp);
  DTRAIN_CHECK_ARG(heads % tp == 0, "GPT: the tensor-parallel size ", tp,
                   " does not divide the number of heads ", heads,
                   " (each rank runs whole heads); choose a tp size that divides it");
  // Whole heads on each rank also split the embedding (heads divides it) and
  // the MLP's hidden size 4C evenly.
  DTRAIN_CHECK_ARG(vocab_size >= tp, "GPT: a vocabulary of ", vocab_size, " cannot be split over ",
                   tp, " tensor-parallel ranks; use a tp size of at most ", vocab_size);
  DTRAIN_CHECK_ARG(!sequence_parallel || context % tp == 0, "GPT: the context length ", context,
                   " is not divisible by the sequence-parallel size ", tp,
                   " (sequence parallelism splits each sequence over the tp ranks); choose a "
                   "context that is a multiple of it, or turn sequence parallelism off");
}

at::Generator dropout_generator(const GptOptions& options, const parallel::RngStreams& rng,
                                std::uint64_t layer, at::Tensor& calls) {
  const auto call = static_cast<std::uint64_t>(calls.item<std::int64_t>());
  calls.add_(1);
  const std::uint64_t dp = static_cast<std::uint64_t>(rng.coord().dp);
  return at::make_generator<at::CPUGeneratorImpl>(
      mix(mix(mix(mix(options.init_seed) + dp) + layer) + call));
}

std::string describe(const GptOptions& o) {
  std::ostringstream os;
  os << "vocab " << o.vocab_size << ", " << o.layers << " layers, " << o.heads
     << " heads, embedding " << o.embedding << ", context " << o.context;
  return os.str();
}

// --- attention ------------------------------------------------------------------

AttentionImpl::AttentionImpl(const GptOptions& options_, std::uint64_t seed_,
                             std::shared_ptr<collectives::Communicator> tp_,
                             std::shared_ptr<parallel::RngStreams> rng_)
    : options(options_), seed(seed_), tp(std::move(tp_)), rng(std::move(rng_)) {
  reset();
}

void AttentionImpl::reset() {
  const std::int64_t c = options.embedding;
  parallel::ColumnParallelLinearOptions in;
  in.in_features = c;
  in.out_features = 3 * c;  // [head][q, k, v][head dim]
  in.sequence_parallel = options.sequence_parallel;
  in.init_seed = layer_seed(seed, 0);
  in.init_std = kInitStd;
  qkv = register_module("qkv", parallel::ColumnParallelLinear(in, tp));
  parallel::RowParallelLinearOptions out;
  out.in_features = c;
  out.out_features = c;
  out.sequence_parallel = options.sequence_parallel;
  out.init_seed = layer_seed(seed, 1);
  out.init_std = kInitStd / std::sqrt(2.0 * static_cast<double>(options.layers));
  proj = register_module("proj", parallel::RowParallelLinear(out, tp));
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, at::Generator& dropout) {
  const std::int64_t heads = options.heads / tp->size();
  const std::int64_t head_dim = options.embedding / options.heads;
  const at::Tensor h = qkv->forward(x);  // [T, B, heads * 3 * head_dim], the whole sequence
  const std::int64_t t = h.size(0);
  const std::int64_t b = h.size(1);
  const at::Tensor split = h.view({t, b, heads, 3, head_dim}).permute({1, 2, 3, 0, 4});
  const at::Tensor q = split.select(2, 0);  // [B, heads, T, head_dim]
  const at::Tensor k = split.select(2, 1);
  const at::Tensor v = split.select(2, 2);
  at::Tensor att = at::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(double(head_dim)));
  const at::Tensor future =
      at::ones({t, t}, at::TensorOptions().dtype(at::kBool).device(att.device())).triu(1);
  att = at::softmax(att.masked_fill(future, -std::numeric_limits<double>::infinity()), -1);
  att = parallel::tensor_parallel_dropout(att, options.dropout, is_training(), dropout,
                                          TensorSplit::over(*tp, 1));
  const at::Tensor y = at::matmul(att, v)  // [B, heads, T, head_dim]
                           .permute({2, 0, 1, 3})
                           .reshape({t, b, heads * head_dim});
  return parallel::tensor_parallel_dropout(proj->forward(y), options.dropout, is_training(),
                                           dropout, activation_split(options, *tp));
}

// --- MLP ---------------------------------------------------------------------------

MlpImpl::MlpImpl(const GptOptions& options_, std::uint64_t seed_,
                 std::shared_ptr<collectives::Communicator> tp_,
                 std::shared_ptr<parallel::RngStreams> rng_)
    : options(options_), seed(seed_), tp(std::move(tp_)), rng(std::move(rng_)) {
  reset();
}

void MlpImpl::reset() {
  const std::int64_t c = options.embedding;
  parallel::ColumnParallelLinearOptions up;
  up.in_features = c;
  up.out_features = 4 * c;
  up.sequence_parallel = options.sequence_parallel;
  up.init_seed = layer_seed(seed, 2);
  up.init_std = kInitStd;
  fc = register_module("fc", parallel::ColumnParallelLinear(up, tp));
  parallel::RowParallelLinearOptions down;
  down.in_features = 4 * c;
  down.out_features = c;
  down.sequence_parallel = options.sequence_parallel;
  down.init_seed = layer_seed(seed, 3);
  down.init_std = kInitStd / std::sqrt(2.0 * static_cast<double>(options.layers));
  proj = register_module("proj", parallel::RowParallelLinear(down, tp));
}

at::Tensor MlpImpl::forward(const at::Tensor& x, at::Generator& dropout) {
  const at::Tensor y = proj->forward(at::gelu(fc->forward(x)));
  return parallel::tensor_parallel_dropout(y, options.dropout, is_training(), dropout,
                                           activation_split(options, *tp));
}

// --- block -------------------------------------------------------------------------

BlockImpl::BlockImpl(const GptOptions& options_, std::int64_t index_,
                     std::shared_ptr<collectives::Communicator> tp_,
                     std::shared_ptr<parallel::RngStreams> rng_)
    : options(options_), index(index_), tp(std::move(tp_)), rng(std::move(rng_)) {
  reset();
}

void BlockImpl::reset() {
  const std::uint64_t seed =
      layer_seed(options.init_seed, 16 + 8 * static_cast<std::uint64_t>(index));
  ln1 = register_module("ln1", layer_norm(options, tp));
  attn = register_module("attn", Attention(options, seed, tp, rng));
  ln2 = register_module("ln2", layer_norm(options, tp));
  mlp = register_module("mlp", Mlp(options, seed, tp, rng));
  dropout_calls = register_buffer("dropout_calls", call_counter());
}

at::Tensor BlockImpl::forward(const at::Tensor& input) {
  const at::Tensor x = swap_batch_and_sequence(input);
  at::Generator dropout;
  if (is_training() && options.dropout > 0) {
    dropout =
        dropout_generator(options, *rng, 1 + static_cast<std::uint64_t>(index), dropout_calls);
  }
  const at::Tensor h = x + attn->forward(ln1->forward(x), dropout);
  return swap_batch_and_sequence(h + mlp->forward(ln2->forward(h), dropout));
}

// --- embedding and head ------------------------------------------------------------

EmbeddingImpl::EmbeddingImpl(const GptOptions& options_,
                             std::shared_ptr<collectives::Communicator> tp_,
                             std::shared_ptr<parallel::RngStreams> rng_)
    : options(options_), tp(std::move(tp_)), rng(std::move(rng_)) {
  reset();
}

void EmbeddingImpl::reset() {
  parallel::VocabParallelEmbeddingOptions e;
  e.num_embeddings = options.vocab_size;
  e.embedding_dim = options.embedding;
  e.sequence_parallel = options.sequence_parallel;
  e.init_seed = layer_seed(options.init_seed, 1);
  e.init_std = kInitStd;
  wte = register_module("wte", parallel::VocabParallelEmbedding(e, tp));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(layer_seed(options.init_seed, 2));
  wpe = register_parameter(
      "wpe", at::empty({options.context, options.embedding}).normal_(0, kInitStd, gen));
  dropout_calls = register_buffer("dropout_calls", call_counter());
}

at::Tensor EmbeddingImpl::forward(const at::Tensor& ids) {
  DTRAIN_CHECK_ARG(ids.dim() == 2, "GPT: expected token ids [batch, sequence], got ", ids.dim(),
                   " dimensions");
  const std::int64_t t = ids.size(1);
  DTRAIN_CHECK_ARG(t >= 1 && t <= options.context, "GPT: a sequence of ", t,
                   " tokens does not fit the context of ", options.context);
  const int parts = tp->size();
  DTRAIN_CHECK_ARG(!options.sequence_parallel || t % parts == 0, "GPT: the sequence length ", t,
                   " is not divisible by the sequence-parallel size ", parts);
  // [T, B]: the embedding's output is [T, B, C] (a shard of T with sequence
  // parallelism).
  at::Tensor x = wte->forward(ids.t().contiguous());
  if (options.sequence_parallel) {
    // This shard's positions; copy_to_tp_region sums wpe's gradient over the
    // shards, so every rank's replicated wpe gets the whole gradient.
    const std::int64_t rows = t / parts;
    x = x + parallel::copy_to_tp_region(wpe, *tp).narrow(0, tp->rank() * rows, rows).unsqueeze(1);
  } else {
    x = x + wpe.narrow(0, 0, t).unsqueeze(1);
  }
  at::Generator dropout;
  if (is_training() && options.dropout > 0) {
    dropout = dropout_generator(options, *rng, 0, dropout_calls);
  }
  x = parallel::tensor_parallel_dropout(x, options.dropout, is_training(), dropout,
                                        activation_split(options, *tp));
  return swap_batch_and_sequence(x);
}

HeadImpl::HeadImpl(parallel::VocabParallelEmbedding wte_) : wte(std::move(wte_)) {
  weight = register_parameter("weight", wte->weight);
}

at::Tensor HeadImpl::forward(const at::Tensor& x) {
  return wte->logits(swap_batch_and_sequence(x));
}

std::map<std::string, parallel::Placement> HeadImpl::placements() const {
  return wte->placements();
}

// --- the model ---------------------------------------------------------------------

GptImpl::GptImpl(GptOptions options_, std::shared_ptr<collectives::Communicator> tp_,
                 std::shared_ptr<parallel::RngStreams> rng_)
    : options(options_), tp(std::move(tp_)), rng(std::move(rng_)) {
  DTRAIN_CHECK_ARG(tp && rng, "GPT needs a tensor-parallel communicator and RNG streams");
  options.validate(tp->size());
  reset();
}

void GptImpl::reset() {
  embedding = register_module("embedding", Embedding(options, tp, rng));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (std::int64_t i = 0; i < options.layers; ++i) blocks->push_back(Block(options, i, tp, rng));
  ln_f = register_module("ln_f", layer_norm(options, tp));
  head = Head(embedding->wte);
}

std::vector<parallel::pipeline::Layer> GptImpl::layers() const {
  std::vector<parallel::pipeline::Layer> out;
  out.push_back({"embedding", torch::nn::AnyModule(embedding)});
  for (std::size_t i = 0; i < blocks->size(); ++i) {
    out.push_back({"blocks." + std::to_string(i), torch::nn::AnyModule(blocks->ptr<BlockImpl>(i))});
  }
  out.push_back({"ln_f", torch::nn::AnyModule(ln_f)});
  out.push_back({"head", torch::nn::AnyModule(head)});
  return out;
}

parallel::pipeline::StagePartition pipeline_partition(const GptOptions& options, int stages) {
  DTRAIN_CHECK_ARG(stages >= 1 && options.layers % stages == 0, "GPT: ", stages,
                   " pipeline stages do not divide the ", options.layers,
                   " transformer blocks (each stage runs the same number of blocks); choose a "
                   "pipeline size (times the stages per rank) that divides --layers");
  const std::int64_t per_stage = options.layers / stages;
  std::vector<int> cuts;
  // Layer 0 is the embedding: stage s starts at block s * per_stage.
  for (int s = 1; s < stages; ++s) cuts.push_back(static_cast<int>(1 + s * per_stage));
  return parallel::pipeline::partition_at(static_cast<int>(options.layers + 3), cuts);
}

at::Tensor GptImpl::forward(const at::Tensor& ids) {
  at::Tensor x = ids;
  for (auto& layer : layers()) x = layer.module.forward(x);
  return x;
}

// --- objective ---------------------------------------------------------------------

train::Objective vocab_parallel_objective(std::int64_t vocab_size,
                                          std::shared_ptr<collectives::Communicator> tp) {
  // logits [T, B, block], targets [B, T].
  train::Objective o;
  o.loss = [vocab_size, tp](const at::Tensor& logits, const at::Tensor& targets) {
    return parallel::vocab_parallel_cross_entropy(logits, targets.t(), vocab_size, *tp).mean();
  };
  o.loss_sum = [vocab_size, tp](const at::Tensor& logits, const at::Tensor& targets) {
    return parallel::vocab_parallel_cross_entropy(logits, targets.t(), vocab_size, *tp).sum();
  };
  o.correct = [vocab_size, tp](const at::Tensor& logits, const at::Tensor& targets) {
    // The target is the arg max when its logit is the largest over every
    // rank's columns: one all-reduce (max) of the rows' maxima, one (sum) of
    // the target logit, which one rank holds.
    const at::Tensor x = logits.detach();
    const parallel::VocabRange r = parallel::vocab_range(vocab_size, tp->rank(), tp->size());
    const at::Tensor t = targets.t();
    at::Tensor row_max = std::get<0>(x.narrow(-1, 0, r.size).max(-1)).contiguous();
    collectives::AllReduceOptions max;
    max.op = collectives::ReduceOp::kMax;
    tp->all_reduce(row_max, max)->wait();
    const at::Tensor mine = (t >= r.start).logical_and(t < r.start + r.size);
    const at::Tensor local = (t - r.start).masked_fill(mine.logical_not(), 0);
    at::Tensor target_logit = x.gather(-1, local.unsqueeze(-1))
                                  .squeeze(-1)
                                  .masked_fill(mine.logical_not(), 0)
                                  .contiguous();
    tp->all_reduce(target_logit)->wait();
    return target_logit.ge(row_max).sum();
  };
  return o;
}

// --- sampling ----------------------------------------------------------------------

std::vector<std::int64_t> sample(Gpt& model, const std::vector<std::int64_t>& prompt,
                                 std::int64_t tokens, double temperature, std::uint64_t seed) {
  DTRAIN_CHECK_ARG(!prompt.empty(), "GPT sample: the prompt needs at least one token");
  DTRAIN_CHECK_ARG(temperature > 0, "GPT sample: the temperature must be > 0, got ", temperature);
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const std::int64_t context = model->options.context;
  const at::Device device = model->embedding->wpe.device();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<std::int64_t> ids = prompt;
  for (std::int64_t n = 0; n < tokens; ++n) {
    const std::int64_t used =
        std::min<std::int64_t>(context, static_cast<std::int64_t>(ids.size()));
    std::vector<std::int64_t> window(static_cast<std::size_t>(context), 0);
    std::copy(ids.end() - used, ids.end(), window.begin());
    const at::Tensor local =
        model->forward(at::tensor(window).view({1, context}).to(device));  // [T, 1, block]
    const at::Tensor logits = model->embedding->wte->gather_logits(local)[used - 1][0].to(at::kCPU);
    const at::Tensor probs = at::softmax(logits.to(at::kDouble) / temperature, -1);
    ids.push_back(at::multinomial(probs, 1, false, gen).item<std::int64_t>());
  }
  model->train(was_training);
  return std::vector<std::int64_t>(ids.begin() + static_cast<std::ptrdiff_t>(prompt.size()),
                                   ids.end());
}

}  // namespace dtrain::gpt
