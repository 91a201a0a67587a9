#include "dtrain/parallel/sync_batch_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "dtrain/error.h"
#include "src/common/torch_compat.h"

namespace dtrain::parallel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Why every per-channel sum is accumulated in double and rounded once.
//
// The normalized output feeds a ReLU (directly, or after the residual add),
// whose gradient is a step at 0. When two ways of splitting one global batch
// over ranks round a channel's mean or variance differently (float partial
// sums of 12, of 6 + 6 or of 4 + 4 + 4 samples do), the outputs move by a
// few ulps; an activation within a few ulps of 0 then changes side, and its
// gradient passes on one layout and is dropped on the other. A single such
// flip moved a ResNet-20 bias gradient by 0.35% (docs/ddp.md, SyncBatchNorm).
// Sums in double carry ~1e-16 relative error whatever the grouping, so the
// statistics round to the same float on every layout (all but certainly) and
// the normalized output is bitwise the same on 1, 2 or 3 ranks: no flips.
// The elementwise part stays in the input's dtype, one rounding per
// operation, so it cannot depend on the layout either.

std::vector<int64_t> channel_shape(const torch::Tensor& x) {
  std::vector<int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
  shape[1] = x.size(1);
  return shape;
}

std::vector<int64_t> reduce_dims(const torch::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

// Sums `t` (float64) over the communicator in place and returns it.
torch::Tensor sum_across(collectives::Communicator* comm, torch::Tensor t) {
  if (comm != nullptr && comm->size() > 1) comm->all_reduce(t)->wait();
  return t;
}

// out[c] = the sum over n and s of term(c, i), i = (n*C + c)*S + s indexing
// an [N, C, S] tensor, in double. One thread sums a whole channel in a fixed
// order (8 interleaved partial sums, which the compiler vectorizes, then a
// fixed tree), so the result does not depend on the intra-op thread count.
template <typename Term>
void per_channel_sums(int64_t n, int64_t c, int64_t s, double* out, const Term& term) {
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      std::array<double, 8> lanes{};
      double tail = 0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t base = (i * c + ch) * s;
        int64_t j = 0;
        for (; j + 8 <= s; j += 8) {
          for (int k = 0; k < 8; ++k) lanes[k] += term(ch, base + j + k);
        }
        for (; j < s; ++j) tail += term(ch, base + j);
      }
      out[ch] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + tail;
    }
  });
}

// CPU float32/float64 tensors are read in place; anything else (CUDA, half
// precision) goes through ATen in double, with the same result up to the
// order of the double additions.
bool read_in_place(const torch::Tensor& t) {
  return t.device().is_cpu() &&
         (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble);
}

// [C] float64 per-channel sums of an [N, C, ...] tensor: of x, of
// (x - mean)^2 when `mean` ([C] float64) is given, or of x * y when `y` is.
torch::Tensor channel_sums(const torch::Tensor& x, const torch::Tensor& mean,
                           const torch::Tensor& y) {
  if (!read_in_place(x) || (y.defined() && !read_in_place(y))) {
    torch::Tensor xd = x.to(torch::kDouble);
    if (mean.defined()) xd = (xd - mean.to(x.device()).view(channel_shape(x))).square();
    if (y.defined()) xd = xd * y.to(torch::kDouble);
    return xd.sum(reduce_dims(x));
  }
  const int64_t n = x.size(0);
  const int64_t c = x.size(1);
  const int64_t s = n * c == 0 ? 0 : x.numel() / (n * c);
  torch::Tensor out = torch::empty({c}, x.options().dtype(torch::kDouble));
  double* o = out.data_ptr<double>();
  const torch::Tensor xc = x.contiguous();
  const torch::Tensor yc = y.defined() ? y.contiguous().to(x.scalar_type()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "sync_batch_norm_sums", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    if (mean.defined()) {
      const double* m = mean.data_ptr<double>();
      per_channel_sums(n, c, s, o, [px, m](int64_t ch, int64_t i) {
        const double d = static_cast<double>(px[i]) - m[ch];
        return d * d;
      });
    } else if (yc.defined()) {
      const scalar_t* py = yc.data_ptr<scalar_t>();
      per_channel_sums(n, c, s, o, [px, py](int64_t, int64_t i) {
        return static_cast<double>(px[i]) * static_cast<double>(py[i]);
      });
    } else {
      per_channel_sums(n, c, s, o, [px](int64_t, int64_t i) { return static_cast<double>(px[i]); });
    }
  });
  return out;
}

// Runs body(channel, index of the row's first element) for each of the N*C
// rows of S contiguous elements of an [N, C, S] tensor, split over threads.
template <typename Body>
void for_each_row(int64_t n, int64_t c, int64_t s, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(s, 1));
  at::parallel_for(0, n * c, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) body(row % c, row * s);
  });
}

// The elementwise parts. On CPU float32/float64 each is one pass over the
// rows (ATen's operators would make four); elsewhere they are ATen ops. Both
// round once per operation, in the order written.
//
// Forward: xhat = (x - mean) * invstd, y = xhat * weight + bias ([C] tensors
// of x's dtype; no weight: y is xhat). Returns {xhat, y}.
std::pair<torch::Tensor, torch::Tensor> normalize(const torch::Tensor& x, const torch::Tensor& mean,
                                                  const torch::Tensor& invstd,
                                                  const torch::Tensor& weight,
                                                  const torch::Tensor& bias) {
  const bool affine = weight.defined();
  if (!read_in_place(x) || (affine && weight.scalar_type() != x.scalar_type())) {
    const auto shape = channel_shape(x);
    torch::Tensor xhat = (x - mean.view(shape)) * invstd.view(shape);
    return {xhat, affine ? xhat * weight.view(shape) + bias.view(shape) : xhat};
  }
  const torch::Tensor xc = x.contiguous();
  torch::Tensor xhat = torch::empty_like(xc);
  torch::Tensor y = affine ? torch::empty_like(xc) : xhat;
  const int64_t n = x.size(0);
  const int64_t c = x.size(1);
  const int64_t s = n * c == 0 ? 0 : x.numel() / (n * c);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "sync_batch_norm_normalize", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    scalar_t* ph = xhat.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    const scalar_t* pm = mean.data_ptr<scalar_t>();
    const scalar_t* pi = invstd.data_ptr<scalar_t>();
    const scalar_t* pw = affine ? weight.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pb = affine ? bias.data_ptr<scalar_t>() : nullptr;
    for_each_row(n, c, s, [&](int64_t ch, int64_t first) {
      const scalar_t m = pm[ch];
      const scalar_t is = pi[ch];
      if (pw == nullptr) {
        for (int64_t j = first; j < first + s; ++j) ph[j] = (px[j] - m) * is;
        return;
      }
      const scalar_t w = pw[ch];
      const scalar_t b = pb[ch];
      for (int64_t j = first; j < first + s; ++j) {
        const scalar_t h = (px[j] - m) * is;
        ph[j] = h;
        py[j] = h * w + b;
      }
    });
  });
  return {xhat, y};
}

// Backward: dx = ((g - mean_g) - xhat * mean_g_xhat) * scale ([C] tensors of
// g's dtype).
torch::Tensor input_gradient(const torch::Tensor& g, const torch::Tensor& xhat,
                             const torch::Tensor& mean_g, const torch::Tensor& mean_g_xhat,
                             const torch::Tensor& scale) {
  if (!read_in_place(g) || xhat.scalar_type() != g.scalar_type() ||
      scale.scalar_type() != g.scalar_type()) {
    const auto shape = channel_shape(g);
    return (g - mean_g.view(shape) - xhat * mean_g_xhat.view(shape)) * scale.view(shape);
  }
  const torch::Tensor gc = g.contiguous();
  const torch::Tensor hc = xhat.contiguous();
  torch::Tensor dx = torch::empty_like(gc);
  const int64_t n = g.size(0);
  const int64_t c = g.size(1);
  const int64_t s = n * c == 0 ? 0 : g.numel() / (n * c);
  AT_DISPATCH_FLOATING_TYPES(gc.scalar_type(), "sync_batch_norm_input_gradient", [&] {
    const scalar_t* pg = gc.data_ptr<scalar_t>();
    const scalar_t* ph = hc.data_ptr<scalar_t>();
    scalar_t* pd = dx.data_ptr<scalar_t>();
    const scalar_t* pmg = mean_g.data_ptr<scalar_t>();
    const scalar_t* pmh = mean_g_xhat.data_ptr<scalar_t>();
    const scalar_t* psc = scale.data_ptr<scalar_t>();
    for_each_row(n, c, s, [&](int64_t ch, int64_t first) {
      const scalar_t mg = pmg[ch];
      const scalar_t mh = pmh[ch];
      const scalar_t sc = psc[ch];
      for (int64_t j = first; j < first + s; ++j) pd[j] = ((pg[j] - mg) - ph[j] * mh) * sc;
    });
  });
  return dx;
}

// y = (x - mean) * invstd * weight + bias with statistics over every rank.
struct SyncBatchNormFunction : public torch::autograd::Function<SyncBatchNormFunction> {
  static variable_list forward(AutogradContext* ctx, torch::Tensor input, torch::Tensor weight,
                               torch::Tensor bias, torch::Tensor running_mean,
                               torch::Tensor running_var, double eps, double momentum,
                               int64_t comm_address) {
    auto* comm = reinterpret_cast<collectives::Communicator*>(comm_address);
    const int64_t channels = input.size(1);
    // Pass 1: global count and mean. Pass 2: global centred sum of squares
    // (two passes avoid the cancellation of E[x^2] - E[x]^2).
    torch::Tensor stats =
        torch::cat({channel_sums(input, {}, {}),
                    torch::full({1}, static_cast<double>(input.numel() / channels),
                                input.options().dtype(torch::kDouble))});
    sum_across(comm, stats);
    const double count = stats[channels].item<double>();
    DTRAIN_CHECK_ARG(count > 1,
                     "SyncBatchNorm: needs more than one value per channel across "
                     "the group in training, got ",
                     count);
    const torch::Tensor mean64 = stats.narrow(0, 0, channels) / count;
    const torch::Tensor var64 = sum_across(comm, channel_sums(input, mean64, {})) / count;
    const torch::Tensor mean = mean64.to(input.scalar_type());
    const torch::Tensor invstd = (var64 + eps).rsqrt().to(input.scalar_type());
    auto [xhat, output] = normalize(input, mean, invstd, weight, bias);
    {
      torch::NoGradGuard no_grad;
      running_mean.mul_(1 - momentum).add_(mean64.to(running_mean.scalar_type()), momentum);
      running_var.mul_(1 - momentum)
          .add_((var64 * (count / (count - 1))).to(running_var.scalar_type()), momentum);
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
    const int64_t channels = xhat.size(1);
    const torch::Tensor local = torch::cat({channel_sums(g, {}, {}), channel_sums(g, {}, xhat)});
    const torch::Tensor global = sum_across(comm, local.clone());
    const torch::Tensor mean_g = (global.narrow(0, 0, channels) / count).to(g.scalar_type());
    const torch::Tensor mean_g_xhat =
        (global.narrow(0, channels, channels) / count).to(g.scalar_type());
    const torch::Tensor scale = weight.defined() ? invstd * weight : invstd;
    torch::Tensor grad_input = input_gradient(g, xhat, mean_g, mean_g_xhat, scale);
    // The affine parameters' gradients are this rank's own; DDP averages them.
    torch::Tensor grad_weight;
    torch::Tensor grad_bias;
    if (weight.defined()) {
      grad_weight = local.narrow(0, channels, channels).to(weight.scalar_type());
      grad_bias = local.narrow(0, 0, channels).to(weight.scalar_type());
    }
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
