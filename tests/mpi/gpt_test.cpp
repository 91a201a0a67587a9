// The GPT example's model and strategy under tensor parallelism: trained at
// tp = 2 (with and without sequence parallelism) against tp = 1, and at
// dp 2 x tp 2 against dp 2 x tp 1, 10 AdamW steps in float64 with dropout
// on, parameters within 1e-10 relative; a checkpoint written at tp = 2 loads
// at tp = 1 with parameters and optimizer state bitwise equal to the saved
// tensors, and training goes on within 1e-6 of the tp = 2 run; bad sizes are
// rejected naming the numbers.

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/collectives/counting_communicator.h"
#include "dtrain/error.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/rng.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "dtrain/train/data_parallel.h"
#include "examples/gpt/gpt.h"
#include "src/common/torch_compat.h"
#include "tests/mpi/gpt_test_util.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::gpt {
namespace {

using parallel::ParallelContext;

using fixtures::DoubleScope;
using fixtures::global_tokens;
using fixtures::kContext;
using fixtures::kGlobalBatch;
using fixtures::kSeed;
using fixtures::kVocab;

GptOptions tiny(bool sequence_parallel) { return fixtures::tiny(2, sequence_parallel); }

// A GPT and its DataParallel strategy over one layout.
struct Trained {
  std::shared_ptr<ParallelContext> ctx;
  std::shared_ptr<parallel::RngStreams> rng;
  Gpt model{nullptr};
  std::unique_ptr<train::DataParallel> strategy;
  train::ReportSums last;  // of the last step

  // The tp communicator the model and the objective use, counting its ops.
  std::shared_ptr<collectives::CountingCommunicator> tp_ops;

  Trained(std::shared_ptr<collectives::Communicator> world, int tp, const GptOptions& options)
      : ctx(std::make_shared<ParallelContext>(std::move(world), tp)),
        rng(std::make_shared<parallel::RngStreams>(*ctx, kSeed)),
        tp_ops(std::make_shared<collectives::CountingCommunicator>(ctx->tp())) {
    model = Gpt(options, tp_ops, rng);
    train::DataParallelOptions o;
    o.layout = parallel::tensor_parallel_layout(*model);
    o.rng = rng;
    o.report = ctx->tp_rank() == 0;
    strategy = std::make_unique<train::DataParallel>(
        model.ptr(), [m = model.ptr()](const at::Tensor& x) { return m->forward(x); }, ctx->dp(),
        [](std::vector<torch::Tensor> params) -> std::unique_ptr<torch::optim::Optimizer> {
          return std::make_unique<torch::optim::AdamW>(
              params, torch::optim::AdamWOptions(3e-3).weight_decay(0.1));
        },
        vocab_parallel_objective(kVocab, tp_ops), o);
  }

  // Steps [first, first + count) on this rank's part of each global batch.
  void train(std::int64_t first, std::int64_t count) {
    for (std::int64_t s = first; s < first + count; ++s) {
      train::Batch batch = fixtures::local_batch(s, ctx->data_rank(), ctx->data_world_size());
      last = strategy->train_step(batch, train::StepInfo{}).sums;
    }
  }

  // This rank's parameters by name, and the placement of each.
  std::map<std::string, at::Tensor> parameters() const {
    std::map<std::string, at::Tensor> out;
    for (const auto& item : model->named_parameters()) out[item.key()] = item.value().detach();
    return out;
  }
};

// This rank's block of `dense` (the tp = 1 tensor) for `name` in `run`.
at::Tensor block_of(const Trained& run, const std::string& name, const at::Tensor& dense) {
  const parallel::ModuleLayout layout = parallel::tensor_parallel_layout(*run.model);
  const at::Tensor local = run.parameters().at(name);
  const parallel::Placement p = layout.placement(name, local);
  at::Tensor out = dense;
  for (std::size_t d = 0; d < p.offset.size(); ++d) {
    out = out.narrow(static_cast<std::int64_t>(d), p.offset[d], p.shape[d]);
  }
  return out;
}

double relative(const at::Tensor& a, const at::Tensor& b) {
  const double scale = std::max(b.abs().max().item<double>(), 1e-300);
  return (a - b).abs().max().item<double>() / scale;
}

// Every parameter of `split` against its block of `dense`'s.
void expect_close(const Trained& split, const Trained& dense, double tolerance,
                  const std::string& what) {
  const auto reference = dense.parameters();
  std::size_t compared = 0;
  for (const auto& [name, local] : split.parameters()) {
    const at::Tensor expected = block_of(split, name, reference.at(name));
    ASSERT_EQ(local.sizes(), expected.sizes()) << what << ": " << name;
    EXPECT_LE(relative(local, expected), tolerance) << what << ": " << name;
    ++compared;
  }
  EXPECT_EQ(compared, reference.size()) << what;
}

// Pairs of neighbouring ranks (a tp group of 2); a world of odd size leaves
// its last rank out.
std::shared_ptr<collectives::Communicator> pairs(collectives::Communicator& world) {
  return world.split(world.rank() / 2, world.rank(), {"gpt-pairs", std::nullopt});
}
std::shared_ptr<collectives::Communicator> self(collectives::Communicator& world) {
  return world.split(world.rank(), 0, {"gpt-self", std::nullopt});
}

TEST(Gpt, TensorParallelTrainsLikeOneRank) {
  auto& world = testing::world();
  if (world.size() % 2 != 0) GTEST_SKIP() << "needs an even world";
  DoubleScope dtype;
  for (bool sp : {false, true}) {
    const std::string what = sp ? "tp 2 with sequence parallelism" : "tp 2";
    Trained split(pairs(world), 2, tiny(sp));
    Trained dense(self(world), 1, tiny(false));
    // The same initial weights, bitwise.
    expect_close(split, dense, 0.0, what + ", initial");
    split.train(0, 10);
    dense.train(0, 10);
    expect_close(split, dense, 1e-10, what + ", after 10 steps");
    // The report counts the loss once: summed over the tp group, the dense
    // model's sums.
    at::Tensor sums = at::tensor(std::vector<double>{split.last.loss_sum, split.last.samples});
    split.ctx->tp()->all_reduce(sums)->wait();
    EXPECT_EQ(sums[1].item<double>(), dense.last.samples) << what;
    EXPECT_NEAR(sums[0].item<double>(), dense.last.loss_sum, 1e-10 * dense.last.loss_sum) << what;
    // Sampling gathers the logits over tp and draws the same tokens.
    EXPECT_EQ(sample(split.model, {1, 2}, 12, 0.8, 9), sample(dense.model, {1, 2}, 12, 0.8, 9))
        << what;
  }
}

TEST(Gpt, DataAndTensorParallelTrainLikeDataParallel) {
  auto& world = testing::world();
  if (world.size() != 4) GTEST_SKIP() << "needs 4 ranks";
  DoubleScope dtype;
  Trained split(world.split(0, world.rank(), {"gpt-dp-tp", std::nullopt}), 2, tiny(false));
  ASSERT_EQ(split.ctx->dp_size(), 2);
  // dp 2 x tp 1 over the ranks of one tp coordinate: the same dp
  // coordinates, so the same batch halves and dropout streams.
  Trained dense(world.split(split.ctx->tp_rank(), world.rank(), {"gpt-dp", std::nullopt}), 1,
                tiny(false));
  ASSERT_EQ(dense.ctx->dp_rank(), split.ctx->dp_rank());
  split.train(0, 10);
  dense.train(0, 10);
  expect_close(split, dense, 1e-10, "dp 2 x tp 2 against dp 2 x tp 1");
}

// The tp collectives of one training step, against the formula: with E =
// T x B x C elements of activations (8 bytes each in float64) and L blocks,
//   without sp: 4L + 2 all-reduces of E (forward: the embedding and each
//     block's two row-parallel outputs; backward: the tied output layer's
//     input and each block's two column-parallel inputs), and 4 of T x B
//     (elements: 5 T B: the loss's maxima and [target, sum], the correct
//     count's maxima and target logits);
//   with sp: 4L + 2 all-gathers and 4L + 2 reduce-scatters of E in place of
//     those all-reduces, and all-reduces of the replicated parameters' partial
//     gradients: 2L + 1 LayerNorms (2C), 2L row biases (C), wpe (context x C).
TEST(Gpt, OneStepCommunicatesWhatTheFormulaSays) {
  auto& world = testing::world();
  if (world.size() % 2 != 0) GTEST_SKIP() << "needs an even world";
  DoubleScope dtype;
  for (bool sp : {false, true}) {
    const GptOptions o = tiny(sp);
    Trained split(pairs(world), 2, o);
    split.tp_ops->reset();
    split.train(0, 1);
    const std::int64_t l = o.layers, c = o.embedding, tb = kContext * kGlobalBatch;
    const std::int64_t e = 8 * tb * c;
    using collectives::OpKind;
    const auto ar = split.tp_ops->tally(OpKind::kAllReduce);
    const auto ag = split.tp_ops->tally(OpKind::kAllGather);
    const auto rs = split.tp_ops->tally(OpKind::kReduceScatter);
    if (!sp) {
      EXPECT_EQ(ar.calls, 4 * l + 6);
      EXPECT_EQ(ar.bytes, (4 * l + 2) * e + 8 * 5 * tb);
      EXPECT_EQ(split.tp_ops->data_ops().calls, ar.calls);
    } else {
      EXPECT_EQ(ag.calls, 4 * l + 2);
      EXPECT_EQ(ag.bytes, (4 * l + 2) * e);
      EXPECT_EQ(rs.calls, 4 * l + 2);
      EXPECT_EQ(rs.bytes, (4 * l + 2) * e);
      EXPECT_EQ(ar.calls, 4 + (2 * l + 1) + 2 * l + 1);
      EXPECT_EQ(ar.bytes, 8 * (5 * tb + (2 * l + 1) * 2 * c + 2 * l * c + kContext * c));
      EXPECT_EQ(split.tp_ops->data_ops().calls, ag.calls + rs.calls + ar.calls);
    }
  }
}

// The AdamW state of each parameter, by parameter name and field.
std::map<std::string, at::Tensor> adam_state(const Trained& run) {
  std::map<std::string, at::Tensor> out;
  auto& optimizer = run.strategy->optimizer();
  for (const auto& item : run.model->named_parameters()) {
    const auto& state = optimizer.state().at(dtrain::detail::optimizer_state_key(item.value()));
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*state);
    out[item.key() + "/exp_avg"] = s.exp_avg();
    out[item.key() + "/exp_avg_sq"] = s.exp_avg_sq();
    out[item.key() + "/step"] = at::scalar_tensor(static_cast<double>(s.step()));
  }
  return out;
}

TEST(Gpt, CheckpointAtTp2LoadsAtTp1) {
  auto& world = testing::world();
  if (world.size() % 2 != 0) GTEST_SKIP() << "needs an even world";
  DoubleScope dtype;
  auto pair = pairs(world);
  Trained split(pair, 2, tiny(false));
  split.train(0, 3);
  const std::string dir = testing::shared_temp_dir(*pair, "gpt-ckpt");
  {
    checkpoint::CheckpointOptions o;
    o.directory = dir;
    o.async = false;
    o.fsync = false;
    checkpoint::CheckpointManager manager(o, *split.ctx);
    manager.save(3, split.strategy->state_dict());
  }
  const auto entries = checkpoint::list_checkpoints(dir);
  ASSERT_EQ(entries.size(), 1u);
  const checkpoint::Checkpoint ckpt = checkpoint::Checkpoint::open(entries.back().directory);

  Trained dense(self(world), 1, tiny(false));
  dense.strategy->load_state(ckpt);
  // Every rank of the pair checks its own block of each global tensor.
  expect_close(split, dense, 0.0, "parameters loaded at tp 1");
  const auto saved = adam_state(split);
  const auto loaded = adam_state(dense);
  ASSERT_EQ(saved.size(), loaded.size());
  for (const auto& [key, local] : saved) {
    const std::string param = key.substr(0, key.rfind('/'));
    const at::Tensor expected =
        local.dim() == 0 ? loaded.at(key) : block_of(split, param, loaded.at(key));
    EXPECT_TRUE(at::equal(local, expected)) << "optimizer state " << key;
  }
  // Training goes on alike: the data, the dropout streams and the optimizer
  // continue where the tp = 2 run left them.
  split.train(3, 10);
  dense.train(3, 10);
  expect_close(split, dense, 1e-6, "10 steps after the tp change");
}

TEST(Gpt, BadSizesNameTheNumbers) {
  auto expect_error = [](const std::function<void()>& f, const std::vector<std::string>& parts) {
    try {
      f();
      ADD_FAILURE() << "no error";
    } catch (const InvalidArgument& e) {
      for (const auto& p : parts) {
        EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
      }
    }
  };
  GptOptions heads = tiny(false);
  heads.heads = 2;
  heads.embedding = 12;
  expect_error([&] { heads.validate(4); },
               {"tensor-parallel size 4 does not divide the number of heads 2"});
  GptOptions uneven = tiny(false);
  uneven.embedding = 18;
  expect_error([&] { uneven.validate(1); }, {"embedding size 18", "number of heads 4"});
  GptOptions context = tiny(true);
  context.context = 7;
  expect_error([&] { context.validate(2); },
               {"context length 7 is not divisible by the sequence-parallel size 2"});

  auto& world = testing::world();
  if (world.size() % 2 != 0) return;
  // The model refuses them too, before anything is communicated; and a
  // sequence the sp size does not divide, in forward.
  auto pair = pairs(world);
  auto ctx = std::make_shared<ParallelContext>(pair, 2);
  auto rng = std::make_shared<parallel::RngStreams>(*ctx, kSeed);
  GptOptions three = tiny(false);
  three.heads = 3;
  three.embedding = 12;
  expect_error([&] { Gpt(three, ctx->tp(), rng); },
               {"tensor-parallel size 2 does not divide the number of heads 3"});
  Gpt model(tiny(true), ctx->tp(), rng);
  expect_error(
      [&] {
        model->forward(at::zeros({2, 7}, at::kLong));
      },
      {"sequence length 7 is not divisible by the sequence-parallel size 2"});
}

}  // namespace
}  // namespace dtrain::gpt
