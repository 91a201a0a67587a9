// gpt_comm_bytes: the bytes one training step of the GPT example sends, by
// communicator, for dp 2, tp 2, tp 2 with sequence parallelism and pp 2 on
// 2 ranks at one global batch, measured by CountingCommunicator (every
// communicator of the layout is a counting one: the world is wrapped before
// the ParallelContext splits it) next to the formula for the layer sizes.
// Random tokens; float32; one warm-up step, then one counted step.
//
//   mpirun -n 2 build/benchmarks/gpt_comm_bytes [--embedding 128] [--layers 4]
//       [--heads 4] [--context 64] [--vocab 113] [--global-batch 32] [--microbatches 4]

#include <torch/torch.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <cxxopts.hpp>

#include "dtrain/collectives/counting_communicator.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/rng.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "dtrain/runtime.h"
#include "dtrain/train/data_parallel.h"
#include "dtrain/train/pipeline_parallel.h"
#include "examples/gpt/gpt.h"
#include "src/cli/cli.h"

namespace {

using dtrain::collectives::CountingCommunicator;
using dtrain::collectives::OpKind;

struct Sizes {
  std::int64_t layers, heads, embedding, context, vocab, global_batch;
  int microbatches;
};

std::shared_ptr<CountingCommunicator> counting(
    std::shared_ptr<dtrain::collectives::Communicator> c) {
  return std::dynamic_pointer_cast<CountingCommunicator>(std::move(c));
}

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

// One layout: builds the model and strategy over a counting world, runs a
// warm-up step and a counted one, prints rank 0's bytes by communicator.
void measure(const std::shared_ptr<dtrain::collectives::Communicator>& world, const Sizes& s,
             const std::string& name, int tp, int pp, bool sp) {
  auto counted = std::make_shared<CountingCommunicator>(world);
  auto ctx = std::make_shared<dtrain::parallel::ParallelContext>(counted, tp, pp);
  auto rng = std::make_shared<dtrain::parallel::RngStreams>(*ctx, 1);
  dtrain::gpt::GptOptions o;
  o.vocab_size = s.vocab;
  o.layers = s.layers;
  o.heads = s.heads;
  o.embedding = s.embedding;
  o.context = s.context;
  o.sequence_parallel = sp;
  dtrain::gpt::Gpt model(o, ctx->tp(), rng);
  auto make_optimizer =
      [](std::vector<torch::Tensor> params) -> std::unique_ptr<torch::optim::Optimizer> {
    return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(1e-3));
  };
  auto objective = dtrain::gpt::vocab_parallel_objective(s.vocab, ctx->tp());
  std::unique_ptr<dtrain::train::Strategy> strategy;
  if (pp > 1) {
    dtrain::train::PipelineParallelOptions po;
    po.schedule.kind = dtrain::parallel::pipeline::ScheduleKind::kOneFOneB;
    po.schedule.num_microbatches = s.microbatches;
    strategy = std::make_unique<dtrain::train::PipelineParallel>(
        model->layers(), dtrain::gpt::pipeline_partition(o, pp),
        torch::zeros({1, s.context}, torch::kLong), ctx, make_optimizer, std::move(objective), po);
  } else {
    dtrain::train::DataParallelOptions dpo;
    dpo.layout = dtrain::parallel::tensor_parallel_layout(*model);
    dpo.rng = rng;
    strategy = std::make_unique<dtrain::train::DataParallel>(
        model.ptr(), [m = model.ptr()](const at::Tensor& x) { return m->forward(x); }, ctx->dp(),
        make_optimizer, std::move(objective), dpo);
  }
  const std::int64_t local = s.global_batch / ctx->data_world_size();
  auto step = [&](std::int64_t i) {
    torch::manual_seed(static_cast<std::uint64_t>(100 + i));
    const at::Tensor tokens = torch::randint(s.vocab, {local, s.context + 1}, torch::kLong);
    dtrain::train::Batch batch;
    batch.inputs = tokens.narrow(1, 0, s.context).contiguous();
    batch.targets = tokens.narrow(1, 1, s.context).contiguous();
    strategy->train_step(batch, dtrain::train::StepInfo{});
  };
  step(0);
  auto dp_c = counting(ctx->dp()), tp_c = counting(ctx->tp()), pp_c = counting(ctx->pp());
  for (const auto& c : {dp_c, tp_c, pp_c}) c->reset();
  step(1);

  // The formulas (float32: 4 bytes an element). E: the activation elements
  // of one dp rank's batch, T x B x C.
  const double c = static_cast<double>(s.embedding), t = static_cast<double>(s.context),
               l = static_cast<double>(s.layers), v = static_cast<double>(s.vocab);
  const double b = static_cast<double>(local);
  const double e = t * b * c;
  double params = 0;
  for (const auto& p : model->parameters()) params += static_cast<double>(p.numel());
  double formula_dp = 0, formula_tp = 0, formula_pp = 0;
  std::string formula;
  if (ctx->dp_size() > 1) {
    formula_dp = 4 * params;
    formula = "dp: every gradient all-reduced once, P x 4 (P = " +
              std::to_string(static_cast<long long>(params)) + ")";
  } else if (tp > 1 && !sp) {
    formula_tp = 4 * ((4 * l + 2) * e + 5 * t * b);
    formula = "tp: (4L + 2) all-reduces of E + 5 T B, x 4";
  } else if (tp > 1) {
    formula_tp = 4 * (2 * (4 * l + 2) * e + 5 * t * b + (2 * l + 1) * 2 * c + 2 * l * c + t * c);
    formula = "tp+sp: 2 (4L + 2) E + 5 T B + (2L + 1) 2C + 2L C + T C, x 4";
  } else {
    formula_pp = 4 * 2 * e;
    formula =
        "pp: activations out + gradients in (or back), 2 E x 4; plus the tied "
        "embedding's all-reduce of V x C x 4 = " +
        std::to_string(static_cast<long long>(4 * v * c)) +
        " bytes on its own communicator (not counted here)";
  }
  if (ctx->rank() == 0) {
    const auto bytes = [](const std::shared_ptr<CountingCommunicator>& x) {
      return static_cast<double>(x->data_ops().bytes);
    };
    std::printf("| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %s |\n", name.c_str(),
                mib(bytes(dp_c)), mib(formula_dp), mib(bytes(tp_c)), mib(formula_tp),
                mib(bytes(pp_c)), mib(formula_pp), formula.c_str());
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  dtrain::Runtime runtime(&argc, &argv);
  cxxopts::Options cli("gpt_comm_bytes", "bytes per step of the GPT example by layout");
  cli.add_options()("embedding", "C", cxxopts::value<std::int64_t>()->default_value("128"))(
      "layers", "L", cxxopts::value<std::int64_t>()->default_value("4"))(
      "heads", "heads", cxxopts::value<std::int64_t>()->default_value("4"))(
      "context", "T", cxxopts::value<std::int64_t>()->default_value("64"))(
      "vocab", "V (the fortunes: 113)", cxxopts::value<std::int64_t>()->default_value("113"))(
      "global-batch", "windows per step", cxxopts::value<std::int64_t>()->default_value("32"))(
      "microbatches", "pp's microbatches", cxxopts::value<int>()->default_value("4"))(
      "h,help", "print this help");
  auto parsed = dtrain::cli::parse(cli, argc, argv);
  if (parsed.count("help")) {
    if (runtime.rank() == 0) std::cout << cli.help() << std::endl;
    return 0;
  }
  if (runtime.size() != 2) {
    if (runtime.rank() == 0) std::cerr << "gpt_comm_bytes runs on 2 ranks\n";
    return 2;
  }
  torch::set_num_threads(1);
  const Sizes s{parsed["layers"].as<std::int64_t>(),    parsed["heads"].as<std::int64_t>(),
                parsed["embedding"].as<std::int64_t>(), parsed["context"].as<std::int64_t>(),
                parsed["vocab"].as<std::int64_t>(),     parsed["global-batch"].as<std::int64_t>(),
                parsed["microbatches"].as<int>()};
  auto world = runtime.world();
  if (runtime.rank() == 0) {
    std::printf(
        "GPT L %lld, C %lld, T %lld, V %lld, global batch %lld, float32, 2 ranks; "
        "MiB per step on rank 0 (counting communicator), and the formula\n\n",
        static_cast<long long>(s.layers), static_cast<long long>(s.embedding),
        static_cast<long long>(s.context), static_cast<long long>(s.vocab),
        static_cast<long long>(s.global_batch));
    std::printf(
        "| layout | dp measured | dp formula | tp measured | tp formula | pp measured | "
        "pp formula | formula |\n|---|---|---|---|---|---|---|---|\n");
  }
  measure(world, s, "dp 2", 1, 1, false);
  measure(world, s, "tp 2", 2, 1, false);
  measure(world, s, "tp 2 + sp", 2, 1, true);
  measure(world, s, "pp 2 (1f1b, m " + std::to_string(s.microbatches) + ")", 1, 2, false);
  return 0;
}
