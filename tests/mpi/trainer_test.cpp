// The trainer's parts on their own (dtrain/train/trainer.h), with a fake
// strategy and fake data: the loop's step count and report sums, the
// learning-rate schedule, checkpoint save and resume, the SIGTERM stop,
// input errors agreed over the ranks, and the metrics it writes.

#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/error.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/placement.h"
#include "dtrain/train/trainer.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::train {
namespace {

constexpr std::int64_t kBatchesPerEpoch = 4;

// Batch b of epoch e holds, per rank, one sample whose value is the global
// step it belongs to; its position is "e b".
class CountingData : public DataSource {
 public:
  CountingData(const std::string& position, int rank) : rank_(rank) {
    if (!position.empty()) {
      std::istringstream in(position);
      in >> epoch_ >> batch_;
      DTRAIN_CHECK_ARG(!in.fail(), "bad position '", position, "'");
    }
  }
  Batch next() override {
    Batch b;
    b.epoch = epoch_;
    b.batch_in_epoch = batch_;
    const double global = static_cast<double>(epoch_ * kBatchesPerEpoch + batch_);
    b.inputs = at::full({1}, global, at::kDouble);
    b.targets = at::zeros({1}, at::kLong);
    b.indices = at::full({1}, global * 10 + rank_, at::kLong);
    if (++batch_ == kBatchesPerEpoch) {
      batch_ = 0;
      ++epoch_;
    }
    return b;
  }
  std::int64_t batches_per_epoch() const override { return kBatchesPerEpoch; }
  std::string position() const override {
    return std::to_string(epoch_) + " " + std::to_string(batch_);
  }

 private:
  int rank_;
  std::int64_t epoch_ = 0;
  std::int64_t batch_ = 0;
};

// "Trains" a scalar: w += lr * (batch value + 1). Its loss is the step
// number; every other step's prediction is correct. Given the run's
// communicators, it all-reduces step + 1 floats over train_comm and one
// double over the dp axis each step (the trainer counts them).
class CountingStrategy : public Strategy {
 public:
  std::string name() const override { return "counting"; }
  void set_lr(double lr) override { lr_ = lr; }
  StepResult train_step(Batch& batch, const StepInfo& info) override {
    if (run_ != nullptr) {
      run_->train_comm->all_reduce(at::ones({info.step + 1}))->wait();
      run_->context->dp()->all_reduce(at::ones({1}, at::kDouble))->wait();
    }
    seen_steps.push_back(info.step);
    seen_inputs.push_back(batch.inputs.item<double>());
    w_ += lr_ * (batch.inputs.item<double>() + 1);
    if (raise_at && info.step + 1 == *raise_at) ::raise(SIGTERM);
    StepResult r;
    r.sums = {static_cast<double>(info.step), info.step % 2 == 0 ? 1.0 : 0.0, 1.0};
    r.local_loss = static_cast<double>(info.step);
    r.metrics = {{"fake_s", 0.5}};
    return r;
  }
  void set_training(bool training) override { training_ = training; }
  ReportSums eval_step(Batch& batch) override {
    EXPECT_FALSE(training_);
    ++eval_batches;
    return {2.0 * static_cast<double>(batch.targets.numel()), 0.25, 1.0};
  }
  checkpoint::StateDict state_dict() const override {
    checkpoint::StateDict state;
    state.add_replicated("model/w", at::full({1}, w_, at::kDouble));
    return state;
  }
  void load_state(const checkpoint::Checkpoint& ckpt) override {
    w_ = ckpt.read("model/w").item<double>();
  }

  double w() const { return w_; }
  std::vector<std::int64_t> seen_steps;
  std::vector<double> seen_inputs;
  int eval_batches = 0;
  std::optional<std::int64_t> raise_at;  // SIGTERM in this step (1-based), on rank 0
  const RunContext* run_ = nullptr;

 private:
  double lr_ = 0;
  double w_ = 0;
  bool training_ = false;
};

class FakeProgram : public TrainingProgram {
 public:
  std::int64_t check_input(const RunContext& run) override {
    DTRAIN_CHECK_ARG(!(bad_input_rank && *bad_input_rank == run.rank), "rank ", run.rank,
                     " dislikes its input");
    return kBatchesPerEpoch;
  }
  std::unique_ptr<Strategy> make_strategy(const RunContext& run) override {
    auto s = std::make_unique<CountingStrategy>();
    s->run_ = &run;
    if (raise_at && testing::runtime().rank() == 0) s->raise_at = raise_at;
    strategy = s.get();
    return s;
  }
  std::unique_ptr<DataSource> train_data(const RunContext& run,
                                         const std::string& position) override {
    started_at = position;
    return std::make_unique<CountingData>(position, run.context->data_rank());
  }
  std::unique_ptr<DataSource> eval_data(const RunContext& run) override {
    if (!with_eval) return nullptr;
    return std::make_unique<CountingData>("", run.context->data_rank());
  }
  Identity identity() const override { return {{"model", model}}; }
  std::string describe() const override { return "fake: " + model; }
  nlohmann::json config() const override { return {{"model", model}}; }

  std::string model = "counting";
  bool with_eval = true;
  std::optional<int> bad_input_rank;
  std::optional<std::int64_t> raise_at;
  CountingStrategy* strategy = nullptr;
  std::string started_at;
};

// Two "layers" of one scalar each, layer l trained as w += lr * (input + 1 +
// l), split over the pipeline stages of the trainer's layout: with pp = 2,
// stage s holds layer s; with pp = 1, each rank holds both. Only the last
// stage reports the sums, as a pipeline does.
class StagedStrategy : public Strategy {
 public:
  static constexpr int kLayers = 2;
  explicit StagedStrategy(const parallel::ParallelContext& context) : context_(context) {
    const int per_stage = kLayers / context.pp_size();
    for (int l = context.pp_rank() * per_stage; l < (context.pp_rank() + 1) * per_stage; ++l) {
      w_[l] = 0;
    }
  }
  std::string name() const override { return "staged"; }
  void set_lr(double lr) override { lr_ = lr; }
  StepResult train_step(Batch& batch, const StepInfo& info) override {
    for (auto& [layer, w] : w_) w += lr_ * (batch.inputs.item<double>() + 1 + layer);
    StepResult r;
    if (context_.is_last_stage()) r.sums = {static_cast<double>(info.step), 1.0, 1.0};
    return r;
  }
  void set_training(bool) override {}
  ReportSums eval_step(Batch&) override { return {}; }
  checkpoint::StateDict state_dict() const override {
    checkpoint::StateDict state;
    for (const auto& [layer, w] : w_) {
      state.add(name_of(layer), at::full({1}, w, at::kDouble),
                parallel::Placement::replicated({1}).on_stage(context_.pp_rank()));
    }
    return state;
  }
  void load_state(const checkpoint::Checkpoint& ckpt) override {
    for (auto& [layer, w] : w_) w = ckpt.read(name_of(layer)).item<double>();
  }
  static std::string name_of(int layer) { return "layers." + std::to_string(layer) + ".w"; }

  std::map<int, double> w_;  // by global layer index

 private:
  parallel::ParallelContext context_;
  double lr_ = 0;
};

class StagedProgram : public FakeProgram {
 public:
  std::unique_ptr<Strategy> make_strategy(const RunContext& run) override {
    auto s = std::make_unique<StagedStrategy>(*run.context);
    staged = s.get();
    return s;
  }
  StagedStrategy* staged = nullptr;
};

TrainerOptions options_in(const std::string& dir, std::int64_t steps) {
  TrainerOptions o;
  o.steps = steps;
  o.global_batch = testing::runtime().size();
  o.lr.lr = 1;
  o.lr.warmup_epochs = 0;
  o.lr.shape = "constant";
  o.out = dir;
  o.checkpoint_dir = dir + "/checkpoints";
  o.checkpoint_every = 2;
  o.async_checkpoint = false;
  o.metrics_dir = dir + "/metrics";
  o.progress = "lines";
  o.log_every = 1000;
  o.comm_timeout_s = 60;
  return o;
}

std::vector<nlohmann::json> metrics_of(const std::string& dir, const std::string& kind) {
  char name[64];
  std::snprintf(name, sizeof(name), "/metrics/metrics-rank%05d.jsonl", testing::runtime().rank());
  std::ifstream in(dir + name);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] == kind) out.push_back(j);
  }
  return out;
}

TEST(Trainer, RunsEveryStepAndReportsGlobalSums) {
  const std::string dir = testing::shared_temp_dir(testing::world(), "dtrain-trainer");
  FakeProgram program;
  Trainer trainer(options_in(dir, 6), program, testing::runtime());
  EXPECT_EQ(trainer.run(), kExitOk);
  EXPECT_EQ(trainer.step(), 6);
  ASSERT_NE(program.strategy, nullptr);
  EXPECT_EQ(program.strategy->seen_steps, (std::vector<std::int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(program.strategy->seen_inputs, (std::vector<double>{0, 1, 2, 3, 4, 5}));
  EXPECT_DOUBLE_EQ(program.strategy->w(), 1 + 2 + 3 + 4 + 5 + 6);
  // Evaluation after epoch 1 (step 4) and at the end: 4 batches each.
  EXPECT_EQ(program.strategy->eval_batches, 8);
  EXPECT_DOUBLE_EQ(trainer.last_eval_accuracy(), 0.25);
  EXPECT_DOUBLE_EQ(trainer.last_eval_loss(), 2.0);

  const auto train = metrics_of(dir, "train");
  ASSERT_EQ(train.size(), 6u);
  for (std::size_t i = 0; i < train.size(); ++i) {
    // Every rank reports loss = step, so the global mean is the step too.
    EXPECT_EQ(train[i]["step"], static_cast<std::int64_t>(i + 1));
    EXPECT_DOUBLE_EQ(train[i]["loss"].get<double>(), static_cast<double>(i));
    EXPECT_DOUBLE_EQ(train[i]["accuracy"].get<double>(), i % 2 == 0 ? 1.0 : 0.0);
    EXPECT_DOUBLE_EQ(train[i]["fake_s"].get<double>(), 0.5);
    EXPECT_TRUE(train[i].contains("images_per_s"));
    EXPECT_TRUE(train[i].contains("data_wait_s"));
    // The process's high-water mark: at least the LibTorch it has loaded,
    // and never lower than at an earlier step.
    EXPECT_GT(train[i]["max_rss_bytes"].get<std::int64_t>(), 10 << 20);
    if (i > 0) {
      EXPECT_GE(train[i]["max_rss_bytes"].get<std::int64_t>(),
                train[i - 1]["max_rss_bytes"].get<std::int64_t>());
    }
    EXPECT_EQ(train[i]["lr"], 1.0);
    // What the strategy handed to the layout's communicators in this step:
    // step + 1 floats over the world and a double over dp, bus bytes as a
    // ring over k ranks sends them (the trainer's own all-reduce is not
    // counted).
    const std::int64_t k = testing::world().size();
    const std::int64_t floats = 4 * static_cast<std::int64_t>(i + 1);
    EXPECT_EQ(train[i]["comm_ops"], 2);
    EXPECT_EQ(train[i]["comm_bytes"], floats + 8);
    EXPECT_EQ(train[i]["comm_sent_bytes"], 2 * (floats * (k - 1) / k) + 2 * (8 * (k - 1) / k));
  }
  const auto runs = metrics_of(dir, "run");
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0]["config"]["steps"], 6);
  EXPECT_EQ(runs[0]["config"]["model"], "counting");
  // The base: at least the loaded libraries, at most what the steps reached.
  EXPECT_GT(runs[0]["base_rss_bytes"].get<std::int64_t>(), 10 << 20);
  EXPECT_LE(runs[0]["base_rss_bytes"].get<std::int64_t>(),
            train.back()["max_rss_bytes"].get<std::int64_t>());
  // Saves at steps 2 and 4 (every 2, not at the last step) and the final one at 6.
  std::vector<std::int64_t> saved;
  for (const auto& c : metrics_of(dir, "checkpoint")) saved.push_back(c["step"]);
  EXPECT_EQ(saved, (std::vector<std::int64_t>{2, 4, 6}));
  const auto ckpt = checkpoint::Checkpoint::open(dir + "/checkpoints/step-000000006");
  EXPECT_EQ(ckpt.metadata("model"), "counting");
  EXPECT_EQ(ckpt.metadata("sampler"), "1 2");
  EXPECT_EQ(ckpt.metadata("global_batch"), std::to_string(testing::runtime().size()));
  EXPECT_EQ(ckpt.metadata("seed"), "0");
}

TEST(Trainer, ResumesWhereTheCheckpointLeftOffAndEndsLikeOneRun) {
  const std::string dir = testing::shared_temp_dir(testing::world(), "dtrain-trainer");
  FakeProgram whole;
  Trainer reference(options_in(dir + "/whole", 10), whole, testing::runtime());
  ASSERT_EQ(reference.run(), kExitOk);

  FakeProgram first;
  Trainer part1(options_in(dir + "/split", 5), first, testing::runtime());
  ASSERT_EQ(part1.run(), kExitOk);
  FakeProgram second;
  Trainer part2(options_in(dir + "/split", 10), second, testing::runtime());
  ASSERT_EQ(part2.run(), kExitOk);
  EXPECT_EQ(second.started_at, "1 1");  // after step 5 of 4-step epochs
  EXPECT_EQ(second.strategy->seen_steps, (std::vector<std::int64_t>{5, 6, 7, 8, 9}));
  EXPECT_EQ(second.strategy->seen_inputs, (std::vector<double>{5, 6, 7, 8, 9}));
  EXPECT_EQ(second.strategy->w(), whole.strategy->w());
}

TEST(Trainer, RefusesACheckpointOfAnotherIdentity) {
  const std::string dir = testing::shared_temp_dir(testing::world(), "dtrain-trainer");
  FakeProgram first;
  ASSERT_EQ(Trainer(options_in(dir, 2), first, testing::runtime()).run(), kExitOk);
  FakeProgram other;
  other.model = "another";
  Trainer trainer(options_in(dir, 4), other, testing::runtime());
  try {
    trainer.run();
    FAIL() << "resumed a checkpoint of another model";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("was written with model = counting but this run has "
                                         "another"),
              std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(trainer.started());
  // --resume false refuses a directory that holds checkpoints.
  FakeProgram fresh;
  TrainerOptions o = options_in(dir, 4);
  o.resume = false;
  EXPECT_THROW(Trainer(o, fresh, testing::runtime()).run(), InvalidArgument);
}

TEST(Trainer, OneRanksBadInputStopsEveryRankBeforeAnythingIsWritten) {
  const std::string dir = testing::shared_temp_dir(testing::world(), "dtrain-trainer");
  FakeProgram program;
  program.bad_input_rank = testing::runtime().size() - 1;
  Trainer trainer(options_in(dir, 4), program, testing::runtime());
  try {
    trainer.run();
    FAIL() << "bad input was accepted";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    if (testing::runtime().rank() == *program.bad_input_rank) {
      EXPECT_NE(what.find("dislikes its input"), std::string::npos) << what;
    } else {
      EXPECT_EQ(what, "another rank rejected the input");
    }
  }
  EXPECT_FALSE(trainer.started());
  EXPECT_EQ(program.strategy, nullptr);
  testing::world().barrier()->wait();
  EXPECT_FALSE(std::filesystem::exists(dir + "/checkpoints"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/metrics"));
}

TEST(Trainer, SigtermOnOneRankSavesAndStopsEveryRank) {
  const std::string dir = testing::shared_temp_dir(testing::world(), "dtrain-trainer");
  StopSignals signals;
  FakeProgram program;
  program.raise_at = 3;  // rank 0 gets SIGTERM during step 3 (not a save step)
  Trainer trainer(options_in(dir, 100), program, testing::runtime());
  EXPECT_EQ(trainer.run(), kExitStopped);
  EXPECT_EQ(trainer.step(), 3);
  EXPECT_TRUE(checkpoint::Checkpoint::open(dir + "/checkpoints/step-000000003").step() == 3);
  // No evaluation on a signal: it stops as soon as it has saved.
  EXPECT_EQ(program.strategy->eval_batches, 0);
}

TEST(Trainer, TimeLimitEvaluatesSavesAndExitsZero) {
  const std::string dir = testing::shared_temp_dir(testing::world(), "dtrain-trainer");
  FakeProgram program;
  TrainerOptions o = options_in(dir, 1000);
  o.max_minutes = 1e-9;  // over after the first step
  Trainer trainer(o, program, testing::runtime());
  EXPECT_EQ(trainer.run(), kExitOk);
  EXPECT_EQ(trainer.step(), 1);
  EXPECT_EQ(program.strategy->eval_batches, 4);
  EXPECT_EQ(checkpoint::Checkpoint::open(dir + "/checkpoints/step-000000001").step(), 1);
}

// The trainer writes its checkpoints with the layout of TrainerOptions::tp
// and pp: each stage's tensors once, by global name, so that a run with
// another split resumes them.
TEST(Trainer, ACheckpointOfTwoStagesResumesInOneStage) {
  const std::string dir = testing::shared_temp_dir(testing::world(), "dtrain-trainer");
  TrainerOptions two_stages = options_in(dir + "/split", 5);
  two_stages.pp = 2;
  if (testing::runtime().size() % 2 != 0) {
    StagedProgram program;
    Trainer trainer(two_stages, program, testing::runtime());
    try {
      trainer.run();
      FAIL() << "two stages were laid out over an odd number of ranks";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("is not divisible"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(trainer.started());
    EXPECT_EQ(program.staged, nullptr);
    return;
  }
  StagedProgram whole;
  Trainer reference(options_in(dir + "/whole", 10), whole, testing::runtime());
  ASSERT_EQ(reference.run(), kExitOk);
  ASSERT_EQ(whole.staged->w_.size(), 2u);

  // Each program's strategy lives as long as its trainer: keep them.
  StagedProgram first;
  Trainer split(two_stages, first, testing::runtime());
  ASSERT_EQ(split.run(), kExitOk);
  ASSERT_EQ(first.staged->w_.size(), 1u);
  const auto runs = metrics_of(dir + "/split", "run");
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0]["layout"]["pp"], 2);
  EXPECT_EQ(runs[0]["layout"]["dp"], testing::runtime().size() / 2);
  // Each stage's layer is one piece, written once, however many replicas hold it.
  const auto ckpt = checkpoint::Checkpoint::open(dir + "/split/checkpoints/step-000000005");
  EXPECT_EQ(ckpt.grid().pp, 2);
  EXPECT_EQ(ckpt.tensor_names(), (std::vector<std::string>{"layers.0.w", "layers.1.w"}));
  for (const auto& name : ckpt.tensor_names()) EXPECT_EQ(ckpt.info(name).pieces.size(), 1u);
  // Every train line's mean loss is the step's, from the last stage's sums only.
  const auto train = metrics_of(dir + "/split", "train");
  ASSERT_EQ(train.size(), 5u);
  for (std::size_t i = 0; i < train.size(); ++i) {
    EXPECT_DOUBLE_EQ(train[i]["loss"].get<double>(), static_cast<double>(i));
  }

  StagedProgram second;  // one stage: both layers on every rank
  Trainer resumed(options_in(dir + "/split", 10), second, testing::runtime());
  ASSERT_EQ(resumed.run(), kExitOk);
  EXPECT_EQ(second.started_at, "1 1");
  EXPECT_EQ(second.staged->w_, whole.staged->w_);
}

TEST(LrSchedule, WarmsUpThenFollowsItsShape) {
  LrScheduleOptions o;
  o.lr = 0.4;
  o.warmup_epochs = 1;
  o.shape = "cosine";
  const LrSchedule cosine(o, 10, 30);  // 10 warm-up steps, 20 cosine steps
  EXPECT_DOUBLE_EQ(cosine.at(0), 0.04);
  EXPECT_DOUBLE_EQ(cosine.at(9), 0.4);
  EXPECT_DOUBLE_EQ(cosine.at(10), 0.4);
  EXPECT_NEAR(cosine.at(20), 0.2, 1e-15);
  EXPECT_NEAR(cosine.at(30), 0.0, 1e-15);
  o.warmup_epochs = 0;
  o.shape = "step";
  o.step_epochs = {1, 2};
  o.step_gamma = 0.5;
  const LrSchedule step(o, 10, 30);
  EXPECT_DOUBLE_EQ(step.at(9), 0.4);
  EXPECT_DOUBLE_EQ(step.at(10), 0.2);
  EXPECT_DOUBLE_EQ(step.at(25), 0.1);
  o.shape = "linear";
  EXPECT_THROW(o.validate(), InvalidArgument);
}

}  // namespace
}  // namespace dtrain::train
