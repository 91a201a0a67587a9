// SyncBatchNorm computes the same thing however the global batch is split:
// one rank, or k ranks with consecutive slices of it. The statistics are
// summed in double and rounded once, so the normalized output is bitwise the
// same on every layout; a trained ResNet then takes the same step on 1, 2
// and 3 ranks (no ReLU mask flips between layouts, see docs/ddp.md).
//
// Each test runs every layout k = 1 .. world size in turn: ranks below k form
// the group, the others wait; rank 0 takes part in all and compares.

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/parallel/distributed_data_parallel.h"
#include "dtrain/parallel/sync_batch_norm.h"
#include "examples/resnet/resnet.h"
#include "src/common/torch_compat.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::parallel {
namespace {

using dtrain::testing::world;

constexpr int64_t kGlobalBatch = 12;  // divisible by 1, 2, 3 and 4 (the largest world)

// The first k ranks of the world (nullptr on the others).
std::shared_ptr<collectives::Communicator> first_ranks(int k, const std::string& name) {
  auto& w = world();
  return w.split(w.rank() < k ? 0 : -1, w.rank(), {name + "/k" + std::to_string(k), std::nullopt});
}

torch::Tensor local_part(const torch::Tensor& t, const collectives::Communicator& comm) {
  const int64_t b = t.size(0) / comm.size();
  return t.narrow(0, comm.rank() * b, b);
}

// Every rank's slice, concatenated in rank order (the global tensor).
torch::Tensor gather(const torch::Tensor& local, collectives::Communicator& comm) {
  std::vector<int64_t> shape = local.sizes().vec();
  shape[0] *= comm.size();
  torch::Tensor all = torch::empty(shape, local.options());
  comm.all_gather(all, local.contiguous())->wait();
  return all;
}

// Largest per-tensor relative difference ||a - b|| / ||b|| (and its name).
std::pair<double, std::string> max_relative(const std::map<std::string, torch::Tensor>& a,
                                            const std::map<std::string, torch::Tensor>& b) {
  std::pair<double, std::string> worst{0.0, ""};
  for (const auto& [name, x] : a) {
    const torch::Tensor y = b.at(name).to(torch::kDouble);
    const double norm = y.norm().item<double>();
    const double rel = (x.to(torch::kDouble) - y).norm().item<double>() / (norm > 0 ? norm : 1.0);
    if (rel > worst.first) worst = {rel, name};
  }
  return worst;
}

struct LayerResult {
  torch::Tensor output, grad_input, grad_weight, grad_bias, running_mean, running_var;
};

// SyncBatchNorm alone on one global batch (input and output gradient), split
// over k ranks.
LayerResult run_layer(int k, const torch::Tensor& x, const torch::Tensor& dy) {
  auto comm = first_ranks(k, "sbn-layer");
  if (!comm) return {};
  SyncBatchNorm bn(SyncBatchNormOptions{x.size(1)}, comm);
  {
    torch::NoGradGuard no_grad;
    bn->weight.uniform_(0.5, 1.5);  // same values on every rank: the RNG is seeded alike
    bn->bias.uniform_(-0.5, 0.5);
  }
  auto input = local_part(x, *comm).clone().requires_grad_(true);
  auto output = bn->forward(input);
  output.backward(local_part(dy, *comm));
  LayerResult r;
  r.output = gather(output.detach(), *comm);
  r.grad_input = gather(input.grad(), *comm);
  r.grad_weight = bn->weight.grad().clone();
  r.grad_bias = bn->bias.grad().clone();
  comm->all_reduce(r.grad_weight)->wait();  // what DDP sums (and averages)
  comm->all_reduce(r.grad_bias)->wait();
  r.running_mean = bn->running_mean.clone();
  r.running_var = bn->running_var.clone();
  return r;
}

TEST(SyncBatchNormTest, OutputIsBitwiseTheSameOnEveryLayout) {
  for (std::vector<int64_t> shape :
       {std::vector<int64_t>{kGlobalBatch, 24, 9, 9}, std::vector<int64_t>{kGlobalBatch, 7}}) {
    torch::manual_seed(5);
    // An offset and spread unlike 0/1, so that the sums round.
    const torch::Tensor x = torch::randn(shape) * 0.37 + 2.9;
    const torch::Tensor dy = torch::randn(shape);
    std::vector<LayerResult> results;  // on 1, 2, .. world size ranks
    for (int k = 1; k <= world().size(); ++k) {
      torch::manual_seed(6);
      results.push_back(run_layer(k, x, dy));
    }
    if (world().rank() != 0) continue;
    const LayerResult& one = results.front();
    // Against float64 autograd of the textbook formula.
    const torch::Tensor xd = x.to(torch::kDouble).requires_grad_(true);
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
    const auto mean = xd.mean(dims, true);
    const auto var = (xd - mean).square().mean(dims, true);
    std::vector<int64_t> cshape(static_cast<std::size_t>(x.dim()), 1);
    cshape[1] = x.size(1);
    torch::manual_seed(6);
    const auto w = torch::empty({x.size(1)}).uniform_(0.5, 1.5).to(torch::kDouble);
    const auto b = torch::empty({x.size(1)}).uniform_(-0.5, 0.5).to(torch::kDouble);
    const auto y = (xd - mean) / (var + 1e-5).sqrt() * w.view(cshape) + b.view(cshape);
    y.backward(dy.to(torch::kDouble));
    EXPECT_LT((one.output.to(torch::kDouble) - y).abs().max().item<double>(), 2e-6);
    EXPECT_LT((one.grad_input.to(torch::kDouble) - xd.grad()).abs().max().item<double>(), 2e-5);

    for (std::size_t i = 1; i < results.size(); ++i) {
      const LayerResult& r = results[i];
      const std::string layout = std::to_string(i + 1) + " ranks";
      EXPECT_TRUE(torch::equal(r.output, one.output))
          << layout << ": output differs from 1 rank by up to "
          << (r.output - one.output).abs().max().item<double>();
      EXPECT_TRUE(torch::equal(r.grad_input, one.grad_input))
          << layout << ": input gradient differs from 1 rank by up to "
          << (r.grad_input - one.grad_input).abs().max().item<double>();
      EXPECT_TRUE(torch::equal(r.running_mean, one.running_mean)) << layout;
      EXPECT_TRUE(torch::equal(r.running_var, one.running_var)) << layout;
      // Per-rank sums of the affine gradients, added in float by the all-reduce.
      EXPECT_TRUE(torch::allclose(r.grad_weight, one.grad_weight, 1e-6, 1e-6)) << layout;
      EXPECT_TRUE(torch::allclose(r.grad_bias, one.grad_bias, 1e-6, 1e-6)) << layout;
    }
  }
}

// Inputs that cannot be read in place (CUDA tensors, or here bfloat16 on
// the CPU) take the ATen path; it computes the same thing.
TEST(SyncBatchNormTest, AtenPathMatchesTheInPlacePath) {
  torch::manual_seed(8);
  const torch::Tensor x = torch::randn({6, 5, 4, 4}) * 0.5 + 1.5;
  const torch::Tensor dy = torch::randn({6, 5, 4, 4});
  auto run = [&](torch::ScalarType dtype) {
    SyncBatchNorm bn(SyncBatchNormOptions{5}, nullptr);
    bn->to(dtype);
    auto input = x.to(dtype).clone().requires_grad_(true);
    auto output = bn->forward(input);
    output.backward(dy.to(dtype));
    return std::vector<torch::Tensor>{output.to(torch::kFloat), input.grad().to(torch::kFloat),
                                      bn->running_var.to(torch::kFloat)};
  };
  const auto in_place = run(torch::kFloat);
  const auto aten = run(torch::kBFloat16);
  for (std::size_t i = 0; i < in_place.size(); ++i) {
    EXPECT_TRUE(torch::allclose(aten[i], in_place[i], 0.05, 0.05))
        << i << ": max difference " << (aten[i] - in_place[i]).abs().max().item<double>();
  }
}

// --- a trained ResNet takes the same step on every layout -------------------

struct Snapshot {
  std::map<std::string, torch::Tensor> weights;  // parameters and buffers
  std::map<std::string, torch::Tensor> momentum;
};

struct Batch {
  torch::Tensor x, y;
};

// Random 1x28x28 images: ResNet-20 then has 1.7M BatchNorm outputs per
// step, enough that per-layout rounding flips a ReLU now and then. With the
// former float sums (and BatchNorm2d on one rank), this seed's ninth step
// flipped one between 1 and 2 ranks: 1.4e-3 in the momentum (3 of the seeds
// 1-10 flipped one).
std::vector<Batch> make_batches(int steps) {
  torch::manual_seed(4);
  std::vector<Batch> out;
  for (int i = 0; i < steps; ++i) {
    out.push_back({torch::randn({kGlobalBatch, 1, 28, 28}),
                   torch::randint(0, 10, {kGlobalBatch}, torch::kLong)});
  }
  return out;
}

// ResNet-20 for 1x28x28 images with SyncBatchNorm over `comm` (the factory
// dtrain-resnet uses with --sync-bn, on any number of ranks) trained from
// `start` (or its initialization) on `batches`, as the trainer does: DDP,
// SGD with Nesterov momentum and weight decay.
Snapshot train(std::shared_ptr<collectives::Communicator> comm, const Snapshot* start,
               const std::vector<Batch>& batches) {
  auto bn_comm = comm->split(0, comm->rank(), {"sbn-resnet/bn", std::nullopt});
  torch::manual_seed(7);
  auto model = resnet::make_resnet("resnet20", 1, 10, false, resnet::sync_batch_norm_2d(bn_comm));
  torch::optim::SGD sgd(
      model->parameters(),
      torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(5e-4));
  if (start != nullptr) {
    torch::NoGradGuard no_grad;
    for (auto& item : model->named_parameters()) {
      item.value().copy_(start->weights.at(item.key()));
      auto state = std::make_unique<torch::optim::SGDParamState>();
      state->momentum_buffer(start->momentum.at(item.key()).clone());
      sgd.state()[dtrain::detail::optimizer_state_key(item.value())] = std::move(state);
    }
    for (auto& item : model->named_buffers()) item.value().copy_(start->weights.at(item.key()));
  }
  DistributedDataParallel ddp(model.ptr(), comm);
  model->train();
  for (const Batch& batch : batches) {
    ddp.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(local_part(batch.x, *comm)),
                                         local_part(batch.y, *comm))
        .backward();
    ddp.synchronize();
    sgd.step();
  }
  Snapshot out;
  for (const auto& item : model->named_parameters()) {
    out.weights[item.key()] = item.value().detach().clone();
    const auto& state = static_cast<const torch::optim::SGDParamState&>(
        *sgd.state().at(dtrain::detail::optimizer_state_key(item.value())));
    out.momentum[item.key()] = state.momentum_buffer().clone();
  }
  for (const auto& item : model->named_buffers()) {
    out.weights[item.key()] = item.value().detach().clone();
  }
  return out;
}

TEST(SyncBatchNormTest, TrainedResNetTakesTheSameStepOnOneTwoAndThreeRanks) {
  at::set_num_threads(1);  // as dtrain-resnet's default --threads
  const auto batches = make_batches(9);
  const std::vector<Batch> first_eight(batches.begin(), batches.begin() + 8);
  // Eight steps on one rank (each rank alone), then rank 0's state
  // everywhere: the same start whatever the world size.
  auto self = world().split(world().rank(), 0, {"sbn-resnet/self", std::nullopt});
  Snapshot trained = train(self, nullptr, first_eight);
  for (auto* part : {&trained.weights, &trained.momentum}) {
    for (auto& item : *part) world().broadcast(item.second)->wait();
  }

  std::vector<Snapshot> next;  // the ninth step on 1, 2, 3 ranks (rank 0 keeps them)
  std::vector<int> layouts;
  for (int k = 1; k <= std::min(3, world().size()); ++k) {
    auto comm = first_ranks(k, "sbn-resnet");
    if (comm) next.push_back(train(comm, &trained, {batches[8]}));
    layouts.push_back(k);
  }
  if (world().rank() != 0) return;
  for (std::size_t i = 1; i < next.size(); ++i) {
    const auto momentum = max_relative(next[i].momentum, next[0].momentum);
    const auto weights = max_relative(next[i].weights, next[0].weights);
    std::printf("[ sync-bn ] step 9 on %d rank(s) vs 1: momentum %.3g (%s), weights %.3g (%s)\n",
                layouts[i], momentum.first, momentum.second.c_str(), weights.first,
                weights.second.c_str());
    EXPECT_LT(momentum.first, 1e-5) << layouts[i] << " ranks vs 1: " << momentum.second;
    EXPECT_LT(weights.first, 1e-5) << layouts[i] << " ranks vs 1: " << weights.second;
  }
}

}  // namespace
}  // namespace dtrain::parallel
