// dtrain-resnet: the reference trainer. ResNet on a sharded HDF5 data set
// with data parallelism (DDP or ZeRO-1), checkpoints with automatic resume,
// distributed evaluation, JSON-lines metrics and Chrome traces.
//
//   dtrain-resnet --train-data data/fashion-mnist/train --test-data data/fashion-mnist/test
//   scripts/launch/dtrain-mpirun -n 2 build/examples/resnet/dtrain-resnet --model resnet20 ...
//
// Exit status: 0 finished, or stopped by --max-minutes after a checkpoint;
// 2 bad input (nothing was trained or written); 75 stopped by SIGTERM/SIGINT
// after saving a checkpoint (run it again to continue); 1 any other error. A failed collective
// (dead or hung peer) aborts the whole job (MPI_Abort) so that the launcher can restart it.
//
// Fault injection for the restart tests (never set in normal use):
//   DTRAIN_FAULT_KILL=<rank>:<step>[:always]  SIGKILL rank <rank> after step
//       <step>, once the checkpoint saves begun before it have committed
//       (only on the first attempt, DTRAIN_RESTART_COUNT unset or 0, unless
//       ":always").
//   DTRAIN_FAULT_FILE_LIMIT_KIB=<n>  once MPI is up (its shared-memory files
//       are larger), limit this process's files to n KiB (RLIMIT_FSIZE): a
//       checkpoint write then fails for real with EFBIG, as on a full disk.

#include <signal.h>
#include <sys/resource.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/checkpoint/state.h"
#include "dtrain/collectives/communicator.h"
#include "dtrain/config.h"
#if DTRAIN_HAVE_NCCL
#include "dtrain/collectives/nccl.h"
#endif
#include "dtrain/data/dataset.h"
#include "dtrain/data/loader.h"
#include "dtrain/env.h"
#include "dtrain/error.h"
#include "dtrain/parallel/distributed_data_parallel.h"
#include "dtrain/parallel/zero_optimizer.h"
#include "dtrain/runtime.h"
#include "examples/resnet/resnet.h"
#include "examples/resnet/telemetry.h"
#include "src/cli/cli.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using dtrain::resnet::SystemTime;
using json = nlohmann::json;

constexpr int kExitBadInput = dtrain::cli::kExitUsage;
constexpr int kExitStopped = 75;

std::atomic<int> g_stop_signal{0};
extern "C" void on_stop_signal(int signal) { g_stop_signal.store(signal); }

// --- configuration ---------------------------------------------------------

struct Config {
  std::string model = "resnet20";
  std::string train_data = "data/fashion-mnist/train";
  std::string test_data = "data/fashion-mnist/test";
  std::string out = "runs/resnet";
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
  std::string checkpoint_dir;         // default <out>/checkpoints; "none" disables
  std::int64_t checkpoint_every = 0;  // steps; 0 = at each epoch's end
  int keep = 3;
  bool async_checkpoint = true;
  bool resume = true;
  int eval_every = 1;  // epochs; 0 = only at the end
  std::int64_t eval_batch = 500;
  std::string metrics_dir;  // default <out>/metrics; "none" disables
  std::string trace_dir;    // empty: no trace
  std::string sample_log;   // empty: off
  int log_every = 50;
  std::string progress = "auto";
  int comm_timeout_s = 300;
};

cxxopts::Options make_cli() {
  cxxopts::Options cli("dtrain-resnet",
                       "Data-parallel ResNet training on sharded HDF5 data with checkpoints and "
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
    ("sync-bn", "synchronize BatchNorm statistics over the ranks", cxxopts::value<bool>()->default_value("false"));
  cli.add_options("Checkpoints and output")
    ("out", "run directory: checkpoints/, metrics/ (and trace/) go here", cxxopts::value<std::string>()->default_value("runs/resnet"))
    ("checkpoint-dir", "checkpoint directory (default <out>/checkpoints; \"none\": no checkpoints)", cxxopts::value<std::string>()->default_value(""))
    ("checkpoint-every", "save every N steps (0: at the end of each epoch)", cxxopts::value<std::int64_t>()->default_value("0"))
    ("keep", "checkpoints to keep", cxxopts::value<int>()->default_value("3"))
    ("async-checkpoint", "write checkpoints in the background", cxxopts::value<bool>()->default_value("true"))
    ("resume", "resume from the newest valid checkpoint if there is one", cxxopts::value<bool>()->default_value("true"))
    ("eval-every", "evaluate every N epochs (0: only at the end)", cxxopts::value<int>()->default_value("1"))
    ("eval-batch", "evaluation batch over all ranks", cxxopts::value<std::int64_t>()->default_value("500"))
    ("metrics-dir", "JSON-lines metrics per rank (default <out>/metrics; \"none\": off)", cxxopts::value<std::string>()->default_value(""))
    ("trace-dir", "Chrome trace per rank (off unless given; merge with scripts/merge_traces.py)", cxxopts::value<std::string>()->default_value(""))
    ("trace", "trace into <out>/trace", cxxopts::value<bool>()->default_value("false"))
    ("sample-log", "append each step's global sample indices per rank to FILE-rankRRRRR.jsonl (for audits)", cxxopts::value<std::string>()->default_value(""))
    ("log-every", "steps between progress lines when not on a terminal", cxxopts::value<int>()->default_value("50"))
    ("progress", "bar, lines or auto (a bar on a terminal when not under mpirun/srun)", cxxopts::value<std::string>()->default_value("auto"))
    ("h,help", "print this help");
  // clang-format on
  return cli;
}

// Parses argv into a Config; throws dtrain::InvalidArgument with the reason.
Config parse_config(cxxopts::ParseResult& p) {
  Config c;
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
  c.out = p["out"].as<std::string>();
  c.checkpoint_dir = p["checkpoint-dir"].as<std::string>();
  c.checkpoint_every = p["checkpoint-every"].as<std::int64_t>();
  c.keep = p["keep"].as<int>();
  c.async_checkpoint = p["async-checkpoint"].as<bool>();
  c.resume = p["resume"].as<bool>();
  c.eval_every = p["eval-every"].as<int>();
  c.eval_batch = p["eval-batch"].as<std::int64_t>();
  c.metrics_dir = p["metrics-dir"].as<std::string>();
  c.trace_dir = p["trace-dir"].as<std::string>();
  if (c.trace_dir.empty() && p["trace"].as<bool>()) c.trace_dir = c.out + "/trace";
  c.log_every = p["log-every"].as<int>();
  c.sample_log = p["sample-log"].as<std::string>();
  c.progress = p["progress"].as<std::string>();
  DTRAIN_CHECK_ARG(c.progress == "auto" || c.progress == "bar" || c.progress == "lines",
                   "unknown --progress '", c.progress, "' (auto, bar, lines)");
  if (c.checkpoint_dir.empty()) c.checkpoint_dir = c.out + "/checkpoints";
  if (c.metrics_dir.empty()) c.metrics_dir = c.out + "/metrics";

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
  DTRAIN_CHECK_ARG(c.keep >= 1, "--keep must be >= 1");
  DTRAIN_CHECK_ARG(c.checkpoint_every >= 0 && c.eval_every >= 0 && c.eval_batch >= 1,
                   "--checkpoint-every and --eval-every must be >= 0, --eval-batch >= 1");
  DTRAIN_CHECK_ARG(c.comm_timeout_s >= 1, "--comm-timeout must be >= 1 s");
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

// Learning rate at `step` (0-based) of `total` steps.
struct LrSchedule {
  Config config;
  std::int64_t steps_per_epoch = 1;
  std::int64_t total = 1;
  std::vector<double> step_epochs;

  double at(std::int64_t step) const {
    const double epoch = static_cast<double>(step) / static_cast<double>(steps_per_epoch);
    const double warmup = config.warmup_epochs * static_cast<double>(steps_per_epoch);
    if (warmup > 0 && static_cast<double>(step) < warmup) {
      return config.lr * static_cast<double>(step + 1) / warmup;
    }
    if (config.schedule == "cosine") {
      const double span = std::max(1.0, static_cast<double>(total) - warmup);
      const double t = std::min(1.0, (static_cast<double>(step) - warmup) / span);
      return 0.5 * config.lr * (1 + std::cos(M_PI * t));
    }
    double lr = config.lr;
    if (config.schedule == "step") {
      for (double e : step_epochs) {
        if (epoch >= e) lr *= config.step_gamma;
      }
    }
    return lr;
  }
};

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// What the run takes from the environment, read once in main() through
// dtrain/env.h: which attempt of a supervised job this is, and the faults
// an external test asks for (docs/configuration.md).
struct RunEnvironment {
  int restart = 0;  ///< DTRAIN_RESTART_COUNT (dtrain-launch sets it)
  /// DTRAIN_FAULT_KILL, when it applies to this attempt.
  std::optional<dtrain::KillFaultSpec> kill;
  /// DTRAIN_FAULT_CHECKPOINT, for CheckpointOptions::fault_hook.
  std::optional<dtrain::CheckpointFaultSpec> checkpoint_fault;
};

RunEnvironment read_run_environment() {
  RunEnvironment env;
  env.restart = dtrain::read_restart_count();
  const dtrain::FaultInjectionEnv faults = dtrain::read_fault_injection_env();
  // Faults are injected on a job's first attempt only (a restart must be
  // able to recover), unless DTRAIN_FAULT_KILL says `always`.
  if (faults.kill && (env.restart == 0 || faults.kill->every_attempt)) env.kill = faults.kill;
  if (faults.checkpoint) {
    dtrain::checkpoint::parse_save_phase(faults.checkpoint->phase);  // a typo is bad input
    if (env.restart == 0) env.checkpoint_fault = faults.checkpoint;
  }
  return env;
}

void kill_self(int rank, const std::string& what) {
  std::fprintf(stderr, "[dtrain rank %d] fault injection: %s\n", rank, what.c_str());
  std::fflush(stderr);
  ::kill(::getpid(), SIGKILL);
}

// The CheckpointOptions::fault_hook of DTRAIN_FAULT_CHECKPOINT: a real
// SIGKILL of this rank at that point of that save or, with `stall`, this
// rank says so and waits there until it is killed from outside.
std::function<void(dtrain::checkpoint::SavePhase, std::int64_t)> checkpoint_fault_hook(
    const std::optional<dtrain::CheckpointFaultSpec>& fault, int rank) {
  if (!fault || fault->rank != rank) return {};
  const dtrain::checkpoint::SavePhase phase = dtrain::checkpoint::parse_save_phase(fault->phase);
  const std::int64_t step = fault->step;
  const bool stall = fault->stall;
  return [phase, step, rank, stall](dtrain::checkpoint::SavePhase now, std::int64_t saving) {
    if (now != phase || saving != step) return;
    const std::string where =
        "saving step " + std::to_string(step) + " (" + dtrain::checkpoint::to_string(phase) + ")";
    if (stall) {
      std::fprintf(stderr, "[dtrain rank %d] fault injection: stalled while %s\n", rank,
                   where.c_str());
      std::fflush(stderr);
      while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    kill_self(rank, "killed while " + where);
  };
}

bool fault_kill_due(const std::optional<dtrain::KillFaultSpec>& kill, int rank, std::int64_t step) {
  return kill && kill->rank == rank && kill->step == step;
}

// --- the run ---------------------------------------------------------------

class Trainer {
 public:
  Trainer(Config config, dtrain::Runtime& runtime, RunEnvironment env)
      : c_(std::move(config)), runtime_(runtime), env_(std::move(env)) {}
  int run();
  /// True once every rank has accepted the input (errors after it abort the job).
  bool started() const { return started_; }

 private:
  void setup();
  void restore();
  dtrain::checkpoint::StateDict state_dict() const;
  std::map<std::string, std::string> metadata() const;
  void save_checkpoint(bool wait);
  void evaluate();
  void set_lr(double lr);
  /// What every loader of this run shares: normalization, workers, output.
  dtrain::data::LoaderOptions loader_options() const;
  /// The batch's images on the training device, normalized (on the device
  /// when the loader hands over raw images).
  at::Tensor images_on_device(const dtrain::data::Batch& batch,
                              const dtrain::data::LoaderOptions& options) const;
  void say(const std::string& text) {
    if (rank_ != 0) return;
    if (progress_) {
      progress_->message(text);
    } else {
      std::printf("%s\n", text.c_str());
      std::fflush(stdout);
    }
  }

  Config c_;
  dtrain::Runtime& runtime_;
  RunEnvironment env_;
  bool started_ = false;
  std::shared_ptr<dtrain::collectives::Communicator> world_;
  /// Gradients, buffers and BatchNorm statistics travel here: world_ itself
  /// on CPU, an NCCL communicator over the same ranks with --device cuda.
  /// world_ (MPI) keeps the CPU-side agreement: input checks, loss, stop.
  std::shared_ptr<dtrain::collectives::Communicator> train_comm_;
  std::shared_ptr<dtrain::collectives::Communicator> bn_comm_;
  int rank_ = 0;
  int world_size_ = 1;
  torch::Device device_ = torch::kCPU;

  std::shared_ptr<dtrain::data::Dataset> train_set_;
  std::shared_ptr<dtrain::data::Dataset> test_set_;
  std::int64_t channels_ = 1;
  std::int64_t classes_ = 10;
  dtrain::resnet::ResNet model_{nullptr};
  std::unique_ptr<dtrain::parallel::DistributedDataParallel> ddp_;
  std::unique_ptr<dtrain::parallel::ZeroRedundancyOptimizer> zero_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  std::unique_ptr<dtrain::checkpoint::CheckpointManager> checkpoints_;
  std::unique_ptr<dtrain::data::DataLoader> loader_;
  dtrain::data::SamplerState sampler_state_;
  LrSchedule schedule_;
  std::int64_t step_ = 0;
  std::int64_t total_steps_ = 0;
  std::int64_t steps_per_epoch_ = 1;
  std::optional<std::int64_t> resumed_from_;
  double last_eval_accuracy_ = -1;
  double last_eval_loss_ = -1;

  std::unique_ptr<dtrain::resnet::MetricsLog> metrics_;
  std::unique_ptr<dtrain::resnet::MetricsLog> samples_;
  std::unique_ptr<dtrain::resnet::TraceLog> trace_;
  std::unique_ptr<dtrain::resnet::Progress> progress_;
};

// Everything that can be wrong with the input is checked here, on every rank,
// and agreed on before anything is trained or written.
void Trainer::setup() {
  rank_ = runtime_.rank();
  world_size_ = runtime_.size();
  std::string problem;
  try {
    DTRAIN_CHECK_ARG(c_.global_batch % world_size_ == 0, "--global-batch ", c_.global_batch,
                     " is not divisible by the number of ranks (", world_size_, ")");
    DTRAIN_CHECK_ARG(c_.test_data == "none" || c_.eval_batch % world_size_ == 0, "--eval-batch ",
                     c_.eval_batch, " is not divisible by the number of ranks (", world_size_, ")");
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
  } catch (const dtrain::Error& e) {
    problem = e.what();
  }
  at::Tensor bad = at::full({1}, problem.empty() ? 0 : 1, at::kLong);
  dtrain::collectives::AllReduceOptions max;
  max.op = dtrain::collectives::ReduceOp::kMax;
  world_->all_reduce(bad, max)->wait();
  if (bad.item<std::int64_t>() != 0) {
    throw dtrain::InvalidArgument(problem.empty() ? "another rank rejected the input" : problem);
  }

  if (c_.checkpoint_dir != "none") {
    dtrain::checkpoint::CheckpointOptions o;
    o.directory = c_.checkpoint_dir;
    o.keep_last = c_.keep;
    o.async = c_.async_checkpoint;
    o.fault_hook = checkpoint_fault_hook(env_.checkpoint_fault, runtime_.rank());
    try {
      checkpoints_ = std::make_unique<dtrain::checkpoint::CheckpointManager>(o, world_);
    } catch (const dtrain::CheckpointError& e) {
      throw dtrain::InvalidArgument(e.what());
    }
  }

  device_ = c_.device == "cuda" ? torch::Device(torch::kCUDA, runtime_.launch().local_rank)
                                : torch::Device(torch::kCPU);
  train_comm_ = world_;
#if DTRAIN_HAVE_NCCL
  if (device_.is_cuda()) {
    dtrain::collectives::NcclOptions nccl;
    nccl.name = "gpu-world";
    nccl.device = device_.index();
    nccl.timeout = std::chrono::seconds(c_.comm_timeout_s);
    train_comm_ = dtrain::collectives::make_nccl_communicator(*world_, nccl);
  }
#endif
  torch::manual_seed(c_.seed);
  dtrain::resnet::NormFactory norm;
  if (c_.sync_bn) {
    // On one rank too: BatchNorm2d would round differently from N ranks.
    bn_comm_ = train_comm_->split(0, rank_, {"sync-bn", std::nullopt});
    norm = dtrain::resnet::sync_batch_norm_2d(bn_comm_);
  }
  model_ = dtrain::resnet::make_resnet(c_.model, channels_, classes_, false, norm);
  model_->to(device_);

  auto make_optimizer =
      [this](std::vector<torch::Tensor> params) -> std::unique_ptr<torch::optim::Optimizer> {
    if (c_.optimizer == "adamw") {
      return std::make_unique<torch::optim::AdamW>(
          params, torch::optim::AdamWOptions(c_.lr).weight_decay(c_.weight_decay));
    }
    return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(c_.lr)
                                                           .momentum(c_.momentum)
                                                           .nesterov(c_.nesterov)
                                                           .weight_decay(c_.weight_decay));
  };
  if (c_.zero) {
    zero_ = std::make_unique<dtrain::parallel::ZeroRedundancyOptimizer>(model_.ptr(), train_comm_,
                                                                        make_optimizer);
  } else {
    dtrain::parallel::DdpOptions o;
    o.bucket_cap_bytes = static_cast<std::size_t>(c_.bucket_cap_mb * (1 << 20));
    o.first_bucket_cap_bytes = static_cast<std::size_t>(c_.first_bucket_mb * (1 << 20));
    o.compression = c_.compression == "bf16"   ? dtrain::parallel::GradientCompression::kBFloat16
                    : c_.compression == "fp16" ? dtrain::parallel::GradientCompression::kFloat16
                                               : dtrain::parallel::GradientCompression::kNone;
    ddp_ =
        std::make_unique<dtrain::parallel::DistributedDataParallel>(model_.ptr(), train_comm_, o);
    optimizer_ = make_optimizer(model_->parameters());
  }

  dtrain::data::SamplerOptions sampler;
  sampler.seed = c_.seed;
  sampler.global_batch_size = c_.global_batch;
  sampler.drop_last = true;
  steps_per_epoch_ = train_set_->size() / c_.global_batch;
  total_steps_ = c_.steps > 0 ? c_.steps : c_.epochs * steps_per_epoch_;
  schedule_ = {c_, steps_per_epoch_, total_steps_, parse_epoch_list(c_.step_epochs)};
}

std::map<std::string, std::string> Trainer::metadata() const {
  return {{"model", c_.model},
          {"global_batch", std::to_string(c_.global_batch)},
          {"optimizer", c_.optimizer},
          {"zero", c_.zero ? "1" : "0"},
          {"seed", std::to_string(c_.seed)},
          {"sampler", sampler_state_.serialize()},
          {"step", std::to_string(step_)},
          {"world_size", std::to_string(world_size_)}};
}

dtrain::checkpoint::StateDict Trainer::state_dict() const {
  dtrain::checkpoint::StateDict state;
  dtrain::checkpoint::add_module(state, *model_);
  if (zero_) {
    dtrain::checkpoint::add_zero_optimizer(state, *zero_);
  } else {
    dtrain::checkpoint::add_optimizer(state, *optimizer_, *model_);
  }
  dtrain::checkpoint::add_rng_state(state, rank_, world_size_);
  return state;
}

void Trainer::restore() {
  if (!checkpoints_) return;
  if (!c_.resume) {
    // Older checkpoints of another run would be resumed by the next restart.
    const auto existing = checkpoints_->list();
    DTRAIN_CHECK_ARG(existing.empty(), "--resume false, but ", c_.checkpoint_dir, " already holds ",
                     existing.size(), " checkpoint(s) (newest: step ", existing.back().step,
                     "); use another --checkpoint-dir or remove them");
    return;
  }
  const auto latest = checkpoints_->latest_valid();
  if (!latest) return;
  const auto ckpt = dtrain::checkpoint::Checkpoint::open(latest->directory);
  auto expect = [&](const char* key, const std::string& value) {
    const std::string& stored = ckpt.metadata(key);
    DTRAIN_CHECK_ARG(stored == value, "checkpoint ", latest->directory, " was written with ", key,
                     " = ", stored, " but this run has ", value,
                     "; use the same value, another --checkpoint-dir, or --resume false");
  };
  expect("model", c_.model);
  expect("global_batch", std::to_string(c_.global_batch));
  expect("optimizer", c_.optimizer);
  expect("zero", c_.zero ? "1" : "0");
  expect("seed", std::to_string(c_.seed));
  dtrain::checkpoint::load_module(ckpt, *model_);
  if (zero_) {
    dtrain::checkpoint::load_zero_optimizer(ckpt, *zero_);
  } else {
    dtrain::checkpoint::load_optimizer(ckpt, *optimizer_, *model_);
  }
  dtrain::checkpoint::load_rng_state(ckpt, rank_);
  sampler_state_ = dtrain::data::SamplerState::parse(ckpt.metadata("sampler"));
  step_ = ckpt.step();
  resumed_from_ = step_;
  say("resumed from " + latest->directory + " (step " + std::to_string(step_) + ", written by " +
      std::to_string(ckpt.world_size()) + " rank(s))");
}

void Trainer::save_checkpoint(bool wait) {
  if (!checkpoints_) return;
  const SystemTime begin = std::chrono::system_clock::now();
  const auto stats = checkpoints_->save(step_, state_dict(), metadata());
  if (wait) checkpoints_->wait();
  const SystemTime end = std::chrono::system_clock::now();
  if (trace_) trace_->span("checkpoint save", begin, end, 0, {{"step", step_}});
  if (metrics_) {
    metrics_->write({{"kind", "checkpoint"},
                     {"rank", rank_},
                     {"step", step_},
                     {"stall_s", std::chrono::duration<double>(end - begin).count()},
                     {"staged_bytes", stats.bytes},
                     {"path", c_.checkpoint_dir}});
  }
  if (trace_) trace_->flush();
}

void Trainer::set_lr(double lr) {
  torch::optim::Optimizer& opt = zero_ ? zero_->optimizer() : *optimizer_;
  for (auto& group : opt.param_groups()) group.options().set_lr(lr);
}

dtrain::data::LoaderOptions Trainer::loader_options() const {
  dtrain::data::LoaderOptions o;
  o.mean = {0.2860};  // Fashion-MNIST's training set
  o.std = {0.3530};
  o.workers = c_.loader_workers;
  o.output = c_.loader_output == "raw" ? dtrain::data::ImageOutput::kRaw
                                       : dtrain::data::ImageOutput::kNormalizedFloat;
  return o;
}

at::Tensor Trainer::images_on_device(const dtrain::data::Batch& batch,
                                     const dtrain::data::LoaderOptions& options) const {
  if (options.output == dtrain::data::ImageOutput::kNormalizedFloat) {
    return batch.images.to(device_);
  }
  return dtrain::data::normalize_images(batch.images.to(device_), options);
}

void Trainer::evaluate() {
  if (!test_set_) return;
  const SystemTime begin = std::chrono::system_clock::now();
  dtrain::data::LoaderOptions o = loader_options();
  o.sampler.global_batch_size = c_.eval_batch;
  o.sampler.shuffle = dtrain::data::ShuffleMode::kNone;
  o.sampler.drop_last = false;
  dtrain::data::DataLoader loader(test_set_, o, rank_, world_size_);
  torch::NoGradGuard no_grad;
  model_->eval();
  double sums[3] = {0, 0, 0};  // loss sum, correct, samples
  for (std::int64_t b = 0; b < loader.batches_per_epoch(); ++b) {
    dtrain::data::Batch batch = loader.next();
    if (batch.labels.numel() == 0) continue;
    auto logits = model_->forward(images_on_device(batch, o));
    auto labels = batch.labels.to(device_);
    sums[0] +=
        torch::nn::functional::cross_entropy(
            logits, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
            .item<double>();
    sums[1] += logits.argmax(1).eq(labels).sum().item<double>();
    sums[2] += static_cast<double>(labels.numel());
  }
  model_->train();
  at::Tensor totals = at::tensor({sums[0], sums[1], sums[2]}, at::kDouble);
  world_->all_reduce(totals)->wait();
  const double n = totals[2].item<double>();
  last_eval_loss_ = totals[0].item<double>() / n;
  last_eval_accuracy_ = totals[1].item<double>() / n;
  const SystemTime end = std::chrono::system_clock::now();
  if (trace_) trace_->span("eval", begin, end, 0, {{"step", step_}});
  if (metrics_) {
    metrics_->write({{"kind", "eval"},
                     {"rank", rank_},
                     {"step", step_},
                     {"epoch", step_ / steps_per_epoch_},
                     {"loss", last_eval_loss_},
                     {"accuracy", last_eval_accuracy_},
                     {"samples", static_cast<std::int64_t>(n)}});
  }
  char line[160];
  std::snprintf(line, sizeof(line),
                "eval  step %lld  test loss %.4f  test accuracy %.4f (%lld images)",
                static_cast<long long>(step_), last_eval_loss_, last_eval_accuracy_,
                static_cast<long long>(n));
  say(line);
}

int Trainer::run() {
  dtrain::collectives::CommunicatorOptions options;
  options.name = "world";
  options.timeout = std::chrono::seconds(c_.comm_timeout_s);
  world_ = runtime_.world(options);
  setup();
  // restore() reads what every rank reads alike; agree anyway, so that a
  // rank-local surprise cannot leave the others waiting in a collective.
  std::string problem;
  try {
    restore();
  } catch (const dtrain::Error& e) {
    problem = e.what();
  }
  at::Tensor bad = at::full({1}, problem.empty() ? 0 : 1, at::kLong);
  dtrain::collectives::AllReduceOptions max;
  max.op = dtrain::collectives::ReduceOp::kMax;
  world_->all_reduce(bad, max)->wait();
  if (bad.item<std::int64_t>() != 0) {
    throw dtrain::InvalidArgument(problem.empty() ? "another rank could not resume" : problem);
  }
  started_ = true;

  if (c_.metrics_dir != "none") {
    char name[64];
    std::snprintf(name, sizeof(name), "/metrics-rank%05d.jsonl", rank_);
    metrics_ = std::make_unique<dtrain::resnet::MetricsLog>(c_.metrics_dir + name);
  }
  if (!c_.sample_log.empty()) {
    char name[64];
    std::snprintf(name, sizeof(name), "-rank%05d.jsonl", rank_);
    samples_ = std::make_unique<dtrain::resnet::MetricsLog>(c_.sample_log + name);
  }
  if (!c_.trace_dir.empty()) {
    char name[64];
    std::snprintf(name, sizeof(name), "/trace-rank%05d.json", rank_);
    trace_ = std::make_unique<dtrain::resnet::TraceLog>(c_.trace_dir + name, rank_, world_size_);
  }
  // Under mpirun a rank's stdout is a pseudo-terminal even when the job's
  // output goes to a file, so "auto" draws a bar only without a launcher.
  const bool bar =
      c_.progress == "bar" || (c_.progress == "auto" && runtime_.launch().launcher == "none" &&
                               ::isatty(STDOUT_FILENO) == 1);
  progress_ = std::make_unique<dtrain::resnet::Progress>(rank_ == 0, bar, total_steps_, step_,
                                                         c_.log_every);
  if (metrics_) {
    metrics_->write({{"kind", "run"},
                     {"rank", rank_},
                     {"world_size", world_size_},
                     {"resumed_from_step", resumed_from_ ? json(*resumed_from_) : json(nullptr)},
                     {"malloc_tuning", runtime_.malloc_policy().tune},
                     {"config",
                      {{"model", c_.model},
                       {"global_batch", c_.global_batch},
                       {"epochs", c_.epochs},
                       {"steps", total_steps_},
                       {"optimizer", c_.optimizer},
                       {"lr", c_.lr},
                       {"schedule", c_.schedule},
                       {"zero", c_.zero},
                       {"sync_bn", c_.sync_bn},
                       {"compression", c_.compression},
                       {"loader_output", c_.loader_output},
                       {"threads", c_.threads},
                       {"seed", c_.seed}}}});
  }
  say("dtrain-resnet: " + c_.model + " on " + c_.train_data + " (" +
      std::to_string(train_set_->size()) + " images, " + std::to_string(classes_) + " classes), " +
      std::to_string(world_size_) + " rank(s), global batch " + std::to_string(c_.global_batch) +
      ", " + std::to_string(total_steps_) + " steps (" + std::to_string(steps_per_epoch_) +
      " per epoch), " + (c_.zero ? "ZeRO-1" : "DDP") +
      (resumed_from_ ? ", resuming at step " + std::to_string(step_) : std::string()));

  dtrain::data::LoaderOptions lo = loader_options();
  lo.sampler.seed = c_.seed;
  lo.sampler.global_batch_size = c_.global_batch;
  lo.sampler.drop_last = true;
  lo.start = sampler_state_;
  if (c_.augment) {
    lo.augment.crop_padding = 2;
    lo.augment.horizontal_flip = true;
  }
  loader_ = std::make_unique<dtrain::data::DataLoader>(train_set_, lo, rank_, world_size_);

  const auto run_start = Clock::now();
  model_->train();
  bool stopped = false;
  bool signalled = false;
  while (step_ < total_steps_) {
    const auto t0 = Clock::now();
    const SystemTime s0 = std::chrono::system_clock::now();
    dtrain::data::Batch batch = loader_->next();
    const auto t1 = Clock::now();
    const SystemTime s1 = std::chrono::system_clock::now();
    auto images = images_on_device(batch, lo);
    auto labels = batch.labels.to(device_);
    const double lr = schedule_.at(step_);
    set_lr(lr);
    if (zero_) {
      zero_->zero_grad();
    } else {
      ddp_->zero_grad();
    }
    auto logits = model_->forward(images);
    auto loss = torch::nn::functional::cross_entropy(
        logits, labels,
        torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(c_.label_smoothing));
    const auto t2 = Clock::now();
    const SystemTime s2 = std::chrono::system_clock::now();
    loss.backward();
    const auto t3 = Clock::now();
    const SystemTime s3 = std::chrono::system_clock::now();
    double exposed = 0;
    if (ddp_) {
      ddp_->synchronize();
      exposed = ddp_->last_step_stats().exposed_comm_seconds;
    }
    const auto t4 = Clock::now();
    const SystemTime s4 = std::chrono::system_clock::now();
    if (zero_) {
      zero_->step();  // its gradient reduction is exposed communication too
    } else {
      optimizer_->step();
    }
    const auto t5 = Clock::now();
    const SystemTime s5 = std::chrono::system_clock::now();
    ++step_;
    sampler_state_ = loader_->state();

    // One small all-reduce: the step's global loss/accuracy, and whether any
    // rank was asked to stop (a signal, or rank 0's time limit).
    const double n = static_cast<double>(labels.numel());
    const bool over_time =
        rank_ == 0 && c_.max_minutes > 0 && seconds(Clock::now() - run_start) > c_.max_minutes * 60;
    at::Tensor agree =
        at::tensor({loss.item<double>() * n, logits.argmax(1).eq(labels).sum().item<double>(), n,
                    g_stop_signal.load() != 0 ? 1.0 : 0.0, over_time ? 1.0 : 0.0},
                   at::kDouble);
    world_->all_reduce(agree)->wait();
    const auto t6 = Clock::now();
    const double step_s = seconds(t6 - t0);
    const double global_n = agree[2].item<double>();
    const double global_loss = agree[0].item<double>() / global_n;
    const double images_per_s = static_cast<double>(c_.global_batch) / step_s;

    if (metrics_) {
      metrics_->write({{"kind", "train"},
                       {"rank", rank_},
                       {"step", step_},
                       {"epoch", batch.epoch},
                       {"loss", global_loss},
                       {"local_loss", loss.item<double>()},
                       {"accuracy", agree[1].item<double>() / global_n},
                       {"lr", lr},
                       {"images_per_s", images_per_s},
                       {"step_s", step_s},
                       {"data_wait_s", seconds(t1 - t0)},
                       {"forward_s", seconds(t2 - t1)},
                       {"backward_s", seconds(t3 - t2)},
                       // Under ZeRO-1 the gradient reduce-scatter and the parameter
                       // all-gather run inside step(): they count as optimizer time.
                       {"comm_exposed_s", exposed},
                       {"optimizer_s", seconds(t5 - t4)},
                       {"sync_s", seconds(t4 - t3)}});
    }
    if (trace_) {
      trace_->span("data wait", s0, s1, 0, {{"step", step_}});
      trace_->span("forward", s1, s2, 0, {{"step", step_}});
      trace_->span("backward", s2, s3, 0, {{"step", step_}});
      if (ddp_) {
        trace_->span("synchronize", s3, s4, 0, {{"step", step_}});
        for (const auto& b : ddp_->last_step_stats().bucket_timings) {
          trace_->span("allreduce bucket " + std::to_string(b.bucket), b.issued, b.completed, 1,
                       {{"bytes", b.bytes}, {"step", step_}});
        }
      }
      trace_->span(zero_ ? "optimizer (zero-1)" : "optimizer", s4, s5, 0, {{"step", step_}});
    }
    if (samples_) {
      samples_->write(
          {{"step", step_},
           {"epoch", batch.epoch},
           {"batch_in_epoch", batch.batch_in_epoch},
           {"rank", rank_},
           {"world_size", world_size_},
           {"restart", env_.restart},
           {"indices", std::vector<std::int64_t>(
                           batch.indices.data_ptr<std::int64_t>(),
                           batch.indices.data_ptr<std::int64_t>() + batch.indices.numel())}});
    }
    progress_->update(step_, batch.epoch, global_loss, images_per_s);
    if (fault_kill_due(env_.kill, rank_, step_)) {
      // The rank dies after the saves begun before this step have committed,
      // so the restart's checkpoint is known however long an async save
      // takes on a loaded machine (DTRAIN_FAULT_CHECKPOINT kills in a save).
      if (checkpoints_) checkpoints_->wait();
      kill_self(rank_, "SIGKILL after step " + std::to_string(step_));
    }

    if (agree[3].item<double>() > 0 || agree[4].item<double>() > 0) {
      stopped = true;
      signalled = agree[3].item<double>() > 0;  // the same decision on every rank
      break;
    }
    const bool epoch_end = batch.batch_in_epoch + 1 == loader_->batches_per_epoch();
    const std::int64_t epoch_done = batch.epoch + 1;
    if (epoch_end && c_.eval_every > 0 && epoch_done % c_.eval_every == 0 && step_ < total_steps_) {
      evaluate();
    }
    const bool save_now = c_.checkpoint_every > 0 ? step_ % c_.checkpoint_every == 0 : epoch_end;
    if (save_now && step_ < total_steps_) save_checkpoint(false);
  }
  progress_->finish();
  if (stopped) {
    if (signalled) {
      say("stop requested (SIGTERM/SIGINT): saving a checkpoint");
    } else {
      char text[96];
      std::snprintf(text, sizeof(text), "time limit of %g minutes reached: evaluating and saving",
                    c_.max_minutes);
      say(text);
      evaluate();
    }
    save_checkpoint(true);
    if (trace_) trace_->flush();
    say(checkpoints_ ? "stopped at step " + std::to_string(step_) +
                           "; run the same command to resume from " + c_.checkpoint_dir
                     : "stopped at step " + std::to_string(step_));
    // A time limit is the run's own budget, not a failure: exit 0, so that a
    // supervisor does not start it again at once.
    return signalled ? kExitStopped : 0;
  }
  evaluate();
  if (!resumed_from_ || *resumed_from_ != step_) save_checkpoint(true);
  if (trace_) trace_->flush();
  const double wall = seconds(Clock::now() - run_start);
  if (rank_ == 0) {
    std::printf("done: %lld steps in %.1f s this run", static_cast<long long>(step_), wall);
    if (last_eval_accuracy_ >= 0) std::printf(", test accuracy %.4f", last_eval_accuracy_);
    std::printf("\n  metrics     %s\n", c_.metrics_dir.c_str());
    if (checkpoints_) std::printf("  checkpoints %s\n", c_.checkpoint_dir.c_str());
    if (trace_)
      std::printf("  traces      %s (merge: scripts/merge_traces.py)\n", c_.trace_dir.c_str());
    std::printf("  plots       scripts/plot_metrics.py %s -o %s/metrics.png\n",
                c_.metrics_dir.c_str(), c_.out.c_str());
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const dtrain::LaunchInfo launch = dtrain::detect_launch();
  cxxopts::Options cli = make_cli();
  Config config;
  try {
    auto parsed = dtrain::cli::parse(cli, argc, argv);
    if (parsed.count("help")) {
      if (launch.rank == 0) {
        std::cout << cli.help({"Model and data", "Schedule", "Data parallelism", "Execution",
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
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s (see --help)\n", launch.rank, e.what());
    return kExitBadInput;
  }
  torch::set_num_threads(config.threads);
  ::signal(SIGTERM, on_stop_signal);
  ::signal(SIGINT, on_stop_signal);
  ::signal(SIGXFSZ, SIG_IGN);  // a file-size limit becomes a write error (EFBIG), not a kill

  // A bad DTRAIN_* variable, or an MPI without thread support, is reported
  // like any other bad input, not as an uncaught exception.
  std::optional<dtrain::Runtime> started;
  try {
    started.emplace(&argc, &argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s\n", launch.rank, e.what());
    return dynamic_cast<const dtrain::InvalidArgument*>(&e) != nullptr ? kExitBadInput : 1;
  }
  dtrain::Runtime& runtime = *started;
  RunEnvironment env;
  std::optional<std::uint64_t> file_limit_kib;
  try {
    env = read_run_environment();
    file_limit_kib = dtrain::read_fault_injection_env().file_limit_kib;
  } catch (const dtrain::InvalidArgument& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s\n", runtime.rank(), e.what());
    return kExitBadInput;
  }
  if (file_limit_kib) {
    const rlimit limit{static_cast<rlim_t>(*file_limit_kib) * 1024, RLIM_INFINITY};
    ::setrlimit(RLIMIT_FSIZE, &limit);
  }
  // The trainer outlives the handlers: aborting must not first wait for its
  // background checkpoint write, which may be waiting for a dead peer.
  Trainer trainer(config, runtime, std::move(env));
  try {
    return trainer.run();
  } catch (const dtrain::InvalidArgument& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s\n", runtime.rank(), e.what());
    if (trainer.started() && runtime.size() > 1)
      dtrain::Runtime::abort_job(kExitBadInput, e.what());
    return kExitBadInput;
  } catch (const dtrain::CommError& e) {
    dtrain::Runtime::abort_job(1, e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s\n", runtime.rank(), e.what());
    if (runtime.size() > 1) dtrain::Runtime::abort_job(1, e.what());
    return 1;
  }
}
