#include "src/train/trainer_cli.h"

#include <algorithm>
#include <cstdint>
#include <iterator>

#include "dtrain/error.h"

namespace dtrain::train {

void add_output_options(cxxopts::Options& cli, const std::string& default_out) {
  // clang-format off
  cli.add_options("Checkpoints and output")
    ("out", "run directory: checkpoints/, metrics/ (and trace/) go here", cxxopts::value<std::string>()->default_value(default_out))
    ("checkpoint-dir", "checkpoint directory (default <out>/checkpoints; \"none\": no checkpoints)", cxxopts::value<std::string>()->default_value(""))
    ("checkpoint-every", "save every N steps (0: at the end of each epoch)", cxxopts::value<std::int64_t>()->default_value("0"))
    ("keep", "checkpoints to keep", cxxopts::value<int>()->default_value("3"))
    ("async-checkpoint", "write checkpoints in the background", cxxopts::value<bool>()->default_value("true"))
    ("resume", "resume from the newest valid checkpoint if there is one (written at any layout)", cxxopts::value<bool>()->default_value("true"))
    ("eval-every", "evaluate every N epochs (0: only at the end)", cxxopts::value<int>()->default_value("1"))
    ("metrics-dir", "JSON-lines metrics per rank (default <out>/metrics; \"none\": off)", cxxopts::value<std::string>()->default_value(""))
    ("trace-dir", "Chrome trace per rank (off unless given; merge with scripts/merge_traces.py)", cxxopts::value<std::string>()->default_value(""))
    ("trace", "trace into <out>/trace", cxxopts::value<bool>()->default_value("false"))
    ("sample-log", "append each step's global sample indices per rank to FILE-rankRRRRR.jsonl (for audits)", cxxopts::value<std::string>()->default_value(""))
    ("log-every", "steps between progress lines when not on a terminal", cxxopts::value<int>()->default_value("50"))
    ("progress", "bar, lines or auto (a bar on a terminal when not under mpirun/srun)", cxxopts::value<std::string>()->default_value("auto"));
  // clang-format on
}

void read_output_options(const cxxopts::ParseResult& p, TrainerOptions& o) {
  o.out = p["out"].as<std::string>();
  o.checkpoint_dir = p["checkpoint-dir"].as<std::string>();
  if (o.checkpoint_dir.empty()) o.checkpoint_dir = o.out + "/checkpoints";
  o.checkpoint_every = p["checkpoint-every"].as<std::int64_t>();
  o.keep = p["keep"].as<int>();
  o.async_checkpoint = p["async-checkpoint"].as<bool>();
  o.resume = p["resume"].as<bool>();
  o.eval_every = p["eval-every"].as<int>();
  o.metrics_dir = p["metrics-dir"].as<std::string>();
  if (o.metrics_dir.empty()) o.metrics_dir = o.out + "/metrics";
  o.trace_dir = p["trace-dir"].as<std::string>();
  if (o.trace_dir.empty() && p["trace"].as<bool>()) o.trace_dir = o.out + "/trace";
  o.sample_log = p["sample-log"].as<std::string>();
  o.log_every = p["log-every"].as<int>();
  o.progress = p["progress"].as<std::string>();
  DTRAIN_CHECK_ARG(o.progress == "auto" || o.progress == "bar" || o.progress == "lines",
                   "unknown --progress '", o.progress, "' (auto, bar, lines)");
  DTRAIN_CHECK_ARG(o.keep >= 1, "--keep must be >= 1");
  DTRAIN_CHECK_ARG(o.checkpoint_every >= 0 && o.eval_every >= 0,
                   "--checkpoint-every and --eval-every must be >= 0");
}

int check_pipeline_flags(int pp, int microbatches, const std::string& schedule,
                         int stages_per_rank) {
  DTRAIN_CHECK_ARG(pp >= 1, "--pp must be >= 1, got ", pp);
  DTRAIN_CHECK_ARG(microbatches >= 1, "--microbatches must be >= 1, got ", microbatches);
  const char* const schedules[] = {"gpipe", "1f1b", "interleaved", "zb-h1"};
  DTRAIN_CHECK_ARG(
      std::find(std::begin(schedules), std::end(schedules), schedule) != std::end(schedules),
      "unknown --pp-schedule '", schedule, "' (gpipe, 1f1b, interleaved, zb-h1)");
  const bool interleaved = schedule == "interleaved";
  DTRAIN_CHECK_ARG(stages_per_rank >= 0, "--pp-stages-per-rank must be >= 0, got ",
                   stages_per_rank);
  if (stages_per_rank == 0) stages_per_rank = interleaved ? 2 : 1;
  DTRAIN_CHECK_ARG(stages_per_rank == 1 || interleaved, "--pp-stages-per-rank ", stages_per_rank,
                   " needs --pp-schedule interleaved (", schedule, " runs one stage per rank)");
  return stages_per_rank;
}

parallel::pipeline::ScheduleOptions schedule_from_flags(const std::string& schedule, int pp,
                                                        int microbatches, int stages_per_rank) {
  parallel::pipeline::ScheduleOptions o;
  o.kind = parallel::pipeline::parse_schedule_kind(schedule);
  o.num_ranks = pp;
  o.num_microbatches = microbatches;
  o.stages_per_rank = stages_per_rank;
  return o;
}

parallel::pipeline::ScheduleOptions checked_schedule_from_flags(const std::string& schedule, int pp,
                                                                int microbatches,
                                                                int stages_per_rank,
                                                                std::int64_t global_batch,
                                                                int replicas) {
  const std::int64_t per_replica = global_batch / replicas;
  DTRAIN_CHECK_ARG(per_replica % microbatches == 0, "--microbatches ", microbatches,
                   " does not divide the batch of each data-parallel replica (", per_replica,
                   " = --global-batch ", global_batch, " over ", replicas,
                   " replicas): choose a divisor of ", per_replica);
  const parallel::pipeline::ScheduleOptions o =
      schedule_from_flags(schedule, pp, microbatches, stages_per_rank);
  try {
    o.validate();
  } catch (const InvalidArgument& e) {
    DTRAIN_THROW(InvalidArgument, "--pp-schedule ", schedule, " with --pp ", pp,
                 " and --microbatches ", microbatches, ": ", e.what());
  }
  return o;
}

}  // namespace dtrain::train
