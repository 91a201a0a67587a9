// The run-directory options every training program shares
// (src/train/trainer_cli.h): their defaults derived from --out, and the
// errors that name the bad option.

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "dtrain/error.h"
#include "src/cli/cli.h"
#include "src/train/trainer_cli.h"

namespace dtrain::train {
namespace {

TrainerOptions read(std::vector<std::string> words) {
  cxxopts::Options cli("trainer", "a test trainer");
  add_output_options(cli, "runs/test");
  words.insert(words.begin(), "trainer");
  std::vector<const char*> argv;
  for (const auto& w : words) argv.push_back(w.c_str());
  const auto parsed = cli::parse(cli, static_cast<int>(argv.size()), argv.data());
  TrainerOptions o;
  read_output_options(parsed, o);
  return o;
}

std::string error_of(std::vector<std::string> words) {
  try {
    read(std::move(words));
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "no error";
}

TEST(TrainerCli, DirectoriesDefaultUnderOut) {
  const TrainerOptions defaults = read({});
  EXPECT_EQ(defaults.out, "runs/test");
  EXPECT_EQ(defaults.checkpoint_dir, "runs/test/checkpoints");
  EXPECT_EQ(defaults.metrics_dir, "runs/test/metrics");
  EXPECT_EQ(defaults.trace_dir, "");
  EXPECT_EQ(defaults.keep, 3);
  EXPECT_TRUE(defaults.resume);
  EXPECT_EQ(defaults.progress, "auto");

  const TrainerOptions o =
      read({"--out", "r", "--trace", "--checkpoint-dir", "none", "--keep", "5", "--resume", "false",
            "--progress", "lines", "--checkpoint-every", "7", "--sample-log", "s"});
  EXPECT_EQ(o.checkpoint_dir, "none");
  EXPECT_EQ(o.metrics_dir, "r/metrics");
  EXPECT_EQ(o.trace_dir, "r/trace");
  EXPECT_EQ(o.keep, 5);
  EXPECT_FALSE(o.resume);
  EXPECT_EQ(o.progress, "lines");
  EXPECT_EQ(o.checkpoint_every, 7);
  EXPECT_EQ(o.sample_log, "s");
  EXPECT_EQ(read({"--trace", "--trace-dir", "t"}).trace_dir, "t");
}

TEST(TrainerCli, BadValuesNameTheOption) {
  EXPECT_EQ(error_of({"--keep", "0"}), "--keep must be >= 1");
  EXPECT_EQ(error_of({"--progress", "fancy"}), "unknown --progress 'fancy' (auto, bar, lines)");
  EXPECT_EQ(error_of({"--eval-every", "-1"}), "--checkpoint-every and --eval-every must be >= 0");
  EXPECT_EQ(error_of({"--checkpoint-every", "-2"}),
            "--checkpoint-every and --eval-every must be >= 0");
}

TEST(TrainerCli, PipelineFlagsAreCheckedBeforeAnythingRuns) {
  const auto ok = checked_schedule_from_flags("interleaved", 2, 4, 2, 64, 2);
  EXPECT_EQ(ok.kind, parallel::pipeline::ScheduleKind::kInterleaved);
  EXPECT_EQ(ok.num_ranks, 2);
  EXPECT_EQ(ok.num_microbatches, 4);
  EXPECT_EQ(ok.stages_per_rank, 2);
  const auto refused = [](auto call, const std::string& part) {
    try {
      call();
      ADD_FAILURE() << "accepted; expected: " << part;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  refused([] { checked_schedule_from_flags("1f1b", 2, 3, 1, 64, 2); },
          "--microbatches 3 does not divide the batch of each data-parallel replica (32 = "
          "--global-batch 64 over 2 replicas)");
  refused([] { checked_schedule_from_flags("zb-h1", 2, 1, 1, 64, 1); },
          "--pp-schedule zb-h1 with --pp 2 and --microbatches 1: ");
  refused([] { checked_schedule_from_flags("interleaved", 2, 3, 2, 48, 1); },
          "--pp-schedule interleaved with --pp 2 and --microbatches 3: ");
  refused([] { schedule_from_flags("pipedream", 2, 2, 1); }, "pipedream");
  EXPECT_EQ(check_pipeline_flags(2, 4, "interleaved", 0), 2);
  EXPECT_EQ(check_pipeline_flags(2, 4, "1f1b", 0), 1);
  refused([] { check_pipeline_flags(0, 1, "1f1b", 0); }, "--pp must be >= 1, got 0");
  refused([] { check_pipeline_flags(1, 0, "1f1b", 0); }, "--microbatches must be >= 1, got 0");
  refused([] { check_pipeline_flags(2, 2, "pipedream", 0); },
          "unknown --pp-schedule 'pipedream' (gpipe, 1f1b, interleaved, zb-h1)");
  refused([] { check_pipeline_flags(2, 2, "gpipe", 2); },
          "--pp-stages-per-rank 2 needs --pp-schedule interleaved (gpipe runs one stage per rank)");
  refused([] { check_pipeline_flags(2, 2, "interleaved", -1); },
          "--pp-stages-per-rank must be >= 0, got -1");
}

}  // namespace
}  // namespace dtrain::train
