#pragma once
// The command-line options that every training program built on the trainer
// (dtrain/train/trainer.h) shares, so that dtrain-resnet, dtrain-gpt and the
// next program spell, default and check them alike. Internal: linked into the
// executables (target dtrain_train_cli), like src/cli/cli.h.
//
//   cxxopts::Options cli("my-trainer", "...");
//   cli.add_options("Model and data")(...);               // the program's own
//   train::add_output_options(cli, "runs/mine");          // --out, --checkpoint-dir, ...
//   cli.add_options("Checkpoints and output")("eval-batch", ...)("h,help", ...);
//   ...
//   train::TrainerOptions o;
//   train::read_output_options(parsed, o);                // InvalidArgument on a bad value

#include <string>

#include <cxxopts.hpp>

#include "dtrain/parallel/pipeline/generators.h"
#include "dtrain/train/trainer.h"

namespace dtrain::train {

/// Adds, to the group "Checkpoints and output": --out (default `default_out`),
/// --checkpoint-dir, --checkpoint-every, --keep, --async-checkpoint,
/// --resume, --eval-every, --metrics-dir, --trace-dir, --trace,
/// --sample-log, --log-every and --progress.
void add_output_options(cxxopts::Options& cli, const std::string& default_out);

/// Reads them into `options`: the checkpoint and metrics directories default
/// to <out>/checkpoints and <out>/metrics, --trace to <out>/trace. Throws
/// InvalidArgument naming the option for an unknown --progress, --keep < 1,
/// or a negative --checkpoint-every or --eval-every.
void read_output_options(const cxxopts::ParseResult& parsed, TrainerOptions& options);

/// Checks the pipeline flags every training program takes on their own
/// (--pp >= 1, --microbatches >= 1, a known --pp-schedule, --pp-stages-per-rank
/// >= 0 and above 1 only for interleaved) and returns the stages per rank,
/// 0 resolved to 2 for interleaved and 1 otherwise. Throws InvalidArgument
/// naming the flag.
int check_pipeline_flags(int pp, int microbatches, const std::string& schedule,
                         int stages_per_rank);

/// The schedule that the pipeline flags every training program takes
/// (--pp-schedule, --microbatches, --pp-stages-per-rank) give for `pp`
/// pipeline ranks, not validated. Throws InvalidArgument listing the names
/// for an unknown schedule.
parallel::pipeline::ScheduleOptions schedule_from_flags(const std::string& schedule, int pp,
                                                        int microbatches, int stages_per_rank);

/// schedule_from_flags, checked before anything runs: --microbatches must
/// divide each of `replicas` data-parallel replicas' share of
/// `global_batch`, and the generator must accept the schedule. Throws
/// InvalidArgument naming the flags and their values.
parallel::pipeline::ScheduleOptions checked_schedule_from_flags(const std::string& schedule, int pp,
                                                                int microbatches,
                                                                int stages_per_rank,
                                                                std::int64_t global_batch,
                                                                int replicas);

}  // namespace dtrain::train
