// Cutting a model into pipeline stages: cut points, uniform, balanced by
// parameter count and by (stubbed) measured time, global names, tied weights.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <set>
#include <string>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/parallel/pipeline/partition.h"

namespace {

using namespace dtrain::parallel::pipeline;

std::vector<int> bounds(const StagePartition& partition) { return partition.bounds; }

std::set<std::string> names_of(torch::nn::Module& module) {
  std::set<std::string> names;
  for (const auto& item : module.named_parameters()) names.insert(item.key());
  return names;
}

TEST(PipelinePartition, AtExplicitCutPoints) {
  EXPECT_EQ(bounds(partition_at(8, {3, 6})), (std::vector<int>{0, 3, 6, 8}));
  EXPECT_EQ(bounds(partition_at(8, {})), (std::vector<int>{0, 8}));
  EXPECT_EQ(partition_at(8, {3, 6}).to_string(), "[0,3) [3,6) [6,8)");
  EXPECT_EQ(partition_at(8, {3, 6}).stage_of_layer(6), 2);
  try {
    partition_at(8, {3, 3});
    FAIL() << "an empty stage was accepted";
  } catch (const dtrain::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("cut point 3 does not follow 3"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(partition_at(8, {0}), dtrain::InvalidArgument);
  EXPECT_THROW(partition_at(8, {8}), dtrain::InvalidArgument);
}

TEST(PipelinePartition, UniformByLayerCount) {
  EXPECT_EQ(bounds(partition_uniform(10, 4)), (std::vector<int>{0, 2, 4, 7, 10}));
  EXPECT_EQ(bounds(partition_uniform(8, 4)), (std::vector<int>{0, 2, 4, 6, 8}));
  EXPECT_EQ(bounds(partition_uniform(3, 3)), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_THROW(partition_uniform(3, 4), dtrain::InvalidArgument);
}

TEST(PipelinePartition, BalancedByParameterCount) {
  torch::nn::Sequential model(torch::nn::Linear(8, 8),   // 72
                              torch::nn::Linear(8, 8),   // 72
                              torch::nn::Linear(8, 64),  // 576
                              torch::nn::Linear(64, 8),  // 520
                              torch::nn::Linear(8, 8),   // 72
                              torch::nn::ReLU());        // 0
  const std::vector<Layer> layers = layers_of(model);
  EXPECT_EQ(parameter_counts(layers), (std::vector<double>{72, 72, 576, 520, 72, 0}));
  // Two stages: cutting after layer 2 gives 720 | 592, every other cut more.
  EXPECT_EQ(bounds(partition_balanced(parameter_counts(layers), 2)), (std::vector<int>{0, 3, 6}));
  // Three stages: the two big layers apart, 144+576 | 520 | 72+0 would be
  // 720; 72+72 | 576 | 520+72 is 592.
  EXPECT_EQ(bounds(partition_balanced(parameter_counts(layers), 3)),
            (std::vector<int>{0, 2, 3, 6}));
  // Ties go to the later stages (they store fewer microbatches under 1F1B).
  EXPECT_EQ(bounds(partition_balanced({1, 1, 1, 1, 1}, 2)), (std::vector<int>{0, 2, 5}));
  EXPECT_THROW(partition_balanced({1, -1}, 2), dtrain::InvalidArgument);
  EXPECT_THROW(partition_balanced({1}, 2), dtrain::InvalidArgument);
}

TEST(PipelinePartition, BalancedByMeasuredTime) {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(6, 6), torch::nn::BatchNorm1d(6),
                              torch::nn::Dropout(0.5), torch::nn::Linear(6, 6),
                              torch::nn::Linear(6, 6), torch::nn::ReLU(), torch::nn::Linear(6, 2));
  const std::vector<Layer> layers = layers_of(model);
  const std::vector<torch::Tensor> samples = {torch::randn({4, 6}), torch::randn({4, 6})};
  const std::vector<double> cost = {1, 1, 1, 1, 5, 1, 1};
  std::vector<int> runs(layers.size(), 0);
  LayerTimingOptions options;
  options.warmup_runs = 1;
  options.timed_runs = 3;
  options.timer = [&](int layer, const std::function<void()>& run) {
    run();
    ++runs[static_cast<std::size_t>(layer)];
    return cost[static_cast<std::size_t>(layer)];
  };
  const torch::Tensor running_mean = model[1]->named_buffers()["running_mean"].clone();
  torch::manual_seed(7);
  const torch::Tensor random_next = torch::rand({3});
  torch::manual_seed(7);
  EXPECT_EQ(measure_layer_times(layers, samples, options), cost);
  // Each layer ran 3 timed runs per sample through the timer.
  EXPECT_EQ(runs, std::vector<int>(layers.size(), 2 * 3));
  // BatchNorm's running statistics and the random generator (which Dropout
  // drew from) are as before.
  EXPECT_TRUE(torch::equal(model[1]->named_buffers()["running_mean"], running_mean));
  EXPECT_TRUE(torch::equal(torch::rand({3}), random_next));
  // 1 1 1 1 | 5 | 1 1: the bottleneck is the slow layer alone.
  EXPECT_EQ(bounds(partition_by_time(layers, samples, 3, options)), (std::vector<int>{0, 4, 5, 7}));
  // The wall clock: one non-negative time per layer.
  const std::vector<double> measured = measure_layer_times(layers, samples);
  ASSERT_EQ(measured.size(), layers.size());
  for (double seconds : measured) EXPECT_GE(seconds, 0.0);
  EXPECT_THROW(measure_layer_times(layers, {}), dtrain::InvalidArgument);
  options.warmup_runs = 0;
  options.timer = [](int, const std::function<void()>&) { return 1.0; };  // never runs
  EXPECT_THROW(measure_layer_times(layers, samples, options), dtrain::InvalidArgument);
}

TEST(PipelinePartition, StagesKeepGlobalNamesAndComputeTheModel) {
  torch::manual_seed(1);
  torch::nn::Sequential model(torch::nn::Linear(4, 8), torch::nn::ReLU(), torch::nn::Linear(8, 8),
                              torch::nn::Linear(8, 3));
  const torch::Tensor x = torch::randn({5, 4});
  const torch::Tensor expected = model->forward(x);
  for (const std::string& prefix : {std::string(), std::string("body")}) {
    const std::vector<Layer> layers = layers_of(model, prefix);
    const StagePartition partition = partition_at(4, {2});
    PipelineStage first(layers, partition, 0);
    PipelineStage second(layers, partition, 1);
    const std::string p = prefix.empty() ? "" : prefix + ".";
    EXPECT_EQ(names_of(*first), (std::set<std::string>{p + "0.weight", p + "0.bias"}));
    EXPECT_EQ(names_of(*second),
              (std::set<std::string>{p + "2.weight", p + "2.bias", p + "3.weight", p + "3.bias"}));
    EXPECT_EQ(second->layer_names(), (std::vector<std::string>{p + "2", p + "3"}));
    // The stages share the model's modules: same tensors, same result.
    EXPECT_TRUE(
        first->named_parameters()[p + "0.weight"].is_same(model[0]->named_parameters()["weight"]));
    EXPECT_TRUE(torch::equal(second->forward(first->forward(x)), expected));
  }
}

TEST(PipelinePartition, NamedModulesAndTiedWeights) {
  struct TiedImpl : torch::nn::Module {
    explicit TiedImpl(torch::Tensor w) : weight(register_parameter("weight", std::move(w))) {}
    torch::Tensor forward(torch::Tensor x) { return x.matmul(weight.t()); }
    torch::Tensor weight;
  };
  const torch::Tensor shared = torch::randn({4, 4});
  std::vector<Layer> layers = {
      {"embed", torch::nn::AnyModule(std::make_shared<TiedImpl>(shared))},
      {"blocks.0", torch::nn::AnyModule(torch::nn::Linear(4, 4))},
      {"blocks.1", torch::nn::AnyModule(torch::nn::Linear(4, 4))},
      {"head", torch::nn::AnyModule(std::make_shared<TiedImpl>(shared))},
  };
  const StagePartition partition = partition_at(4, {1, 3});
  PipelineStage middle(layers, partition, 1);
  EXPECT_EQ(names_of(*middle), (std::set<std::string>{"blocks.0.weight", "blocks.0.bias",
                                                      "blocks.1.weight", "blocks.1.bias"}));
  const std::vector<TiedParameter> tied = find_tied_parameters(layers, partition);
  ASSERT_EQ(tied.size(), 1u);
  EXPECT_EQ(tied[0].names, (std::vector<std::string>{"embed.weight", "head.weight"}));
  EXPECT_EQ(tied[0].stages, (std::vector<int>{0, 2}));
  // In one stage autograd sums the two uses itself: nothing to report.
  EXPECT_TRUE(find_tied_parameters(layers, partition_at(4, {})).empty());
  // Names must be unique and have no empty part.
  layers[2].name = "blocks.0";
  EXPECT_THROW(PipelineStage(layers, partition, 1), dtrain::InvalidArgument);
  layers[2].name = "blocks..1";
  EXPECT_THROW(PipelineStage(layers, partition, 1), dtrain::InvalidArgument);
  EXPECT_THROW(PipelineStage(layers, partition_at(3, {1}), 0), dtrain::InvalidArgument);
}

}  // namespace
