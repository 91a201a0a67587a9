// The trainer's pipeline strategy (train::PipelineParallel) on real ranks.
//
//  * pp = the world size, every schedule: the report sums, losses,
//    parameters and BatchNorm buffers after 3 steps, and an evaluation,
//    bitwise equal to pp = 1 running the same microbatches (each rank runs
//    that reference itself, on a communicator of its own);
//  * the report sums are counted once (only the last stage reports);
//  * a checkpoint written at pp = 2 loads at pp = 1 and (4 ranks) at pp = 4:
//    every parameter, buffer and momentum buffer equal to the saved global
//    tensor, and one more step equal to pp = 2 continuing;
//  * ZeRO-1 per stage at pp 2 x dp 2: losses, parameters and buffers bitwise equal
//    to DDP per stage after 3 steps; its checkpoint resumes under ZeRO-1
//    and under DDP with the next step equal to the uninterrupted run's;
//  * bad options refused before any communication.

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/pipeline/partition.h"
#include "dtrain/train/pipeline_parallel.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::train {
namespace {

namespace pl = parallel::pipeline;
using dtrain::testing::fresh_world;
using dtrain::testing::world;

constexpr int kFeatures = 12;
constexpr int kClasses = 5;
constexpr int kLayers = 8;
constexpr int kBatch = 16;
constexpr int kMicrobatches = 4;
constexpr int kSteps = 3;

// Eight layers (p = 4 with v = 2 has one per stage), with a BatchNorm whose
// running statistics follow the microbatches.
torch::nn::Sequential make_model() {
  torch::manual_seed(7);
  namespace nn = torch::nn;
  return nn::Sequential(nn::Linear(kFeatures, 24), nn::BatchNorm1d(24), nn::ReLU(),
                        nn::Linear(24, 24), nn::Tanh(), nn::Linear(24, 16), nn::ReLU(),
                        nn::Linear(16, kClasses));
}

std::unique_ptr<PipelineParallel> make_strategy(
    std::shared_ptr<const parallel::ParallelContext> ctx, pl::ScheduleKind kind,
    int stages_per_rank = 1, int microbatches = kMicrobatches, bool zero = false) {
  auto layers = pl::layers_of(make_model(), "net");
  PipelineParallelOptions o;
  o.zero = zero;
  o.schedule.kind = kind;
  o.schedule.num_microbatches = microbatches;
  o.schedule.stages_per_rank = stages_per_rank;
  o.seed = 3;
  const int stages = ctx->pp_size() * stages_per_rank;
  return std::make_unique<PipelineParallel>(
      layers, pl::partition_uniform(kLayers, stages), torch::zeros({1, kFeatures}), ctx,
      [](std::vector<torch::Tensor> params) {
        return std::make_unique<torch::optim::SGD>(
            params, torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(1e-4));
      },
      classification(), o);
}

Batch make_batch(int step, int batch_size = kBatch) {
  torch::manual_seed(1000 + step);
  Batch b;
  b.inputs = torch::randn({batch_size, kFeatures});
  b.targets = torch::randint(0, kClasses, {batch_size}, torch::kLong);
  return b;
}

std::shared_ptr<const parallel::ParallelContext> context(const std::string& name, int pp) {
  return std::make_shared<const parallel::ParallelContext>(fresh_world(name), 1, pp);
}

// pp = 1 on this rank alone: the reference.
std::shared_ptr<const parallel::ParallelContext> alone(const std::string& name) {
  auto self = fresh_world(name)->split(world().rank(), 0);
  return std::make_shared<const parallel::ParallelContext>(self, 1, 1);
}

// Every parameter and buffer of this rank's stages, by global name.
std::map<std::string, torch::Tensor> tensors_of(PipelineParallel& s) {
  std::map<std::string, torch::Tensor> out;
  for (int stage : s.engine().stage_ids()) {
    const auto module = s.engine().stage(stage);
    for (const auto& item : module->named_parameters(true)) out[item.key()] = item.value();
    for (const auto& item : module->named_buffers(true)) out[item.key()] = item.value();
  }
  return out;
}

double sum_over_world(double value) {
  auto t = torch::tensor({value}, torch::kDouble);
  world().all_reduce(t)->wait();
  return t.item<double>();
}

struct Case {
  pl::ScheduleKind kind;
  int stages_per_rank;
};

class PipelineStrategyEquals : public ::testing::TestWithParam<Case> {};

TEST_P(PipelineStrategyEquals, OneProcessRunningTheSameMicrobatches) {
  const Case c = GetParam();
  const int p = world().size();
  auto split = make_strategy(context("pp-split", p), c.kind, c.stages_per_rank);
  auto ref = make_strategy(alone("pp-ref"), pl::ScheduleKind::kOneFOneB);
  const auto& schedule = split->engine().schedule();
  const bool last = schedule.rank_of_stage(schedule.num_stages() - 1) == world().rank();
  split->set_training(true);
  ref->set_training(true);
  for (int step = 0; step < kSteps; ++step) {
    StepInfo info;
    info.step = step;
    info.trace = true;
    info.data_ready = std::chrono::steady_clock::now();
    info.data_ready_wall = std::chrono::system_clock::now();
    Batch a = make_batch(step);
    Batch b = make_batch(step);
    split->set_lr(0.05);
    ref->set_lr(0.05);
    const StepResult r = split->train_step(a, info);
    const StepResult rr = ref->train_step(b, info);
    // Counted once: the world's sums are one batch's.
    EXPECT_EQ(sum_over_world(r.sums.samples), kBatch);
    EXPECT_EQ(sum_over_world(r.sums.loss_sum), sum_over_world(last ? rr.sums.loss_sum : 0.0));
    if (last) {
      EXPECT_EQ(r.local_loss, rr.local_loss) << "step " << step;
      EXPECT_EQ(r.sums.correct, rr.sums.correct);
    } else {
      EXPECT_EQ(r.sums.samples, 0);
      EXPECT_EQ(r.sums.loss_sum, 0);
    }
    // One span per compute action of this rank, each naming its stage and microbatch.
    int compute = 0;
    for (const Span& span : r.spans) {
      if (span.name == "F" || span.name == "B" || span.name == "I" || span.name == "W") {
        ++compute;
        EXPECT_TRUE(span.args.contains("stage") && span.args.contains("microbatch"));
      }
    }
    const int stages_here = static_cast<int>(split->engine().stage_ids().size());
    const int per_microbatch = c.kind == pl::ScheduleKind::kZeroBubbleH1 ? 3 : 2;
    EXPECT_EQ(compute, stages_here * kMicrobatches * per_microbatch);
    EXPECT_TRUE(r.metrics.contains("idle_fraction"));
  }
  const auto mine = tensors_of(*split);
  const auto all = tensors_of(*ref);
  // Every tensor of the model is on one rank (a stage of activations only
  // holds none).
  EXPECT_EQ(sum_over_world(static_cast<double>(mine.size())), static_cast<double>(all.size()));
  for (const auto& [name, tensor] : mine) {
    EXPECT_TRUE(all.count(name) && torch::equal(tensor, all.at(name))) << name;
  }
  // Evaluation: the stages forward, the last one scores.
  torch::NoGradGuard no_grad;
  split->set_training(false);
  ref->set_training(false);
  Batch a = make_batch(99, 10);
  Batch b = make_batch(99, 10);
  const ReportSums e = split->eval_step(a);
  const ReportSums er = ref->eval_step(b);
  EXPECT_EQ(sum_over_world(e.samples), 10);
  if (last) {
    EXPECT_EQ(e.loss_sum, er.loss_sum);
    EXPECT_EQ(e.correct, er.correct);
  }
}

INSTANTIATE_TEST_SUITE_P(Schedules, PipelineStrategyEquals,
                         ::testing::Values(Case{pl::ScheduleKind::kGPipe, 1},
                                           Case{pl::ScheduleKind::kOneFOneB, 1},
                                           Case{pl::ScheduleKind::kInterleaved, 2},
                                           Case{pl::ScheduleKind::kZeroBubbleH1, 1}),
                         [](const auto& info) {
                           std::string n = pl::schedule_kind_name(info.param.kind);
                           for (char& ch : n) {
                             if (ch == '-') ch = '_';
                           }
                           return "k" + n;
                         });

// Every tensor of a state dict whose name starts with `prefix`, by name.
std::map<std::string, torch::Tensor> entries(const checkpoint::StateDict& state,
                                             const std::string& prefix) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& e : state.entries()) {
    if (e.name.rfind(prefix, 0) == 0) out[e.name] = e.tensor;
  }
  return out;
}

TEST(PipelineStrategy, ACheckpointAtPp2ResumesAtPp1AndPp4) {
  if (world().size() % 2 != 0) GTEST_SKIP() << "pp 2 needs an even number of ranks";
  const std::string dir = dtrain::testing::shared_temp_dir(world(), "dtrain-pp-ckpt");
  auto ctx2 = context("ckpt-pp2", 2);
  auto two = make_strategy(ctx2, pl::ScheduleKind::kOneFOneB);
  two->set_training(true);
  StepInfo info;
  for (int step = 0; step < 2; ++step) {
    Batch b = make_batch(step);
    info.step = step;
    two->train_step(b, info);
  }
  checkpoint::CheckpointOptions co;
  co.directory = dir;
  co.async = false;
  co.fsync = false;
  {
    checkpoint::CheckpointManager manager(co, *ctx2);
    manager.save(2, two->state_dict());
  }
  const auto ckpt = checkpoint::Checkpoint::open(dir + "/step-000000002");
  EXPECT_EQ(ckpt.grid().pp, 2);
  // pp = 2 continues with a third step: what the resumed runs must match.
  Batch next = make_batch(2);
  info.step = 2;
  two->train_step(next, info);
  const auto after = tensors_of(*two);
  std::size_t stored = 0;
  for (const auto& name : ckpt.tensor_names()) stored += name.rfind("model/", 0) == 0 ? 1 : 0;

  // pp = 1 on each rank alone (dp = 1: averaging over 2 replicas at pp = 2
  // is exact, over more it may round), and pp = 4 over 4 ranks.
  std::vector<int> splits{1};
  if (world().size() == 4) splits.push_back(4);
  for (int pp : splits) {
    SCOPED_TRACE("pp " + std::to_string(pp));
    auto s = make_strategy(pp == 1 ? alone("ckpt-pp1") : context("ckpt-pp4", pp),
                           pl::ScheduleKind::kGPipe);
    s->load_state(ckpt);
    const auto state = s->state_dict();
    int checked = 0;
    for (const auto& [name, tensor] : entries(state, "model/")) {
      EXPECT_TRUE(torch::equal(tensor, ckpt.read(name))) << name;
      ++checked;
    }
    const auto optim = entries(state, "optim/");
    EXPECT_FALSE(optim.empty());
    for (const auto& [name, tensor] : optim) {
      EXPECT_TRUE(torch::equal(tensor, ckpt.read(name))) << name;
    }
    // Every model tensor of the checkpoint is on some stage of this split.
    EXPECT_GE(static_cast<std::size_t>(sum_over_world(checked)), stored);
    // The third step from the checkpoint equals pp = 2's.
    s->set_training(true);
    Batch b = make_batch(2);
    s->train_step(b, info);
    for (const auto& [name, tensor] : tensors_of(*s)) {
      if (after.count(name)) {
        EXPECT_TRUE(torch::equal(tensor, after.at(name))) << name;
      }
    }
  }
}

// pp 2 x dp 2: parameters and BatchNorm buffers (both copy dp rank 0's
// buffers to the other replica in each step).
TEST(PipelineStrategy, ZeroPerStageEqualsDdpPerStageAndResumes) {
  if (world().size() != 4) GTEST_SKIP() << "needs 4 ranks (pp 2 x dp 2)";
  const std::string dir = dtrain::testing::shared_temp_dir(world(), "dtrain-pp-zero-ckpt");
  auto zero_ctx = context("pp-zero", 2);
  auto zero = make_strategy(zero_ctx, pl::ScheduleKind::kOneFOneB, 1, kMicrobatches, true);
  auto ddp = make_strategy(context("pp-ddp", 2), pl::ScheduleKind::kOneFOneB);
  EXPECT_NE(zero->name().find("ZeRO-1"), std::string::npos) << zero->name();
  zero->set_training(true);
  ddp->set_training(true);
  const int dp_rank = zero_ctx->dp_rank();
  StepInfo info;
  const auto batch = [&](int step) { return make_batch(10 * step + dp_rank); };
  for (int step = 0; step < kSteps; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    info.step = step;
    Batch a = batch(step);
    Batch b = batch(step);
    const StepResult rz = zero->train_step(a, info);
    const StepResult rd = ddp->train_step(b, info);
    EXPECT_EQ(rz.local_loss, rd.local_loss);
    const auto pd = tensors_of(*ddp);
    for (const auto& [name, tensor] : tensors_of(*zero)) {
      EXPECT_TRUE(torch::equal(tensor, pd.at(name))) << name;
    }
    if (step == 1) {  // a checkpoint after 2 steps
      checkpoint::CheckpointOptions co;
      co.directory = dir;
      co.async = false;
      co.fsync = false;
      checkpoint::CheckpointManager manager(co, *zero_ctx);
      manager.save(2, zero->state_dict());
    }
  }
  const auto after = tensors_of(*zero);
  const auto ckpt = checkpoint::Checkpoint::open(dir + "/step-000000002");
  // Resumed under ZeRO-1 and under DDP: the third step equals the run's.
  for (bool resume_zero : {true, false}) {
    SCOPED_TRACE(resume_zero ? "resumed under ZeRO-1" : "resumed under DDP");
    auto s = make_strategy(context("pp-zero-resume", 2), pl::ScheduleKind::kOneFOneB, 1,
                           kMicrobatches, resume_zero);
    s->load_state(ckpt);
    s->set_training(true);
    Batch b = batch(2);
    info.step = 2;
    s->train_step(b, info);
    for (const auto& [name, tensor] : tensors_of(*s)) {
      EXPECT_TRUE(torch::equal(tensor, after.at(name))) << name;
    }
  }
}

TEST(PipelineStrategy, RefusesBadOptionsBeforeCommunicating) {
  auto ctx = context("pp-bad", world().size());
  auto layers = pl::layers_of(make_model(), "net");
  const auto optimizer = [](std::vector<torch::Tensor> params) {
    return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1));
  };
  PipelineParallelOptions o;
  o.schedule.num_microbatches = 4;
  // A partition with another number of stages than pp * v.
  EXPECT_THROW(PipelineParallel(layers, pl::partition_uniform(kLayers, world().size() + 1),
                                torch::zeros({1, kFeatures}), ctx, optimizer, classification(), o),
               InvalidArgument);
  // Interleaved with m not a multiple of p (p >= 2).
  o.schedule.kind = pl::ScheduleKind::kInterleaved;
  o.schedule.stages_per_rank = 2;
  o.schedule.num_microbatches = world().size() + 1;
  EXPECT_THROW(PipelineParallel(layers, pl::partition_uniform(kLayers, 2 * world().size()),
                                torch::zeros({1, kFeatures}), ctx, optimizer, classification(), o),
               InvalidArgument);
  // ZeRO-1 per stage with tp > 1 (as DataParallel refuses it), naming tp.
  if (world().size() % 2 == 0) {
    auto tp2 = std::make_shared<const parallel::ParallelContext>(fresh_world("pp-zero-tp"), 2,
                                                                 world().size() / 2);
    PipelineParallelOptions z;
    z.zero = true;
    z.schedule.num_microbatches = 4;
    try {
      PipelineParallel(layers, pl::partition_uniform(kLayers, world().size() / 2),
                       torch::zeros({1, kFeatures}), tp2, optimizer, classification(), z);
      ADD_FAILURE() << "ZeRO-1 with tp 2 was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("ZeRO-1 per pipeline stage with tp 2"),
                std::string::npos)
          << e.what();
    }
  }
  // The refusals happened before any message: the context still works.
  auto t = torch::ones({1});
  ctx->world()->all_reduce(t)->wait();
  EXPECT_EQ(t.item<float>(), world().size());
}

}  // namespace
}  // namespace dtrain::train
