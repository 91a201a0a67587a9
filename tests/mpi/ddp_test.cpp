// DistributedDataParallel against one process: N ranks with per-rank batch b
// must end with the parameters of one process trained on the N*b global
// batch; accumulation, rank-dependent gradient order, unused parameters,
// mismatched models and determinism.

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "dtrain/parallel/distributed_data_parallel.h"
#include "dtrain/parallel/sync_batch_norm.h"
#include "dtrain/parallel/zero_optimizer.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::parallel {
namespace {

using dtrain::testing::runtime;

std::shared_ptr<collectives::Communicator> dp_comm(const std::string& name) {
  collectives::CommunicatorOptions options;
  options.name = name;
  options.timeout = std::chrono::seconds(60);
  return runtime().world(options);
}

torch::nn::Sequential make_mlp(int hidden = 32) {
  return torch::nn::Sequential(torch::nn::Linear(20, hidden), torch::nn::ReLU(),
                               torch::nn::Linear(hidden, 16), torch::nn::ReLU(),
                               torch::nn::Linear(16, 5));
}

torch::nn::Sequential make_cnn() {
  return torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3)),
                               torch::nn::ReLU(),
                               torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 8, 3).stride(2)),
                               torch::nn::ReLU(), torch::nn::Flatten(), torch::nn::Linear(72, 5));
}

struct Batch {
  torch::Tensor x;
  torch::Tensor y;
};

// The same global batches on every rank.
std::vector<Batch> make_batches(int steps, int global_batch, std::vector<std::int64_t> shape) {
  torch::manual_seed(1234);
  std::vector<Batch> out;
  shape.insert(shape.begin(), global_batch);
  for (int i = 0; i < steps; ++i) {
    out.push_back({torch::randn(shape), torch::randint(0, 5, {global_batch}, torch::kLong)});
  }
  return out;
}

torch::Tensor local_part(const torch::Tensor& t, int rank, int world) {
  const std::int64_t b = t.size(0) / world;
  return t.narrow(0, rank * b, b);
}

// Cross-entropy of `model` on this rank's share of a global batch.
template <typename Model>
torch::Tensor local_loss(Model& model, const Batch& batch, const collectives::Communicator& comm) {
  return torch::nn::functional::cross_entropy(
      model->forward(local_part(batch.x, comm.rank(), comm.size())),
      local_part(batch.y, comm.rank(), comm.size()));
}

void expect_same_parameters(torch::nn::Module& a, torch::nn::Module& b, double rtol) {
  auto pa = a.named_parameters();
  auto pb = b.named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& item : pa) {
    const torch::Tensor& x = item.value();
    const torch::Tensor& y = pb[item.key()];
    EXPECT_TRUE(torch::allclose(x, y, rtol, 1e-6))
        << item.key() << ": max difference " << (x - y).abs().max().item<double>();
  }
}

// Inside no_sync() backward must leave each rank's own gradients alone:
// `model`'s (DDP's bucket views) must equal those of `local`, a copy of the
// model without DDP that saw the same micro-batches. Averaged over the ranks
// instead, they would differ, since every rank has different samples.
void expect_local_gradients(torch::nn::Module& model, torch::nn::Module& local, int micro) {
  auto pm = model.named_parameters();
  auto pl = local.named_parameters();
  ASSERT_EQ(pm.size(), pl.size());
  for (const auto& item : pm) {
    const torch::Tensor g = item.value().grad();
    const torch::Tensor want = pl[item.key()].grad();
    ASSERT_TRUE(g.defined() && want.defined()) << item.key();
    EXPECT_TRUE(torch::allclose(g, want, 1e-5, 1e-7))
        << item.key() << " after no_sync micro-batch " << micro
        << ": not this rank's own gradient (max difference "
        << (g - want).abs().max().item<double>() << "); was it all-reduced?";
  }
}

// Trains `model` with DDP on this rank's share and `reference` on the whole
// batch, `accumulate` micro-batches per step (checking, in between, that
// no_sync() kept the gradients local).
void train_both(torch::nn::Sequential model, torch::nn::Sequential reference,
                const std::vector<Batch>& batches, DdpOptions options, int accumulate = 1) {
  auto comm = dp_comm("ddp");
  const int world = comm->size();
  const int rank = comm->rank();
  DistributedDataParallel ddp(model.ptr(), comm, options);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD ref_opt(reference->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (std::size_t step = 0; step + accumulate <= batches.size(); step += accumulate) {
    ddp.zero_grad();
    // This step's starting point, without DDP, for the no_sync() check.
    std::shared_ptr<torch::nn::SequentialImpl> local;
    if (accumulate > 1) {
      local = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
      ASSERT_NE(local, nullptr);
    }
    for (int micro = 0; micro < accumulate; ++micro) {
      const Batch& batch = batches[step + micro];
      const auto micro_loss = [&](torch::nn::Sequential& m) {
        return torch::nn::functional::cross_entropy(m->forward(local_part(batch.x, rank, world)),
                                                    local_part(batch.y, rank, world)) /
               accumulate;
      };
      auto loss = micro_loss(model);
      if (micro + 1 < accumulate) {
        {
          auto guard = ddp.no_sync();
          loss.backward();
        }
        torch::nn::Sequential local_model(local);
        micro_loss(local_model).backward();
        expect_local_gradients(*model, *local, micro);
      } else {
        loss.backward();
      }
    }
    ddp.synchronize();
    opt.step();

    ref_opt.zero_grad();
    std::vector<torch::Tensor> xs;
    std::vector<torch::Tensor> ys;
    for (int micro = 0; micro < accumulate; ++micro) {
      xs.push_back(batches[step + micro].x);
      ys.push_back(batches[step + micro].y);
    }
    torch::nn::functional::cross_entropy(reference->forward(torch::cat(xs)), torch::cat(ys))
        .backward();
    ref_opt.step();
  }
}

template <typename Make>
void check_matches_single_process(Make make, std::vector<std::int64_t> sample_shape,
                                  DdpOptions options, int accumulate = 1) {
  const int world = runtime().size();
  torch::manual_seed(7);
  auto model = make();
  auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  ASSERT_NE(reference, nullptr);
  const int per_rank = 4;
  auto batches = make_batches(6, world * per_rank, sample_shape);
  train_both(model, torch::nn::Sequential(reference), batches, options, accumulate);
  expect_same_parameters(*model, *reference, 1e-5);
}

TEST(DdpTest, MlpMatchesOneProcessWithTheGlobalBatch) {
  check_matches_single_process([] { return make_mlp(); }, {20}, DdpOptions{});
}

TEST(DdpTest, CnnMatchesOneProcessWithTheGlobalBatch) {
  check_matches_single_process([] { return make_cnn(); }, {1, 10, 10}, DdpOptions{});
}

TEST(DdpTest, TinyBucketsAndNoOverlapGiveTheSameResult) {
  DdpOptions options;
  options.first_bucket_cap_bytes = 64;
  options.bucket_cap_bytes = 512;
  check_matches_single_process([] { return make_mlp(); }, {20}, options);
  options.overlap = false;
  check_matches_single_process([] { return make_mlp(); }, {20}, options);
}

TEST(DdpTest, AccumulationWithNoSyncEqualsTheLargeBatch) {
  check_matches_single_process([] { return make_mlp(); }, {20}, DdpOptions{}, /*accumulate=*/3);
}

TEST(DdpTest, BucketsAreReverseRegistrationOrderWithASmallFirstBucket) {
  torch::manual_seed(7);
  auto model = make_mlp();
  DdpOptions options;
  options.first_bucket_cap_bytes = 16 * 5 * 4 + 5 * 4;  // exactly the last Linear
  options.bucket_cap_bytes = 1 << 20;
  DistributedDataParallel ddp(model.ptr(), dp_comm("layout"), options);
  const auto layout = ddp.bucket_layout();
  ASSERT_EQ(layout.size(), 2u);
  EXPECT_EQ(layout[0], (std::vector<std::string>{"4.bias", "4.weight"}));
  EXPECT_EQ(layout[1].front(), "2.bias");
  EXPECT_EQ(layout[1].back(), "0.weight");
  // Gradients are views into the buckets.
  for (const auto& p : model->parameters()) EXPECT_TRUE(p.grad().defined());
}

// Two branches whose gradients arrive in a rank-dependent order.
struct TwoBranch : torch::nn::Module {
  TwoBranch() {
    a = register_module("a", torch::nn::Linear(20, 5));
    b = register_module("b", torch::nn::Linear(20, 5));
  }
  torch::Tensor forward(const torch::Tensor& x, bool a_first) {
    if (a_first) {
      auto ya = a->forward(x);
      return ya + b->forward(x);
    }
    auto yb = b->forward(x);
    return a->forward(x) + yb;
  }
  torch::nn::Linear a{nullptr};
  torch::nn::Linear b{nullptr};
};

TEST(DdpTest, RankDependentReadinessStillLaunchesInBucketOrder) {
  auto comm = dp_comm("order");
  torch::manual_seed(3);
  auto model = std::make_shared<TwoBranch>();
  DdpOptions options;
  options.first_bucket_cap_bytes = 20;  // one parameter per bucket
  options.bucket_cap_bytes = 20;
  DistributedDataParallel ddp(model, comm, options);
  auto batches = make_batches(1, 4 * comm->size(), {20});
  ddp.zero_grad();
  auto out =
      model->forward(local_part(batches[0].x, comm->rank(), comm->size()), comm->rank() % 2 == 0);
  torch::nn::functional::cross_entropy(out, local_part(batches[0].y, comm->rank(), comm->size()))
      .backward();
  ddp.synchronize();
  const auto& order = ddp.last_launch_order();
  ASSERT_EQ(order.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(order[i], i);
  // And the gradients equal the global-batch gradient of a single process.
  torch::manual_seed(3);
  auto reference = std::make_shared<TwoBranch>();
  torch::nn::functional::cross_entropy(reference->forward(batches[0].x, true), batches[0].y)
      .backward();
  EXPECT_TRUE(torch::allclose(model->a->weight.grad(), reference->a->weight.grad(), 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(model->b->bias.grad(), reference->b->bias.grad(), 1e-5, 1e-6));
}

struct WithUnused : torch::nn::Module {
  WithUnused() {
    used = register_module("used", torch::nn::Linear(20, 5));
    unused = register_module("unused", torch::nn::Linear(20, 5));
  }
  torch::Tensor forward(const torch::Tensor& x) { return used->forward(x); }
  torch::nn::Linear used{nullptr};
  torch::nn::Linear unused{nullptr};
};

TEST(DdpTest, UnusedParameterIsAnErrorNamingItAndTheOption) {
  auto comm = dp_comm("unused");
  auto model = std::make_shared<WithUnused>();
  DistributedDataParallel ddp(model, comm);
  auto batches = make_batches(1, 4 * comm->size(), {20});
  ddp.zero_grad();
  auto loss = torch::nn::functional::cross_entropy(model->forward(batches[0].x), batches[0].y);
  try {
    loss.backward();
    ddp.synchronize();
    FAIL() << "expected an error about the unused parameter";
  } catch (const std::exception& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("unused."), std::string::npos) << message;
    EXPECT_NE(message.find("find_unused_parameters"), std::string::npos) << message;
  }
}

TEST(DdpTest, UnusedParametersCountAsZeroWithTheOption) {
  auto comm = dp_comm("unused-ok");
  torch::manual_seed(5);
  auto model = std::make_shared<WithUnused>();
  const torch::Tensor before = model->unused->weight.detach().clone();
  DdpOptions options;
  options.find_unused_parameters = true;
  DistributedDataParallel ddp(model, comm, options);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
  auto batches = make_batches(3, 4 * comm->size(), {20});
  for (const Batch& batch : batches) {
    ddp.zero_grad();
    local_loss(model, batch, *comm).backward();
    ddp.synchronize();
    opt.step();
  }
  EXPECT_TRUE(torch::equal(model->unused->weight, before));
}

TEST(DdpTest, DifferentModelsAcrossRanksAreRejectedNamingTheParameter) {
  auto comm = dp_comm("mismatch");
  if (comm->size() == 1) GTEST_SKIP() << "needs two ranks";
  auto model = make_mlp(comm->rank() == comm->size() - 1 ? 33 : 32);
  try {
    DistributedDataParallel ddp(model.ptr(), comm);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("0.weight"), std::string::npos) << message;
  }
}

TEST(DdpTest, CompressedGradientsStayCloseAndTrainingConverges) {
  for (GradientCompression compression :
       {GradientCompression::kBFloat16, GradientCompression::kFloat16}) {
    auto comm = dp_comm("compressed");
    torch::manual_seed(7);
    auto model = make_mlp();
    auto exact = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
    DdpOptions options;
    options.compression = compression;
    DistributedDataParallel ddp(model.ptr(), comm, options);
    torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
    // A learnable task: labels are a fixed function of the inputs.
    torch::manual_seed(99);
    auto x = torch::randn({64 * comm->size(), 20});
    auto y = x.narrow(1, 0, 5).argmax(1);
    auto local_x = local_part(x, comm->rank(), comm->size());
    auto local_y = local_part(y, comm->rank(), comm->size());
    float first_loss = 0;
    float last_loss = 0;
    for (int step = 0; step < 60; ++step) {
      ddp.zero_grad();
      auto loss = torch::nn::functional::cross_entropy(model->forward(local_x), local_y);
      loss.backward();
      ddp.synchronize();
      if (step == 0) {
        // The first gradient equals the exact global gradient within 16-bit precision.
        torch::nn::functional::cross_entropy(exact->forward(x), y).backward();
        auto params = model->parameters();
        auto exact_params = exact->parameters();
        for (std::size_t i = 0; i < params.size(); ++i) {
          const double scale = exact_params[i].grad().abs().max().item<double>() + 1e-12;
          EXPECT_LT((params[i].grad() - exact_params[i].grad()).abs().max().item<double>() / scale,
                    2e-2);
        }
        first_loss = loss.item<float>();
      }
      last_loss = loss.item<float>();
      opt.step();
    }
    EXPECT_LT(last_loss, 0.5f * first_loss) << "first " << first_loss << " last " << last_loss;
  }
}

// A CNN with batch normalization: SyncBatchNorm (over `bn_comm`) or, for the
// single-process reference, LibTorch's BatchNorm2d. Same initialization.
torch::nn::Sequential make_bn_cnn(std::shared_ptr<collectives::Communicator> bn_comm) {
  auto bn = [&](int64_t c) -> torch::nn::AnyModule {
    if (bn_comm) return torch::nn::AnyModule(SyncBatchNorm(SyncBatchNormOptions{c}, bn_comm));
    return torch::nn::AnyModule(torch::nn::BatchNorm2d(c));
  };
  torch::nn::Sequential net;
  net->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3)));
  net->push_back(bn(4));
  net->push_back(torch::nn::ReLU());
  net->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 8, 3).stride(2)));
  net->push_back(bn(8));
  net->push_back(torch::nn::ReLU());
  net->push_back(torch::nn::Flatten());
  net->push_back(torch::nn::Linear(72, 5));
  return net;
}

TEST(DdpTest, SyncBatchNormCnnMatchesOneProcessWithTheGlobalBatch) {
  auto comm = dp_comm("ddp-bn");
  auto bn_comm = comm->split(0, comm->rank(), {"ddp-bn/syncbn", std::nullopt});
  torch::manual_seed(21);
  auto model = make_bn_cnn(bn_comm);
  torch::manual_seed(21);
  auto reference = make_bn_cnn(nullptr);
  auto batches = make_batches(4, 4 * comm->size(), {1, 10, 10});
  train_both(model, reference, batches, DdpOptions{});
  expect_same_parameters(*model, *reference, 1e-4);
  auto buffers = model->named_buffers();
  for (const auto& item : reference->named_buffers()) {
    EXPECT_TRUE(torch::allclose(buffers[item.key()].to(torch::kDouble),
                                item.value().to(torch::kDouble), 1e-4, 1e-5))
        << item.key();
  }
  // Evaluation uses the running statistics, like BatchNorm2d.
  model->eval();
  reference->eval();
  EXPECT_TRUE(
      torch::allclose(model->forward(batches[0].x), reference->forward(batches[0].x), 1e-4, 1e-5));
}

// ZeRO-1 against one process with the same optimizer on the global batch.
template <typename MakeOptimizer>
void check_zero_matches(MakeOptimizer make_optimizer, const char* what) {
  auto comm = dp_comm(std::string("zero-") + what);
  torch::manual_seed(13);
  auto model = make_mlp();
  auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  ZeroRedundancyOptimizer zero(model.ptr(), comm, [&](std::vector<torch::Tensor> shard) {
    return make_optimizer(std::move(shard));
  });
  auto ref_opt = make_optimizer(reference->parameters());
  auto batches = make_batches(5, 4 * comm->size(), {20});
  for (const Batch& batch : batches) {
    zero.zero_grad();
    local_loss(model, batch, *comm).backward();
    zero.step();
    ref_opt->zero_grad();
    torch::nn::functional::cross_entropy(reference->forward(batch.x), batch.y).backward();
    ref_opt->step();
  }
  expect_same_parameters(*model, *reference, 1e-5);
  EXPECT_EQ(zero.shard_numel(), (zero.total_numel() + comm->size() - 1) / comm->size());
  // Every replica holds the same bits: each shard is updated by one rank and
  // gathered by copies (reduce_scatter and all_gather run shm on one node).
  for (const auto& item : model->named_parameters()) {
    at::Tensor mine = item.value().detach().reshape({-1}).clone();
    at::Tensor all = torch::empty({comm->size() * mine.numel()}, mine.options());
    collectives::AllGatherOptions ring;  // checked by the other algorithm
    ring.algorithm = collectives::Algorithm::kRing;
    comm->all_gather(all, mine, ring)->wait();
    for (int r = 0; r < comm->size(); ++r) {
      EXPECT_TRUE(torch::equal(all.narrow(0, r * mine.numel(), mine.numel()), mine))
          << item.key() << " differs bitwise between rank " << r << " and rank " << comm->rank();
    }
  }
}

TEST(ZeroTest, EachRankKeepsAboutOneNthOfTheOptimizerState) {
  auto comm = dp_comm("zero-memory");
  torch::manual_seed(13);
  auto model = make_mlp(4096);  // ~150k parameters: serialization overhead is negligible
  auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  auto adam = [](std::vector<torch::Tensor> params) {
    return std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(1e-3));
  };
  ZeroRedundancyOptimizer zero(model.ptr(), comm, adam);
  auto full = adam(reference->parameters());
  auto batches = make_batches(1, 4 * comm->size(), {20});
  zero.zero_grad();
  torch::nn::functional::cross_entropy(
      model->forward(local_part(batches[0].x, comm->rank(), comm->size())),
      local_part(batches[0].y, comm->rank(), comm->size()))
      .backward();
  zero.step();
  torch::nn::functional::cross_entropy(reference->forward(batches[0].x), batches[0].y).backward();
  full->step();
  torch::serialize::OutputArchive archive;
  full->save(archive);
  std::ostringstream bytes;
  archive.save_to(bytes);
  const double ratio =
      static_cast<double>(zero.optimizer_state_bytes()) / static_cast<double>(bytes.str().size());
  if (comm->rank() == 0) {
    std::printf(
        "[ zero-1 adam ] %d ranks, %lld parameters: optimizer state %zu bytes per rank, "
        "%zu unsharded (ratio %.3f)\n",
        comm->size(), static_cast<long long>(zero.total_numel()), zero.optimizer_state_bytes(),
        bytes.str().size(), ratio);
  }
  EXPECT_LT(ratio, 1.0 / comm->size() + 0.03);
}

TEST(ZeroTest, BuffersFollowRankZeroAfterEachStep) {
  auto comm = dp_comm("zero-buffers");
  torch::manual_seed(17);
  auto model = torch::nn::Sequential(torch::nn::Linear(20, 8), torch::nn::BatchNorm1d(8),
                                     torch::nn::Linear(8, 5));
  ZeroRedundancyOptimizer zero(model.ptr(), comm, [](std::vector<torch::Tensor> params) {
    return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1));
  });
  auto batches = make_batches(2, 4 * comm->size(), {20});
  for (const auto& batch : batches) {
    zero.zero_grad();
    // Each rank sees different data, so its running statistics differ.
    local_loss(model, batch, *comm).backward();
    zero.step();
  }
  for (const auto& item : model->named_buffers()) {
    at::Tensor mine = item.value().to(torch::kDouble).reshape({-1});
    at::Tensor all = torch::empty({comm->size() * mine.numel()}, mine.options());
    comm->all_gather(all, mine)->wait();
    for (int r = 1; r < comm->size(); ++r) {
      EXPECT_TRUE(torch::equal(all.narrow(0, r * mine.numel(), mine.numel()),
                               all.narrow(0, 0, mine.numel())))
          << item.key() << " differs between rank " << r << " and rank 0";
    }
  }
}

TEST(ZeroTest, SgdWithMomentumMatchesOneProcess) {
  check_zero_matches(
      [](std::vector<torch::Tensor> params) {
        return std::make_unique<torch::optim::SGD>(params,
                                                   torch::optim::SGDOptions(0.1).momentum(0.9));
      },
      "sgd");
}

TEST(ZeroTest, AdamWMatchesOneProcess) {
  check_zero_matches(
      [](std::vector<torch::Tensor> params) {
        return std::make_unique<torch::optim::AdamW>(
            params, torch::optim::AdamWOptions(1e-2).weight_decay(0.01));
      },
      "adamw");
}

TEST(DdpTest, SameSeedGivesBitwiseIdenticalParameters) {
  std::vector<torch::Tensor> runs[2];
  for (auto& run : runs) {
    torch::manual_seed(11);
    auto model = make_mlp();
    auto reference = make_mlp();
    auto batches = make_batches(4, 4 * runtime().size(), {20});
    train_both(model, reference, batches, DdpOptions{});
    for (const auto& p : model->parameters()) run.push_back(p.detach().clone());
  }
  for (std::size_t i = 0; i < runs[0].size(); ++i)
    EXPECT_TRUE(torch::equal(runs[0][i], runs[1][i]));
}

}  // namespace
}  // namespace dtrain::parallel
