#include "dtrain/parallel/sync_batch_norm.h"

#include <torch/autograd.h>
#include <torch/torch.h>

#include <cstdint>

#include "dtrain/error.h"
#include "src/common/torch_compat.h"

namespace dtrain::parallel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Sums `t` over the communicator (in place) and returns it.
torch::Tensor sum_across(collectives::Communicator* comm, torch::Tensor t) {
  if (comm != nullptr && comm->size() > 1) comm->all_reduce(t)->wait();
  return t;
}

std::vector<int64_t> reduce_dims(const torch::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::vector<int64_t> channel_shape(const torch::Tensor& x) {
  std::vector<int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
  shape[1] = x.size(1);
  return shape;
}

// y = (x - mean) * invstd * weight + bias with statistics over every rank.
struct SyncBatchNormFunction : public torch::autograd::Function<SyncBatchNormFunction> {
  static variable_list forward(AutogradContext* ctx, torch::Tensor input, torch::Tensor weight,
                               torch::Tensor bias, torch::Tensor running_mean,
                               torch::Tensor running_var, double eps, double momentum,
                               int64_t comm_address) {
    auto* comm = reinterpret_cast<collectives::Communicator*>(comm_address);
    const auto dims = reduce_dims(input);
    const auto shape = channel_shape(input);
    const int64_t channels = input.size(1);
    // Pass 1: global count and mean. Pass 2: global centred sum of squares
    // (two passes avoid the cancellation of E[x^2] - E[x]^2).
    torch::Tensor stats = torch::cat(
        {input.sum(dims).to(torch::kDouble),
         torch::full({1}, static_cast<double>(input.numel() / channels), torch::kDouble)});
    sum_across(comm, stats);
    const double count = stats[channels].item<double>();
    DTRAIN_CHECK_ARG(count > 1,
                     "SyncBatchNorm: needs more than one value per channel across "
                     "the group in training, got ",
                     count);
    torch::Tensor mean = (stats.narrow(0, 0, channels) / count).to(input.scalar_type());
    torch::Tensor centred = input - mean.view(shape);
    torch::Tensor sq = sum_across(comm, (centred * centred).sum(dims).to(torch::kDouble));
    torch::Tensor var = (sq / count).to(input.scalar_type());
    torch::Tensor invstd = (var + eps).rsqrt();
    torch::Tensor xhat = centred * invstd.view(shape);
    torch::Tensor output = weight.defined() ? xhat * weight.view(shape) + bias.view(shape) : xhat;
    {
      torch::NoGradGuard no_grad;
      running_mean.mul_(1 - momentum).add_(mean, momentum);
      running_var.mul_(1 - momentum).add_(var * (count / (count - 1)), momentum);
    }
    ctx->save_for_backward({xhat, invstd, weight});
    ctx->saved_data["comm"] = comm_address;
    ctx->saved_data["count"] = count;
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor& xhat = saved[0];
    const torch::Tensor& invstd = saved[1];
    const torch::Tensor& weight = saved[2];
    auto* comm = reinterpret_cast<collectives::Communicator*>(ctx->saved_data["comm"].toInt());
    const double count = ctx->saved_data["count"].toDouble();
    const torch::Tensor& g = grad_outputs[0];
    const auto dims = reduce_dims(xhat);
    const auto shape = channel_shape(xhat);
    const int64_t channels = xhat.size(1);
    torch::Tensor local_sum_g = g.sum(dims);
    torch::Tensor local_sum_g_xhat = (g * xhat).sum(dims);
    torch::Tensor both = sum_across(comm, torch::cat({local_sum_g, local_sum_g_xhat}));
    torch::Tensor mean_g = both.narrow(0, 0, channels) / count;
    torch::Tensor mean_g_xhat = both.narrow(0, channels, channels) / count;
    torch::Tensor scale = weight.defined() ? invstd * weight : invstd;
    torch::Tensor grad_input =
        (g - mean_g.view(shape) - xhat * mean_g_xhat.view(shape)) * scale.view(shape);
    // The affine parameters' gradients are this rank's own; DDP averages them.
    torch::Tensor grad_weight = weight.defined() ? local_sum_g_xhat : torch::Tensor();
    torch::Tensor grad_bias = weight.defined() ? local_sum_g : torch::Tensor();
    return {grad_input,      grad_weight,     grad_bias,       torch::Tensor(),
            torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

SyncBatchNormImpl::SyncBatchNormImpl(SyncBatchNormOptions options_,
                                     std::shared_ptr<collectives::Communicator> comm_)
    : options(options_), comm(std::move(comm_)) {
  reset();
}

void SyncBatchNormImpl::reset() {
  DTRAIN_CHECK_ARG(options.num_features > 0, "SyncBatchNorm: num_features must be > 0, got ",
                   options.num_features);
  DTRAIN_CHECK_ARG(options.eps > 0, "SyncBatchNorm: eps must be > 0");
  if (options.affine) {
    weight = register_parameter("weight", torch::ones({options.num_features}));
    bias = register_parameter("bias", torch::zeros({options.num_features}));
  }
  running_mean = register_buffer("running_mean", torch::zeros({options.num_features}));
  running_var = register_buffer("running_var", torch::ones({options.num_features}));
  num_batches_tracked = register_buffer("num_batches_tracked", torch::zeros({}, torch::kLong));
}

torch::Tensor SyncBatchNormImpl::forward(const torch::Tensor& input) {
  DTRAIN_CHECK_ARG(input.dim() >= 2 && input.size(1) == options.num_features,
                   "SyncBatchNorm: expected input [N, ", options.num_features, ", ...], got ",
                   input.sizes());
  const auto shape = channel_shape(input);
  if (!is_training()) {
    torch::Tensor y =
        (input - running_mean.view(shape)) * (running_var + options.eps).rsqrt().view(shape);
    return options.affine ? y * weight.view(shape) + bias.view(shape) : y;
  }
  {
    torch::NoGradGuard no_grad;
    num_batches_tracked.add_(1);
  }
  return dtrain::detail::apply_autograd_function<SyncBatchNormFunction>(
      input, weight, bias, running_mean, running_var, options.eps, options.momentum,
      reinterpret_cast<int64_t>(comm.get()))[0];
}

}  // namespace dtrain::parallel
