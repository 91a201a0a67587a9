// dtrain-plan: ranks the dp x pp x tp layouts of a model by predicted step
// time, from a profile (a model's per-layer costs and a machine's numbers;
// planner.h), for any world size and global batch. The machine's numbers can
// be replaced on the command line, to rank the layouts for another cluster.
//
//   dtrain-plan PROFILE --world 4 --global-batch 64 [--memory-per-rank-mib N]
//               [--all-reduce-gbs X] [--all-reduce-latency-us X] [--p2p-gbs X]
//               [--p2p-latency-us X] [--cores N] [--schedules LIST]
//               [--microbatch-multiples LIST] [--interleave V] [--no-zero]
//               [--no-sequence-parallel] [--top N] [--json FILE]
//
// Exit status: 0, 1 when no layout is valid, 2 usage error or bad profile.

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/plan/planner.h"
#include "src/cli/cli.h"

namespace {

using namespace dtrain::plan;

constexpr double kMiB = 1024.0 * 1024.0;

int usage(const std::string& problem) {
  std::cerr << "dtrain-plan: " << problem << " (see --help)\n";
  return dtrain::cli::kExitUsage;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  DTRAIN_CHECK_ARG(in.good(), "cannot read profile ", path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

template <typename T>
std::vector<T> split_list(const std::string& text, T (*parse)(const std::string&)) {
  std::vector<T> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    DTRAIN_CHECK_ARG(!item.empty(), "empty item in list '", text, "'");
    out.push_back(parse(item));
  }
  DTRAIN_CHECK_ARG(!out.empty(), "empty list");
  return out;
}

int parse_int(const std::string& s) {
  std::size_t end = 0;
  int v = 0;
  try {
    v = std::stoi(s, &end);
  } catch (const std::exception&) {
    end = 0;
  }
  DTRAIN_CHECK_ARG(end == s.size() && end > 0, "'", s, "' is not an integer");
  return v;
}

ScheduleKind parse_kind(const std::string& s) {
  return dtrain::parallel::pipeline::parse_schedule_kind(s);
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("dtrain-plan", "rank a model's dp x pp x tp layouts by predicted step time");
  cli.add_options()("profile", "the profile (JSON: model layers and machine numbers)",
                    cxxopts::value<std::string>())("world", "ranks", cxxopts::value<int>())(
      "global-batch", "samples per step", cxxopts::value<std::int64_t>())(
      "memory-per-rank-mib", "memory limit per rank (replaces the profile's; 0: none)",
      cxxopts::value<double>())("all-reduce-gbs", "all-reduce bus bandwidth, GB/s",
                                cxxopts::value<double>())(
      "all-reduce-latency-us", "all-reduce latency, us", cxxopts::value<double>())(
      "p2p-gbs", "point-to-point bandwidth, GB/s", cxxopts::value<double>())(
      "p2p-latency-us", "point-to-point latency, us", cxxopts::value<double>())(
      "cores", "cores the ranks share (0: one per rank)", cxxopts::value<int>())(
      "schedules", "pipeline schedules to consider",
      cxxopts::value<std::string>()->default_value("gpipe,1f1b,interleaved,zb-h1"))(
      "microbatch-multiples", "microbatch counts as multiples of pp",
      cxxopts::value<std::string>()->default_value("1,2,4"))(
      "interleave", "stages per rank of the interleaved schedule",
      cxxopts::value<int>()->default_value("2"))("no-zero", "leave out ZeRO-1")(
      "no-sequence-parallel", "leave out sequence parallelism")(
      "top", "print the best N layouts (0: all)", cxxopts::value<int>()->default_value("0"))(
      "json", "also write the predictions to this file", cxxopts::value<std::string>())(
      "h,help", "print this help");
  cli.parse_positional({"profile"});
  cli.positional_help("PROFILE");

  PlanProfile profile;
  SearchSpace space;
  int top = 0;
  std::string json_path;
  try {
    const auto parsed = dtrain::cli::parse(cli, argc, argv);
    if (parsed.count("help")) {
      std::cout << cli.help()
                << "\nExit status: 0, 1 when no layout is valid, 2 usage error or bad profile.\n";
      return 0;
    }
    if (parsed.count("profile") == 0) return usage("expected a PROFILE file");
    if (parsed.count("world") == 0 || parsed.count("global-batch") == 0) {
      return usage("--world and --global-batch are required");
    }
    const std::string path = parsed["profile"].as<std::string>();
    profile = profile_from_json(read_file(path), path);
    MachineProfile& m = profile.machine;
    bool replaced = false;
    if (parsed.count("memory-per-rank-mib")) {
      const double mib = parsed["memory-per-rank-mib"].as<double>();
      DTRAIN_CHECK_ARG(mib >= 0, "--memory-per-rank-mib must be >= 0, got ", mib);
      m.memory_per_rank = static_cast<std::int64_t>(mib * kMiB);
      replaced = true;
    }
    if (parsed.count("all-reduce-gbs")) {
      m.all_reduce_bandwidth = parsed["all-reduce-gbs"].as<double>() * 1e9;
      replaced = true;
    }
    if (parsed.count("all-reduce-latency-us")) {
      m.all_reduce_latency = parsed["all-reduce-latency-us"].as<double>() * 1e-6;
      replaced = true;
    }
    if (parsed.count("p2p-gbs")) {
      m.p2p_bandwidth = parsed["p2p-gbs"].as<double>() * 1e9;
      replaced = true;
    }
    if (parsed.count("p2p-latency-us")) {
      m.p2p_latency = parsed["p2p-latency-us"].as<double>() * 1e-6;
      replaced = true;
    }
    if (parsed.count("cores")) {
      m.cores = parsed["cores"].as<int>();
      replaced = true;
    }
    m.validate();
    if (replaced) profile.machine_description += " (numbers replaced on the command line)";
    space.world = parsed["world"].as<int>();
    space.global_batch = parsed["global-batch"].as<std::int64_t>();
    space.schedules = split_list<ScheduleKind>(parsed["schedules"].as<std::string>(), parse_kind);
    space.microbatch_multiples =
        split_list<int>(parsed["microbatch-multiples"].as<std::string>(), parse_int);
    space.interleave = parsed["interleave"].as<int>();
    space.try_zero = parsed.count("no-zero") == 0;
    space.try_sequence_parallel = parsed.count("no-sequence-parallel") == 0;
    space.validate();
    top = parsed["top"].as<int>();
    DTRAIN_CHECK_ARG(top >= 0, "--top must be >= 0, got ", top);
    if (parsed.count("json")) json_path = parsed["json"].as<std::string>();
  } catch (const dtrain::InvalidArgument& e) {
    return usage(e.what());
  }

  const std::vector<Prediction> ranked = rank_layouts(profile.model, profile.machine, space);
  const ModelProfile& model = profile.model;
  std::printf("model %s: %zu layers; world %d, global batch %lld; machine: %s\n",
              model.name.c_str(), model.layers.size(), space.world,
              static_cast<long long>(space.global_batch),
              profile.machine_description.empty() ? "(no description)"
                                                  : profile.machine_description.c_str());
  std::printf("assumptions:\n%s\n", assumptions(profile.machine).c_str());
  const std::string rate = model.unit + "/s";
  std::printf("%4s  %-34s %10s %12s %10s %10s %10s %10s %10s  %s\n", "rank", "layout", "step_ms",
              rate.c_str(), "compute_ms", "comm_ms", "bubble_ms", "peak_MiB", "sent_MiB", "fits");
  for (std::size_t i = 0; i < ranked.size(); ++i) {
    if (top > 0 && static_cast<int>(i) >= top) break;
    const Prediction& p = ranked[i];
    std::printf("%4zu  %-34s %10.2f %12.1f %10.2f %10.2f %10.2f %10.1f %10.2f  %s\n", i + 1,
                p.layout.name().c_str(), p.step_seconds * 1e3, p.throughput,
                p.compute_seconds * 1e3, p.communication_seconds * 1e3, p.bubble_seconds * 1e3,
                p.peak_bytes / kMiB, p.bytes_sent_per_step / kMiB, p.fits ? "yes" : "no");
  }
  for (const RejectedLayout& r : rejected_factorizations(model.limits, space)) {
    std::printf("      %-34s not valid: %s\n", r.layout.name().c_str(), r.reason.c_str());
  }
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << predictions_to_json(ranked);
    if (!out.good()) {
      std::cerr << "dtrain-plan: cannot write " << json_path << "\n";
      return 2;
    }
  }
  if (ranked.empty()) {
    std::cerr << "dtrain-plan: no layout of " << model.name << " is valid on " << space.world
              << " ranks with a global batch of " << space.global_batch << "\n";
    return 1;
  }
  return 0;
}
