// heartbeat_probe: all-reduces in a loop, for the failure tests on the
// namespace cluster (tests/cluster/cluster_test.py).
//
//   heartbeat_probe --iters N --bytes B [--comm-timeout S] [--report-dir DIR]
//                   [--stall-rank R --stall-at I --stall-seconds S]
//
// Each iteration all-reduces B bytes of float32 (the communicator's default
// algorithm) and checks the sum. --stall-* makes rank R compute (sleep) for S
// seconds before iteration I, while the others wait in the all-reduce: a
// slow rank, which must not be taken for a dead one. With --report-dir each
// rank writes DIR/progress-rankR (its last finished iteration) and, on an
// error, DIR/error-rankR: "<unix time> <the error>". Exit: 0 done, 3 wrong
// sum, 1 error (after Runtime::abort_job).

#include <ATen/ATen.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include <cxxopts.hpp>

#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "dtrain/runtime.h"
#include "src/cli/cli.h"

namespace {

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void write_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << text << "\n";
  }
  std::rename(tmp.c_str(), path.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  // When one rank aborts, the launcher sends SIGTERM to the others, which
  // may not have written their own error yet (they notice within
  // milliseconds of each other); its SIGKILL comes a second later.
  std::signal(SIGTERM, SIG_IGN);
  dtrain::Runtime runtime(&argc, &argv);
  cxxopts::Options cli("heartbeat_probe", "all-reduces in a loop, for the cluster's failure tests");
  cli.add_options()("iters", "iterations", cxxopts::value<long>()->default_value("10"))(
      "bytes", "bytes per all-reduce", cxxopts::value<long>()->default_value("1048576"))(
      "comm-timeout", "collective timeout, seconds", cxxopts::value<int>()->default_value("300"))(
      "report-dir", "progress and error files", cxxopts::value<std::string>()->default_value(""))(
      "stall-rank", "rank that stalls", cxxopts::value<int>()->default_value("-1"))(
      "stall-at", "iteration before which it stalls", cxxopts::value<long>()->default_value("0"))(
      "stall-seconds", "how long", cxxopts::value<int>()->default_value("0"))("h,help", "help");
  long iters = 0;
  long bytes = 0;
  int timeout_s = 0;
  std::string report;
  int stall_rank = -1;
  long stall_at = 0;
  int stall_seconds = 0;
  try {
    auto parsed = dtrain::cli::parse(cli, argc, argv);
    if (parsed.count("help")) {
      if (runtime.rank() == 0) std::cout << cli.help() << std::endl;
      return 0;
    }
    iters = parsed["iters"].as<long>();
    bytes = parsed["bytes"].as<long>();
    timeout_s = parsed["comm-timeout"].as<int>();
    report = parsed["report-dir"].as<std::string>();
    stall_rank = parsed["stall-rank"].as<int>();
    stall_at = parsed["stall-at"].as<long>();
    stall_seconds = parsed["stall-seconds"].as<int>();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "heartbeat_probe: %s\n", e.what());
    return 2;
  }
  const int rank = runtime.rank();
  const std::string tag = "rank" + std::to_string(rank);
  dtrain::collectives::CommunicatorOptions options;
  options.name = "world";
  options.timeout = std::chrono::seconds(timeout_s);
  try {
    auto world = runtime.world(options);
    const int n = world->size();
    at::Tensor data = at::empty({std::max<long>(1, bytes / 4)}, at::kFloat);
    for (long i = 0; i < iters; ++i) {
      if (rank == stall_rank && i == stall_at) {
        std::printf("[probe %s] computing for %d s before iteration %ld\n", tag.c_str(),
                    stall_seconds, i);
        std::fflush(stdout);
        std::this_thread::sleep_for(std::chrono::seconds(stall_seconds));
      }
      data.fill_(static_cast<float>(rank + 1));
      world->all_reduce(data)->wait();
      const float want = static_cast<float>(n * (n + 1) / 2);
      if (!at::equal(data, at::full_like(data, want))) {
        std::fprintf(stderr, "[probe %s] wrong sum in iteration %ld\n", tag.c_str(), i);
        return 3;
      }
      if (!report.empty()) write_file(report + "/progress-" + tag, std::to_string(i));
    }
    std::printf("[probe %s] done: %ld iterations of %ld bytes on %d ranks\n", tag.c_str(), iters,
                bytes, n);
    return 0;
  } catch (const dtrain::Error& e) {
    char stamp[64];
    std::snprintf(stamp, sizeof(stamp), "%.3f ", unix_now());
    if (!report.empty()) write_file(report + "/error-" + tag, stamp + std::string(e.what()));
    dtrain::Runtime::abort_job(1, e.what());
  }
}
