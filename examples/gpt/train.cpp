// dtrain-gpt: a GPT (examples/gpt/gpt.h) trained on a token data set (the
// fortunes, `dtrain-data convert-text`) with tensor parallelism inside each
// group of --tp ranks, pipeline parallelism over --pp ranks (the blocks cut
// into stages, PipelineParallel) and data parallelism (DDP) over the rest,
// dp = ranks / (pp x tp), on the library's trainer: checkpoints with
// automatic resume (at any tp and pp size), evaluation on the held-out
// split, metrics, traces, SIGTERM.
//
//   dtrain-gpt --train-data data/fortunes/train --val-data data/fortunes/val
//   scripts/launch/dtrain-mpirun -n 4 build/examples/gpt/dtrain-gpt --tp 2 ...
//   scripts/launch/dtrain-mpirun -n 4 build/examples/gpt/dtrain-gpt --pp 2 --tp 2
//       --microbatches 4 --pp-schedule 1f1b ...
//
// It reports the training and validation loss (cross-entropy in nats per
// token, and in bits: bits per character at char level), the unigram
// baseline of the data, and prints a short text sample at the end.
// Exit status as dtrain-resnet: 0 finished, or stopped by --max-minutes after
// a checkpoint; 2 bad input (nothing trained or written); 75 stopped by
// SIGTERM/SIGINT after a checkpoint; 1 any other error.

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "dtrain/config.h"
#include "dtrain/data/dataset.h"
#include "dtrain/data/text.h"
#include "dtrain/data/token_loader.h"
#include "dtrain/env.h"
#include "dtrain/error.h"
#include "dtrain/parallel/pipeline/generators.h"
#include "dtrain/parallel/rng.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "dtrain/train/data_parallel.h"
#include "dtrain/train/pipeline_parallel.h"
#include "dtrain/train/trainer.h"
#include "examples/gpt/gpt.h"
#include "src/cli/cli.h"
#include "src/train/trainer_cli.h"

namespace {

namespace train = dtrain::train;
namespace data = dtrain::data;

// --- configuration ---------------------------------------------------------

struct Config {
  std::string train_data = "data/fortunes/train";
  std::string val_data = "data/fortunes/val";
  train::TrainerOptions output;  // --out, --checkpoint-dir, ... (src/train/trainer_cli.h)
  std::int64_t layers = 4;
  std::int64_t heads = 4;
  std::int64_t embedding = 128;
  std::int64_t context = 64;
  double dropout = 0.0;
  int tp = 1;
  int pp = 1;
  int microbatches = 1;
  std::string pp_schedule = "1f1b";
  std::string pp_tied_sum = "step";
  int pp_stages_per_rank = 0;  // 0: 2 for interleaved, 1 otherwise
  bool sequence_parallel = false;
  int epochs = 1;
  std::int64_t steps = 0;
  double max_minutes = 0;
  std::int64_t global_batch = 32;
  double lr = 1e-3;
  double weight_decay = 0.1;
  double beta2 = 0.99;
  double warmup_epochs = 0.05;
  std::string schedule = "cosine";
  std::uint64_t seed = 0;
  std::string device = "cpu";
  int threads = 1;
  int loader_workers = 1;
  std::int64_t eval_batch = 64;
  std::int64_t val_windows = 1024;
  std::int64_t sample_tokens = 300;
  double temperature = 0.8;
  int comm_timeout_s = 300;

  // The pipeline strategy runs with --pp > 1, or --microbatches > 1 (at pp 1:
  // gradient accumulation over the microbatches).
  bool pipeline() const { return pp > 1 || microbatches > 1; }
};

cxxopts::Options make_cli() {
  cxxopts::Options cli("dtrain-gpt",
                       "GPT training on a token data set with tensor, pipeline and data "
                       "parallelism, checkpoints and automatic resume.\nRun under mpirun/srun "
                       "for several ranks (dp = ranks / (pp x tp)); runs alone as one rank.");
  // clang-format off
  cli.add_options("Model and data")
    ("train-data", "training token data set (dtrain-data convert-text)", cxxopts::value<std::string>()->default_value("data/fortunes/train"))
    ("val-data", "held-out token data set (\"none\": no evaluation)", cxxopts::value<std::string>()->default_value("data/fortunes/val"))
    ("layers", "transformer blocks", cxxopts::value<std::int64_t>()->default_value("4"))
    ("heads", "attention heads (--tp must divide it)", cxxopts::value<std::int64_t>()->default_value("4"))
    ("embedding", "embedding size (--heads must divide it)", cxxopts::value<std::int64_t>()->default_value("128"))
    ("context", "tokens per window", cxxopts::value<std::int64_t>()->default_value("64"))
    ("dropout", "dropout on embeddings, attention and residual branches", cxxopts::value<double>()->default_value("0"))
    ("loader-workers", "window threads per rank", cxxopts::value<int>()->default_value("1"))
    ("sample-tokens", "tokens of the text sample printed at the end (0: none)", cxxopts::value<std::int64_t>()->default_value("300"))
    ("temperature", "of the sample", cxxopts::value<double>()->default_value("0.8"));
  cli.add_options("Schedule")
    ("epochs", "epochs to train", cxxopts::value<int>()->default_value("1"))
    ("steps", "total optimizer steps instead of --epochs (0: use --epochs)", cxxopts::value<std::int64_t>()->default_value("0"))
    ("max-minutes", "stop after this wall time, with an evaluation and a checkpoint (exit 0); a rerun resumes (0: no limit)", cxxopts::value<double>()->default_value("0"))
    ("global-batch", "windows per step over all data-parallel ranks", cxxopts::value<std::int64_t>()->default_value("32"))
    ("lr", "peak learning rate (AdamW)", cxxopts::value<double>()->default_value("1e-3"))
    ("weight-decay", "AdamW's decoupled weight decay", cxxopts::value<double>()->default_value("0.1"))
    ("beta2", "AdamW's beta2", cxxopts::value<double>()->default_value("0.99"))
    ("warmup-epochs", "linear warm-up from 0 over this many epochs", cxxopts::value<double>()->default_value("0.05"))
    ("schedule", "after warm-up: cosine (to 0) or constant", cxxopts::value<std::string>()->default_value("cosine"))
    ("seed", "seed of weights, data order and dropout", cxxopts::value<std::uint64_t>()->default_value("0"));
  cli.add_options("Parallelism")
    ("tp", "tensor-parallel size (divides --heads); dp = ranks / (pp x tp)", cxxopts::value<int>()->default_value("1"))
    ("pp", "pipeline ranks: the blocks are cut into pp x stages-per-rank stages (dividing --layers)", cxxopts::value<int>()->default_value("1"))
    ("microbatches", "microbatches per step and replica (dividing global batch / dp); above 1 with --pp 1 accumulates gradients over them", cxxopts::value<int>()->default_value("1"))
    ("pp-schedule", "gpipe, 1f1b, interleaved or zb-h1", cxxopts::value<std::string>()->default_value("1f1b"))
    ("pp-stages-per-rank", "stages per pipeline rank (interleaved only; 0: 2 for interleaved, 1 otherwise)", cxxopts::value<int>()->default_value("0"))
    ("pp-tied-sum", "the tied embedding's gradient over its two stages: step (one all-reduce per step) or microbatch (bitwise the --pp 1 run's)", cxxopts::value<std::string>()->default_value("step"))
    ("sequence-parallel", "keep LayerNorm, dropout and residuals as sequence shards over the tp ranks (--tp must divide --context)", cxxopts::value<bool>()->default_value("false"));
  cli.add_options("Execution")
    ("device", "cpu or cuda (cuda: --tp 1 only)", cxxopts::value<std::string>()->default_value("cpu"))
    ("threads", "intra-op threads per rank", cxxopts::value<int>()->default_value("1"))
    ("comm-timeout", "seconds before a collective that a peer never joins fails the job", cxxopts::value<int>()->default_value("300"));
  // clang-format on
  train::add_output_options(cli, "runs/gpt");
  // clang-format off
  cli.add_options("Checkpoints and output")
    ("eval-batch", "evaluation windows per batch over all data-parallel ranks", cxxopts::value<std::int64_t>()->default_value("64"))
    ("val-windows", "evaluate on the first N windows of --val-data, rounded up to whole batches (0: all)", cxxopts::value<std::int64_t>()->default_value("1024"))
    ("h,help", "print this help");
  // clang-format on
  return cli;
}

Config parse_config(cxxopts::ParseResult& p) {
  Config c;
  train::read_output_options(p, c.output);
  c.train_data = p["train-data"].as<std::string>();
  c.val_data = p["val-data"].as<std::string>();
  c.layers = p["layers"].as<std::int64_t>();
  c.heads = p["heads"].as<std::int64_t>();
  c.embedding = p["embedding"].as<std::int64_t>();
  c.context = p["context"].as<std::int64_t>();
  c.dropout = p["dropout"].as<double>();
  c.loader_workers = p["loader-workers"].as<int>();
  c.sample_tokens = p["sample-tokens"].as<std::int64_t>();
  c.temperature = p["temperature"].as<double>();
  c.epochs = p["epochs"].as<int>();
  c.steps = p["steps"].as<std::int64_t>();
  c.max_minutes = p["max-minutes"].as<double>();
  c.global_batch = p["global-batch"].as<std::int64_t>();
  c.lr = p["lr"].as<double>();
  c.weight_decay = p["weight-decay"].as<double>();
  c.beta2 = p["beta2"].as<double>();
  c.warmup_epochs = p["warmup-epochs"].as<double>();
  c.schedule = p["schedule"].as<std::string>();
  c.seed = p["seed"].as<std::uint64_t>();
  c.tp = p["tp"].as<int>();
  c.pp = p["pp"].as<int>();
  c.microbatches = p["microbatches"].as<int>();
  c.pp_schedule = p["pp-schedule"].as<std::string>();
  c.pp_stages_per_rank = p["pp-stages-per-rank"].as<int>();
  c.pp_tied_sum = p["pp-tied-sum"].as<std::string>();
  if (c.pp_tied_sum != "step" && c.pp_tied_sum != "microbatch") {
    DTRAIN_THROW(dtrain::InvalidArgument, "--pp-tied-sum '", c.pp_tied_sum,
                 "' is not step or microbatch");
  }
  c.sequence_parallel = p["sequence-parallel"].as<bool>();
  c.device = p["device"].as<std::string>();
  c.threads = p["threads"].as<int>();
  c.comm_timeout_s = p["comm-timeout"].as<int>();
  c.eval_batch = p["eval-batch"].as<std::int64_t>();
  c.val_windows = p["val-windows"].as<std::int64_t>();

  DTRAIN_CHECK_ARG(c.tp >= 1, "--tp must be >= 1, got ", c.tp);
  c.pp_stages_per_rank =
      train::check_pipeline_flags(c.pp, c.microbatches, c.pp_schedule, c.pp_stages_per_rank);
  DTRAIN_CHECK_ARG(!(c.pipeline() && c.device == "cuda"),
                   "--pp and --microbatches run on --device cpu only (the stages' messages go "
                   "over MPI)");
  DTRAIN_CHECK_ARG(c.epochs >= 1 || c.steps >= 1, "--epochs or --steps must be >= 1");
  DTRAIN_CHECK_ARG(c.steps >= 0, "--steps must be >= 0");
  DTRAIN_CHECK_ARG(c.global_batch >= 1, "--global-batch must be >= 1, got ", c.global_batch);
  DTRAIN_CHECK_ARG(c.lr > 0, "--lr must be > 0");
  DTRAIN_CHECK_ARG(c.weight_decay >= 0, "--weight-decay must be >= 0");
  DTRAIN_CHECK_ARG(c.beta2 > 0 && c.beta2 < 1, "--beta2 must be in (0, 1)");
  DTRAIN_CHECK_ARG(c.schedule == "cosine" || c.schedule == "constant", "unknown --schedule '",
                   c.schedule, "' (cosine, constant)");
  DTRAIN_CHECK_ARG(c.device == "cpu" || c.device == "cuda", "unknown --device '", c.device,
                   "' (cpu, cuda)");
  DTRAIN_CHECK_ARG(c.device != "cuda" || c.tp == 1,
                   "--device cuda runs with --tp 1 only (the tensor-parallel layers' "
                   "collectives run over MPI on CPU tensors)");
  DTRAIN_CHECK_ARG(c.device != "cuda" || DTRAIN_HAVE_NCCL,
                   "--device cuda needs dtrain's NCCL backend, and this build has none (see "
                   "docs/gpu.md)");
  DTRAIN_CHECK_ARG(c.device != "cuda" || torch::cuda::is_available(),
                   "--device cuda was asked for but no CUDA device is available");
  DTRAIN_CHECK_ARG(c.threads >= 1, "--threads must be >= 1");
  DTRAIN_CHECK_ARG(c.loader_workers >= 1, "--loader-workers must be >= 1");
  DTRAIN_CHECK_ARG(c.sample_tokens >= 0, "--sample-tokens must be >= 0");
  DTRAIN_CHECK_ARG(c.temperature > 0, "--temperature must be > 0");
  DTRAIN_CHECK_ARG(c.eval_batch >= 1 && c.val_windows >= 0,
                   "--val-windows must be >= 0, --eval-batch >= 1");
  DTRAIN_CHECK_ARG(c.comm_timeout_s >= 1, "--comm-timeout must be >= 1 s");
  return c;
}

dtrain::gpt::GptOptions model_options(const Config& c, std::int64_t vocab) {
  dtrain::gpt::GptOptions o;
  o.vocab_size = vocab;
  o.layers = c.layers;
  o.heads = c.heads;
  o.embedding = c.embedding;
  o.context = c.context;
  o.dropout = c.dropout;
  o.sequence_parallel = c.sequence_parallel;
  o.init_seed = c.seed;
  return o;
}

train::TrainerOptions trainer_options(const Config& c) {
  train::TrainerOptions o = c.output;
  o.epochs = c.epochs;
  o.steps = c.steps;
  o.max_minutes = c.max_minutes;
  o.global_batch = c.global_batch;
  o.seed = c.seed;
  o.lr.lr = c.lr;
  o.lr.warmup_epochs = c.warmup_epochs;
  o.lr.shape = c.schedule;
  o.device = c.device;
  o.threads = c.threads;
  o.comm_timeout_s = c.comm_timeout_s;
  o.tp = c.tp;
  o.pp = c.pp;
  o.rate_name = "tokens_per_s";
  o.rate_unit = "tok/s";
  o.sample_name = "tokens";
  o.eval_name = "val";
  o.loss_in_bits = true;
  return o;
}

// --- data ------------------------------------------------------------------

// Every token of field "tokens" of `set`, counted by id.
std::vector<double> token_counts(data::Dataset& set, std::int64_t vocab) {
  const int field = set.field_index("tokens");
  const data::FieldSpec& spec = set.manifest().fields.at(static_cast<std::size_t>(field));
  const auto& offsets = set.shard_offsets();
  std::vector<double> counts(static_cast<std::size_t>(vocab), 0.0);
  for (std::size_t s = 0; s + 1 < offsets.size(); ++s) {
    const std::int64_t n = offsets[s + 1] - offsets[s];
    std::vector<unsigned char> bytes(static_cast<std::size_t>(n) * spec.bytes_per_sample());
    set.read(field, offsets[s], n, bytes.data());
    const at::Tensor raw =
        at::from_blob(bytes.data(), {static_cast<std::int64_t>(bytes.size())}, at::kByte);
    const at::Tensor ids =
        spec.dtype == data::DType::kUInt8 ? raw.to(at::kLong) : raw.view(at::kInt).to(at::kLong);
    const at::Tensor c = at::bincount(ids, {}, vocab).to(at::kDouble).contiguous();
    for (std::int64_t i = 0; i < vocab; ++i)
      counts[static_cast<std::size_t>(i)] += c[i].item<double>();
  }
  return counts;
}

// The cross-entropy (nats per token) of `eval` under the unigram
// distribution of `train` (add-one smoothed): what a model that ignores the
// context reaches at best.
double unigram_baseline(data::Dataset& train, data::Dataset& eval, std::int64_t vocab) {
  std::vector<double> p = token_counts(train, vocab);
  double total = 0;
  for (double& x : p) total += (x += 1.0);
  const std::vector<double> q = token_counts(eval, vocab);
  double loss = 0, n = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    loss -= q[i] * std::log(p[i] / total);
    n += q[i];
  }
  return loss / n;
}

// A TokenLoader as the trainer's DataSource; `max_batches` > 0 ends an
// epoch early (a partial evaluation).
class TokenData : public train::DataSource {
 public:
  TokenData(std::shared_ptr<data::Dataset> set, data::TokenLoaderOptions options, int rank,
            int world_size, torch::Device device, std::int64_t max_batches = 0)
      : loader_(std::move(set), options, rank, world_size),
        device_(device),
        max_batches_(max_batches) {}

  train::Batch next() override {
    data::TokenBatch b = loader_.next();
    train::Batch out;
    out.inputs = std::move(b.inputs);
    out.targets = std::move(b.targets);
    out.epoch = b.epoch;
    out.batch_in_epoch = b.batch_in_epoch;
    out.indices = std::move(b.indices);
    return out;
  }
  void to_device(train::Batch& batch) override {
    batch.inputs = batch.inputs.to(device_);
    batch.targets = batch.targets.to(device_);
  }
  std::int64_t batches_per_epoch() const override {
    const std::int64_t all = loader_.batches_per_epoch();
    return max_batches_ > 0 ? std::min(all, max_batches_) : all;
  }
  std::string position() const override { return loader_.state().serialize(); }

 private:
  data::TokenLoader loader_;
  torch::Device device_;
  std::int64_t max_batches_;
};

// --- the program -----------------------------------------------------------

class GptProgram : public train::TrainingProgram {
 public:
  explicit GptProgram(Config config) : c_(std::move(config)) {}

  std::int64_t check_input(const train::RunContext& run) override {
    const int replicas = run.context->data_world_size();
    DTRAIN_CHECK_ARG(c_.global_batch % replicas == 0, "--global-batch ", c_.global_batch,
                     " is not divisible by the number of data-parallel ranks (", replicas, " = ",
                     run.world_size, " ranks / (--pp ", c_.pp, " x --tp ", c_.tp, "))");
    DTRAIN_CHECK_ARG(c_.val_data == "none" || c_.eval_batch % replicas == 0, "--eval-batch ",
                     c_.eval_batch, " is not divisible by the number of data-parallel ranks (",
                     replicas, ")");
    data::OpenOptions open;
    open.verify_digests = false;
    train_set_ = data::Dataset::open(c_.train_data, open);
    const auto& vocabulary = train_set_->manifest().vocabulary;
    DTRAIN_CHECK_ARG(vocabulary.has_value(), c_.train_data,
                     " has no vocabulary in its manifest: not a token data set (make one with "
                     "dtrain-data convert-text)");
    vocabulary_ = *vocabulary;
    data::check_token_field(*train_set_, "tokens");
    if (c_.val_data != "none") {
      val_set_ = data::Dataset::open(c_.val_data, open);
      data::check_token_field(*val_set_, "tokens");
      const auto& v = val_set_->manifest().vocabulary;
      DTRAIN_CHECK_ARG(v.has_value() && v->size() == vocabulary_.size() &&
                           v->code_points == vocabulary_.code_points,
                       c_.val_data, " has another vocabulary than ", c_.train_data,
                       " (convert both splits together with dtrain-data convert-text)");
    }
    // Sizes against tp, before anything is built (every rank agrees).
    model_options(c_, vocabulary_.size()).validate(c_.tp);
    if (c_.pipeline()) check_pipeline(replicas);
    const std::int64_t windows = data::token_windows(train_set_->size(), c_.context, c_.context);
    DTRAIN_CHECK_ARG(windows >= c_.global_batch, c_.train_data, " holds ", windows, " windows of ",
                     c_.context, " tokens, fewer than one global batch (", c_.global_batch, ")");
    if (val_set_) baseline_ = unigram_baseline(*train_set_, *val_set_, vocabulary_.size());
    return windows / c_.global_batch;
  }

  std::unique_ptr<train::Strategy> make_strategy(const train::RunContext& run) override {
    const auto& ctx = *run.context;
    tp_ = ctx.tp();
    rng_ = std::make_shared<dtrain::parallel::RngStreams>(ctx, c_.seed, run.device);
    model_ = dtrain::gpt::Gpt(model_options(c_, vocabulary_.size()), tp_, rng_);
    model_->to(run.device);
    const double lr = c_.lr, wd = c_.weight_decay, beta2 = c_.beta2;
    auto make_optimizer =
        [lr, wd,
         beta2](std::vector<torch::Tensor> params) -> std::unique_ptr<torch::optim::Optimizer> {
      return std::make_unique<torch::optim::AdamW>(
          params, torch::optim::AdamWOptions(lr).betas({0.9, beta2}).weight_decay(wd));
    };
    auto objective = dtrain::gpt::vocab_parallel_objective(vocabulary_.size(), tp_);
    if (c_.pipeline()) {
      train::PipelineParallelOptions po;
      po.schedule = schedule_options(ctx.pp_size());
      po.seed = c_.seed;
      po.activation_dtype = model_->embedding->wpe.scalar_type();
      po.tied_gradients = c_.pp_tied_sum == "microbatch"
                              ? dtrain::parallel::pipeline::TiedGradientSum::kPerMicrobatch
                              : dtrain::parallel::pipeline::TiedGradientSum::kPerStep;
      const auto partition = dtrain::gpt::pipeline_partition(
          model_options(c_, vocabulary_.size()), ctx.pp_size() * po.schedule.stages_per_rank);
      auto strategy = std::make_unique<train::PipelineParallel>(
          model_->layers(), partition,
          torch::zeros({1, c_.context}, torch::TensorOptions(run.device).dtype(torch::kLong)),
          run.context, make_optimizer, std::move(objective), po);
      pipeline_ = strategy.get();
      partition_ = partition;
      return strategy;
    }
    train::DataParallelOptions o;
    o.layout = dtrain::parallel::tensor_parallel_layout(*model_);
    o.rng = rng_;
    o.report = ctx.tp_rank() == 0;
    // The dp axis: the ranks that hold the same shards. On cuda (tp = 1)
    // that is the trainer's NCCL communicator over every rank.
    auto dp = c_.device == "cuda" ? run.train_comm : ctx.dp();
    return std::make_unique<train::DataParallel>(
        model_.ptr(), [m = model_.ptr()](const at::Tensor& x) { return m->forward(x); }, dp,
        make_optimizer, std::move(objective), o);
  }

  std::unique_ptr<train::DataSource> train_data(const train::RunContext& run,
                                                const std::string& position) override {
    data::TokenLoaderOptions o = loader_options();
    o.sampler.seed = c_.seed;
    o.sampler.global_batch_size = c_.global_batch;
    o.sampler.drop_last = true;
    if (!position.empty()) o.start = data::SamplerState::parse(position);
    return std::make_unique<TokenData>(train_set_, o, run.context->data_rank(),
                                       run.context->data_world_size(), run.device);
  }

  std::unique_ptr<train::DataSource> eval_data(const train::RunContext& run) override {
    if (!val_set_) return nullptr;
    data::TokenLoaderOptions o = loader_options();
    o.sampler.global_batch_size = c_.eval_batch;
    o.sampler.shuffle = data::ShuffleMode::kNone;
    o.sampler.drop_last = false;
    const std::int64_t batches = (c_.val_windows + c_.eval_batch - 1) / c_.eval_batch;
    return std::make_unique<TokenData>(val_set_, o, run.context->data_rank(),
                                       run.context->data_world_size(), run.device, batches);
  }

  void finish(const train::RunContext& run) override {
    if (c_.sample_tokens == 0) return;
    if (pipeline_ != nullptr && run.context->pp_size() > 1) gather_stages(*run.context);
    // A newline starts the sample (a fortune's first line) when the
    // vocabulary has one; otherwise id 0.
    std::vector<std::int64_t> prompt{0};
    try {
      prompt = data::encode_text(vocabulary_, "\n");
    } catch (const dtrain::Error&) {
    }
    const auto ids = dtrain::gpt::sample(model_, prompt, c_.sample_tokens, c_.temperature, c_.seed);
    if (run.rank == 0) {
      std::printf("sample (%lld tokens, temperature %g):\n%s\n",
                  static_cast<long long>(c_.sample_tokens), c_.temperature,
                  data::decode_tokens(vocabulary_, ids).c_str());
      std::fflush(stdout);
    }
  }

  Identity identity() const override {
    return {{"model", "gpt"},
            {"layers", std::to_string(c_.layers)},
            {"heads", std::to_string(c_.heads)},
            {"embedding", std::to_string(c_.embedding)},
            {"context", std::to_string(c_.context)},
            {"vocabulary", std::to_string(vocabulary_.size())},
            {"global_batch", std::to_string(c_.global_batch)},
            {"optimizer", "adamw"},
            {"seed", std::to_string(c_.seed)}};
  }

  std::string describe() const override {
    char baseline[96] = "";
    if (baseline_ > 0) {
      std::snprintf(baseline, sizeof(baseline), "; unigram baseline on val %.4f (%.4f bits)",
                    baseline_, baseline_ / std::log(2.0));
    }
    return "dtrain-gpt: " + dtrain::gpt::describe(model_options(c_, vocabulary_.size())) + " on " +
           c_.train_data + " (" + std::to_string(train_set_->size()) + " tokens, " +
           data::token_level_name(vocabulary_.level) + " level), tp " + std::to_string(c_.tp) +
           (c_.sequence_parallel ? " with sequence parallelism" : "") + ", pp " +
           std::to_string(c_.pp) + baseline;
  }

  nlohmann::json config() const override {
    return {{"model", "gpt"},
            {"layers", c_.layers},
            {"heads", c_.heads},
            {"embedding", c_.embedding},
            {"context", c_.context},
            {"vocabulary", vocabulary_.size()},
            {"dropout", c_.dropout},
            {"tp", c_.tp},
            {"sequence_parallel", c_.sequence_parallel},
            {"pp", c_.pp},
            {"microbatches", c_.microbatches},
            {"pp_schedule", c_.pp_schedule},
            {"pp_tied_sum", c_.pp_tied_sum},
            {"pp_stages_per_rank", c_.pp_stages_per_rank},
            {"global_batch", c_.global_batch},
            {"epochs", c_.epochs},
            {"optimizer", "adamw"},
            {"lr", c_.lr},
            {"schedule", c_.schedule},
            {"unigram_baseline", baseline_},
            {"threads", c_.threads},
            {"seed", c_.seed}};
  }

 private:
  dtrain::parallel::pipeline::ScheduleOptions schedule_options(int pp) const {
    return train::schedule_from_flags(c_.pp_schedule, pp, c_.microbatches, c_.pp_stages_per_rank);
  }

  // The pipeline's inputs against the layout, before anything is built.
  void check_pipeline(int replicas) const {
    const auto schedule = train::checked_schedule_from_flags(
        c_.pp_schedule, c_.pp, c_.microbatches, c_.pp_stages_per_rank, c_.global_batch, replicas);
    try {
      dtrain::gpt::pipeline_partition(model_options(c_, vocabulary_.size()),
                                      c_.pp * schedule.stages_per_rank);
    } catch (const dtrain::InvalidArgument& e) {
      DTRAIN_THROW(dtrain::InvalidArgument, "--pp ", c_.pp, " x ", schedule.stages_per_rank,
                   " stage(s) per rank with --layers ", c_.layers, ": ", e.what());
    }
  }

  data::TokenLoaderOptions loader_options() const {
    data::TokenLoaderOptions o;
    o.context = c_.context;
    o.workers = c_.loader_workers;
    return o;
  }

  // Every rank builds the whole model but trains only its stages: before
  // sampling, each stage's owner broadcasts its parameters over the pp ranks,
  // so that every rank holds the trained model.
  void gather_stages(const dtrain::parallel::ParallelContext& ctx) {
    torch::NoGradGuard no_grad;
    const auto& schedule = pipeline_->engine().schedule();
    const auto layers = model_->layers();
    for (int i = 0; i < static_cast<int>(layers.size()); ++i) {
      dtrain::collectives::BroadcastOptions from;
      from.root = schedule.rank_of_stage(partition_.stage_of_layer(i));
      for (auto& param : layers[static_cast<std::size_t>(i)].module.ptr()->parameters()) {
        ctx.pp()->broadcast(param, from)->wait();
      }
    }
  }

  Config c_;
  std::shared_ptr<data::Dataset> train_set_;
  std::shared_ptr<data::Dataset> val_set_;
  data::Vocabulary vocabulary_;
  double baseline_ = 0;
  std::shared_ptr<dtrain::collectives::Communicator> tp_;
  std::shared_ptr<dtrain::parallel::RngStreams> rng_;
  dtrain::gpt::Gpt model_{nullptr};
  train::PipelineParallel* pipeline_ = nullptr;  // owned by the trainer, with --pp
  dtrain::parallel::pipeline::StagePartition partition_;
};

}  // namespace

int main(int argc, char** argv) {
  const dtrain::LaunchInfo launch = dtrain::detect_launch();
  cxxopts::Options cli = make_cli();
  Config config;
  train::TrainerOptions options;
  try {
    auto parsed = dtrain::cli::parse(cli, argc, argv);
    if (parsed.count("help")) {
      if (launch.rank == 0) {
        std::cout << cli.help({"Model and data", "Schedule", "Parallelism", "Execution",
                               "Checkpoints and output"})
                  << "\nBoolean options take true or false attached or as the next word "
                     "(--resume=false, --resume false); alone they mean true.\n"
                     "Exit status: 0 finished (or stopped by --max-minutes after a "
                     "checkpoint), 2 bad input (nothing trained or written), 75 stopped by "
                     "SIGTERM/SIGINT after a checkpoint (run again to resume), 1 other errors.\n";
      }
      return 0;
    }
    config = parse_config(parsed);
    options = trainer_options(config);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s (see --help)\n", launch.rank, e.what());
    return train::kExitBadInput;
  }
  GptProgram program(config);
  return train::run(&argc, &argv, options, program);
}
