// dtrain-resnet: the reference trainer. ResNet on a sharded HDF5 data set
// with data parallelism (DDP or ZeRO-1) or pipeline parallelism combined
// with data parallelism (--pp, dp x pp ranks), checkpoints with automatic resume,
// distributed evaluation, JSON-lines metrics and Chrome traces.
//
//   dtrain-resnet --train-data data/fashion-mnist/train --test-data data/fashion-mnist/test
//   scripts/launch/dtrain-mpirun -n 2 build/examples/resnet/dtrain-resnet --model resnet20 ...
//
// This file holds what is ResNet's: the model, the image data and the
// command line. The loop, checkpoints, signals, evaluation, metrics, traces,
// exit codes and fault injection are the library's trainer
// (dtrain/train/trainer.h), data parallelism its DataParallel strategy
// (dtrain/train/data_parallel.h) and pipeline parallelism its
// PipelineParallel strategy (dtrain/train/pipeline_parallel.h), over the
// model's layers (ResNet::layers()). Exit status: 0 finished, or stopped by
// --max-minutes after a checkpoint; 2 bad input (nothing was trained or
// written); 75 stopped by SIGTERM/SIGINT after saving a checkpoint (run it
// again to continue); 1 any other error.

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "dtrain/config.h"
#include "dtrain/data/dataset.h"
#include "dtrain/data/loader.h"
#include "dtrain/env.h"
#include "dtrain/error.h"
#include "dtrain/parallel/pipeline/generators.h"
#include "dtrain/parallel/pipeline/partition.h"
#include "dtrain/train/data_parallel.h"
#include "dtrain/train/pipeline_parallel.h"
#include "dtrain/train/trainer.h"
#include "examples/resnet/resnet.h"
#include "src/cli/cli.h"
#include "src/train/trainer_cli.h"

namespace {

namespace train = dtrain::train;

// --- configuration ---------------------------------------------------------

struct Config {
  std::string model = "resnet20";
  std::string train_data = "data/fashion-mnist/train";
  std::string test_data = "data/fashion-mnist/test";
  train::TrainerOptions output;  // --out, --checkpoint-dir, ... (src/train/trainer_cli.h)
  int epochs = 10;
  std::int64_t steps = 0;  // 0: epochs * steps per epoch
  double max_minutes = 0;  // 0: no time limit
  std::int64_t global_batch = 128;
  std::string optimizer = "sgd";
  double lr = 0.1;
  double momentum = 0.9;
  bool nesterov = true;
  double weight_decay = 5e-4;
  double warmup_epochs = 1;
  std::string schedule = "cosine";
  std::string step_epochs = "";  // e.g. "5,8" for --schedule step
  double step_gamma = 0.1;
  double label_smoothing = 0.0;
  std::uint64_t seed = 0;
  std::string device = "cpu";
  int threads = 1;
  int loader_workers = 1;
  std::string loader_output;  // "float", "raw" or "" (raw on cuda, float on cpu)
  bool augment = true;
  double bucket_cap_mb = 25;
  double first_bucket_mb = 1;
  std::string compression = "none";
  bool zero = false;
  bool sync_bn = false;
  int pp = 1;                            // pipeline ranks
  int microbatches = 1;                  // per replica and step
  std::string pp_schedule = "1f1b";      // gpipe, 1f1b, interleaved, zb-h1
  int pp_stages_per_rank = 0;            // v; 0: 2 for interleaved, 1 otherwise
  std::string pp_partition = "uniform";  // uniform, params, or cut points "4,9"
  std::vector<int> pp_cuts;              // the cut points of --pp-partition 4,9

  // The pipeline strategy runs with --pp > 1, or --microbatches > 1 (at
  // pp 1: gradient accumulation over the microbatches).
  bool pipeline() const { return pp > 1 || microbatches > 1; }
  std::int64_t eval_batch = 500;
  int comm_timeout_s = 300;
};

cxxopts::Options make_cli() {
  cxxopts::Options cli(
      "dtrain-resnet",
      "Data- and pipeline-parallel ResNet training on sharded HDF5 data with checkpoints and "
      "automatic resume.\nRun under mpirun/srun for several ranks; runs alone "
      "as one rank.");
  // clang-format off
  cli.add_options("Model and data")
    ("model", "resnet20|resnet32|resnet56 (CIFAR layout) or resnet18|resnet34|resnet50", cxxopts::value<std::string>()->default_value("resnet20"))
    ("train-data", "training data set directory (dtrain-data format)", cxxopts::value<std::string>()->default_value("data/fashion-mnist/train"))
    ("test-data", "test data set directory (\"none\": no evaluation)", cxxopts::value<std::string>()->default_value("data/fashion-mnist/test"))
    ("augment", "random crop (padding 2) and horizontal flip on training images", cxxopts::value<bool>()->default_value("true"))
    ("loader-workers", "decode/augment threads per rank", cxxopts::value<int>()->default_value("1"))
    ("loader-output", "float: the loader normalizes images to float32; raw: it hands over the stored uint8 images and they are normalized on the device, bitwise the same (a quarter of the bytes to copy to a GPU). Default: raw with --device cuda, float otherwise", cxxopts::value<std::string>()->default_value(""));
  cli.add_options("Schedule")
    ("epochs", "epochs to train", cxxopts::value<int>()->default_value("10"))
    ("steps", "total optimizer steps instead of --epochs (0: use --epochs)", cxxopts::value<std::int64_t>()->default_value("0"))
    ("max-minutes", "stop after this wall time, with an evaluation and a checkpoint (exit 0); a rerun resumes (0: no limit)", cxxopts::value<double>()->default_value("0"))
    ("global-batch", "samples per step over all ranks (divisible by the number of ranks)", cxxopts::value<std::int64_t>()->default_value("128"))
    ("optimizer", "sgd (momentum) or adamw", cxxopts::value<std::string>()->default_value("sgd"))
    ("lr", "peak learning rate", cxxopts::value<double>()->default_value("0.1"))
    ("momentum", "SGD momentum", cxxopts::value<double>()->default_value("0.9"))
    ("nesterov", "Nesterov momentum (SGD)", cxxopts::value<bool>()->default_value("true"))
    ("weight-decay", "weight decay (L2 for SGD, decoupled for AdamW)", cxxopts::value<double>()->default_value("5e-4"))
    ("warmup-epochs", "linear warm-up from 0 over this many epochs", cxxopts::value<double>()->default_value("1"))
    ("schedule", "after warm-up: cosine (to 0), step, or constant", cxxopts::value<std::string>()->default_value("cosine"))
    ("step-epochs", "epochs at which --schedule step multiplies the rate by --step-gamma, e.g. 5,8", cxxopts::value<std::string>()->default_value(""))
    ("step-gamma", "factor of each step decay", cxxopts::value<double>()->default_value("0.1"))
    ("label-smoothing", "label smoothing of the cross-entropy loss", cxxopts::value<double>()->default_value("0"))
    ("seed", "seed of weights, data order and augmentation", cxxopts::value<std::uint64_t>()->default_value("0"));
  cli.add_options("Execution")
    ("device", "cpu or cuda", cxxopts::value<std::string>()->default_value("cpu"))
    ("threads", "intra-op threads per rank", cxxopts::value<int>()->default_value("1"))
    ("comm-timeout", "seconds before a collective that a peer never joins fails the job", cxxopts::value<int>()->default_value("300"));
  cli.add_options("Data parallelism")
    ("bucket-cap-mb", "gradient bucket size (MiB)", cxxopts::value<double>()->default_value("25"))
    ("first-bucket-mb", "first (last layers') bucket size (MiB)", cxxopts::value<double>()->default_value("1"))
    ("compression", "gradient wire format: none, bf16 or fp16", cxxopts::value<std::string>()->default_value("none"))
    ("zero", "ZeRO-1: shard optimizer state over the ranks (instead of DDP)", cxxopts::value<bool>()->default_value("false"))
    ("sync-bn", "synchronize BatchNorm statistics over the data-parallel ranks", cxxopts::value<bool>()->default_value("false"));
  cli.add_options("Pipeline parallelism")
    ("pp", "pipeline ranks: the model is cut into stages, dp = ranks / pp (divisible)", cxxopts::value<int>()->default_value("1"))
    ("microbatches", "microbatches per step and replica (dividing global batch / dp); above 1 with --pp 1 accumulates gradients over them", cxxopts::value<int>()->default_value("1"))
    ("pp-schedule", "gpipe, 1f1b, interleaved or zb-h1", cxxopts::value<std::string>()->default_value("1f1b"))
    ("pp-stages-per-rank", "stages per pipeline rank (interleaved only; 0: 2 for interleaved, 1 otherwise)", cxxopts::value<int>()->default_value("0"))
    ("pp-partition", "where the layers are cut: uniform (by layer count), params (balanced by parameter count) or the first layer of each stage after the first, e.g. 4,9", cxxopts::value<std::string>()->default_value("uniform"));
  // clang-format on
  train::add_output_options(cli, "runs/resnet");
  // clang-format off
  cli.add_options("Checkpoints and output")
    ("eval-batch", "evaluation batch over all ranks", cxxopts::value<std::int64_t>()->default_value("500"))
    ("h,help", "print this help");
  // clang-format on
  return cli;
}

// Parses argv into a Config; throws dtrain::InvalidArgument with the reason.
Config parse_config(cxxopts::ParseResult& p) {
  Config c;
  train::read_output_options(p, c.output);
  c.model = p["model"].as<std::string>();
  c.train_data = p["train-data"].as<std::string>();
  c.test_data = p["test-data"].as<std::string>();
  c.augment = p["augment"].as<bool>();
  c.loader_workers = p["loader-workers"].as<int>();
  c.loader_output = p["loader-output"].as<std::string>();
  c.epochs = p["epochs"].as<int>();
  c.steps = p["steps"].as<std::int64_t>();
  c.max_minutes = p["max-minutes"].as<double>();
  c.global_batch = p["global-batch"].as<std::int64_t>();
  c.optimizer = p["optimizer"].as<std::string>();
  c.lr = p["lr"].as<double>();
  c.momentum = p["momentum"].as<double>();
  c.nesterov = p["nesterov"].as<bool>();
  c.weight_decay = p["weight-decay"].as<double>();
  c.warmup_epochs = p["warmup-epochs"].as<double>();
  c.schedule = p["schedule"].as<std::string>();
  c.step_epochs = p["step-epochs"].as<std::string>();
  c.step_gamma = p["step-gamma"].as<double>();
  c.label_smoothing = p["label-smoothing"].as<double>();
  c.seed = p["seed"].as<std::uint64_t>();
  c.device = p["device"].as<std::string>();
  c.threads = p["threads"].as<int>();
  c.comm_timeout_s = p["comm-timeout"].as<int>();
  c.bucket_cap_mb = p["bucket-cap-mb"].as<double>();
  c.first_bucket_mb = p["first-bucket-mb"].as<double>();
  c.compression = p["compression"].as<std::string>();
  c.zero = p["zero"].as<bool>();
  c.sync_bn = p["sync-bn"].as<bool>();
  c.pp = p["pp"].as<int>();
  c.microbatches = p["microbatches"].as<int>();
  c.pp_schedule = p["pp-schedule"].as<std::string>();
  c.pp_stages_per_rank = p["pp-stages-per-rank"].as<int>();
  c.pp_partition = p["pp-partition"].as<std::string>();
  c.eval_batch = p["eval-batch"].as<std::int64_t>();

  const auto& names = dtrain::resnet::resnet_names();
  std::string valid;
  for (const auto& n : names) valid += (valid.empty() ? "" : ", ") + n;
  DTRAIN_CHECK_ARG(std::find(names.begin(), names.end(), c.model) != names.end(),
                   "unknown --model '", c.model, "' (valid: ", valid, ")");
  DTRAIN_CHECK_ARG(c.epochs >= 1 || c.steps >= 1, "--epochs or --steps must be >= 1");
  DTRAIN_CHECK_ARG(c.steps >= 0, "--steps must be >= 0");
  DTRAIN_CHECK_ARG(c.global_batch >= 1, "--global-batch must be >= 1, got ", c.global_batch);
  DTRAIN_CHECK_ARG(c.optimizer == "sgd" || c.optimizer == "adamw", "unknown --optimizer '",
                   c.optimizer, "' (sgd, adamw)");
  DTRAIN_CHECK_ARG(c.lr > 0, "--lr must be > 0");
  DTRAIN_CHECK_ARG(c.schedule == "cosine" || c.schedule == "step" || c.schedule == "constant",
                   "unknown --schedule '", c.schedule, "' (cosine, step, constant)");
  DTRAIN_CHECK_ARG(c.label_smoothing >= 0 && c.label_smoothing < 1,
                   "--label-smoothing must be in [0, 1)");
  DTRAIN_CHECK_ARG(c.device == "cpu" || c.device == "cuda", "unknown --device '", c.device,
                   "' (cpu, cuda)");
  DTRAIN_CHECK_ARG(c.threads >= 1, "--threads must be >= 1");
  DTRAIN_CHECK_ARG(c.loader_workers >= 1, "--loader-workers must be >= 1");
  DTRAIN_CHECK_ARG(
      c.loader_output.empty() || c.loader_output == "float" || c.loader_output == "raw",
      "unknown --loader-output '", c.loader_output, "' (float, raw)");
  if (c.loader_output.empty()) c.loader_output = c.device == "cuda" ? "raw" : "float";
  DTRAIN_CHECK_ARG(c.compression == "none" || c.compression == "bf16" || c.compression == "fp16",
                   "unknown --compression '", c.compression, "' (none, bf16, fp16)");
  DTRAIN_CHECK_ARG(!(c.zero && c.compression != "none"),
                   "--compression applies to DDP's all-reduce; it cannot be combined with --zero");
  DTRAIN_CHECK_ARG(c.eval_batch >= 1, "--eval-batch must be >= 1");
  DTRAIN_CHECK_ARG(c.comm_timeout_s >= 1, "--comm-timeout must be >= 1 s");
  c.pp_stages_per_rank =
      train::check_pipeline_flags(c.pp, c.microbatches, c.pp_schedule, c.pp_stages_per_rank);
  if (c.pp_partition != "uniform" && c.pp_partition != "params") {
    std::stringstream in(c.pp_partition);
    std::string item;
    while (std::getline(in, item, ',')) {
      std::size_t used = 0;
      int cut = -1;
      try {
        cut = std::stoi(item, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      DTRAIN_CHECK_ARG(used == item.size() && !item.empty(), "--pp-partition '", c.pp_partition,
                       "' is not uniform, params or comma-separated layer indices (e.g. 4,9)");
      c.pp_cuts.push_back(cut);
    }
  }
  DTRAIN_CHECK_ARG(!(c.pp > 1 && c.device == "cuda"), "--pp ", c.pp,
                   " runs on --device cpu only (the stages' messages go over MPI)");
  DTRAIN_CHECK_ARG(c.device != "cuda" || DTRAIN_HAVE_NCCL,
                   "--device cuda needs dtrain's NCCL backend, and this build has none (CUDA "
                   "and NCCL were not found at configure time; see docs/gpu.md)");
  DTRAIN_CHECK_ARG(c.device != "cuda" || torch::cuda::is_available(),
                   "--device cuda was asked for but no CUDA device is available (this LibTorch ",
                   torch::cuda::is_available() ? "sees" : "has no CUDA support or sees no GPU",
                   ")");
  return c;
}

std::vector<double> parse_epoch_list(const std::string& text) {
  std::vector<double> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (item.empty()) continue;
    try {
      out.push_back(std::stod(item));
    } catch (const std::exception&) {
      DTRAIN_THROW(dtrain::InvalidArgument, "--step-epochs '", text,
                   "' must be comma-separated numbers");
    }
  }
  return out;
}

// The options the library's trainer takes, from the command line.
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
  o.lr.step_epochs = parse_epoch_list(c.step_epochs);
  o.lr.step_gamma = c.step_gamma;
  o.device = c.device;
  o.threads = c.threads;
  o.comm_timeout_s = c.comm_timeout_s;
  o.pp = c.pp;
  return o;
}

// --- data ------------------------------------------------------------------

// A DataLoader over an image data set, as the trainer's DataSource: images
// and labels, moved to the device (and normalized there with raw output).
class ImageData : public train::DataSource {
 public:
  ImageData(std::shared_ptr<dtrain::data::Dataset> set, dtrain::data::LoaderOptions options,
            int rank, int world_size, torch::Device device)
      : options_(options), loader_(std::move(set), options, rank, world_size), device_(device) {}

  train::Batch next() override {
    dtrain::data::Batch b = loader_.next();
    train::Batch out;
    out.inputs = std::move(b.images);
    out.targets = std::move(b.labels);
    out.epoch = b.epoch;
    out.batch_in_epoch = b.batch_in_epoch;
    out.indices = std::move(b.indices);
    return out;
  }
  // From pinned batches (pin_memory, on a GPU) the copies are asynchronous:
  // the host goes on queueing the step while they run, and CUDA's host
  // allocator keeps each batch's memory until its copy has finished.
  void to_device(train::Batch& batch) override {
    const bool async = options_.pin_memory;
    at::Tensor inputs = batch.inputs.to(device_, async);
    batch.inputs = options_.output == dtrain::data::ImageOutput::kNormalizedFloat
                       ? inputs
                       : dtrain::data::normalize_images(inputs, options_);
    batch.targets = batch.targets.to(device_, async);
  }
  std::int64_t batches_per_epoch() const override { return loader_.batches_per_epoch(); }
  std::string position() const override { return loader_.state().serialize(); }

 private:
  dtrain::data::LoaderOptions options_;
  dtrain::data::DataLoader loader_;
  torch::Device device_;
};

// --- the program -----------------------------------------------------------

class ResNetProgram : public train::TrainingProgram {
 public:
  explicit ResNetProgram(Config config) : c_(std::move(config)) {}

  // Everything that can be wrong with the input; the trainer agrees on it
  // over the ranks before anything is trained or written.
  std::int64_t check_input(const train::RunContext& run) override {
    const int replicas = run.context->data_world_size();
    DTRAIN_CHECK_ARG(c_.global_batch % replicas == 0, "--global-batch ", c_.global_batch,
                     " is not divisible by the number of data-parallel ranks (", replicas, ")");
    DTRAIN_CHECK_ARG(c_.test_data == "none" || c_.eval_batch % replicas == 0, "--eval-batch ",
                     c_.eval_batch, " is not divisible by the number of data-parallel ranks (",
                     replicas, ")");
    dtrain::data::OpenOptions open;
    open.verify_digests = false;  // sizes, structure, dtypes and shapes are still checked
    train_set_ = dtrain::data::Dataset::open(c_.train_data, open);
    if (c_.test_data != "none") test_set_ = dtrain::data::Dataset::open(c_.test_data, open);
    const auto& m = train_set_->manifest();
    const auto& images = m.fields.at(static_cast<std::size_t>(train_set_->field_index("images")));
    DTRAIN_CHECK_ARG(images.shape.size() == 3 || images.shape.size() == 2, c_.train_data,
                     ": field 'images' must be [C,H,W] or [H,W] per sample");
    channels_ = images.shape.size() == 3 ? images.shape[0] : 1;
    classes_ = m.class_names.empty() ? 10 : static_cast<std::int64_t>(m.class_names.size());
    // Integer labels in [0, classes): from the manifest's recorded range, or
    // one read of the labels for a data set written before it was recorded.
    dtrain::data::check_class_labels(*train_set_, "labels", classes_);
    if (test_set_) dtrain::data::check_class_labels(*test_set_, "labels", classes_);
    DTRAIN_CHECK_ARG(train_set_->size() >= c_.global_batch, c_.train_data, " holds ",
                     train_set_->size(), " samples, fewer than one global batch (", c_.global_batch,
                     ")");
    image_shape_ = images.shape;
    if (image_shape_.size() == 2) image_shape_.insert(image_shape_.begin(), 1);
    if (c_.pipeline()) check_pipeline(replicas);
    return train_set_->size() / c_.global_batch;
  }

  std::unique_ptr<train::Strategy> make_strategy(const train::RunContext& run) override {
    dtrain::resnet::NormFactory norm;
    if (c_.sync_bn) {
      // On one rank too: BatchNorm2d would round differently from N ranks.
      // Under pipeline parallelism the statistics are those of the stage's
      // replicas: the dp axis (MPI, like the stages' messages).
      bn_comm_ = c_.pipeline() ? run.context->dp()->split(0, run.context->dp_rank(),
                                                          {"sync-bn", std::nullopt})
                               : run.train_comm->split(0, run.rank, {"sync-bn", std::nullopt});
      norm = dtrain::resnet::sync_batch_norm_2d(bn_comm_);
    }
    dtrain::resnet::ResNet model =
        dtrain::resnet::make_resnet(c_.model, channels_, classes_, false, norm);
    model->to(run.device);
    auto make_optimizer =
        [c = c_](std::vector<torch::Tensor> params) -> std::unique_ptr<torch::optim::Optimizer> {
      if (c.optimizer == "adamw") {
        return std::make_unique<torch::optim::AdamW>(
            params, torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay));
      }
      return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(c.lr)
                                                             .momentum(c.momentum)
                                                             .nesterov(c.nesterov)
                                                             .weight_decay(c.weight_decay));
    };
    dtrain::parallel::DdpOptions ddp;
    ddp.bucket_cap_bytes = static_cast<std::size_t>(c_.bucket_cap_mb * (1 << 20));
    ddp.first_bucket_cap_bytes = static_cast<std::size_t>(c_.first_bucket_mb * (1 << 20));
    ddp.compression = c_.compression == "bf16"   ? dtrain::parallel::GradientCompression::kBFloat16
                      : c_.compression == "fp16" ? dtrain::parallel::GradientCompression::kFloat16
                                                 : dtrain::parallel::GradientCompression::kNone;
    if (c_.pipeline()) {
      train::PipelineParallelOptions po;
      po.schedule = schedule_options(run.context->pp_size());
      po.ddp = ddp;
      po.zero = c_.zero;  // ZeRO-1 per stage instead of DDP
      po.seed = c_.seed;
      auto layers = model->layers();
      const auto partition = partition_of(layers, po.schedule);
      std::vector<std::int64_t> sample_shape{1};
      sample_shape.insert(sample_shape.end(), image_shape_.begin(), image_shape_.end());
      return std::make_unique<train::PipelineParallel>(
          std::move(layers), partition,
          torch::zeros(sample_shape, torch::TensorOptions(run.device)), run.context, make_optimizer,
          train::classification(c_.label_smoothing), po);
    }
    train::DataParallelOptions o;
    o.zero = c_.zero;
    o.ddp = ddp;
    return std::make_unique<train::DataParallel>(
        model.ptr(), [impl = model.ptr()](const at::Tensor& x) { return impl->forward(x); },
        run.train_comm, make_optimizer, train::classification(c_.label_smoothing), o);
  }

  std::unique_ptr<train::DataSource> train_data(const train::RunContext& run,
                                                const std::string& position) override {
    dtrain::data::LoaderOptions lo = loader_options();
    lo.sampler.seed = c_.seed;
    lo.sampler.global_batch_size = c_.global_batch;
    lo.sampler.drop_last = true;
    if (!position.empty()) lo.start = dtrain::data::SamplerState::parse(position);
    if (c_.augment) {
      lo.augment.crop_padding = 2;
      lo.augment.horizontal_flip = true;
    }
    return std::make_unique<ImageData>(train_set_, lo, run.context->data_rank(),
                                       run.context->data_world_size(), run.device);
  }

  std::unique_ptr<train::DataSource> eval_data(const train::RunContext& run) override {
    if (!test_set_) return nullptr;
    dtrain::data::LoaderOptions o = loader_options();
    o.sampler.global_batch_size = c_.eval_batch;
    o.sampler.shuffle = dtrain::data::ShuffleMode::kNone;
    o.sampler.drop_last = false;
    return std::make_unique<ImageData>(test_set_, o, run.context->data_rank(),
                                       run.context->data_world_size(), run.device);
  }

  Identity identity() const override {
    return {{"model", c_.model},
            {"global_batch", std::to_string(c_.global_batch)},
            {"optimizer", c_.optimizer},
            {"zero", c_.zero ? "1" : "0"},
            {"seed", std::to_string(c_.seed)}};
  }

  std::string describe() const override {
    return "dtrain-resnet: " + c_.model + " on " + c_.train_data + " (" +
           std::to_string(train_set_->size()) + " images, " + std::to_string(classes_) +
           " classes)";
  }

  nlohmann::json config() const override {
    return {{"model", c_.model},
            {"global_batch", c_.global_batch},
            {"epochs", c_.epochs},
            {"optimizer", c_.optimizer},
            {"lr", c_.lr},
            {"schedule", c_.schedule},
            {"zero", c_.zero},
            {"sync_bn", c_.sync_bn},
            {"pp", c_.pp},
            {"microbatches", c_.microbatches},
            {"pp_schedule", c_.pp_schedule},
            {"pp_stages_per_rank", c_.pp_stages_per_rank},
            {"pp_partition", c_.pp_partition},
            {"compression", c_.compression},
            {"loader_output", c_.loader_output},
            {"threads", c_.threads},
            {"seed", c_.seed}};
  }

 private:
  dtrain::parallel::pipeline::ScheduleOptions schedule_options(int pp) const {
    return train::schedule_from_flags(c_.pp_schedule, pp, c_.microbatches, c_.pp_stages_per_rank);
  }

  dtrain::parallel::pipeline::StagePartition partition_of(
      const std::vector<dtrain::parallel::pipeline::Layer>& layers,
      const dtrain::parallel::pipeline::ScheduleOptions& schedule) const {
    namespace pl = dtrain::parallel::pipeline;
    const int stages = schedule.num_ranks * schedule.stages_per_rank;
    const int n = static_cast<int>(layers.size());
    DTRAIN_CHECK_ARG(stages <= n, "--pp ", schedule.num_ranks, " x ", schedule.stages_per_rank,
                     " stage(s) per rank makes ", stages, " stages, but ", c_.model, " has only ",
                     n, " layers to cut (stem layers, residual blocks, pool, fc)");
    if (c_.pp_partition == "uniform") return pl::partition_uniform(n, stages);
    if (c_.pp_partition == "params") {
      return pl::partition_balanced(pl::parameter_counts(layers), stages);
    }
    DTRAIN_CHECK_ARG(static_cast<int>(c_.pp_cuts.size()) == stages - 1, "--pp-partition '",
                     c_.pp_partition, "' has ", c_.pp_cuts.size(), " cut points; ", stages,
                     " stages need ", stages - 1);
    try {
      return pl::partition_at(n, c_.pp_cuts);
    } catch (const dtrain::InvalidArgument& e) {
      DTRAIN_THROW(dtrain::InvalidArgument, "--pp-partition '", c_.pp_partition, "' on ", n,
                   " layers: ", e.what());
    }
  }

  // The pipeline's bad input, before anything is written: microbatches that
  // do not divide a replica's batch, a schedule refused for this pp and m,
  // more stages than layers, bad cut points.
  void check_pipeline(int replicas) const {
    const auto schedule = train::checked_schedule_from_flags(
        c_.pp_schedule, c_.pp, c_.microbatches, c_.pp_stages_per_rank, c_.global_batch, replicas);
    const auto model = dtrain::resnet::make_resnet(c_.model, channels_, classes_);
    partition_of(model->layers(), schedule);
  }

  // What every loader of this run shares: normalization, workers, output.
  dtrain::data::LoaderOptions loader_options() const {
    dtrain::data::LoaderOptions o;
    o.mean = {0.2860};  // Fashion-MNIST's training set
    o.std = {0.3530};
    o.workers = c_.loader_workers;
    o.output = c_.loader_output == "raw" ? dtrain::data::ImageOutput::kRaw
                                         : dtrain::data::ImageOutput::kNormalizedFloat;
    o.pin_memory = c_.device == "cuda";
    return o;
  }

  Config c_;
  std::shared_ptr<dtrain::data::Dataset> train_set_;
  std::shared_ptr<dtrain::data::Dataset> test_set_;
  std::int64_t channels_ = 1;
  std::int64_t classes_ = 10;
  std::vector<std::int64_t> image_shape_;  // [C, H, W]
  std::shared_ptr<dtrain::collectives::Communicator> bn_comm_;
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
        std::cout << cli.help({"Model and data", "Schedule", "Data parallelism",
                               "Pipeline parallelism", "Execution", "Checkpoints and output"})
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
  ResNetProgram program(config);
  return train::run(&argc, &argv, options, program);
}
