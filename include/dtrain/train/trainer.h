#pragma once
// The trainer: what every training program shares, around a Strategy
// (dtrain/train/strategy.h). A program supplies its model, data and command
// line through a TrainingProgram; the library does the rest:
//
//   the loop       data wait, learning-rate schedule, the strategy's step, one
//                  small all-reduce per step for the global loss/accuracy and
//                  the stop decision; evaluation every few epochs and at the end
//   checkpoints    save every N steps or at each epoch's end (async), resume
//                  from the newest checkpoint that verifies, refuse one written
//                  with another identity (model, batch, ...)
//   stopping       SIGTERM/SIGINT: finish the step, save, exit 75;
//                  --max-minutes: evaluate, save, exit 0
//   telemetry      metrics-rankRRRRR.jsonl, trace-rankRRRRR.json, the console
//                  progress (dtrain/train/telemetry.h, docs/metrics.md)
//   exit codes     0 done, 2 bad input (checked on every rank before anything
//                  is trained or written), 75 stopped by a signal after a
//                  checkpoint, 1 anything else; a failed collective aborts
//                  the whole job so the launcher can restart it
//   fault tests    DTRAIN_FAULT_KILL, DTRAIN_FAULT_CHECKPOINT,
//                  DTRAIN_FAULT_FILE_LIMIT_KIB (docs/configuration.md)
//
// A program's main() parses its command line into TrainerOptions and its own
// settings, and hands both to run():
//
//   class MyProgram : public train::TrainingProgram {
//     std::int64_t check_input(const train::RunContext& run) override {
//       open and check the data (InvalidArgument); return the steps per epoch
//     }
//     std::unique_ptr<train::Strategy> make_strategy(const train::RunContext& run) override {
//       build the model on run.device, wrap it: DataParallel (dtrain/train/
//       data_parallel.h), or a pipeline / tensor-parallel strategy
//     }
//     std::unique_ptr<train::DataSource> train_data(const train::RunContext& run,
//                                                   const std::string& position) override;
//     std::unique_ptr<train::DataSource> eval_data(const train::RunContext& run) override;
//     Identity identity() const override { return {{"model", "gpt-small"}, ...}; }
//     std::string describe() const override { return "dtrain-gpt: gpt-small on ..."; }
//     nlohmann::json config() const override { return {{"model", "gpt-small"}, ...}; }
//   };
//
//   int main(int argc, char** argv) {
//     parse the command line (exit train::kExitBadInput on an error)
//     MyProgram program(settings);
//     return train::run(&argc, &argv, options, program);
//   }
//
// examples/resnet/train.cpp is such a program (ResNet on HDF5 images); a GPT
// over token ids fits the same way: its DataSource hands over token tensors,
// its strategy scores them with its own Objective, and `rate_name`,
// `rate_unit` and `sample_name` say tokens instead of images.

#include <signal.h>
#include <torch/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/collectives/communicator.h"
#include "dtrain/collectives/counting_communicator.h"
#include "dtrain/env.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/runtime.h"
#include "dtrain/train/strategy.h"
#include "dtrain/train/telemetry.h"

namespace dtrain::train {

/// Exit statuses of a training program.
constexpr int kExitOk = 0;        ///< finished, or stopped by the time limit after a checkpoint
constexpr int kExitFailed = 1;    ///< any other error
constexpr int kExitBadInput = 2;  ///< bad input; nothing was trained or written
constexpr int kExitStopped = 75;  ///< SIGTERM/SIGINT, after a checkpoint (run again to resume)

/// The learning rate over the run: a linear warm-up from 0, then cosine (to
/// 0 at the last step), step decays at given epochs, or constant.
struct LrScheduleOptions {
  double lr = 0.1;                  ///< peak rate (after warm-up)
  double warmup_epochs = 1;         ///< 0: none
  std::string shape = "cosine";     ///< cosine, step or constant
  std::vector<double> step_epochs;  ///< with "step": epochs at which the rate is multiplied
  double step_gamma = 0.1;          ///< by this
  void validate() const;
};

class LrSchedule {
 public:
  LrSchedule() = default;
  LrSchedule(LrScheduleOptions options, std::int64_t steps_per_epoch, std::int64_t total_steps);
  /// The rate of step `step` (0-based).
  double at(std::int64_t step) const;

 private:
  LrScheduleOptions options_;
  std::int64_t steps_per_epoch_ = 1;
  std::int64_t total_ = 1;
};

/// What the trainer does, as plain settings (a program fills them from its
/// command line). validate() says what is wrong, as InvalidArgument.
struct TrainerOptions {
  int epochs = 10;
  std::int64_t steps = 0;           ///< total steps; 0: epochs * steps per epoch
  double max_minutes = 0;           ///< stop (evaluate, save, exit 0) after this; 0: no limit
  std::int64_t global_batch = 128;  ///< samples per step over all ranks (stored, checked)
  std::uint64_t seed = 0;           ///< torch::manual_seed before make_strategy (stored, checked)
  LrScheduleOptions lr;
  std::string device = "cpu";  ///< cpu or cuda (NCCL communicator for train_comm)
  int threads = 1;             ///< intra-op threads (run() sets them)
  int comm_timeout_s = 300;    ///< of the world and train communicators
  /// The layout: tensor- and pipeline-parallel sizes (the trainer builds
  /// ParallelContext(world, tp, pp); dp = ranks / (tp * pp)). A strategy
  /// that does not split the model leaves both at 1.
  int tp = 1;
  int pp = 1;

  std::string out = "runs/train";     ///< run directory (named in the final message)
  std::string checkpoint_dir;         ///< "none" or empty: no checkpoints
  std::int64_t checkpoint_every = 0;  ///< steps; 0: at each epoch's end
  int keep = 3;
  bool async_checkpoint = true;
  bool resume = true;  ///< false: refuse a directory that already holds checkpoints
  int eval_every = 1;  ///< epochs; 0: only at the end

  std::string metrics_dir;  ///< "none" or empty: no metrics
  std::string trace_dir;    ///< empty: no trace
  std::string sample_log;   ///< empty: no sample log
  int log_every = 50;
  std::string progress = "auto";  ///< bar, lines, auto
  /// The throughput's metrics field: the step's ReportSums::samples (summed
  /// over the world: images, or a language model's tokens) per second.
  std::string rate_name = "images_per_s";
  std::string rate_unit = "img/s";     ///< and its unit on the console
  std::string sample_name = "images";  ///< what the evaluation line counts
  std::string eval_name = "test";      ///< the evaluation data on the console ("val")
  /// Also print the losses in bits (loss / ln 2): bits per character for a
  /// character-level language model.
  bool loss_in_bits = false;

  void validate() const;
};

/// What the trainer has set up when it calls the program.
struct RunContext {
  Runtime& runtime;
  /// MPI over every rank: the CPU-side agreement (input checks, report sums, stop).
  std::shared_ptr<collectives::Communicator> world;
  /// The layout (TrainerOptions::tp and pp) over `world`: its axis
  /// communicators, which samples this rank reads (data_rank() of
  /// data_world_size()), the stage it runs. The checkpoints are written
  /// with it, so a strategy's placements must match it.
  std::shared_ptr<const parallel::ParallelContext> context;
  /// Where a data-parallel strategy's gradients and buffers travel: `world`
  /// on CPU, an NCCL communicator over the same ranks with device cuda.
  /// Set after check_input. (With tp or pp > 1, strategies use the
  /// context's axis communicators, which are MPI.)
  std::shared_ptr<collectives::Communicator> train_comm;
  torch::Device device;
  int rank = 0;
  int world_size = 1;
};

/// The part of a training run that is the program's own: model, data, names.
/// Each call is made on every rank, in this order: check_input,
/// make_strategy, train_data, then eval_data at each evaluation.
class TrainingProgram {
 public:
  /// Checked against a checkpoint on resume and stored in each: what must
  /// not change across a resume, in the order checked.
  using Identity = std::vector<std::pair<std::string, std::string>>;

  virtual ~TrainingProgram() = default;
  /// Opens and checks the program's input (InvalidArgument says what is
  /// wrong; the trainer agrees over the ranks before anything is written).
  /// `run.train_comm` and `run.device` are not set yet; `run.context` is.
  /// Returns the steps of one epoch.
  virtual std::int64_t check_input(const RunContext& run) = 0;
  /// Builds the model and its strategy (after torch::manual_seed(seed)).
  virtual std::unique_ptr<Strategy> make_strategy(const RunContext& run) = 0;
  /// The training data from `position` (DataSource::position() of a
  /// checkpoint; empty: the start). InvalidArgument when it cannot be used.
  virtual std::unique_ptr<DataSource> train_data(const RunContext& run,
                                                 const std::string& position) = 0;
  /// One pass over the evaluation data, or nullptr: no evaluation.
  virtual std::unique_ptr<DataSource> eval_data(const RunContext& run) = 0;
  /// "global_batch" and "seed" are added by the trainer when missing.
  virtual Identity identity() const = 0;
  /// The start line's beginning ("dtrain-resnet: resnet20 on ... (60000 images, 10 classes)").
  virtual std::string describe() const = 0;
  /// The "config" object of the run's first metrics line.
  virtual nlohmann::json config() const = 0;
  /// Called on every rank after the final evaluation and checkpoint of a
  /// run that reached its last step or its time limit (not one stopped by a
  /// signal), before the closing lines: a language model prints a text
  /// sample, say. It may
  /// run collectives over the strategy's communicators. Default: nothing.
  virtual void finish(const RunContext& run) { (void)run; }
};

/// What a run takes from the environment (dtrain/env.h), read once: which
/// attempt of a supervised job this is, and the faults a test asks for.
struct RunEnvironment {
  int restart = 0;  ///< DTRAIN_RESTART_COUNT (dtrain-launch sets it)
  /// DTRAIN_FAULT_KILL, when it applies to this attempt.
  std::optional<KillFaultSpec> kill;
  /// DTRAIN_FAULT_CHECKPOINT, when it applies to this attempt.
  std::optional<CheckpointFaultSpec> checkpoint_fault;
  /// DTRAIN_FAULT_FILE_LIMIT_KIB.
  std::optional<std::uint64_t> file_limit_kib;
};

/// Reads it; InvalidArgument for a malformed variable. Faults apply to a
/// job's first attempt only (a restart must be able to recover), unless
/// DTRAIN_FAULT_KILL says `always`.
RunEnvironment read_run_environment();

/// SIGTERM and SIGINT handlers that only record the signal, for the object's
/// lifetime (the previous handlers come back after it). The trainer stops
/// at the end of the step in which any rank saw one. One at a time.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  /// True once a signal came while one was installed.
  static bool requested();

 private:
  struct sigaction previous_term_ {};
  struct sigaction previous_int_ {};
};

class Trainer {
 public:
  /// Nothing happens before run(). `program` and `runtime` outlive the trainer.
  Trainer(TrainerOptions options, TrainingProgram& program, Runtime& runtime,
          RunEnvironment environment = {});
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// The run: kExitOk or kExitStopped. Throws InvalidArgument for bad input
  /// (the same on every rank as long as started() is false), another
  /// dtrain::Error or std::exception for anything else.
  int run();
  /// True once every rank has accepted the input and the checkpoint (errors
  /// after it are one rank's and abort the job).
  bool started() const { return started_; }
  /// Steps done (after run(): where it ended).
  std::int64_t step() const { return step_; }
  /// The last evaluation's accuracy and loss (-1 before one).
  double last_eval_accuracy() const { return last_eval_accuracy_; }
  double last_eval_loss() const { return last_eval_loss_; }

 private:
  void setup();
  void restore();
  std::map<std::string, std::string> metadata() const;
  void save_checkpoint(bool wait);
  void evaluate();
  void open_telemetry();
  /// Throws InvalidArgument with `problem` on every rank if any rank had one.
  void agree(const std::string& problem, const char* other_rank);
  void say(const std::string& text);

  TrainerOptions o_;
  TrainingProgram& program_;
  Runtime& runtime_;
  RunEnvironment env_;
  bool started_ = false;
  std::shared_ptr<collectives::Communicator> world_;
  // The layout's communicators and train_comm, counted (comm_bytes per step).
  std::vector<std::shared_ptr<collectives::CountingCommunicator>> counters_;
  std::unique_ptr<RunContext> run_;
  std::size_t base_rss_bytes_ = 0;  // the resident set before the program built anything
  std::int64_t steps_per_epoch_ = 1;
  std::int64_t total_steps_ = 0;
  LrSchedule schedule_;
  std::unique_ptr<checkpoint::CheckpointManager> checkpoints_;
  std::unique_ptr<Strategy> strategy_;
  std::unique_ptr<DataSource> data_;
  std::string position_;
  std::int64_t step_ = 0;
  std::optional<std::int64_t> resumed_from_;
  double last_eval_accuracy_ = -1;
  double last_eval_loss_ = -1;
  std::unique_ptr<MetricsLog> metrics_;
  std::unique_ptr<MetricsLog> samples_;
  std::unique_ptr<TraceLog> trace_;
  std::unique_ptr<Progress> progress_;
};

/// A training program's main() after its command line: sets the intra-op
/// threads, installs StopSignals, ignores SIGXFSZ (a file-size limit becomes
/// a write error), starts the Runtime, reads the RunEnvironment, runs a
/// Trainer and turns what it throws into an exit status (kExitBadInput for
/// InvalidArgument, with the whole job aborted once it has started;
/// kExitFailed otherwise; a CommError aborts the job). Errors go to stderr
/// with the rank.
int run(int* argc, char*** argv, const TrainerOptions& options, TrainingProgram& program);

}  // namespace dtrain::train
