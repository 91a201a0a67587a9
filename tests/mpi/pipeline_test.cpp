// The pipeline engine on real ranks against one process.
//
// Every rank builds the same model and also trains a one-process copy of it
// (the reference) on the same data, so each rank checks its own stages:
//  * with pp = the world size and every schedule, the same microbatches in
//    the same order with gradient accumulation: microbatch losses, gradients
//    and parameters bitwise equal after each of 3 SGD steps, for an even
//    batch, an uneven one (a short last microbatch), m < p and m = 1 where
//    the schedule takes them;
//  * against one process on the full batch: relative error <= 1e-6;
//  * pp 2 x dp 2 against one process that accumulates each replica's
//    microbatches and averages the replicas (bitwise), and on the full batch;
//  * a stage whose output shape is not what the next stage declared: a
//    CommError naming both shapes on both ranks of the pair, not a hang;
//  * tied first/last weights: both copies bitwise equal after every step;
//    summed per microbatch, bitwise the one-process gradients
//    and within 1e-6 of one process;
//  * schedules refused before anything runs.

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <set>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/pipeline/engine.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::parallel::pipeline {
namespace {

using dtrain::testing::fresh_world;
using dtrain::testing::world;

constexpr int kFeatures = 12;
constexpr int kClasses = 5;
constexpr int kSteps = 3;
constexpr double kLearningRate = 0.05;

// Eight layers, so that p = 4 with v = 2 has one layer per stage. With 2 or
// 4 stages every stage ends with a Linear, whose output autograd does not
// save: the engine releases those outputs after sending them.
torch::nn::Sequential make_model() {
  torch::manual_seed(7);
  namespace nn = torch::nn;
  return nn::Sequential(nn::Tanh(), nn::Linear(kFeatures, 24), nn::ReLU(), nn::Linear(24, 24),
                        nn::Tanh(), nn::Linear(24, 16), nn::ReLU(), nn::Linear(16, kClasses));
}

// The output layer shares the first layer's weight (an embedding and the
// output projection, in a language model).
struct TiedOutputImpl : torch::nn::Module {
  explicit TiedOutputImpl(torch::Tensor shared) {
    weight = register_parameter("weight", std::move(shared));
  }
  torch::Tensor forward(torch::Tensor x) { return torch::matmul(x, weight.t()); }
  torch::Tensor weight;
};
TORCH_MODULE(TiedOutput);

torch::nn::Sequential make_tied_model() {
  torch::manual_seed(11);
  namespace nn = torch::nn;
  nn::Linear first(kFeatures, kFeatures);
  return nn::Sequential(first, nn::Tanh(), nn::Linear(kFeatures, kFeatures), nn::ReLU(),
                        nn::Linear(kFeatures, kFeatures), nn::Tanh(),
                        nn::Linear(kFeatures, kFeatures), TiedOutput(first->weight));
}

torch::Tensor loss_fn(const torch::Tensor& output, const torch::Tensor& target) {
  return torch::nn::functional::cross_entropy(output, target);
}

struct Batch {
  torch::Tensor x;
  torch::Tensor y;
};

std::vector<Batch> make_batches(int batch_size, int classes) {
  torch::manual_seed(1234);
  std::vector<Batch> out;
  for (int i = 0; i < kSteps; ++i) {
    out.push_back({torch::randn({batch_size, kFeatures}),
                   torch::randint(0, classes, {batch_size}, torch::kLong)});
  }
  return out;
}

// One process, the whole model: the microbatches of `sizes` in order with
// gradient accumulation (each loss scaled by its share of the batch), or
// the whole batch at once when `sizes` is empty.
struct Reference {
  torch::nn::Sequential model;
  torch::optim::SGD sgd;
  std::vector<torch::Tensor> losses;  // the last step's

  explicit Reference(torch::nn::Sequential m)
      : model(std::move(m)),
        sgd(distinct(model->parameters()), torch::optim::SGDOptions(kLearningRate).momentum(0.9)) {}

  // A tied tensor is listed once per module that registers it; step it once.
  static std::vector<torch::Tensor> distinct(const std::vector<torch::Tensor>& params) {
    std::vector<torch::Tensor> out;
    for (const auto& p : params) {
      bool seen = false;
      for (const auto& q : out) seen = seen || q.is_same(p);
      if (!seen) out.push_back(p);
    }
    return out;
  }

  void backward(const Batch& batch, const std::vector<std::int64_t>& sizes) {
    for (auto& p : model->parameters()) {
      if (p.grad().defined()) p.mutable_grad().zero_();
    }
    losses.clear();
    if (sizes.empty()) {
      torch::Tensor l = loss_fn(model->forward(batch.x), batch.y);
      l.backward();
      losses.push_back(l.detach());
      return;
    }
    const auto xs = batch.x.split_with_sizes(sizes, 0);
    const auto ys = batch.y.split_with_sizes(sizes, 0);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      torch::Tensor l = loss_fn(model->forward(xs[i]), ys[i]) *
                        (static_cast<double>(sizes[i]) / static_cast<double>(batch.x.size(0)));
      l.backward();
      losses.push_back(l.detach());
    }
  }
  // Data parallel over `dp` replicas, replica r holding samples
  // [r * replica_batch, (r + 1) * replica_batch) of the batch: each replica's
  // microbatches accumulate as in backward(), then the replicas' gradients
  // are summed in replica order and divided by dp, as the dp all-reduce
  // (ReduceOp::kAvg) does. `losses` keeps replica `mine`'s microbatch losses.
  void backward_replicated(const Batch& batch, int dp, int mine,
                           const std::vector<std::int64_t>& sizes) {
    const std::int64_t replica_batch = batch.x.size(0) / dp;
    std::vector<torch::Tensor> sums;
    std::vector<torch::Tensor> my_losses;
    for (int r = 0; r < dp; ++r) {
      backward({batch.x.narrow(0, r * replica_batch, replica_batch),
                batch.y.narrow(0, r * replica_batch, replica_batch)},
               sizes);
      if (r == mine) my_losses = losses;
      const auto params = model->parameters();
      for (std::size_t i = 0; i < params.size(); ++i) {
        if (r == 0) {
          sums.push_back(params[i].grad().clone());
        } else {
          sums[i] += params[i].grad();
        }
      }
    }
    const auto params = model->parameters();
    for (std::size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad().copy_(sums[i] / static_cast<double>(dp));
    }
    losses = my_losses;
  }
  void step() { sgd.step(); }
  torch::Tensor param(const std::string& name) {
    const auto named = model->named_parameters();
    const torch::Tensor* t = named.find(name);
    EXPECT_NE(t, nullptr) << name;
    return t ? *t : torch::Tensor();
  }
};

double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  const double scale = b.norm().item<double>();
  return (a - b).norm().item<double>() / (scale > 0 ? scale : 1.0);
}

struct Case {
  ScheduleKind kind;
  int stages_per_rank;
  int microbatches;
  int batch;
};

std::string describe(const Case& c, int pp, int dp) {
  return std::string(schedule_kind_name(c.kind)) + " pp=" + std::to_string(pp) +
         " dp=" + std::to_string(dp) + " v=" + std::to_string(c.stages_per_rank) +
         " m=" + std::to_string(c.microbatches) + " batch=" + std::to_string(c.batch);
}

// Runs kSteps steps of `c` on a pp x dp layout of a fresh world and compares
// with the references. `bitwise`: against the accumulating reference (with
// dp > 1, each replica's accumulation, then their average).
// Adds the bytes of sent outputs this rank deallocated to `deallocated`.
void run_case(const Case& c, int pp, torch::nn::Sequential (*model_fn)(), bool bitwise, int classes,
              std::size_t* deallocated = nullptr,
              TiedGradientSum tied = TiedGradientSum::kPerStep) {
  auto comm = fresh_world("pipeline-" + describe(c, pp, 0));
  ParallelContext ctx(comm, /*tp=*/1, pp);
  const int dp = ctx.dp_size();
  SCOPED_TRACE(describe(c, pp, dp));

  torch::nn::Sequential model = model_fn();
  const auto layers = layers_of(model);
  const StagePartition partition =
      partition_uniform(static_cast<int>(layers.size()), pp * c.stages_per_rank);
  PipelineOptions options;
  options.schedule.kind = c.kind;
  options.schedule.num_microbatches = c.microbatches;
  options.schedule.stages_per_rank = c.stages_per_rank;
  options.stage_input_shapes = stage_input_shapes(layers, partition, torch::zeros({1, kFeatures}));
  options.tied_gradients = tied;
  PipelineEngine engine(layers, partition, ctx, options);
  torch::optim::SGD sgd(engine.parameters(), torch::optim::SGDOptions(kLearningRate).momentum(0.9));

  // Global batches; this replica's part of each.
  const auto batches = make_batches(c.batch * dp, classes);
  Reference accumulating(model_fn());
  Reference full(model_fn());
  const auto sizes = microbatch_sizes(c.batch, c.microbatches);

  for (int step = 0; step < kSteps; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const Batch& global = batches[step];
    const torch::Tensor x = global.x.narrow(0, ctx.dp_rank() * c.batch, c.batch);
    const torch::Tensor y = global.y.narrow(0, ctx.dp_rank() * c.batch, c.batch);
    const PipelineStepResult result = engine.step(x, y, loss_fn);
    if (deallocated) *deallocated += engine.last_stats().deallocated_bytes;
    full.backward(global, {});
    if (bitwise) {
      if (dp == 1) {
        accumulating.backward(global, sizes);
      } else {
        accumulating.backward_replicated(global, dp, ctx.dp_rank(), sizes);
      }
    }

    if (ctx.is_last_stage()) {
      ASSERT_TRUE(result.loss.defined());
      ASSERT_EQ(result.microbatch_losses.size(), static_cast<std::size_t>(c.microbatches));
      if (bitwise) {
        for (int i = 0; i < c.microbatches; ++i) {
          EXPECT_TRUE(torch::equal(result.microbatch_losses[i], accumulating.losses[i]))
              << "microbatch " << i << ": " << result.microbatch_losses[i].item<float>() << " vs "
              << accumulating.losses[i].item<float>();
        }
      }
      if (dp == 1) {
        EXPECT_LE(relative_error(result.loss, full.losses[0]), 1e-6);
      }
    } else {
      EXPECT_FALSE(result.loss.defined());
    }
    for (const auto& [name, param] : engine.named_parameters()) {
      ASSERT_TRUE(param.grad().defined()) << name;
      if (bitwise) {
        EXPECT_TRUE(torch::equal(param.grad(), accumulating.param(name).grad()))
            << name << " gradient differs by "
            << (param.grad() - accumulating.param(name).grad()).abs().max().item<float>();
      }
      EXPECT_LE(relative_error(param.grad(), full.param(name).grad()), 1e-6) << name;
    }
    sgd.step();
    full.step();
    if (bitwise) accumulating.step();
    for (const auto& [name, param] : engine.named_parameters()) {
      if (bitwise) {
        EXPECT_TRUE(torch::equal(param, accumulating.param(name))) << name;
      }
      EXPECT_LE(relative_error(param, full.param(name)), 1e-6) << name;
    }
  }
  comm->barrier()->wait();
}

std::vector<Case> cases_for(int p) {
  std::vector<Case> cases;
  for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB,
                            ScheduleKind::kInterleaved, ScheduleKind::kZeroBubbleH1}) {
    const int v = kind == ScheduleKind::kInterleaved ? 2 : 1;
    // Even and uneven batches; m < p and m = 1 where the schedule takes them.
    std::vector<std::pair<int, int>> mb = {{4, 16}, {4, 15}};
    if (kind == ScheduleKind::kGPipe || kind == ScheduleKind::kOneFOneB) {
      mb.push_back({1, 5});
      if (p > 2) mb.push_back({p - 1, 7});
    }
    if (kind == ScheduleKind::kInterleaved && p == 2) mb.push_back({6, 13});
    for (const auto& [m, batch] : mb) cases.push_back({kind, v, m, batch});
  }
  return cases;
}

TEST(PipelineEngineTest, EveryScheduleMatchesOneProcessWithAccumulationBitwise) {
  const int p = world().size();
  if (p < 2) GTEST_SKIP() << "needs 2 ranks";
  std::size_t deallocated = 0;
  for (const Case& c : cases_for(p)) {
    run_case(c, p, &make_model, /*bitwise=*/true, kClasses, &deallocated);
  }
  // Outputs of stages that end with a Linear were released after their sends
  // (make_model), and the results above stayed bitwise equal.
  if (world().rank() < p - 1) {
    EXPECT_GT(deallocated, 0u);
  }
}

// pp 2 x dp 2: against one process that runs each replica's microbatches
// in order with gradient accumulation and averages the two replicas'
// gradients, bitwise (with two replicas the all-reduce's sum is one
// addition, the same on both, and the division by 2 is exact); against one
// process on the full batch within 1e-6.
TEST(PipelineEngineTest, PipelineTimesDataParallelMatchesOneProcess) {
  if (world().size() != 4) GTEST_SKIP() << "needs 4 ranks (pp 2 x dp 2)";
  for (const Case& c : cases_for(2)) {
    run_case(c, /*pp=*/2, &make_model, /*bitwise=*/true, kClasses);
  }
}

TEST(PipelineEngineTest, TiedFirstAndLastWeightsStayEqual) {
  const int p = world().size();
  if (p < 2) GTEST_SKIP() << "needs 2 ranks";
  for (ScheduleKind kind : {ScheduleKind::kOneFOneB, ScheduleKind::kZeroBubbleH1}) {
    const Case c{kind, 1, 4, 12};
    // One process within 1e-6 (the copies' sum adds in another order).
    run_case(c, p, &make_tied_model, /*bitwise=*/false, kFeatures);
  }
  // Summed per microbatch, the copies' gradients are bitwise those of the
  // one process accumulating the same microbatches.
  for (ScheduleKind kind :
       {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB, ScheduleKind::kZeroBubbleH1}) {
    // zb-h1 needs m >= p.
    for (int m : std::set<int>{kind == ScheduleKind::kZeroBubbleH1 ? p : 1, std::max(4, p)}) {
      const Case c{kind, 1, m, 12};
      run_case(c, p, &make_tied_model, /*bitwise=*/true, kFeatures, nullptr,
               TiedGradientSum::kPerMicrobatch);
    }
  }
  // Bitwise equal copies: the first and the last stage train the same tensor.
  std::vector<int> pps{p};
  if (p > 2 && p % 2 == 0) pps.push_back(2);  // with dp 2 as well
  for (int pp : pps) {
    auto comm = fresh_world("pipeline-tied");
    ParallelContext ctx(comm, 1, pp);
    torch::nn::Sequential model = make_tied_model();
    const auto layers = layers_of(model);
    const auto partition = partition_uniform(static_cast<int>(layers.size()), pp);
    ASSERT_EQ(find_tied_parameters(layers, partition).size(), 1u);
    PipelineOptions options;
    options.schedule.num_microbatches = 3;
    options.stage_input_shapes = stage_input_shapes(layers, partition, torch::zeros({1, 12}));
    PipelineEngine engine(layers, partition, ctx, options);
    torch::optim::SGD sgd(engine.parameters(), torch::optim::SGDOptions(0.1));
    const auto batches = make_batches(9 * ctx.dp_size(), kFeatures);
    const torch::Tensor tied = model[0]->named_parameters()["weight"];
    for (int step = 0; step < kSteps; ++step) {
      const auto& b = batches[step];
      engine.step(b.x.narrow(0, ctx.dp_rank() * 9, 9), b.y.narrow(0, ctx.dp_rank() * 9, 9),
                  loss_fn);
      sgd.step();
      // Every rank gathers the first and the last stage's copies.
      torch::Tensor mine = tied.detach().clone();
      torch::Tensor all = torch::empty({pp, kFeatures, kFeatures});
      ctx.pp()->all_gather(all, mine)->wait();
      EXPECT_TRUE(torch::equal(all[0], all[pp - 1])) << "step " << step;
      EXPECT_FALSE(torch::equal(all[0], make_tied_model()[0]->named_parameters()["weight"]))
          << "the tied weight did not train";
    }
    comm->barrier()->wait();
  }
}

// The per-microbatch sum's hooks go with their engine (it removes them):
// the model's tied weight outlives it, and a backward through the model
// afterwards must give autograd's own gradient, untouched by any hook. (A
// hook left behind would read the destroyed engine; a sanitizer build,
// DTRAIN_SANITIZE=address, reports that here.)
TEST(PipelineEngineTest, PerMicrobatchTiedHooksEndWithTheEngine) {
  const int p = world().size();
  if (p < 2) GTEST_SKIP() << "needs 2 ranks";
  auto comm = fresh_world("pipeline-tied-hooks");
  ParallelContext ctx(comm, 1, p);
  torch::nn::Sequential model = make_tied_model();
  const auto batches = make_batches(8, kFeatures);
  {
    const auto layers = layers_of(model);
    const auto partition = partition_uniform(static_cast<int>(layers.size()), p);
    PipelineOptions options;
    options.schedule.num_microbatches = p;
    options.stage_input_shapes = stage_input_shapes(layers, partition, torch::zeros({1, 12}));
    options.tied_gradients = TiedGradientSum::kPerMicrobatch;
    PipelineEngine engine(layers, partition, ctx, options);
    engine.step(batches[0].x, batches[0].y, loss_fn);
  }
  torch::nn::Sequential reference = make_tied_model();
  for (torch::nn::Sequential* m : {&model, &reference}) {
    for (auto& param : (*m)->parameters()) {
      if (param.grad().defined()) param.mutable_grad().zero_();
    }
    loss_fn((*m)->forward(batches[1].x), batches[1].y).backward();
  }
  const torch::Tensor tied = model[0]->named_parameters()["weight"];
  const torch::Tensor expected = reference[0]->named_parameters()["weight"];
  EXPECT_TRUE(torch::equal(tied.grad(), expected.grad()));
  comm->barrier()->wait();
}

// The first layer's weight used again by stages 1 and 3: with pp 2 x v 2,
// pipeline rank 1 holds it in two stages, which the per-microbatch sum
// cannot tell apart; every rank refuses before the first step.
torch::nn::Sequential make_thrice_tied_model() {
  torch::manual_seed(13);
  namespace nn = torch::nn;
  nn::Linear first(kFeatures, kFeatures);
  return nn::Sequential(first, nn::Tanh(), TiedOutput(first->weight), nn::ReLU(),
                        nn::Linear(kFeatures, kFeatures), nn::Tanh(),
                        nn::Linear(kFeatures, kFeatures), TiedOutput(first->weight));
}

TEST(PipelineEngineTest, PerMicrobatchTiedSumNeedsOneStagePerRank) {
  if (world().size() != 2) GTEST_SKIP() << "needs 2 ranks";
  auto comm = fresh_world("pipeline-thrice-tied");
  ParallelContext ctx(comm, 1, 2);
  torch::nn::Sequential model = make_thrice_tied_model();
  const auto layers = layers_of(model);
  const auto partition = partition_uniform(static_cast<int>(layers.size()), 4);
  PipelineOptions options;
  options.schedule.kind = ScheduleKind::kInterleaved;
  options.schedule.stages_per_rank = 2;
  options.schedule.num_microbatches = 2;
  options.stage_input_shapes = stage_input_shapes(layers, partition, torch::zeros({1, kFeatures}));
  options.tied_gradients = TiedGradientSum::kPerMicrobatch;
  try {
    PipelineEngine engine(layers, partition, ctx, options);
    ADD_FAILURE() << "the engine accepted a tied weight held twice on one rank";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("pipeline rank 1 holds the tied parameter"),
              std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("in 2 stages"), std::string::npos) << e.what();
  }
  // Summed per step, the same model trains.
  options.tied_gradients = TiedGradientSum::kPerStep;
  PipelineEngine engine(layers, partition, ctx, options);
  const auto batches = make_batches(4, kFeatures);
  engine.step(batches[0].x, batches[0].y, loss_fn);
  comm->barrier()->wait();
}

TEST(PipelineEngineTest, ReceivesOfActivationsArePostedAhead) {
  const int p = world().size();
  if (p < 2) GTEST_SKIP() << "needs 2 ranks";
  auto comm = fresh_world("pipeline-ahead");
  ParallelContext ctx(comm, 1, p);
  torch::nn::Sequential model = make_model();
  const auto layers = layers_of(model);
  const auto partition = partition_uniform(static_cast<int>(layers.size()), p);
  PipelineOptions options;
  options.schedule.kind = ScheduleKind::kGPipe;
  options.schedule.num_microbatches = 4;
  options.stage_input_shapes = stage_input_shapes(layers, partition, torch::zeros({1, kFeatures}));
  PipelineEngine engine(layers, partition, ctx, options);
  engine.step(torch::randn({16, kFeatures}), torch::randint(0, kClasses, {16}, torch::kLong),
              loss_fn);
  // GPipe's last stage receives only activations until its first backward:
  // all its receives are posted before its first forward runs (the schedule
  // lists each right before its forward), so the previous stage's sends do
  // not wait for this rank's forwards.
  if (ctx.is_last_stage()) {
    double first_forward = -1;
    int receives = 0;
    for (const ActionRecord& r : engine.last_trace()) {
      if (r.action.kind == ActionKind::kForward && first_forward < 0) {
        first_forward = r.start_seconds;
      }
    }
    for (const ActionRecord& r : engine.last_trace()) {
      if (r.action.kind != ActionKind::kRecvActivation) continue;
      ++receives;
      EXPECT_LE(r.start_seconds, first_forward) << r.action.to_string() << " posted after F";
    }
    EXPECT_EQ(receives, 4);
  }
  comm->barrier()->wait();
}

// With 1F1B and with GPipe, whose last stage posts its receives ahead.
class ShapeMismatchTest : public ::testing::TestWithParam<ScheduleKind> {};

TEST_P(ShapeMismatchTest, IsACommErrorOnBothRanks) {
  const int n = world().size();
  if (n < 2 || n % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  // pp 2 (x dp n/2): stage 1 declares 25 features, stage 0 sends 24.
  auto comm = fresh_world("pipeline-shape", std::chrono::seconds(20));
  ParallelContext ctx(comm, 1, 2);
  torch::nn::Sequential model = make_model();
  const auto layers = layers_of(model);
  const auto partition = partition_at(static_cast<int>(layers.size()), {3});
  PipelineOptions options;
  options.schedule.kind = GetParam();
  options.schedule.num_microbatches = 2;
  options.stage_input_shapes = {{kFeatures}, {25}};
  PipelineEngine engine(layers, partition, ctx, options);
  const auto start = std::chrono::steady_clock::now();
  std::string message;
  try {
    engine.step(torch::randn({8, kFeatures}), torch::zeros({8}, torch::kLong), loss_fn);
    ADD_FAILURE() << "the step went through";
  } catch (const TimeoutError& e) {
    ADD_FAILURE() << "timed out instead of naming the shapes: " << e.what();
  } catch (const CommError& e) {
    message = e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 10.0);
  EXPECT_NE(message.find("[4, 24]"), std::string::npos) << message;
  EXPECT_NE(message.find("[4, 25]"), std::string::npos) << message;
  EXPECT_NE(message.find("pipeline rank " + std::to_string(ctx.pp_rank())), std::string::npos)
      << message;
  // The engine refuses to go on after a failed step.
  EXPECT_THROW(engine.step(torch::randn({8, kFeatures}), torch::zeros({8}, torch::kLong), loss_fn),
               Error);
}

INSTANTIATE_TEST_SUITE_P(PipelineEngineTest, ShapeMismatchTest,
                         ::testing::Values(ScheduleKind::kOneFOneB, ScheduleKind::kGPipe),
                         [](const auto& info) {
                           return info.param == ScheduleKind::kGPipe ? "GPipe" : "OneFOneB";
                         });

TEST(PipelineEngineTest, RefusedSchedulesFailBeforeAnythingRuns) {
  const int p = world().size();
  if (p < 2) GTEST_SKIP() << "needs 2 ranks";
  auto comm = fresh_world("pipeline-refused");
  ParallelContext ctx(comm, 1, p);
  torch::nn::Sequential model = make_model();
  const auto layers = layers_of(model);
  const auto partition = partition_uniform(static_cast<int>(layers.size()), p);
  PipelineOptions options;
  options.stage_input_shapes = stage_input_shapes(layers, partition, torch::zeros({1, kFeatures}));
  // ZB-H1 with fewer microbatches than stages.
  options.schedule.kind = ScheduleKind::kZeroBubbleH1;
  options.schedule.num_microbatches = p - 1;
  EXPECT_THROW(PipelineEngine(layers, partition, ctx, options), InvalidArgument);
  // A partition with another number of stages.
  options.schedule.kind = ScheduleKind::kOneFOneB;
  options.schedule.num_microbatches = 2;
  EXPECT_THROW(PipelineEngine(layers, partition_uniform(8, 2 * p), ctx, options), InvalidArgument);
  // A hand-written list that deadlocks (rank 1 wants both forwards before its
  // first backward, rank 0 the first gradient before its second forward).
  if (p == 2) {
    options.custom_schedule = parse_schedule(
        "pipeline ranks=2 microbatches=2\n"
        "0: F0.0 sendF0.0>1 recvB0.0<1 B0.0 F0.1 sendF0.1>1 recvB0.1<1 B0.1 reduce0\n"
        "1: recvF1.0<0 F1.0 recvF1.1<0 F1.1 B1.0 sendB1.0>0 B1.1 sendB1.1>0 reduce1\n");
    try {
      PipelineEngine engine(layers, partition, ctx, options);
      ADD_FAILURE() << "a deadlocking schedule was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("deadlock"), std::string::npos) << e.what();
    }
  }
  // Nothing ran: the communicator still works.
  comm->barrier()->wait();
}

}  // namespace
}  // namespace dtrain::parallel::pipeline
