// dtrain-pipeline: print, check and simulate pipeline schedules.
//
//   dtrain-pipeline print --schedule 1f1b --pp 4 --microbatches 8
//       the text form of a generated schedule (to start one's own from)
//   dtrain-pipeline check FILE            (or the generator flags, or - for stdin)
//       validates the schedule and simulates it: idle fraction, and per rank
//       busy/idle time and the peak stored activations; --timeline draws it
//
// Costs for check: --forward, --backward, --input-grad, --weight-grad,
// --comm (default 1, 2, 1, 1, 0). Exit status: 0 valid, 1 rejected, 2 usage
// error or unreadable input.

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/parallel/pipeline/generators.h"
#include "dtrain/parallel/pipeline/schedule.h"
#include "dtrain/parallel/pipeline/simulator.h"
#include "src/cli/cli.h"

namespace {

using namespace dtrain::parallel::pipeline;

constexpr const char* kHelp =
    "dtrain-pipeline: print, check and simulate pipeline schedules\n\n"
    "  dtrain-pipeline print --schedule S --pp P --microbatches M [--stages-per-rank V]\n"
    "      the text form of a generated schedule (S: gpipe, 1f1b, interleaved, zb-h1)\n"
    "  dtrain-pipeline print FILE\n"
    "      a schedule file, reformatted (one row per rank)\n"
    "  dtrain-pipeline check FILE | - | --schedule S --pp P --microbatches M [...]\n"
    "      validates the schedule and simulates it with the given costs:\n"
    "      --forward 1 --backward 2 --input-grad 1 --weight-grad 1 --comm 0\n"
    "      --timeline draws one row per rank\n\n"
    "Exit status: 0 valid, 1 rejected, 2 usage error or unreadable input.\n";

int usage(const std::string& problem) {
  std::cerr << "dtrain-pipeline: " << problem << " (see --help)\n";
  return dtrain::cli::kExitUsage;
}

std::string read_input(const std::string& path) {
  std::ostringstream text;
  if (path == "-") {
    text << std::cin.rdbuf();
    return text.str();
  }
  std::ifstream in(path);
  DTRAIN_CHECK_ARG(in.good(), "cannot read ", path);
  text << in.rdbuf();
  return text.str();
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("dtrain-pipeline", "print, check and simulate pipeline schedules");
  cli.add_options()("command", "print or check", cxxopts::value<std::string>())(
      "file", "a schedule file, or - for stdin", cxxopts::value<std::string>())(
      "schedule", "gpipe, 1f1b, interleaved or zb-h1", cxxopts::value<std::string>())(
      "pp", "pipeline ranks", cxxopts::value<int>()->default_value("2"))(
      "microbatches", "microbatches per step", cxxopts::value<int>()->default_value("4"))(
      "stages-per-rank", "stages per rank (interleaved)",
      cxxopts::value<int>()->default_value("1"))("forward", "cost of F",
                                                 cxxopts::value<double>()->default_value("1"))(
      "backward", "cost of B", cxxopts::value<double>()->default_value("2"))(
      "input-grad", "cost of I", cxxopts::value<double>()->default_value("1"))(
      "weight-grad", "cost of W", cxxopts::value<double>()->default_value("1"))(
      "comm", "cost of a message", cxxopts::value<double>()->default_value("0"))(
      "timeline", "draw the simulated step")("h,help", "print this help");
  cli.parse_positional({"command", "file"});
  Schedule schedule;
  std::string command;
  SimulationOptions sim;
  bool timeline = false;
  try {
    const auto parsed = dtrain::cli::parse(cli, static_cast<int>(argc), argv);
    if (parsed.count("help")) {
      std::cout << kHelp;
      return 0;
    }
    if (parsed.count("command") == 0) return usage("expected a command: print or check");
    command = parsed["command"].as<std::string>();
    if (command != "print" && command != "check") return usage("unknown command '" + command + "'");
    const bool have_file = parsed.count("file") > 0;
    const bool have_generator = parsed.count("schedule") > 0;
    if (have_file == have_generator) {
      return usage("give either a schedule FILE or --schedule with --pp and --microbatches");
    }
    if (have_file) {
      const std::string path = parsed["file"].as<std::string>();
      schedule = parse_schedule(read_input(path), path == "-" ? "stdin" : path);
    } else {
      ScheduleOptions options;
      options.kind = parse_schedule_kind(parsed["schedule"].as<std::string>());
      options.num_ranks = parsed["pp"].as<int>();
      options.num_microbatches = parsed["microbatches"].as<int>();
      options.stages_per_rank = parsed["stages-per-rank"].as<int>();
      schedule = make_schedule(options);
    }
    sim.costs.forward = parsed["forward"].as<double>();
    sim.costs.backward = parsed["backward"].as<double>();
    sim.costs.backward_input = parsed["input-grad"].as<double>();
    sim.costs.backward_weight = parsed["weight-grad"].as<double>();
    sim.costs.communication = parsed["comm"].as<double>();
    sim.costs.validate();
    timeline = parsed.count("timeline") > 0 && parsed["timeline"].as<bool>();
  } catch (const dtrain::InvalidArgument& e) {
    return usage(e.what());
  }
  if (command == "print") {
    std::cout << to_text(schedule);
    return 0;
  }
  const std::vector<std::string> problems = check(schedule);
  if (!problems.empty()) {
    std::cout << "rejected: " << problems.size() << " problem(s)\n";
    for (const std::string& p : problems) std::cout << "  " << p << "\n";
    return 1;
  }
  const SimulationReport report = simulate(schedule, sim);
  std::printf("valid: %s, %d ranks, %d stages, %d microbatches\n",
              schedule.name.empty() ? "(unnamed)" : schedule.name.c_str(), schedule.num_ranks,
              schedule.num_stages(), schedule.num_microbatches);
  std::printf("step length %.6g, idle fraction %.6f\n", report.makespan, report.idle_fraction);
  std::printf("%-6s %12s %12s %12s %14s %14s\n", "rank", "busy", "idle", "finish", "peak stored",
              "peak until I");
  for (std::size_t r = 0; r < report.ranks.size(); ++r) {
    const RankSimulation& rank = report.ranks[r];
    std::printf("%-6zu %12.6g %12.6g %12.6g %14d %14d\n", r, rank.busy, rank.idle, rank.finish,
                rank.peak_stored, rank.peak_stored_until_input_grad);
  }
  if (timeline) std::cout << render_timeline(schedule, report);
  return 0;
}
