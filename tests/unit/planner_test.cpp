// The layout enumeration against hand-written lists, and the cost model
// against hand-computed cases (include/dtrain/plan/planner.h).

#include "dtrain/plan/planner.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/plan/measure.h"

namespace dtrain::plan {
namespace {

// A GPT-like model: 4 blocks, 4 heads (tp must divide 4), 8 tokens.
ModelLimits four_blocks() {
  ModelLimits m;
  m.layers = 4;
  m.tp_must_divide = {4};
  m.sequence = 8;
  return m;
}

SearchSpace space_of(int world) {
  SearchSpace s;
  s.world = world;
  s.global_batch = 24;
  s.microbatch_multiples = {1, 2};
  s.schedules = {ScheduleKind::kOneFOneB, ScheduleKind::kInterleaved};
  return s;
}

std::vector<std::string> names(const std::vector<Layout>& layouts) {
  std::vector<std::string> out;
  for (const Layout& l : layouts) out.push_back(l.name());
  return out;
}

TEST(Planner, EnumeratesTheHandWrittenLayouts) {
  const ModelLimits model = four_blocks();
  EXPECT_EQ(names(enumerate_layouts(model, space_of(1))), std::vector<std::string>{"dp1 pp1 tp1"});
  EXPECT_EQ(
      names(enumerate_layouts(model, space_of(2))),
      (std::vector<std::string>{"dp2 pp1 tp1", "dp2 pp1 tp1 zero", "dp1 pp2 tp1 1f1b m2",
                                "dp1 pp2 tp1 1f1b m4", "dp1 pp2 tp1 interleaved v2 m2",
                                "dp1 pp2 tp1 interleaved v2 m4", "dp1 pp1 tp2", "dp1 pp1 tp2 sp"}));
  EXPECT_EQ(names(enumerate_layouts(model, space_of(4))),
            (std::vector<std::string>{"dp4 pp1 tp1",
                                      "dp4 pp1 tp1 zero",
                                      "dp2 pp2 tp1 1f1b m2",
                                      "dp2 pp2 tp1 1f1b m4",
                                      "dp2 pp2 tp1 interleaved v2 m2",
                                      "dp2 pp2 tp1 interleaved v2 m4",
                                      "dp1 pp4 tp1 1f1b m4",
                                      "dp1 pp4 tp1 1f1b m8",
                                      "dp2 pp1 tp2",
                                      "dp2 pp1 tp2 sp",
                                      "dp1 pp2 tp2 1f1b m2",
                                      "dp1 pp2 tp2 1f1b m2 sp",
                                      "dp1 pp2 tp2 1f1b m4",
                                      "dp1 pp2 tp2 1f1b m4 sp",
                                      "dp1 pp2 tp2 interleaved v2 m2",
                                      "dp1 pp2 tp2 interleaved v2 m2 sp",
                                      "dp1 pp2 tp2 interleaved v2 m4",
                                      "dp1 pp2 tp2 interleaved v2 m4 sp",
                                      "dp1 pp1 tp4",
                                      "dp1 pp1 tp4 sp"}));
  EXPECT_EQ(
      names(enumerate_layouts(model, space_of(6))),
      (std::vector<std::string>{
          "dp6 pp1 tp1", "dp6 pp1 tp1 zero", "dp3 pp2 tp1 1f1b m2", "dp3 pp2 tp1 1f1b m4",
          "dp3 pp2 tp1 interleaved v2 m2", "dp3 pp2 tp1 interleaved v2 m4", "dp2 pp3 tp1 1f1b m3",
          "dp2 pp3 tp1 1f1b m6", "dp3 pp1 tp2", "dp3 pp1 tp2 sp", "dp1 pp3 tp2 1f1b m3",
          "dp1 pp3 tp2 1f1b m3 sp", "dp1 pp3 tp2 1f1b m6", "dp1 pp3 tp2 1f1b m6 sp"}));
  EXPECT_EQ(names(enumerate_layouts(model, space_of(8))),
            (std::vector<std::string>{"dp8 pp1 tp1",
                                      "dp8 pp1 tp1 zero",
                                      "dp4 pp2 tp1 1f1b m2",
                                      "dp4 pp2 tp1 interleaved v2 m2",
                                      "dp2 pp4 tp1 1f1b m4",
                                      "dp4 pp1 tp2",
                                      "dp4 pp1 tp2 sp",
                                      "dp2 pp2 tp2 1f1b m2",
                                      "dp2 pp2 tp2 1f1b m2 sp",
                                      "dp2 pp2 tp2 1f1b m4",
                                      "dp2 pp2 tp2 1f1b m4 sp",
                                      "dp2 pp2 tp2 interleaved v2 m2",
                                      "dp2 pp2 tp2 interleaved v2 m2 sp",
                                      "dp2 pp2 tp2 interleaved v2 m4",
                                      "dp2 pp2 tp2 interleaved v2 m4 sp",
                                      "dp1 pp4 tp2 1f1b m4",
                                      "dp1 pp4 tp2 1f1b m4 sp",
                                      "dp1 pp4 tp2 1f1b m8",
                                      "dp1 pp4 tp2 1f1b m8 sp",
                                      "dp2 pp1 tp4",
                                      "dp2 pp1 tp4 sp",
                                      "dp1 pp2 tp4 1f1b m2",
                                      "dp1 pp2 tp4 1f1b m2 sp",
                                      "dp1 pp2 tp4 1f1b m4",
                                      "dp1 pp2 tp4 1f1b m4 sp",
                                      "dp1 pp2 tp4 interleaved v2 m2",
                                      "dp1 pp2 tp4 interleaved v2 m2 sp",
                                      "dp1 pp2 tp4 interleaved v2 m4",
                                      "dp1 pp2 tp4 interleaved v2 m4 sp"}));
}

TEST(Planner, NamesWhyAFactorizationHasNoLayout) {
  const std::vector<RejectedLayout> rejected = rejected_factorizations(four_blocks(), space_of(6));
  std::vector<std::string> got;
  for (const RejectedLayout& r : rejected) got.push_back(r.layout.name() + ": " + r.reason);
  EXPECT_EQ(
      got, (std::vector<std::string>{
               "dp1 pp6 tp1 1f1b m6: pp 6 x 1 stage(s) per rank is more stages than the 4 layers",
               "dp2 pp1 tp3: tp 3 does not divide 4", "dp1 pp2 tp3 1f1b m2: tp 3 does not divide 4",
               "dp1 pp1 tp6: tp 6 does not divide 4"}));
}

TEST(Planner, ModelsWithoutTensorParallelLayersOrZeroCombinations) {
  ModelLimits resnet;
  resnet.layers = 10;
  SearchSpace s = space_of(2);
  s.schedules = {ScheduleKind::kGPipe, ScheduleKind::kZeroBubbleH1};
  EXPECT_EQ(names(enumerate_layouts(resnet, s)),
            (std::vector<std::string>{"dp2 pp1 tp1", "dp2 pp1 tp1 zero", "dp1 pp2 tp1 gpipe m2",
                                      "dp1 pp2 tp1 gpipe m4", "dp1 pp2 tp1 zb-h1 m2",
                                      "dp1 pp2 tp1 zb-h1 m4"}));
  Layout tp2;
  tp2.tp = 2;
  EXPECT_EQ(layout_problem(resnet, s, tp2),
            "the model has no tensor-parallel layers (tp must be 1)");
  Layout sp;
  sp.dp = 2;
  sp.sequence_parallel = true;
  EXPECT_EQ(layout_problem(resnet, s, sp), "sequence parallelism needs tp > 1");
  SearchSpace four = space_of(4);
  Layout zero_pp;
  zero_pp.dp = 2;
  zero_pp.pp = 2;
  zero_pp.microbatches = 2;
  zero_pp.zero = true;
  EXPECT_EQ(layout_problem(resnet, four, zero_pp),
            "the model's program does not combine ZeRO-1 with pp > 1");
  resnet.zero_with_pp = true;
  EXPECT_EQ(layout_problem(resnet, four, zero_pp), "");
  // The generator's own rules: ZB-H1 refuses m < p.
  Layout zb = zero_pp;
  zb.zero = false;
  zb.schedule = ScheduleKind::kZeroBubbleH1;
  zb.microbatches = 1;
  EXPECT_NE(layout_problem(resnet, four, zb).find("zb-h1"), std::string::npos)
      << layout_problem(resnet, four, zb);
}

// Equal layers, each a stage: F = 1 s and B = 2 s per sample, nothing else.
ModelProfile unit_layers(int n) {
  ModelProfile m;
  m.name = "unit";
  m.limits.layers = n;
  for (int i = 0; i < n; ++i) {
    LayerProfile l;
    l.name = "layer" + std::to_string(i);
    l.forward_seconds = 1.0;
    l.backward_seconds = 2.0;
    m.layers.push_back(l);
  }
  return m;
}

MachineProfile free_network() {
  MachineProfile m;
  m.all_reduce_latency = 0.0;
  m.p2p_latency = 0.0;
  return m;
}

TEST(Planner, LayersThatAreNotStageUnitsGoWithTheirNeighbours) {
  // The GPT's shape: embedding | 4 blocks | ln_f | head, cut by blocks, the
  // stage count dividing them.
  ModelProfile gpt = unit_layers(7);
  gpt.limits.layers = 4;
  gpt.limits.stages_must_divide = {4};
  for (int i : {0, 5, 6}) gpt.layers[static_cast<std::size_t>(i)].stage_unit = false;
  for (LayerProfile& l : gpt.layers) l.saved_bytes = 1;  // one byte per sample and layer
  SearchSpace s;
  s.world = 2;
  s.global_batch = 2;
  Layout pp2;
  pp2.pp = 2;
  pp2.microbatches = 2;
  pp2.schedule = ScheduleKind::kGPipe;
  // Stage 0: embedding + 2 blocks (F 3, B 6 per microbatch); stage 1: 2
  // blocks + ln_f + head (F 4, B 8): GPipe's step is F0 + 2 F1 + 2 B1 + B0.
  const Prediction p = predict(gpt, free_network(), s, pp2);
  EXPECT_DOUBLE_EQ(p.step_seconds, 3.0 + 2 * 4.0 + 2 * 8.0 + 6.0);
  EXPECT_EQ(p.activation_bytes, 2 * 4);  // stage 1 stores 2 microbatches of 4 layers
  // 3 stages do not divide the 4 blocks; 5 are more than the units.
  SearchSpace three = s;
  three.world = 3;
  three.global_batch = 3;
  Layout pp3;
  pp3.pp = 3;
  pp3.microbatches = 3;
  EXPECT_EQ(layout_problem(gpt.limits, three, pp3), "pp 3 x 1 stage(s) per rank do not divide 4");
  gpt.limits.layers = 7;
  EXPECT_THROW(gpt.validate(), InvalidArgument);  // 4 units, not 7
}

TEST(Planner, AllReduceBytesAndTime) {
  EXPECT_DOUBLE_EQ(all_reduce_bytes_sent(1000.0, 4), 1500.0);
  EXPECT_DOUBLE_EQ(all_reduce_bytes_sent(1000.0, 2), 1000.0);
  EXPECT_DOUBLE_EQ(all_reduce_bytes_sent(1000.0, 1), 0.0);
  MachineProfile m;
  m.all_reduce_bandwidth = 1e9;
  m.all_reduce_latency = 1e-4;
  EXPECT_DOUBLE_EQ(all_reduce_seconds(m, 4e6, 4), 1e-4 + 6e6 / 1e9);
  EXPECT_DOUBLE_EQ(all_reduce_seconds(m, 4e6, 1), 0.0);
}

TEST(Planner, PipelineBubbleIsTheScheduleFormula) {
  const ModelProfile model = unit_layers(4);
  SearchSpace s;
  s.world = 4;
  s.global_batch = 8;
  for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB}) {
    Layout l;
    l.pp = 4;
    l.schedule = kind;
    l.microbatches = 8;
    const Prediction p = predict(model, free_network(), s, l);
    // (m + p - 1) x (F + B) = 11 x 3; each rank computes 8 x 3.
    EXPECT_DOUBLE_EQ(p.step_seconds, 33.0);
    EXPECT_DOUBLE_EQ(p.compute_seconds, 24.0);
    EXPECT_DOUBLE_EQ(p.bubble_seconds, 9.0);
    EXPECT_DOUBLE_EQ(p.bubble_seconds / p.step_seconds, 3.0 / 11.0);  // (p-1)/(m+p-1)
    EXPECT_DOUBLE_EQ(p.throughput, 8.0 / 33.0);
  }
  // Without a pipeline: the whole batch through all layers on one rank.
  s.world = 1;
  const Prediction one = predict(model, free_network(), s, Layout{});
  EXPECT_DOUBLE_EQ(one.step_seconds, 8 * 4 * 3.0);
  EXPECT_DOUBLE_EQ(one.bubble_seconds, 0.0);
}

TEST(Planner, ActivationMemoryOfGPipeAndOneFOneB) {
  ModelProfile model = unit_layers(2);
  for (LayerProfile& l : model.layers) l.saved_bytes = 1 << 20;  // 1 MiB per sample
  SearchSpace s;
  s.world = 2;
  s.global_batch = 16;
  Layout l;
  l.pp = 2;
  l.microbatches = 8;  // 2 samples each: 2 MiB per stored microbatch
  l.schedule = ScheduleKind::kGPipe;
  const Prediction gpipe = predict(model, free_network(), s, l);
  l.schedule = ScheduleKind::kOneFOneB;
  const Prediction one_f_one_b = predict(model, free_network(), s, l);
  EXPECT_EQ(gpipe.activation_bytes, 8 * (2 << 20));        // m microbatches
  EXPECT_EQ(one_f_one_b.activation_bytes, 2 * (2 << 20));  // min(p - 0, m) at stage 0
  EXPECT_EQ(gpipe.peak_bytes - one_f_one_b.peak_bytes, (8 - 2) * (2 << 20));  // (m - p) x bytes
  // Sequence parallelism splits the replicated activations over tp.
  ModelProfile gpt = unit_layers(2);
  gpt.limits.tp_must_divide = {2};
  gpt.limits.sequence = 4;
  for (LayerProfile& layer : gpt.layers) {
    layer.tensor_parallel = true;
    layer.saved_bytes = 800;
    layer.replicated_saved_bytes = 200;
  }
  SearchSpace two;
  two.world = 2;
  two.global_batch = 1;
  Layout tp;
  tp.tp = 2;
  EXPECT_EQ(predict(gpt, free_network(), two, tp).activation_bytes, 2 * (400 + 200));
  tp.sequence_parallel = true;
  EXPECT_EQ(predict(gpt, free_network(), two, tp).activation_bytes, 2 * (400 + 100));
}

TEST(Planner, DataParallelGradientsAndZero) {
  ModelProfile model = unit_layers(1);
  model.layers[0].parameters = 1'000'000;  // 4 MB of float32
  model.optimizer_states = 2;              // Adam
  MachineProfile machine = free_network();
  machine.all_reduce_bandwidth = 1e9;
  SearchSpace s;
  s.world = 4;
  s.global_batch = 8;
  Layout dp;
  dp.dp = 4;
  const Prediction plain = predict(model, machine, s, dp);
  // 2 samples per rank x 3 s, then 2 (3/4) x 4 MB at 1 GB/s.
  EXPECT_DOUBLE_EQ(plain.step_seconds, 6.0 + 6e6 / 1e9);
  EXPECT_DOUBLE_EQ(plain.communication_seconds, 6e6 / 1e9);
  EXPECT_EQ(plain.bytes_sent_per_step, 6'000'000);
  // Weights + gradients + Adam's 2 states + DDP's gradient buffer.
  EXPECT_EQ(plain.state_bytes, 4'000'000 * 5);
  dp.zero = true;
  const Prediction zero = predict(model, machine, s, dp);
  EXPECT_DOUBLE_EQ(zero.step_seconds, plain.step_seconds);
  EXPECT_EQ(zero.state_bytes, 4'000'000 * 3 + 8'000'000 / 4);
  // What the process holds before training is added to every rank's peak.
  MachineProfile based = machine;
  based.base_bytes_per_rank = 300 << 20;
  EXPECT_EQ(predict(model, based, s, dp).peak_bytes, zero.peak_bytes + (300 << 20));
  machine.memory_per_rank = zero.peak_bytes;
  EXPECT_TRUE(predict(model, machine, s, dp).fits);
  dp.zero = false;
  EXPECT_FALSE(predict(model, machine, s, dp).fits);
}

TEST(Planner, TensorParallelSplitsComputeAndAddsItsAllReduces) {
  ModelProfile model = unit_layers(1);
  model.limits.tp_must_divide = {4};
  model.layers[0].tensor_parallel = true;
  model.layers[0].tp_all_reduces = 2;
  model.layers[0].output_bytes = 1'000'000;
  model.layers[0].parameters = 1000;
  MachineProfile machine = free_network();
  machine.all_reduce_bandwidth = 1e9;
  machine.all_reduce_latency = 1e-3;
  SearchSpace s;
  s.world = 2;
  s.global_batch = 1;
  Layout tp;
  tp.tp = 2;
  const Prediction p = predict(model, machine, s, tp);
  const double one = 1e-3 + 1e6 / 1e9;  // one all-reduce of 1 MB over 2 ranks
  EXPECT_DOUBLE_EQ(p.compute_seconds, 1.5);
  EXPECT_DOUBLE_EQ(p.communication_seconds, 4 * one);
  EXPECT_DOUBLE_EQ(p.step_seconds, 1.5 + 4 * one);
  EXPECT_EQ(p.bytes_sent_per_step, 4'000'000);
  EXPECT_EQ(p.state_bytes, 500 * 4 * (2 + 1));  // its half: weights, gradients, momentum
  // Two ranks on one core take twice the compute.
  machine.cores = 1;
  EXPECT_DOUBLE_EQ(predict(model, machine, s, tp).compute_seconds, 3.0);
}

TEST(Planner, RanksFittingLayoutsFirstAndRefusesInvalidOnes) {
  ModelProfile model = unit_layers(2);
  for (LayerProfile& l : model.layers) l.saved_bytes = 1000;
  SearchSpace s;
  s.world = 2;
  s.global_batch = 8;
  s.schedules = {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB};
  MachineProfile machine = free_network();
  const std::vector<Prediction> ranked = rank_layouts(model, machine, s);
  ASSERT_FALSE(ranked.empty());
  // With a free network, dp 2 has no bubble and wins.
  EXPECT_EQ(ranked.front().layout.name(), "dp2 pp1 tp1");
  for (std::size_t i = 1; i < ranked.size(); ++i) {
    EXPECT_LE(ranked[i - 1].step_seconds, ranked[i].step_seconds);
  }
  // A memory limit below dp 2's activations (8000) puts it behind a pipeline
  // that stores less.
  machine.memory_per_rank = 7000;
  const std::vector<Prediction> limited = rank_layouts(model, machine, s);
  // 1F1B stores 2 microbatches at stage 0: 2 x 1000 at m = 8 (and 2 x 2000 at
  // m = 4, which also fits); m = 8 has the smaller bubble.
  EXPECT_EQ(limited.front().layout.name(), "dp1 pp2 tp1 1f1b m8");
  EXPECT_TRUE(limited.front().fits);
  bool fitting = true;
  for (const Prediction& p : limited) {
    EXPECT_TRUE(fitting || !p.fits)
        << p.layout.name() << " fits but is ranked after one that does not";
    fitting = fitting && p.fits;
    if (p.layout.name() == "dp2 pp1 tp1") {
      EXPECT_FALSE(p.fits);
    }
  }
  Layout bad;
  bad.dp = 3;
  try {
    predict(model, machine, s, bad);
    FAIL() << "an invalid layout was predicted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("not the world's 2 ranks"), std::string::npos) << e.what();
  }
  EXPECT_NE(assumptions(machine).find("limit"), std::string::npos);
}

PlanProfile small_profile() {
  PlanProfile p;
  p.model = unit_layers(2);
  p.model.unit = "tokens";
  p.model.units_per_sample = 64;
  p.model.optimizer_states = 2;
  p.model.partition = Partition::kBalanced;
  p.model.limits.tp_must_divide = {4, 128};
  p.model.limits.sequence = 64;
  p.model.limits.zero_with_pp = true;
  p.model.limits.stages_must_divide = {2};
  p.model.layers[1].tensor_parallel = true;
  p.model.layers[1].tp_all_reduces = 2;
  p.model.layers[1].parameters = 12345;
  p.model.layers[1].output_bytes = 777;
  p.model.layers[1].saved_bytes = 999;
  p.model.layers[1].replicated_saved_bytes = 111;
  p.machine.all_reduce_bandwidth = 2.5e9;
  p.machine.cores = 2;
  p.machine.memory_per_rank = 1 << 30;
  p.machine.base_bytes_per_rank = 123 << 20;
  p.machine_description = "a test machine";
  return p;
}

TEST(Planner, ProfilesRoundTripThroughJson) {
  const PlanProfile p = small_profile();
  const PlanProfile back = profile_from_json(profile_to_json(p), "test");
  EXPECT_EQ(profile_to_json(back), profile_to_json(p));
  EXPECT_EQ(back.model.limits.layers, 2);
  EXPECT_EQ(back.model.partition, Partition::kBalanced);
  EXPECT_EQ(back.model.layers[1].replicated_saved_bytes, 111);
  EXPECT_EQ(back.machine.cores, 2);
  EXPECT_EQ(back.machine.base_bytes_per_rank, 123 << 20);
  EXPECT_EQ(back.machine_description, "a test machine");
  SearchSpace s;
  s.world = 2;
  s.global_batch = 4;
  EXPECT_NE(
      predictions_to_json(rank_layouts(back.model, back.machine, s)).find("\"dp1 pp1 tp2 sp\""),
      std::string::npos);
}

void expect_refused(const std::string& text, const std::string& part) {
  try {
    profile_from_json(text, "p.json");
    ADD_FAILURE() << "accepted: " << text;
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("p.json"), std::string::npos) << e.what();
  }
}

TEST(Planner, BadProfilesNameWhatIsWrong) {
  const std::string good = profile_to_json(small_profile());
  auto with = [&good](const std::string& from, const std::string& to) {
    std::string t = good;
    const std::size_t at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return t.replace(at, from.size(), to);
  };
  expect_refused("{", "not valid JSON");
  expect_refused(with("\"dtrain-plan-profile\"", "\"other\""), "format is \"other\"");
  expect_refused(with("\"version\": 1", "\"version\": 9"), "version 9");
  expect_refused(with("\"cores\"", "\"core\""), "unknown field \"core\" in machine");
  expect_refused(with("\"p2p_bandwidth\"", "\"p2p_bandwith\""), "machine has no \"p2p_bandwidth\"");
  expect_refused(with("\"parameters\": 12345", "\"parameters\": \"many\""),
                 "model.layers[1].parameters has the wrong type");
  expect_refused(with("\"forward_seconds\": 1.0", "\"forward_seconds\": -1.0"), "negative");
  expect_refused(with("\"partition\": \"balanced\"", "\"partition\": \"even\""),
                 "model.partition is \"even\"");
}

TEST(Planner, MeasuresEachLayerPerSample) {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(64, 256), torch::nn::ReLU(),
                              torch::nn::Linear(256, 10));
  const std::vector<parallel::pipeline::Layer> layers = parallel::pipeline::layers_of(model);
  const torch::Tensor sample = torch::randn({32, 64});
  const std::vector<LayerProfile> p = measure_layers(layers, sample);
  ASSERT_EQ(p.size(), 3U);
  EXPECT_EQ(p[0].name, "0");
  EXPECT_EQ(p[0].parameters, 64 * 256 + 256);
  EXPECT_EQ(p[1].parameters, 0);
  EXPECT_EQ(p[2].parameters, 256 * 10 + 10);
  EXPECT_EQ(p[0].output_bytes, 256 * 4);
  EXPECT_EQ(p[1].output_bytes, 256 * 4);
  EXPECT_EQ(p[2].output_bytes, 10 * 4);
  for (const LayerProfile& l : p) {
    EXPECT_GT(l.forward_seconds, 0.0) << l.name;
    EXPECT_GE(l.backward_seconds, 0.0) << l.name;
    // Each forward keeps at least its output until the backward, and not
    // much more than a few tensors of that size.
    EXPECT_GE(l.saved_bytes, l.output_bytes) << l.name;
    EXPECT_LE(l.saved_bytes, 4 * l.output_bytes + 1024) << l.name;
  }
  // A timer that the tests control: every timed run takes 3.
  parallel::pipeline::LayerTimingOptions stub;
  stub.timer = [](int, const std::function<void()>& run) {
    run();
    return 3.0;
  };
  const std::vector<LayerProfile> fixed = measure_layers(layers, sample, stub);
  EXPECT_DOUBLE_EQ(fixed[0].forward_seconds, 3.0 / 32);
  EXPECT_DOUBLE_EQ(fixed[0].backward_seconds, 0.0);  // the same 3 for forward+backward
  EXPECT_THROW(measure_layers({}, sample), InvalidArgument);
}

}  // namespace
}  // namespace dtrain::plan
