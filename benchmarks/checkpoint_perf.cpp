// checkpoint_perf: how fast dtrain saves and loads checkpoints, and how long
// a save stalls training, synchronous against asynchronous.
//
//   scripts/launch/dtrain-mpirun -n 2 build/benchmarks/checkpoint_perf
//       --model-size 256M --dir /tmp/ckpt-bench [--json out.json]
//
// The state is what a ZeRO-1 Adam job saves: a replicated model of
// --model-size bytes (float32, in 16 MiB tensors), written once over all
// ranks, plus two optimizer-state shards per rank of model-size/N each. Rows:
//   save (sync)     save() until committed: bytes this rank wrote / time
//   load            latest_valid() (digests every file) + reading this rank's
//                   model and shards back: bytes read / time
//   stall           a training loop (matmuls, --step-ms per step) with one
//                   save at its start: extra wall time of the loop over the
//                   same loop without a save, sync vs async, and the time
//                   save() itself blocked. An async save still competes for
//                   the cores while it writes; the loop should outlast it.
//   save parts      where the best sync save's time went, on the slowest rank:
//                   encode (HDF5 file built in memory: copies, Fletcher32;
//                   its chunks go to disk meanwhile), write (the writes left
//                   after that, the XXH3 digest alongside), fsync, commit
//                   (agreement, manifest, rename)
// Times are the slowest rank's; each row keeps the best of --iters runs.
// --no-fsync measures without fsync; --buffered writes through the page
// cache instead of O_DIRECT.

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "benchmarks/harness.h"
#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/collectives/communicator.h"
#include "dtrain/runtime.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using dtrain::checkpoint::CheckpointManager;
using dtrain::checkpoint::CheckpointOptions;
using dtrain::checkpoint::StateDict;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double slowest(dtrain::collectives::Communicator& comm, double value) {
  at::Tensor t = at::full({1}, value, at::kDouble);
  dtrain::collectives::AllReduceOptions o;
  o.op = dtrain::collectives::ReduceOp::kMax;
  comm.all_reduce(t, o)->wait();
  return t.item<double>();
}

struct State {
  std::vector<at::Tensor> model;  // replicated
  at::Tensor exp_avg;             // this rank's shards
  at::Tensor exp_avg_sq;
  std::int64_t total = 0;
  std::int64_t shard = 0;

  StateDict dict(int rank) const {
    StateDict d;
    for (std::size_t i = 0; i < model.size(); ++i) {
      d.add_replicated("model/t" + std::to_string(i), model[i]);
    }
    const std::int64_t offset = rank * shard;
    const std::int64_t length = std::max<std::int64_t>(0, std::min(shard, total - offset));
    if (length > 0) {
      d.add_shard("zero/exp_avg", exp_avg.narrow(0, 0, length), {total}, {offset});
      d.add_shard("zero/exp_avg_sq", exp_avg_sq.narrow(0, 0, length), {total}, {offset});
    }
    return d;
  }
};

State make_state(std::size_t model_bytes, int world) {
  State s;
  s.total = static_cast<std::int64_t>(model_bytes / 4);
  const std::int64_t piece = 4 << 20;  // 16 MiB of float32
  for (std::int64_t done = 0; done < s.total; done += piece) {
    s.model.push_back(torch::randn({std::min(piece, s.total - done)}));
  }
  s.shard = (s.total + world - 1) / world;
  s.exp_avg = torch::randn({s.shard});
  s.exp_avg_sq = torch::rand({s.shard});
  return s;
}

// `steps` matmul steps of about step_ms; saves once after the first if asked.
double train_loop(int steps, int matmul_reps, CheckpointManager* manager, const State& state,
                  int rank, std::int64_t step_id, double* blocked) {
  at::Tensor a = torch::randn({256, 256});
  at::Tensor b = torch::randn({256, 256});
  const auto start = Clock::now();
  for (int s = 0; s < steps; ++s) {
    for (int r = 0; r < matmul_reps; ++r) a = torch::tanh(torch::mm(a, b));
    if (s == 0 && manager != nullptr) {
      const auto t = Clock::now();
      manager->save(step_id, state.dict(rank));
      *blocked = since(t);
    }
  }
  const double elapsed = since(start);
  if (manager != nullptr) manager->wait();  // not part of the loop: the next save would wait here
  return elapsed;
}

}  // namespace

int main(int argc, char** argv) {
  dtrain::Runtime runtime(&argc, &argv);
  cxxopts::Options cli("checkpoint_perf", "checkpoint save/load speed and training stall");
  cli.add_options()("model-size", "replicated model bytes (K/M/G)",
                    cxxopts::value<std::string>()->default_value("256M"))(
      "dir", "checkpoint directory (emptied first)",
      cxxopts::value<std::string>()->default_value("/tmp/dtrain-checkpoint-perf"))(
      "iters", "runs per row (best kept)", cxxopts::value<int>()->default_value("3"))(
      "steps", "training-loop steps in the stall rows (make the loop outlast a save)",
      cxxopts::value<int>()->default_value("100"))("step-ms", "approximate compute per step",
                                                   cxxopts::value<double>()->default_value("50"))(
      "no-fsync", "skip fsync", cxxopts::value<bool>()->default_value("false"))(
      "buffered", "write through the page cache (no O_DIRECT)",
      cxxopts::value<bool>()->default_value("false"))(
      "json", "write results to this file", cxxopts::value<std::string>()->default_value(""))(
      "h,help", "help");
  cxxopts::ParseResult args;
  try {
    args = dtrain::cli::parse(cli, argc, argv);
  } catch (const dtrain::cli::UsageError& e) {
    if (runtime.rank() == 0) std::fprintf(stderr, "checkpoint_perf: %s\n", e.what());
    return dtrain::cli::kExitUsage;
  }
  if (args.count("help")) {
    if (runtime.rank() == 0) std::printf("%s\n", cli.help().c_str());
    return 0;
  }
  torch::set_num_threads(1);
  auto world = runtime.world({"checkpoint-perf", std::chrono::minutes(10)});
  const int rank = world->rank();
  const int n = world->size();
  const std::size_t model_bytes = dtrain::bench::parse_size(args["model-size"].as<std::string>());
  const std::string dir = args["dir"].as<std::string>();
  const int iters = args["iters"].as<int>();
  if (rank == 0) fs::remove_all(dir);
  world->barrier()->wait();

  const State state = make_state(model_bytes, n);
  CheckpointOptions sync_opt;
  sync_opt.directory = dir;
  sync_opt.keep_last = 2;
  sync_opt.async = false;
  sync_opt.fsync = !args["no-fsync"].as<bool>();
  sync_opt.direct_io = !args["buffered"].as<bool>();
  CheckpointOptions async_opt = sync_opt;
  async_opt.async = true;
  CheckpointManager sync_mgr(sync_opt, world);
  CheckpointManager async_mgr(async_opt, world);

  std::int64_t step = 1;
  double save_s = 1e30;
  std::uint64_t written = 0;
  dtrain::checkpoint::WriteStats parts;  // of the best save, the slowest rank's each
  for (int i = 0; i < iters; ++i) {
    world->barrier()->wait();
    const auto t = Clock::now();
    sync_mgr.save(step++, state.dict(rank));
    const double seconds = slowest(*world, since(t));
    const auto w = sync_mgr.last_write();
    written = w.bytes;
    if (seconds < save_s) {
      parts = w;
      parts.encode_seconds = slowest(*world, w.encode_seconds);
      parts.io_seconds = slowest(*world, w.io_seconds);
      parts.fsync_seconds = slowest(*world, w.fsync_seconds);
      parts.commit_seconds = slowest(*world, w.commit_seconds);
    } else {
      for (int k = 0; k < 4; ++k) slowest(*world, 0);  // the same collectives on every rank
    }
    save_s = std::min(save_s, seconds);
  }
  const double written_max = slowest(*world, static_cast<double>(written));

  double load_s = 1e30;
  double read_bytes = 0;
  for (int i = 0; i < iters; ++i) {
    world->barrier()->wait();
    const auto t = Clock::now();
    const auto latest = sync_mgr.latest_valid();
    const auto ckpt = dtrain::checkpoint::Checkpoint::open(latest->directory);
    double bytes = 0;
    for (std::size_t m = 0; m < state.model.size(); ++m) {
      bytes += static_cast<double>(ckpt.read("model/t" + std::to_string(m)).nbytes());
    }
    const std::int64_t offset = rank * state.shard;
    const std::int64_t length =
        std::max<std::int64_t>(0, std::min(state.shard, state.total - offset));
    if (length > 0) {
      bytes += static_cast<double>(ckpt.read("zero/exp_avg", {offset}, {length}).nbytes());
      bytes += static_cast<double>(ckpt.read("zero/exp_avg_sq", {offset}, {length}).nbytes());
    }
    load_s = std::min(load_s, slowest(*world, since(t)));
    read_bytes = bytes;
  }

  // Calibrate the step to about step_ms.
  int reps = 1;
  {
    const auto t = Clock::now();
    double unused = 0;
    train_loop(1, 20, nullptr, state, rank, 0, &unused);
    const double per_rep = since(t) / 20;
    reps = std::max(1, static_cast<int>(args["step-ms"].as<double>() / 1e3 / per_rep));
  }
  const int steps = args["steps"].as<int>();
  double base = 1e30, sync_loop = 1e30, async_loop = 1e30, sync_block = 1e30, async_block = 1e30;
  for (int i = 0; i < iters; ++i) {
    double blocked = 0;
    world->barrier()->wait();
    base =
        std::min(base, slowest(*world, train_loop(steps, reps, nullptr, state, rank, 0, &blocked)));
    world->barrier()->wait();
    sync_loop = std::min(sync_loop, slowest(*world, train_loop(steps, reps, &sync_mgr, state, rank,
                                                               step++, &blocked)));
    sync_block = std::min(sync_block, slowest(*world, blocked));
    world->barrier()->wait();
    async_loop = std::min(async_loop, slowest(*world, train_loop(steps, reps, &async_mgr, state,
                                                                 rank, step++, &blocked)));
    async_block = std::min(async_block, slowest(*world, blocked));
  }

  if (rank == 0) {
    const double state_bytes = static_cast<double>(model_bytes) * 3;
    std::printf(
        "# checkpoint_perf  %d ranks  model %s (+2 ZeRO-1 state shards)  checkpoint %.1f MiB  "
        "fsync %s  best of %d\n",
        n, dtrain::bench::format_bytes(model_bytes).c_str(), state_bytes / (1 << 20),
        sync_opt.fsync ? "on" : "off", iters);
    std::printf("%-22s %12s %12s %14s\n", "row", "seconds", "MiB/rank", "GB/s per rank");
    std::printf("%-22s %12.3f %12.1f %14.3f\n", "save (sync, commit)", save_s,
                written_max / (1 << 20), written_max / save_s / 1e9);
    std::printf("%-22s %12.3f %12.1f %14.3f\n", "load (verify + read)", load_s,
                read_bytes / (1 << 20), read_bytes / load_s / 1e9);
    std::printf("\n# parts of the best sync save (slowest rank each; written %s)\n",
                parts.direct_io ? "with O_DIRECT" : "through the page cache");
    std::printf("%-22s %12s\n", "part", "seconds");
    std::printf("%-22s %12.3f\n", "encode (HDF5 image)", parts.encode_seconds);
    std::printf("%-22s %12.3f\n", "write rest (+ digest)", parts.io_seconds);
    std::printf("%-22s %12.3f\n", "fsync", parts.fsync_seconds);
    std::printf("%-22s %12.3f\n", "commit", parts.commit_seconds);
    std::printf("\n# training loop of %d steps (~%.0f ms each), one save at its start\n", steps,
                base / steps * 1e3);
    std::printf("%-22s %12s %14s %16s\n", "row", "loop s", "extra s (stall)", "save() blocked s");
    std::printf("%-22s %12.3f %14s %16s\n", "no save", base, "-", "-");
    std::printf("%-22s %12.3f %14.3f %16.3f\n", "sync save", sync_loop, sync_loop - base,
                sync_block);
    std::printf("%-22s %12.3f %14.3f %16.3f\n", "async save", async_loop, async_loop - base,
                async_block);
    const std::string json_path = args["json"].as<std::string>();
    if (!json_path.empty()) {
      nlohmann::json j = {{"benchmark", "checkpoint_perf"},
                          {"ranks", n},
                          {"model_bytes", model_bytes},
                          {"fsync", sync_opt.fsync},
                          {"direct_io", parts.direct_io},
                          {"save_encode_seconds", parts.encode_seconds},
                          {"save_write_seconds", parts.io_seconds},
                          {"save_fsync_seconds", parts.fsync_seconds},
                          {"save_commit_seconds", parts.commit_seconds},
                          {"save_seconds", save_s},
                          {"save_bytes_per_rank", written_max},
                          {"load_seconds", load_s},
                          {"load_bytes_per_rank", read_bytes},
                          {"loop_seconds", base},
                          {"sync_loop_seconds", sync_loop},
                          {"async_loop_seconds", async_loop},
                          {"sync_blocked_seconds", sync_block},
                          {"async_blocked_seconds", async_block}};
      std::ofstream(json_path) << j.dump(2) << "\n";
    }
  }
  world->barrier()->wait();
  return 0;
}
