#include "dtrain/train/trainer.h"

#include <signal.h>
#include <sys/resource.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <thread>

#include "dtrain/config.h"
#include "dtrain/error.h"
#include "dtrain/memory.h"
#include "dtrain/runtime.h"
#if DTRAIN_HAVE_NCCL
#include "dtrain/collectives/nccl.h"
#endif

namespace dtrain::train {

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The one piece of state a signal handler may touch. StopSignals owns it.
std::atomic<int> g_stop_signal{0};
extern "C" void on_stop_signal(int signal) { g_stop_signal.store(signal); }

void kill_self(int rank, const std::string& what) {
  std::fprintf(stderr, "[dtrain rank %d] fault injection: %s\n", rank, what.c_str());
  std::fflush(stderr);
  ::kill(::getpid(), SIGKILL);
}

// The CheckpointOptions::fault_hook of DTRAIN_FAULT_CHECKPOINT: a real
// SIGKILL of this rank at that point of that save or, with `stall`, this
// rank says so and waits there until it is killed from outside.
std::function<void(checkpoint::SavePhase, std::int64_t)> checkpoint_fault_hook(
    const std::optional<CheckpointFaultSpec>& fault, int rank) {
  if (!fault || fault->rank != rank) return {};
  const checkpoint::SavePhase phase = checkpoint::parse_save_phase(fault->phase);
  const std::int64_t step = fault->step;
  const bool stall = fault->stall;
  return [phase, step, rank, stall](checkpoint::SavePhase now, std::int64_t saving) {
    if (now != phase || saving != step) return;
    const std::string where =
        "saving step " + std::to_string(step) + " (" + checkpoint::to_string(phase) + ")";
    if (stall) {
      std::fprintf(stderr, "[dtrain rank %d] fault injection: stalled while %s\n", rank,
                   where.c_str());
      std::fflush(stderr);
      while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    kill_self(rank, "killed while " + where);
  };
}

bool fault_kill_due(const std::optional<KillFaultSpec>& kill, int rank, std::int64_t step) {
  return kill && kill->rank == rank && kill->step == step;
}

}  // namespace

// --- learning rate -------------------------------------------------------------

void LrScheduleOptions::validate() const {
  DTRAIN_CHECK_ARG(lr > 0, "the learning rate must be > 0, got ", lr);
  DTRAIN_CHECK_ARG(shape == "cosine" || shape == "step" || shape == "constant",
                   "unknown learning-rate schedule '", shape, "' (cosine, step, constant)");
  DTRAIN_CHECK_ARG(warmup_epochs >= 0, "warm-up epochs must be >= 0, got ", warmup_epochs);
}

LrSchedule::LrSchedule(LrScheduleOptions options, std::int64_t steps_per_epoch,
                       std::int64_t total_steps)
    : options_(std::move(options)), steps_per_epoch_(steps_per_epoch), total_(total_steps) {}

double LrSchedule::at(std::int64_t step) const {
  const double epoch = static_cast<double>(step) / static_cast<double>(steps_per_epoch_);
  const double warmup = options_.warmup_epochs * static_cast<double>(steps_per_epoch_);
  if (warmup > 0 && static_cast<double>(step) < warmup) {
    return options_.lr * static_cast<double>(step + 1) / warmup;
  }
  if (options_.shape == "cosine") {
    const double span = std::max(1.0, static_cast<double>(total_) - warmup);
    const double t = std::min(1.0, (static_cast<double>(step) - warmup) / span);
    return 0.5 * options_.lr * (1 + std::cos(M_PI * t));
  }
  double lr = options_.lr;
  if (options_.shape == "step") {
    for (double e : options_.step_epochs) {
      if (epoch >= e) lr *= options_.step_gamma;
    }
  }
  return lr;
}

// --- options and environment ------------------------------------------------------

void TrainerOptions::validate() const {
  DTRAIN_CHECK_ARG(epochs >= 1 || steps >= 1, "epochs or steps must be >= 1");
  DTRAIN_CHECK_ARG(steps >= 0, "steps must be >= 0");
  DTRAIN_CHECK_ARG(global_batch >= 1, "the global batch must be >= 1, got ", global_batch);
  lr.validate();
  DTRAIN_CHECK_ARG(device == "cpu" || device == "cuda", "unknown device '", device,
                   "' (cpu, cuda)");
  DTRAIN_CHECK_ARG(threads >= 1, "threads must be >= 1");
  DTRAIN_CHECK_ARG(comm_timeout_s >= 1, "the communication timeout must be >= 1 s");
  DTRAIN_CHECK_ARG(tp >= 1 && pp >= 1,
                   "the tensor- and pipeline-parallel sizes must be >= 1, got tp ", tp, ", pp ",
                   pp);
  DTRAIN_CHECK_ARG(keep >= 1, "checkpoints to keep must be >= 1");
  DTRAIN_CHECK_ARG(checkpoint_every >= 0 && eval_every >= 0,
                   "checkpoint and evaluation intervals must be >= 0");
  DTRAIN_CHECK_ARG(progress == "auto" || progress == "bar" || progress == "lines",
                   "unknown progress '", progress, "' (auto, bar, lines)");
}

RunEnvironment read_run_environment() {
  RunEnvironment env;
  env.restart = read_restart_count();
  const FaultInjectionEnv faults = read_fault_injection_env();
  if (faults.kill && (env.restart == 0 || faults.kill->every_attempt)) env.kill = faults.kill;
  if (faults.checkpoint) {
    checkpoint::parse_save_phase(faults.checkpoint->phase);  // a typo is bad input
    if (env.restart == 0) env.checkpoint_fault = faults.checkpoint;
  }
  env.file_limit_kib = faults.file_limit_kib;
  return env;
}

StopSignals::StopSignals() {
  g_stop_signal.store(0);
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // as signal() does: blocking calls go on
  ::sigaction(SIGTERM, &action, &previous_term_);
  ::sigaction(SIGINT, &action, &previous_int_);
}

StopSignals::~StopSignals() {
  ::sigaction(SIGTERM, &previous_term_, nullptr);
  ::sigaction(SIGINT, &previous_int_, nullptr);
  g_stop_signal.store(0);
}

bool StopSignals::requested() { return g_stop_signal.load() != 0; }

// --- the trainer ------------------------------------------------------------------

Trainer::Trainer(TrainerOptions options, TrainingProgram& program, Runtime& runtime,
                 RunEnvironment environment)
    : o_(std::move(options)), program_(program), runtime_(runtime), env_(std::move(environment)) {}

Trainer::~Trainer() = default;

void Trainer::say(const std::string& text) {
  if (run_->rank != 0) return;
  if (progress_) {
    progress_->message(text);
  } else {
    std::printf("%s\n", text.c_str());
    std::fflush(stdout);
  }
}

void Trainer::agree(const std::string& problem, const char* other_rank) {
  at::Tensor bad = at::full({1}, problem.empty() ? 0 : 1, at::kLong);
  collectives::AllReduceOptions max;
  max.op = collectives::ReduceOp::kMax;
  world_->all_reduce(bad, max)->wait();
  if (bad.item<std::int64_t>() != 0) {
    throw InvalidArgument(problem.empty() ? std::string(other_rank) : problem);
  }
}

// Everything that can be wrong with the input is checked here, on every rank,
// and agreed on before anything is trained or written.
void Trainer::setup() {
  base_rss_bytes_ = max_rss_bytes();
  // Collective; a layout that does not fit the ranks is InvalidArgument on
  // every rank before any split.
  // The layout's communicators are counted: each step's metrics say what the
  // strategy handed to them (the trainer's own agreement over world_ is not
  // counted).
  auto counted =
      std::make_shared<collectives::CountingCommunicator>(world_, /*keep_records=*/false);
  counters_ = {counted};
  auto context = std::make_shared<const parallel::ParallelContext>(counted, o_.tp, o_.pp);
  run_ = std::make_unique<RunContext>(RunContext{runtime_, world_, context, nullptr,
                                                 torch::Device(torch::kCPU), runtime_.rank(),
                                                 runtime_.size()});
  std::string problem;
  try {
    steps_per_epoch_ = program_.check_input(*run_);
    DTRAIN_CHECK_ARG(steps_per_epoch_ >= 1, "an epoch must hold at least one step, got ",
                     steps_per_epoch_);
  } catch (const Error& e) {
    problem = e.what();
  }
  agree(problem, "another rank rejected the input");

  if (o_.checkpoint_dir != "none" && !o_.checkpoint_dir.empty()) {
    checkpoint::CheckpointOptions c;
    c.directory = o_.checkpoint_dir;
    c.keep_last = o_.keep;
    c.async = o_.async_checkpoint;
    c.fault_hook = checkpoint_fault_hook(env_.checkpoint_fault, run_->rank);
    try {
      checkpoints_ = std::make_unique<checkpoint::CheckpointManager>(c, *context);
    } catch (const CheckpointError& e) {
      throw InvalidArgument(e.what());
    }
  }

  run_->device = o_.device == "cuda" ? torch::Device(torch::kCUDA, runtime_.launch().local_rank)
                                     : torch::Device(torch::kCPU);
  run_->train_comm = counted;
#if DTRAIN_HAVE_NCCL
  if (run_->device.is_cuda()) {
    collectives::NcclOptions nccl;
    nccl.name = "gpu-world";
    nccl.device = run_->device.index();
    nccl.timeout = std::chrono::seconds(o_.comm_timeout_s);
    counters_.push_back(std::make_shared<collectives::CountingCommunicator>(
        collectives::make_nccl_communicator(*world_, nccl), /*keep_records=*/false));
    run_->train_comm = counters_.back();
  }
#else
  DTRAIN_CHECK_ARG(!run_->device.is_cuda(),
                   "device cuda needs dtrain's NCCL backend, and this build has none");
#endif
  torch::manual_seed(o_.seed);
  strategy_ = program_.make_strategy(*run_);
  DTRAIN_CHECK(strategy_ != nullptr, "TrainingProgram::make_strategy returned no strategy");
  total_steps_ = o_.steps > 0 ? o_.steps : o_.epochs * steps_per_epoch_;
  schedule_ = LrSchedule(o_.lr, steps_per_epoch_, total_steps_);
}

std::map<std::string, std::string> Trainer::metadata() const {
  std::map<std::string, std::string> m;
  for (const auto& [key, value] : program_.identity()) m[key] = value;
  m["global_batch"] = std::to_string(o_.global_batch);
  m["seed"] = std::to_string(o_.seed);
  m["sampler"] = position_;
  m["step"] = std::to_string(step_);
  m["world_size"] = std::to_string(run_->world_size);
  return m;
}

void Trainer::restore() {
  std::string position;
  if (checkpoints_ && !o_.resume) {
    // Older checkpoints of another run would be resumed by the next restart.
    const auto existing = checkpoints_->list();
    DTRAIN_CHECK_ARG(existing.empty(), "--resume false, but ", o_.checkpoint_dir, " already holds ",
                     existing.size(), " checkpoint(s) (newest: step ", existing.back().step,
                     "); use another --checkpoint-dir or remove them");
  }
  const auto latest = checkpoints_ && o_.resume ? checkpoints_->latest_valid() : std::nullopt;
  if (latest) {
    const auto ckpt = checkpoint::Checkpoint::open(latest->directory);
    TrainingProgram::Identity identity = program_.identity();
    auto listed = [&](const char* key) {
      return std::any_of(identity.begin(), identity.end(),
                         [&](const auto& entry) { return entry.first == key; });
    };
    if (!listed("global_batch"))
      identity.emplace_back("global_batch", std::to_string(o_.global_batch));
    if (!listed("seed")) identity.emplace_back("seed", std::to_string(o_.seed));
    for (const auto& [key, value] : identity) {
      const std::string& stored = ckpt.metadata(key);
      DTRAIN_CHECK_ARG(stored == value, "checkpoint ", latest->directory, " was written with ", key,
                       " = ", stored, " but this run has ", value,
                       "; use the same value, another --checkpoint-dir, or --resume false");
    }
    strategy_->load_state(ckpt);
    position = ckpt.metadata("sampler");
    step_ = ckpt.step();
    resumed_from_ = step_;
    say("resumed from " + latest->directory + " (step " + std::to_string(step_) + ", written by " +
        std::to_string(ckpt.world_size()) + " rank(s))");
  }
  data_ = program_.train_data(*run_, position);
  DTRAIN_CHECK(data_ != nullptr, "TrainingProgram::train_data returned no data");
  position_ = data_->position();
}

void Trainer::save_checkpoint(bool wait) {
  if (!checkpoints_) return;
  const SystemTime begin = std::chrono::system_clock::now();
  const auto stats = checkpoints_->save(step_, strategy_->state_dict(), metadata());
  if (wait) checkpoints_->wait();
  const SystemTime end = std::chrono::system_clock::now();
  if (trace_) trace_->span("checkpoint save", begin, end, 0, {{"step", step_}});
  if (metrics_) {
    metrics_->write({{"kind", "checkpoint"},
                     {"rank", run_->rank},
                     {"step", step_},
                     {"stall_s", std::chrono::duration<double>(end - begin).count()},
                     {"staged_bytes", stats.bytes},
                     {"path", o_.checkpoint_dir}});
  }
  if (trace_) trace_->flush();
}

void Trainer::evaluate() {
  const SystemTime begin = std::chrono::system_clock::now();
  std::unique_ptr<DataSource> data = program_.eval_data(*run_);
  if (!data) return;
  ReportSums sums;
  {
    torch::NoGradGuard no_grad;
    strategy_->set_training(false);
    for (std::int64_t b = 0; b < data->batches_per_epoch(); ++b) {
      Batch batch = data->next();
      if (batch.targets.numel() == 0) continue;
      data->to_device(batch);
      const ReportSums s = strategy_->eval_step(batch);
      sums.loss_sum += s.loss_sum;
      sums.correct += s.correct;
      sums.samples += s.samples;
    }
    strategy_->set_training(true);
  }
  at::Tensor totals = at::tensor({sums.loss_sum, sums.correct, sums.samples}, at::kDouble);
  world_->all_reduce(totals)->wait();
  const double n = totals[2].item<double>();
  last_eval_loss_ = totals[0].item<double>() / n;
  last_eval_accuracy_ = totals[1].item<double>() / n;
  const SystemTime end = std::chrono::system_clock::now();
  if (trace_) trace_->span("eval", begin, end, 0, {{"step", step_}});
  if (metrics_) {
    metrics_->write({{"kind", "eval"},
                     {"rank", run_->rank},
                     {"step", step_},
                     {"epoch", step_ / steps_per_epoch_},
                     {"loss", last_eval_loss_},
                     {"accuracy", last_eval_accuracy_},
                     {"samples", static_cast<std::int64_t>(n)}});
  }
  char bits[48] = "";
  if (o_.loss_in_bits) {
    std::snprintf(bits, sizeof(bits), " (%.4f bits)", last_eval_loss_ / std::log(2.0));
  }
  char line[256];
  std::snprintf(line, sizeof(line), "eval  step %lld  %s loss %.4f%s  %s accuracy %.4f (%lld %s)",
                static_cast<long long>(step_), o_.eval_name.c_str(), last_eval_loss_, bits,
                o_.eval_name.c_str(), last_eval_accuracy_, static_cast<long long>(n),
                o_.sample_name.c_str());
  say(line);
}

void Trainer::open_telemetry() {
  const int rank = run_->rank;
  if (!o_.metrics_dir.empty() && o_.metrics_dir != "none") {
    char name[64];
    std::snprintf(name, sizeof(name), "/metrics-rank%05d.jsonl", rank);
    metrics_ = std::make_unique<MetricsLog>(o_.metrics_dir + name);
  }
  if (!o_.sample_log.empty()) {
    char name[64];
    std::snprintf(name, sizeof(name), "-rank%05d.jsonl", rank);
    samples_ = std::make_unique<MetricsLog>(o_.sample_log + name);
  }
  if (!o_.trace_dir.empty()) {
    char name[64];
    std::snprintf(name, sizeof(name), "/trace-rank%05d.json", rank);
    trace_ = std::make_unique<TraceLog>(o_.trace_dir + name, rank, run_->world_size);
  }
  // Under mpirun a rank's stdout is a pseudo-terminal even when the job's
  // output goes to a file, so "auto" draws a bar only without a launcher.
  const bool bar =
      o_.progress == "bar" || (o_.progress == "auto" && runtime_.launch().launcher == "none" &&
                               ::isatty(STDOUT_FILENO) == 1);
  progress_ =
      std::make_unique<Progress>(rank == 0, bar, total_steps_, step_, o_.log_every, o_.rate_unit);
}

int Trainer::run() {
  collectives::CommunicatorOptions options;
  options.name = "world";
  options.timeout = std::chrono::seconds(o_.comm_timeout_s);
  world_ = runtime_.world(options);
  setup();
  // restore() reads what every rank reads alike; agree anyway, so that a
  // rank-local surprise cannot leave the others waiting in a collective.
  std::string problem;
  try {
    restore();
  } catch (const Error& e) {
    problem = e.what();
  }
  agree(problem, "another rank could not resume");
  started_ = true;

  const int rank = run_->rank;
  const int world_size = run_->world_size;
  open_telemetry();
  if (metrics_) {
    json config = program_.config();
    if (config.is_object()) config["steps"] = total_steps_;
    metrics_->write({{"kind", "run"},
                     {"rank", rank},
                     {"world_size", world_size},
                     {"layout",
                      {{"dp", run_->context->dp_size()},
                       {"pp", run_->context->pp_size()},
                       {"tp", run_->context->tp_size()}}},
                     {"resumed_from_step", resumed_from_ ? json(*resumed_from_) : json(nullptr)},
                     {"malloc_tuning", runtime_.malloc_policy().tune},
                     {"base_rss_bytes", base_rss_bytes_},
                     {"config", config}});
  }
  const auto& shape = run_->context->shape();
  const std::string layout = shape.pp == 1 && shape.tp == 1
                                 ? std::string()
                                 : " (dp " + std::to_string(shape.dp) + " x pp " +
                                       std::to_string(shape.pp) + " x tp " +
                                       std::to_string(shape.tp) + ")";
  say(program_.describe() + ", " + std::to_string(world_size) + " rank(s)" + layout +
      ", global batch " + std::to_string(o_.global_batch) + ", " + std::to_string(total_steps_) +
      " steps (" + std::to_string(steps_per_epoch_) + " per epoch), " + strategy_->name() +
      (resumed_from_ ? ", resuming at step " + std::to_string(step_) : std::string()));

  const auto run_start = Clock::now();
  strategy_->set_training(true);
  bool stopped = false;
  bool signalled = false;
  const auto comm_totals = [this] {
    collectives::OpTally sum;
    for (const auto& c : counters_) {
      const collectives::OpTally t = c->tree_data_ops();
      sum.calls += t.calls;
      sum.bytes += t.bytes;
      sum.sent_bytes += t.sent_bytes;
    }
    return sum;
  };
  while (step_ < total_steps_) {
    const collectives::OpTally comm_before = comm_totals();
    const auto t0 = Clock::now();
    const SystemTime s0 = std::chrono::system_clock::now();
    Batch batch = data_->next();
    StepInfo info;
    info.step = step_;
    info.trace = trace_ != nullptr;
    info.data_ready = Clock::now();
    info.data_ready_wall = std::chrono::system_clock::now();
    data_->to_device(batch);
    const double lr = schedule_.at(step_);
    strategy_->set_lr(lr);
    StepResult result = strategy_->train_step(batch, info);
    ++step_;
    position_ = data_->position();

    // One small all-reduce: the step's global loss/accuracy, and whether any
    // rank was asked to stop (a signal, or rank 0's time limit).
    const bool over_time =
        rank == 0 && o_.max_minutes > 0 && seconds(Clock::now() - run_start) > o_.max_minutes * 60;
    at::Tensor agreed = at::tensor({result.sums.loss_sum, result.sums.correct, result.sums.samples,
                                    StopSignals::requested() ? 1.0 : 0.0, over_time ? 1.0 : 0.0},
                                   at::kDouble);
    world_->all_reduce(agreed)->wait();
    const collectives::OpTally comm_after = comm_totals();
    const auto t6 = Clock::now();
    const double step_s = seconds(t6 - t0);
    const double global_n = agreed[2].item<double>();
    const double global_loss = agreed[0].item<double>() / global_n;
    // What the strategies counted (images, or tokens: a window of a language
    // model is context tokens), once over the world.
    const double samples_per_s = global_n / step_s;

    if (metrics_) {
      json line = {{"kind", "train"},
                   {"rank", rank},
                   {"step", step_},
                   {"epoch", batch.epoch},
                   {"loss", global_loss},
                   {"local_loss", result.local_loss},
                   {"accuracy", agreed[1].item<double>() / global_n},
                   {"lr", lr},
                   {o_.rate_name, samples_per_s},
                   {"step_s", step_s},
                   {"data_wait_s", seconds(info.data_ready - t0)},
                   {"max_rss_bytes", max_rss_bytes()},
                   {"comm_ops", comm_after.calls - comm_before.calls},
                   {"comm_bytes", comm_after.bytes - comm_before.bytes},
                   {"comm_sent_bytes", comm_after.sent_bytes - comm_before.sent_bytes}};
      line.update(result.metrics);
      metrics_->write(std::move(line));
    }
    if (trace_) {
      trace_->span("data wait", s0, info.data_ready_wall, 0, {{"step", step_}});
      for (auto& span : result.spans) {
        trace_->span(span.name, span.begin, span.end, span.tid, std::move(span.args));
      }
    }
    if (samples_) {
      std::vector<std::int64_t> indices;
      if (batch.indices.defined()) {
        const at::Tensor idx = batch.indices.to(at::kLong).contiguous();
        indices.assign(idx.data_ptr<std::int64_t>(), idx.data_ptr<std::int64_t>() + idx.numel());
      }
      samples_->write({{"step", step_},
                       {"epoch", batch.epoch},
                       {"batch_in_epoch", batch.batch_in_epoch},
                       {"rank", rank},
                       {"world_size", world_size},
                       {"restart", env_.restart},
                       {"indices", indices}});
    }
    progress_->update(step_, batch.epoch, global_loss, samples_per_s);
    if (fault_kill_due(env_.kill, rank, step_)) {
      // The rank dies after the saves begun before this step have committed,
      // so the restart's checkpoint is known however long an async save
      // takes on a loaded machine (DTRAIN_FAULT_CHECKPOINT kills in a save).
      if (checkpoints_) checkpoints_->wait();
      kill_self(rank, "SIGKILL after step " + std::to_string(step_));
    }

    if (agreed[3].item<double>() > 0 || agreed[4].item<double>() > 0) {
      stopped = true;
      signalled = agreed[3].item<double>() > 0;  // the same decision on every rank
      break;
    }
    const bool epoch_end = batch.batch_in_epoch + 1 == data_->batches_per_epoch();
    const std::int64_t epoch_done = batch.epoch + 1;
    if (epoch_end && o_.eval_every > 0 && epoch_done % o_.eval_every == 0 && step_ < total_steps_) {
      evaluate();
    }
    const bool save_now = o_.checkpoint_every > 0 ? step_ % o_.checkpoint_every == 0 : epoch_end;
    if (save_now && step_ < total_steps_) save_checkpoint(false);
  }
  progress_->finish();
  if (stopped) {
    if (signalled) {
      say("stop requested (SIGTERM/SIGINT): saving a checkpoint");
    } else {
      char text[96];
      std::snprintf(text, sizeof(text), "time limit of %g minutes reached: evaluating and saving",
                    o_.max_minutes);
      say(text);
      evaluate();
    }
    save_checkpoint(true);
    if (!signalled) program_.finish(*run_);
    if (trace_) trace_->flush();
    say(checkpoints_ ? "stopped at step " + std::to_string(step_) +
                           "; run the same command to resume from " + o_.checkpoint_dir
                     : "stopped at step " + std::to_string(step_));
    // A time limit is the run's own budget, not a failure: exit 0, so that a
    // supervisor does not start it again at once.
    return signalled ? kExitStopped : kExitOk;
  }
  evaluate();
  if (!resumed_from_ || *resumed_from_ != step_) save_checkpoint(true);
  program_.finish(*run_);
  if (trace_) trace_->flush();
  const double wall = seconds(Clock::now() - run_start);
  if (rank == 0) {
    std::printf("done: %lld steps in %.1f s this run", static_cast<long long>(step_), wall);
    if (last_eval_accuracy_ >= 0) {
      std::printf(", %s loss %.4f", o_.eval_name.c_str(), last_eval_loss_);
      if (o_.loss_in_bits) std::printf(" (%.4f bits)", last_eval_loss_ / std::log(2.0));
      std::printf(", %s accuracy %.4f", o_.eval_name.c_str(), last_eval_accuracy_);
    }
    std::printf("\n  metrics     %s\n", o_.metrics_dir.c_str());
    if (checkpoints_) std::printf("  checkpoints %s\n", o_.checkpoint_dir.c_str());
    if (trace_)
      std::printf("  traces      %s (merge: scripts/merge_traces.py)\n", o_.trace_dir.c_str());
    std::printf("  plots       scripts/plot_metrics.py %s -o %s/metrics.png\n",
                o_.metrics_dir.c_str(), o_.out.c_str());
    std::fflush(stdout);
  }
  return kExitOk;
}

// --- main() ---------------------------------------------------------------------

int run(int* argc, char*** argv, const TrainerOptions& options, TrainingProgram& program) {
  const LaunchInfo launch = detect_launch();
  try {
    options.validate();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s\n", launch.rank, e.what());
    return kExitBadInput;
  }
  torch::set_num_threads(options.threads);
  StopSignals signals;
  ::signal(SIGXFSZ, SIG_IGN);  // a file-size limit becomes a write error (EFBIG), not a kill

  // A bad DTRAIN_* variable, or an MPI without thread support, is reported
  // like any other bad input, not as an uncaught exception.
  std::optional<Runtime> started;
  try {
    started.emplace(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s\n", launch.rank, e.what());
    return dynamic_cast<const InvalidArgument*>(&e) != nullptr ? kExitBadInput : kExitFailed;
  }
  Runtime& runtime = *started;
  RunEnvironment env;
  try {
    env = read_run_environment();
  } catch (const InvalidArgument& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s\n", runtime.rank(), e.what());
    return kExitBadInput;
  }
  if (env.file_limit_kib) {
    const rlimit limit{static_cast<rlim_t>(*env.file_limit_kib) * 1024, RLIM_INFINITY};
    ::setrlimit(RLIMIT_FSIZE, &limit);
  }
  // The trainer outlives the handlers: aborting must not first wait for its
  // background checkpoint write, which may be waiting for a dead peer.
  Trainer trainer(options, program, runtime, std::move(env));
  try {
    return trainer.run();
  } catch (const InvalidArgument& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s\n", runtime.rank(), e.what());
    if (trainer.started() && runtime.size() > 1) Runtime::abort_job(kExitBadInput, e.what());
    return kExitBadInput;
  } catch (const CommError& e) {
    Runtime::abort_job(kExitFailed, e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dtrain rank %d] error: %s\n", runtime.rank(), e.what());
    if (runtime.size() > 1) Runtime::abort_job(kExitFailed, e.what());
    return kExitFailed;
  }
}

}  // namespace dtrain::train
