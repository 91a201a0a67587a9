// Vocab-parallel cross-entropy and tensor-parallel dropout.

#include <torch/autograd.h>
#include <torch/torch.h>

#include <functional>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "src/common/torch_compat.h"

namespace dtrain::parallel {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The softmax of a row split over the ranks: with m the row's global
// maximum, S = sum over every rank's columns of exp(x - m), and t the
// target's column (on exactly one rank),
//
//   loss = log(S) - (x_t - m),   d loss / d x_j = exp(x_j - m) / S - [j == t].
//
// m needs one all-reduce (max); then x_t - m (zero on the ranks that do not
// hold t) and this rank's part of S are summed by one all-reduce of [N, 2].
// The gradient needs nothing from the other ranks.
struct VocabParallelCrossEntropyFunction
    : public torch::autograd::Function<VocabParallelCrossEntropyFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& local_logits,
                            const at::Tensor& target, std::int64_t vocab_size,
                            std::int64_t comm_address) {
    auto& comm = *reinterpret_cast<collectives::Communicator*>(comm_address);
    const VocabRange r = vocab_range(vocab_size, comm.rank(), comm.size());
    const std::int64_t width = local_logits.size(-1);
    // Padded columns are left out of the softmax: they are masked, not zero.
    const at::Tensor x = width > r.size ? local_logits.narrow(-1, 0, r.size) : local_logits;

    at::Tensor max = std::get<0>(x.max(-1)).contiguous();
    if (comm.size() > 1) {
      collectives::AllReduceOptions options;
      options.op = collectives::ReduceOp::kMax;
      comm.all_reduce(max, options)->wait();
    }
    at::Tensor exp = (x - max.unsqueeze(-1)).exp_();
    const at::Tensor mine = (target >= r.start).logical_and(target < r.start + r.size);
    const at::Tensor column = (target - r.start).masked_fill(mine.logical_not(), 0);
    // x_t - m on the rank that holds t, 0 elsewhere.
    const at::Tensor target_shifted =
        (x.gather(-1, column.unsqueeze(-1)).squeeze(-1) - max).masked_fill(mine.logical_not(), 0);
    at::Tensor sums = at::stack({target_shifted, exp.sum(-1)}, -1).contiguous();
    if (comm.size() > 1) comm.all_reduce(sums)->wait();
    const at::Tensor sum_exp = sums.select(-1, 1);
    const at::Tensor loss = sum_exp.log() - sums.select(-1, 0);

    exp.div_(sum_exp.unsqueeze(-1));  // now the softmax of this rank's columns
    ctx->save_for_backward({exp, mine, column});
    ctx->saved_data["width"] = width;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& softmax = saved[0];
    const at::Tensor& mine = saved[1];
    const at::Tensor& column = saved[2];
    const std::int64_t width = ctx->saved_data["width"].toInt();
    at::Tensor grad = softmax.clone();
    grad.scatter_add_(-1, column.unsqueeze(-1), -mine.to(grad.scalar_type()).unsqueeze(-1));
    grad.mul_(grad_outputs[0].unsqueeze(-1));
    if (width > grad.size(-1)) grad = at::constant_pad_nd(grad, {0, width - grad.size(-1)});
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor vocab_parallel_cross_entropy(const at::Tensor& local_logits, const at::Tensor& target,
                                        std::int64_t vocab_size, collectives::Communicator& comm) {
  constexpr const char* kWhat = "vocab_parallel_cross_entropy";
  const VocabRange r = vocab_range(vocab_size, comm.rank(), comm.size());
  DTRAIN_CHECK_ARG(
      local_logits.defined() && local_logits.dim() >= 1 && local_logits.is_floating_point(), kWhat,
      ": expected floating-point logits [..., vocabulary block]");
  const std::int64_t width = local_logits.size(-1);
  DTRAIN_CHECK_ARG(width == r.size || width == r.padded, kWhat, ": rank ", comm.rank(), " of ",
                   comm.size(), " holds ", r.size, " of the ", vocab_size,
                   " vocabulary columns (padded: ", r.padded, "), got logits of width ", width);
  DTRAIN_CHECK_ARG(target.defined() && target.scalar_type() == at::kLong, kWhat,
                   ": expected int64 targets");
  const auto batch_shape = local_logits.sizes().slice(0, local_logits.dim() - 1);
  DTRAIN_CHECK_ARG(target.sizes() == batch_shape, kWhat, ": targets of shape ", target.sizes(),
                   " do not match logits of shape ", local_logits.sizes());
  if (target.numel() > 0) {
    const std::int64_t lo = target.min().item<std::int64_t>();
    const std::int64_t hi = target.max().item<std::int64_t>();
    DTRAIN_CHECK_ARG(lo >= 0 && hi < vocab_size, kWhat, ": targets must be in [0, ", vocab_size,
                     "), got values in [", lo, ", ", hi, "]");
  }
  return dtrain::detail::apply_autograd_function<VocabParallelCrossEntropyFunction>(
      local_logits, target, vocab_size, reinterpret_cast<std::int64_t>(&comm));
}

TensorSplit TensorSplit::over(const collectives::Communicator& comm, std::int64_t dim) {
  return TensorSplit{dim, comm.rank(), comm.size()};
}

namespace {

// The whole tensor's mask from `draw` (one bernoulli over the whole shape),
// this rank's part of it applied to `input`.
at::Tensor apply_dropout(const at::Tensor& input, double p, bool training, TensorSplit split,
                         const std::function<at::Tensor(std::vector<std::int64_t>, double)>& draw) {
  DTRAIN_CHECK_ARG(p >= 0 && p < 1, "tensor_parallel_dropout: p must be in [0, 1), got ", p);
  DTRAIN_CHECK_ARG(input.defined(), "tensor_parallel_dropout: the input is undefined");
  DTRAIN_CHECK_ARG(split.parts >= 1 && split.index >= 0 && split.index < split.parts,
                   "tensor_parallel_dropout: part ", split.index, " of ", split.parts,
                   " does not exist");
  DTRAIN_CHECK_ARG(split.parts == 1 || (split.dim >= 0 && split.dim < input.dim()),
                   "tensor_parallel_dropout: a split over ", split.parts,
                   " parts needs a dimension in [0, ", input.dim(), "), got ", split.dim);
  if (!training || p == 0) return input;
  std::vector<std::int64_t> shape = input.sizes().vec();
  if (split.parts > 1) shape[static_cast<std::size_t>(split.dim)] *= split.parts;
  at::Tensor mask = draw(std::move(shape), 1 - p);
  if (split.parts > 1) {
    const std::int64_t size = input.size(split.dim);
    mask = mask.narrow(split.dim, split.index * size, size);
  }
  return input * mask.mul_(1 / (1 - p));
}

}  // namespace

at::Tensor tensor_parallel_dropout(const at::Tensor& input, double p, bool training,
                                   RngStreams& rng, TensorSplit split) {
  return apply_dropout(input, p, training, split, [&](std::vector<std::int64_t> shape, double q) {
    auto scope = rng.fork(RngStream::kTensorShared);
    return at::empty(shape, input.options().requires_grad(false)).bernoulli_(q);
  });
}

at::Tensor tensor_parallel_dropout(const at::Tensor& input, double p, bool training,
                                   at::Generator& generator, TensorSplit split) {
  return apply_dropout(input, p, training, split, [&](std::vector<std::int64_t> shape, double q) {
    // Drawn on the generator's device, then moved to the input's.
    return at::empty(shape, input.options().device(generator.device()).requires_grad(false))
        .bernoulli_(q, generator)
        .to(input.device());
  });
}

}  // namespace dtrain::parallel
