// The GPT example under pipeline parallelism (PipelineParallel over
// GptImpl::layers()), in float64 with dropout on:
//  * pp = 2 against pp = 1 running the same microbatches, 10 AdamW steps,
//    for each schedule (gpipe, 1f1b, interleaved, zb-h1), bitwise equal with
//    the tied embedding's gradients summed per microbatch
//    (TiedGradientSum::kPerMicrobatch). Summed per step (the default: first
//    stage's sum + last stage's sum, where one process adds both uses per
//    microbatch), every other parameter is bitwise equal after the first
//    step and 10 steps agree within 1e-12 relative.
//  * pp = 2 x tp = 2 on 4 ranks against tp = 2 (with sequence parallelism).
//  * checkpoints: saved at tp 2 x pp 2 on 4 ranks, loaded at (tp, pp) =
//    (1, 1), (2, 1) and (1, 2): parameters and optimizer state bitwise the
//    saved global tensors; 10 more steps bitwise equal to the uninterrupted
//    run after the pp-only change, within 1e-6 after a tp change.

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/pipeline/generators.h"
#include "dtrain/parallel/rng.h"
#include "dtrain/train/pipeline_parallel.h"
#include "examples/gpt/gpt.h"
#include "src/common/torch_compat.h"
#include "tests/mpi/gpt_test_util.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::gpt {
namespace {

using parallel::ParallelContext;
using parallel::pipeline::ScheduleKind;

using fixtures::DoubleScope;
using fixtures::global_tokens;
using fixtures::kContext;
using fixtures::kGlobalBatch;
using fixtures::kSeed;
using fixtures::kVocab;

// 4 blocks: 4 stages, pp 2 x 2 stages per rank (interleaved).
GptOptions tiny(bool sequence_parallel = false) { return fixtures::tiny(4, sequence_parallel); }

struct Schedule {
  ScheduleKind kind = ScheduleKind::kOneFOneB;
  int microbatches = 1;
  int stages_per_rank = 1;
};

// A GPT and its PipelineParallel strategy over one dp x pp x tp layout.
struct Piped {
  std::shared_ptr<ParallelContext> ctx;
  std::shared_ptr<parallel::RngStreams> rng;
  Gpt model{nullptr};
  parallel::pipeline::StagePartition partition;
  std::unique_ptr<train::PipelineParallel> strategy;

  Piped(std::shared_ptr<collectives::Communicator> world, int tp, int pp, Schedule schedule,
        const GptOptions& options = tiny(),
        parallel::pipeline::TiedGradientSum tied = parallel::pipeline::TiedGradientSum::kPerStep)
      : ctx(std::make_shared<ParallelContext>(std::move(world), tp, pp)),
        rng(std::make_shared<parallel::RngStreams>(*ctx, kSeed)) {
    model = Gpt(options, ctx->tp(), rng);
    train::PipelineParallelOptions o;
    o.schedule.kind = schedule.kind;
    o.schedule.num_microbatches = schedule.microbatches;
    o.schedule.stages_per_rank = schedule.stages_per_rank;
    o.seed = kSeed;
    o.activation_dtype = at::kDouble;
    o.tied_gradients = tied;
    partition = pipeline_partition(options, pp * schedule.stages_per_rank);
    strategy = std::make_unique<train::PipelineParallel>(
        model->layers(), partition, at::zeros({1, kContext}, at::kLong), ctx,
        [](std::vector<torch::Tensor> params) -> std::unique_ptr<torch::optim::Optimizer> {
          return std::make_unique<torch::optim::AdamW>(
              params, torch::optim::AdamWOptions(3e-3).weight_decay(0.1));
        },
        vocab_parallel_objective(kVocab, ctx->tp()), o);
  }

  void train(std::int64_t first, std::int64_t count) {
    for (std::int64_t s = first; s < first + count; ++s) {
      train::Batch batch = fixtures::local_batch(s, ctx->data_rank(), ctx->data_world_size());
      strategy->train_step(batch, train::StepInfo{});
    }
  }

  // This rank's trained parameters under their global names (the tied
  // output layer's copy under the embedding's name).
  std::map<std::string, at::Tensor> parameters() const {
    std::map<std::string, at::Tensor> out;
    for (const auto& [name, value] : strategy->engine().named_parameters()) {
      out[name == "head.weight" ? "embedding.wte.weight" : name] = value.detach();
    }
    return out;
  }

  // Writes the state into a fresh directory shared by the layout's ranks
  // and returns the checkpoint.
  checkpoint::Checkpoint save(const std::string& prefix, std::int64_t step) const {
    const std::string dir = testing::shared_temp_dir(*ctx->world(), prefix);
    checkpoint::CheckpointOptions o;
    o.directory = dir;
    o.async = false;
    o.fsync = false;
    {
      checkpoint::CheckpointManager manager(o, *ctx);
      manager.save(step, strategy->state_dict());
    }
    const auto entries = checkpoint::list_checkpoints(dir);
    EXPECT_EQ(entries.size(), 1u);
    return checkpoint::Checkpoint::open(entries.back().directory);
  }
};

double relative(const at::Tensor& a, const at::Tensor& b) {
  const double scale = std::max(b.abs().max().item<double>(), 1e-300);
  return (a - b).abs().max().item<double>() / scale;
}

std::shared_ptr<collectives::Communicator> pairs(collectives::Communicator& world) {
  return world.split(world.rank() / 2, world.rank(), {"gpt-pp-pairs", std::nullopt});
}
std::shared_ptr<collectives::Communicator> self(collectives::Communicator& world) {
  return world.split(world.rank(), 0, {"gpt-pp-self", std::nullopt});
}

std::string schedule_text(const Schedule& s) {
  return std::string(parallel::pipeline::schedule_kind_name(s.kind)) + ", m " +
         std::to_string(s.microbatches) + ", v " + std::to_string(s.stages_per_rank);
}

// Every parameter of `split` (this rank's stages) against `dense`'s:
// bitwise at tolerance 0, else the tied embedding (or all) within it.
void expect_match(const Piped& split, const Piped& dense, double tolerance, bool only_tied_differs,
                  const std::string& what) {
  const auto reference = dense.parameters();
  for (const auto& [name, local] : split.parameters()) {
    const at::Tensor expected = reference.at(name);
    ASSERT_EQ(local.sizes(), expected.sizes()) << what << ": " << name;
    if (tolerance == 0 || (only_tied_differs && name != "embedding.wte.weight")) {
      EXPECT_TRUE(at::equal(local, expected))
          << what << ": " << name << " differs by " << relative(local, expected);
    } else {
      EXPECT_LE(relative(local, expected), tolerance) << what << ": " << name;
    }
  }
}

TEST(GptPipeline, TwoStagesTrainLikeOne) {
  auto& world = testing::world();
  if (world.size() % 2 != 0) GTEST_SKIP() << "needs an even world";
  DoubleScope dtype;
  const std::vector<Schedule> schedules = {
      {ScheduleKind::kGPipe, 1, 1},        {ScheduleKind::kOneFOneB, 1, 1},
      {ScheduleKind::kGPipe, 4, 1},        {ScheduleKind::kOneFOneB, 4, 1},
      {ScheduleKind::kInterleaved, 2, 2},  {ScheduleKind::kZeroBubbleH1, 2, 1},
      {ScheduleKind::kZeroBubbleH1, 4, 1},
  };
  for (const Schedule& s : schedules) {
    const std::string what = "pp 2 (" + schedule_text(s) + "), tied summed per microbatch";
    Piped split(pairs(world), 1, 2, s, tiny(), parallel::pipeline::TiedGradientSum::kPerMicrobatch);
    Piped dense(self(world), 1, 1, {ScheduleKind::kOneFOneB, s.microbatches, 1});
    expect_match(split, dense, 0.0, false, what + ", initial");
    split.train(0, 10);
    dense.train(0, 10);
    expect_match(split, dense, 0.0, false, what + ", 10 steps");
  }
  // Summed per step: the tied embedding rounds differently.
  for (const Schedule& s :
       {Schedule{ScheduleKind::kOneFOneB, 4, 1}, Schedule{ScheduleKind::kZeroBubbleH1, 4, 1}}) {
    const std::string what = "pp 2 (" + schedule_text(s) + "), tied summed per step";
    Piped split(pairs(world), 1, 2, s);
    Piped dense(self(world), 1, 1, {ScheduleKind::kOneFOneB, s.microbatches, 1});
    split.train(0, 1);
    dense.train(0, 1);
    expect_match(split, dense, 1e-14, true, what + ", 1 step");
    split.train(1, 9);
    dense.train(1, 9);
    expect_match(split, dense, 1e-12, false, what + ", 10 steps");
  }
}

TEST(GptPipeline, PipelineAndTensorParallelTrainLikeTensorParallel) {
  auto& world = testing::world();
  if (world.size() != 4) GTEST_SKIP() << "needs 4 ranks";
  DoubleScope dtype;
  for (bool sp : {false, true}) {
    const std::string what = sp ? "pp 2 x tp 2 with sequence parallelism" : "pp 2 x tp 2";
    Piped split(world.split(0, world.rank(), {"gpt-pp-tp", std::nullopt}), 2, 2,
                {ScheduleKind::kOneFOneB, 1, 1}, tiny(sp));
    ASSERT_EQ(split.ctx->pp_size(), 2);
    // tp 2 alone over the ranks of one pp coordinate: the same tp ranks.
    Piped dense(world.split(split.ctx->pp_rank(), world.rank(), {"gpt-tp", std::nullopt}), 2, 1,
                {ScheduleKind::kOneFOneB, 1, 1}, tiny(sp));
    ASSERT_EQ(dense.ctx->tp_rank(), split.ctx->tp_rank());
    split.train(0, 10);
    dense.train(0, 10);
    expect_match(split, dense, 0.0, false, what + ", 10 steps");
  }
}

// The global tensors of a checkpoint, by name.
std::map<std::string, at::Tensor> global_tensors(const checkpoint::Checkpoint& ckpt,
                                                 const std::string& prefix) {
  std::map<std::string, at::Tensor> out;
  for (const std::string& name : ckpt.tensor_names()) {
    if (name.rfind(prefix, 0) == 0) out[name] = ckpt.read(name);
  }
  return out;
}

// Every parameter and AdamW field of `run` equals its block of the saved
// global tensor, bitwise.
void expect_loaded(const Piped& run, const checkpoint::Checkpoint& ckpt, const std::string& what) {
  const auto& engine = run.strategy->engine();
  const auto tied = parallel::pipeline::find_tied_parameters(run.model->layers(), run.partition);
  auto& optimizer = run.strategy->optimizer();
  std::size_t checked = 0;
  for (int s : engine.stage_ids()) {
    const auto stage = engine.stage(s);
    const parallel::ModuleLayout layout = train::stage_layout(*stage, s, tied);
    std::set<const void*> seen;
    for (const auto& item : stage->named_parameters()) {
      // A tied weight within one stage is one tensor, stored once under its
      // first name.
      if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;
      const std::string name = layout.global(item.key());
      const parallel::Placement p = layout.placement(item.key(), item.value());
      EXPECT_TRUE(at::equal(item.value(), ckpt.read("model/" + name, p.offset, p.shape)))
          << what << ": " << name;
      const auto& state = optimizer.state().at(dtrain::detail::optimizer_state_key(item.value()));
      const auto& adam = static_cast<const torch::optim::AdamWParamState&>(*state);
      EXPECT_TRUE(
          at::equal(adam.exp_avg(), ckpt.read("optim/" + name + "/exp_avg", p.offset, p.shape)))
          << what << ": exp_avg of " << name;
      EXPECT_TRUE(at::equal(adam.exp_avg_sq(),
                            ckpt.read("optim/" + name + "/exp_avg_sq", p.offset, p.shape)))
          << what << ": exp_avg_sq of " << name;
      EXPECT_EQ(static_cast<double>(adam.step()),
                ckpt.read("optim/" + name + "/step").item<double>())
          << what << ": step of " << name;
      ++checked;
    }
  }
  EXPECT_GT(checked, 0u) << what;
}

TEST(GptPipeline, CheckpointMovesBetweenLayouts) {
  auto& world = testing::world();
  if (world.size() != 4) GTEST_SKIP() << "needs 4 ranks";
  DoubleScope dtype;
  const Schedule one{ScheduleKind::kOneFOneB, 1, 1};
  std::shared_ptr<collectives::Communicator> all =
      world.split(0, world.rank(), {"gpt-pp-all", std::nullopt});
  Piped saved(all, 2, 2, one);
  saved.train(0, 3);
  const checkpoint::Checkpoint ckpt = saved.save("gpt-pp-ckpt", 3);
  // The uninterrupted run.
  saved.train(3, 10);
  const auto reference = global_tensors(saved.save("gpt-pp-ref", 13), "model/");

  struct Target {
    int tp, pp;
    double tolerance;
  };
  for (const Target& t : {Target{2, 1, 0.0}, Target{1, 1, 1e-6}, Target{1, 2, 1e-6}}) {
    const std::string what =
        "loaded at tp " + std::to_string(t.tp) + ", pp " + std::to_string(t.pp);
    Piped loaded(t.tp * t.pp == 1 ? self(world) : pairs(world), t.tp, t.pp, one);
    loaded.strategy->load_state(ckpt);
    expect_loaded(loaded, ckpt, what);
    loaded.train(3, 10);
    const auto after = global_tensors(loaded.save("gpt-pp-after", 13), "model/");
    ASSERT_EQ(after.size(), reference.size()) << what;
    for (const auto& [name, tensor] : reference) {
      if (t.tolerance == 0) {
        EXPECT_TRUE(at::equal(after.at(name), tensor))
            << what << ", 10 steps on: " << name << " differs by "
            << relative(after.at(name), tensor);
      } else if (tensor.is_floating_point()) {
        EXPECT_LE(relative(after.at(name), tensor), t.tolerance) << what << ": " << name;
      } else {
        EXPECT_TRUE(at::equal(after.at(name), tensor)) << what << ": " << name;
      }
    }
  }
}

}  // namespace
}  // namespace dtrain::gpt
