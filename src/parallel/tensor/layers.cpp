// Column-, row- and vocab-parallel layers, the sequence-parallel LayerNorm
// and the layout that tells checkpoints where their pieces sit.

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "dtrain/parallel/tensor_regions.h"

namespace dtrain::parallel {

namespace {

// One generator per layer, seeded with its init_seed: the master weight
// first, then the master bias, both of their global shapes, in the default
// dtype. The same code runs at every tp size, so every rank's slice is the
// tp = 1 tensor's, bitwise.
class MasterInit {
 public:
  explicit MasterInit(std::uint64_t seed)
      : generator_(at::make_generator<at::CPUGeneratorImpl>(seed)) {}

  at::Tensor uniform(std::vector<std::int64_t> shape, double bound) {
    return empty(std::move(shape)).uniform_(-bound, bound, generator_);
  }
  at::Tensor normal(std::vector<std::int64_t> shape, double std) {
    return empty(std::move(shape)).normal_(0.0, std, generator_);
  }
  static at::Tensor empty(std::vector<std::int64_t> shape) {
    return at::empty(shape, at::TensorOptions().dtype(at::get_default_dtype()));
  }

 private:
  at::Generator generator_;
};

// Linear layers: weight [out, in] and bias [out] of the global shapes.
std::pair<at::Tensor, at::Tensor> master_linear(std::int64_t out, std::int64_t in, bool bias,
                                                std::uint64_t seed, double init_std) {
  MasterInit init(seed);
  if (init_std > 0) {
    at::Tensor w = init.normal({out, in}, init_std);
    return {w, bias ? MasterInit::empty({out}).zero_() : at::Tensor()};
  }
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  at::Tensor w = init.uniform({out, in}, bound);
  return {w, bias ? init.uniform({out}, bound) : at::Tensor()};
}

void check_comm(const char* layer, const std::shared_ptr<collectives::Communicator>& tp) {
  DTRAIN_CHECK_ARG(tp != nullptr, layer,
                   ": the tensor-parallel communicator is null (pass ctx.tp(), or a "
                   "communicator of one rank)");
}

void check_positive(const char* layer, const char* what, std::int64_t value) {
  DTRAIN_CHECK_ARG(value > 0, layer, ": ", what, " must be > 0, got ", value);
}

void check_divides(const char* layer, const char* what, std::int64_t value, int tp) {
  DTRAIN_CHECK_ARG(value % tp == 0, layer, ": the tensor-parallel size ", tp, " does not divide ",
                   what, " ", value, "; choose a tp size that divides it, or change the size");
}

void check_last_dim(const char* layer, const at::Tensor& input, std::int64_t expected,
                    const char* what) {
  DTRAIN_CHECK_ARG(input.defined() && input.dim() >= 1 && input.size(-1) == expected, layer,
                   ": expected input [..., ", expected, "] (", what, "), got ",
                   input.defined() ? input.sizes() : at::IntArrayRef{});
}

}  // namespace

// --- layout ------------------------------------------------------------------

ModuleLayout tensor_parallel_layout(const torch::nn::Module& model) {
  ModuleLayout layout;
  auto add = [&layout](const std::string& prefix, const torch::nn::Module& module) {
    const auto* tp_module = dynamic_cast<const TensorParallelModule*>(&module);
    if (tp_module == nullptr) return;
    for (auto& [name, placement] : tp_module->placements()) {
      layout.placements[prefix.empty() ? name : prefix + "." + name] = placement;
    }
  };
  add("", model);
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    add(item.key(), *item.value());
  }
  return layout;
}

VocabRange vocab_range(std::int64_t vocab_size, int index, int parts) {
  DTRAIN_CHECK_ARG(parts >= 1 && index >= 0 && index < parts, "vocab_range: part ", index, " of ",
                   parts, " does not exist");
  DTRAIN_CHECK_ARG(vocab_size >= parts, "a vocabulary of ", vocab_size, " cannot be split over ",
                   parts,
                   " tensor-parallel ranks (each needs at least one row); use a tp size of at "
                   "most ",
                   vocab_size);
  const std::int64_t base = vocab_size / parts;
  const std::int64_t extra = vocab_size % parts;
  VocabRange r;
  r.start = index * base + std::min<std::int64_t>(index, extra);
  r.size = base + (index < extra ? 1 : 0);
  r.padded = base + (extra > 0 ? 1 : 0);
  return r;
}

// --- ColumnParallelLinear -------------------------------------------------------

ColumnParallelLinearImpl::ColumnParallelLinearImpl(ColumnParallelLinearOptions options_,
                                                   std::shared_ptr<collectives::Communicator> tp_)
    : options(options_), tp(std::move(tp_)) {
  reset();
}

void ColumnParallelLinearImpl::reset() {
  constexpr const char* kLayer = "ColumnParallelLinear";
  check_comm(kLayer, tp);
  check_positive(kLayer, "in_features", options.in_features);
  check_positive(kLayer, "out_features", options.out_features);
  check_divides(kLayer, "out_features", options.out_features, tp->size());
  auto [w, b] = master_linear(options.out_features, options.in_features, options.bias,
                              options.init_seed, options.init_std);
  const std::int64_t rows = options.out_features / tp->size();
  weight = register_parameter("weight", w.narrow(0, tp->rank() * rows, rows).clone());
  if (options.bias) bias = register_parameter("bias", b.narrow(0, tp->rank() * rows, rows).clone());
}

at::Tensor ColumnParallelLinearImpl::forward(const at::Tensor& input) {
  check_last_dim("ColumnParallelLinear", input, options.in_features, "in_features");
  auto& comm = *tp;
  const at::Tensor x = options.sequence_parallel
                           ? gather_from_sequence_region(input, comm, options.sequence_dim)
                           : copy_to_tp_region(input, comm);
  at::Tensor y = at::linear(x, weight, bias);
  return options.gather_output ? gather_from_tp_region(y, comm) : y;
}

std::map<std::string, Placement> ColumnParallelLinearImpl::placements() const {
  std::map<std::string, Placement> out;
  out.emplace("weight", Placement::split({options.out_features, options.in_features}, 0, tp->rank(),
                                         tp->size()));
  if (options.bias) {
    out.emplace("bias", Placement::split({options.out_features}, 0, tp->rank(), tp->size()));
  }
  return out;
}

// --- RowParallelLinear -------------------------------------------------------------

RowParallelLinearImpl::RowParallelLinearImpl(RowParallelLinearOptions options_,
                                             std::shared_ptr<collectives::Communicator> tp_)
    : options(options_), tp(std::move(tp_)) {
  reset();
}

void RowParallelLinearImpl::reset() {
  constexpr const char* kLayer = "RowParallelLinear";
  check_comm(kLayer, tp);
  check_positive(kLayer, "in_features", options.in_features);
  check_positive(kLayer, "out_features", options.out_features);
  check_divides(kLayer, "in_features", options.in_features, tp->size());
  auto [w, b] = master_linear(options.out_features, options.in_features, options.bias,
                              options.init_seed, options.init_std);
  const std::int64_t cols = options.in_features / tp->size();
  weight = register_parameter("weight", w.narrow(1, tp->rank() * cols, cols).clone());
  if (options.bias) bias = register_parameter("bias", b);
}

at::Tensor RowParallelLinearImpl::forward(const at::Tensor& input) {
  constexpr const char* kLayer = "RowParallelLinear";
  auto& comm = *tp;
  at::Tensor x;
  if (options.input_is_parallel) {
    check_last_dim(kLayer, input, weight.size(1), "this rank's slice of in_features");
    x = input;
  } else {
    check_last_dim(kLayer, input, options.in_features, "in_features");
    x = scatter_to_tp_region(input, comm);
  }
  const at::Tensor partial = at::linear(x, weight);
  at::Tensor y = options.sequence_parallel
                     ? reduce_scatter_to_sequence_region(partial, comm, options.sequence_dim)
                     : reduce_from_tp_region(partial, comm);
  if (!options.bias) return y;
  // Under sequence parallelism each rank adds the bias to its own shard only,
  // so its gradient is a partial sum: copy_to_tp_region sums it.
  return y + (options.sequence_parallel ? copy_to_tp_region(bias, comm) : bias);
}

std::map<std::string, Placement> RowParallelLinearImpl::placements() const {
  std::map<std::string, Placement> out;
  out.emplace("weight", Placement::split({options.out_features, options.in_features}, 1, tp->rank(),
                                         tp->size()));
  return out;
}

// --- VocabParallelEmbedding -----------------------------------------------------------

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(
    VocabParallelEmbeddingOptions options_, std::shared_ptr<collectives::Communicator> tp_)
    : options(options_), tp(std::move(tp_)) {
  reset();
}

void VocabParallelEmbeddingImpl::reset() {
  constexpr const char* kLayer = "VocabParallelEmbedding";
  check_comm(kLayer, tp);
  check_positive(kLayer, "num_embeddings", options.num_embeddings);
  check_positive(kLayer, "embedding_dim", options.embedding_dim);
  const VocabRange r = range();
  MasterInit init(options.init_seed);
  const at::Tensor w = init.normal({options.num_embeddings, options.embedding_dim},
                                   options.init_std > 0 ? options.init_std : 1.0);
  weight = register_parameter("weight", w.narrow(0, r.start, r.size).clone());
}

VocabRange VocabParallelEmbeddingImpl::range() const {
  return vocab_range(options.num_embeddings, tp->rank(), tp->size());
}

at::Tensor VocabParallelEmbeddingImpl::forward(const at::Tensor& ids) {
  DTRAIN_CHECK_ARG(ids.defined() && ids.scalar_type() == at::kLong,
                   "VocabParallelEmbedding: expected int64 ids, got ",
                   ids.defined() ? c10::toString(ids.scalar_type()) : "an undefined tensor");
  if (ids.numel() > 0) {
    const std::int64_t lo = ids.min().item<std::int64_t>();
    const std::int64_t hi = ids.max().item<std::int64_t>();
    DTRAIN_CHECK_ARG(lo >= 0 && hi < options.num_embeddings,
                     "VocabParallelEmbedding: ids must be in [0, ", options.num_embeddings,
                     "), got values in [", lo, ", ", hi, "]");
  }
  const VocabRange r = range();
  // Ids outside this rank's rows look up row 0 and are zeroed: the sum over
  // the ranks then holds exactly one real row per id.
  const at::Tensor outside = (ids < r.start).logical_or(ids >= r.start + r.size);
  const at::Tensor local_ids = (ids - r.start).masked_fill(outside, 0);
  const at::Tensor rows = at::embedding(weight, local_ids).masked_fill(outside.unsqueeze(-1), 0);
  return options.sequence_parallel
             ? reduce_scatter_to_sequence_region(rows, *tp, options.sequence_dim)
             : reduce_from_tp_region(rows, *tp);
}

at::Tensor VocabParallelEmbeddingImpl::logits(const at::Tensor& hidden) {
  check_last_dim("VocabParallelEmbedding::logits", hidden, options.embedding_dim, "embedding_dim");
  const at::Tensor x = options.sequence_parallel
                           ? gather_from_sequence_region(hidden, *tp, options.sequence_dim)
                           : copy_to_tp_region(hidden, *tp);
  return at::linear(x, weight);
}

at::Tensor VocabParallelEmbeddingImpl::gather_logits(const at::Tensor& local_logits) {
  const VocabRange r = range();
  check_last_dim("VocabParallelEmbedding::gather_logits", local_logits, r.size,
                 "this rank's vocabulary rows");
  const int parts = tp->size();
  if (r.padded * parts == options.num_embeddings) return gather_from_tp_region(local_logits, *tp);
  const at::Tensor padded = at::constant_pad_nd(local_logits, {0, r.padded - r.size});
  const at::Tensor all = gather_from_tp_region(padded, *tp);
  std::vector<at::Tensor> blocks;
  for (int k = 0; k < parts; ++k) {
    blocks.push_back(
        all.narrow(-1, k * r.padded, vocab_range(options.num_embeddings, k, parts).size));
  }
  return at::cat(blocks, -1);
}

std::map<std::string, Placement> VocabParallelEmbeddingImpl::placements() const {
  // Uneven blocks when tp does not divide the vocabulary: the placement is
  // the block itself (split along 0, replicated over dp like any tp split).
  const VocabRange r = range();
  Placement p = Placement::replicated({options.num_embeddings, options.embedding_dim});
  p.offset[0] = r.start;
  p.shape[0] = r.size;
  p.split_dim = 0;
  p.replicated_over = {Axis::kData};
  return {{"weight", p}};
}

// --- SequenceParallelLayerNorm ---------------------------------------------------------

SequenceParallelLayerNormImpl::SequenceParallelLayerNormImpl(
    SequenceParallelLayerNormOptions options_, std::shared_ptr<collectives::Communicator> tp_)
    : options(options_), tp(std::move(tp_)) {
  reset();
}

void SequenceParallelLayerNormImpl::reset() {
  constexpr const char* kLayer = "SequenceParallelLayerNorm";
  check_comm(kLayer, tp);
  check_positive(kLayer, "normalized_size", options.normalized_size);
  DTRAIN_CHECK_ARG(options.eps > 0, kLayer, ": eps must be > 0, got ", options.eps);
  weight = register_parameter("weight", MasterInit::empty({options.normalized_size}).fill_(1));
  bias = register_parameter("bias", MasterInit::empty({options.normalized_size}).zero_());
}

at::Tensor SequenceParallelLayerNormImpl::forward(const at::Tensor& input) {
  const std::int64_t n = options.normalized_size;
  check_last_dim("SequenceParallelLayerNorm", input, n, "normalized_size");
  if (!options.sequence_parallel || tp->size() == 1) {
    return at::layer_norm(input, {n}, weight, bias, options.eps);
  }
  // Weight and bias in one tensor, so that their gradients are summed over
  // the tp ranks by one all-reduce.
  const at::Tensor both = copy_to_tp_region(at::cat({weight, bias}), *tp);
  return at::layer_norm(input, {n}, both.narrow(0, 0, n), both.narrow(0, n, n), options.eps);
}

}  // namespace dtrain::parallel
