// strategy_profile: writes the profile dtrain-plan reads (planner.h) for one
// of the examples' models on this machine: each layer measured per sample
// (plan::measure_layers) and the machine's all-reduce and point-to-point
// latency and bandwidth, fitted from two message sizes.
//
//   mpiexec -n 2 strategy_profile --model resnet20 --microbatch 64 --out resnet20.json
//   mpiexec -n 2 strategy_profile --model gpt --vocab 96 --microbatch 16 --out gpt.json
//
// For the GPT (examples/gpt, its layers embedding | blocks | ln_f | head),
// measured dense (tp = 1), the profile marks what tensor parallelism splits
// and the all-reduces it adds (docs/gpt.md's count: the embedding's and each
// block's two forward all-reduces, as many backward); of a block's kept bytes
// three activations of [T, C] per sample (the LayerNorm inputs and the
// residual stream) are counted as replicated over tp, split only by
// sequence parallelism.
//
// As many ranks as the machine has cores (--cores) measure the layers at
// once, with --threads intra-op threads each, as training runs them, and each
// layer's time is their mean (--alone: rank 0 measures alone); the other
// ranks sleep meanwhile (they poll for the end every millisecond, so they take
// no core). Then all ranks time all-reduces over the world and ranks 0 and 1
// time a ping-pong. Run it on as many ranks as the layouts to
// compare will use: the collectives then cross the same processes.

#include <mpi.h>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "benchmarks/harness.h"
#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "dtrain/memory.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/rng.h"
#include "dtrain/plan/measure.h"
#include "dtrain/plan/planner.h"
#include "dtrain/runtime.h"
#include "examples/gpt/gpt.h"
#include "examples/resnet/resnet.h"

namespace {

using dtrain::collectives::Communicator;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Ranks 0 .. workers-1 run `work` at the same time; the others wait here,
// asleep, until every worker has finished.
void others_sleep_while_workers_work(int rank, int size, int workers,
                                     const std::function<void()>& work) {
  constexpr int kTag = 7001;
  if (rank < workers) {
    work();
    int token = 1;
    for (int r = workers; r < size; ++r) MPI_Send(&token, 1, MPI_INT, r, kTag, MPI_COMM_WORLD);
    return;
  }
  for (int w = 0; w < workers; ++w) {
    int token = 0;
    MPI_Request request = MPI_REQUEST_NULL;
    MPI_Irecv(&token, 1, MPI_INT, w, kTag, MPI_COMM_WORLD, &request);
    int done = 0;
    while (!done) {
      MPI_Test(&request, &done, MPI_STATUS_IGNORE);
      if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
}

// The slowest rank's mean time of `iters` ops after `warmup`.
double time_op(Communicator& world, int warmup, int iters, const std::function<void()>& op) {
  for (int i = 0; i < warmup; ++i) op();
  world.barrier()->wait();
  const auto start = Clock::now();
  for (int i = 0; i < iters; ++i) op();
  double mine = seconds_since(start) / iters;
  at::Tensor t = at::full({1}, mine, at::kDouble);
  dtrain::collectives::AllReduceOptions max;
  max.op = dtrain::collectives::ReduceOp::kMax;
  world.all_reduce(t, max)->wait();
  return t.item<double>();
}

// latency + bytes / bandwidth through two points (small, large).
void fit(double small_bytes, double small_s, double large_bytes, double large_s, double& latency,
         double& bandwidth) {
  DTRAIN_CHECK_ARG(large_s > small_s, "the large message (", large_s,
                   " s) was not slower than the small one (", small_s,
                   " s): the machine was too noisy to fit a bandwidth; run again");
  bandwidth = (large_bytes - small_bytes) / (large_s - small_s);
  latency = std::max(0.0, small_s - small_bytes / bandwidth);
}

}  // namespace

int main(int argc, char** argv) {
  dtrain::Runtime runtime(&argc, &argv);
  cxxopts::Options cli("strategy_profile", "the dtrain-plan profile of a model on this machine");
  cli.add_options()("model", "gpt, resnet20, resnet32, resnet56, resnet18, resnet34 or resnet50",
                    cxxopts::value<std::string>()->default_value("resnet20"))(
      "vocab", "gpt: vocabulary size", cxxopts::value<std::int64_t>()->default_value("96"))(
      "layers", "gpt: transformer blocks", cxxopts::value<std::int64_t>()->default_value("4"))(
      "heads", "gpt: attention heads", cxxopts::value<std::int64_t>()->default_value("4"))(
      "embedding", "gpt: embedding size", cxxopts::value<std::int64_t>()->default_value("128"))(
      "context", "gpt: tokens per window", cxxopts::value<std::int64_t>()->default_value("64"))(
      "image", "input image as C,H,W", cxxopts::value<std::string>()->default_value("1,28,28"))(
      "classes", "classes", cxxopts::value<int>()->default_value("10"))(
      "microbatch", "samples per measured microbatch", cxxopts::value<int>()->default_value("64"))(
      "threads", "intra-op threads while measuring the layers",
      cxxopts::value<int>()->default_value("1"))("timed-runs",
                                                 "timed runs per layer (the median counts)",
                                                 cxxopts::value<int>()->default_value("5"))(
      "optimizer-states", "optimizer state per parameter (SGD with momentum 1, Adam 2)",
      cxxopts::value<int>()->default_value("1"))(
      "cores", "cores the ranks share (0: one per rank; default: this machine's)",
      cxxopts::value<int>()->default_value(std::to_string(std::thread::hardware_concurrency())))(
      "alone", "measure the layers on rank 0 alone (default: on as many ranks as cores, at once)")(
      "out", "the profile to write", cxxopts::value<std::string>())("h,help", "print this help");
  auto world = runtime.world();
  std::string model_name, out_path;
  std::vector<std::int64_t> image;
  int classes = 10, microbatch = 64, threads = 1, timed_runs = 5, optimizer_states = 1, cores = 0;
  bool measure_alone = false;
  dtrain::gpt::GptOptions gpt;
  try {
    const auto parsed = dtrain::cli::parse(cli, argc, argv);
    if (parsed.count("help")) {
      if (world->rank() == 0) std::cout << cli.help();
      return 0;
    }
    DTRAIN_CHECK_ARG(parsed.count("out") > 0, "--out FILE is required");
    out_path = parsed["out"].as<std::string>();
    model_name = parsed["model"].as<std::string>();
    for (const std::string& d : {parsed["image"].as<std::string>()}) {
      std::size_t start = 0;
      while (start <= d.size()) {
        const std::size_t comma = std::min(d.find(',', start), d.size());
        image.push_back(std::stoll(d.substr(start, comma - start)));
        start = comma + 1;
      }
    }
    DTRAIN_CHECK_ARG(image.size() == 3, "--image must be C,H,W");
    classes = parsed["classes"].as<int>();
    microbatch = parsed["microbatch"].as<int>();
    threads = parsed["threads"].as<int>();
    measure_alone = parsed.count("alone") > 0;
    timed_runs = parsed["timed-runs"].as<int>();
    optimizer_states = parsed["optimizer-states"].as<int>();
    cores = parsed["cores"].as<int>();
    DTRAIN_CHECK_ARG(microbatch >= 1 && threads >= 1 && timed_runs >= 1 && classes >= 1 &&
                         cores >= 0 && optimizer_states >= 0,
                     "--microbatch, --threads, --timed-runs and --classes must be >= 1, --cores "
                     "and --optimizer-states >= 0");
    DTRAIN_CHECK_ARG(world->size() >= 2,
                     "run it on at least 2 ranks (the point-to-point probe "
                     "needs two), got ",
                     world->size());
    if (model_name == "gpt") {
      gpt.vocab_size = parsed["vocab"].as<std::int64_t>();
      gpt.layers = parsed["layers"].as<std::int64_t>();
      gpt.heads = parsed["heads"].as<std::int64_t>();
      gpt.embedding = parsed["embedding"].as<std::int64_t>();
      gpt.context = parsed["context"].as<std::int64_t>();
      gpt.validate(1);
    } else {
      dtrain::resnet::resnet_options(model_name, image[0], classes);  // refuses an unknown name
    }
  } catch (const std::exception& e) {
    if (world->rank() == 0) std::cerr << "strategy_profile: " << e.what() << " (see --help)\n";
    return 2;
  }

  dtrain::plan::PlanProfile profile;
  // What a rank holds before training: the runtime and its libraries, read
  // on the last rank, which builds no model.
  at::Tensor base = at::full({1}, static_cast<double>(dtrain::max_rss_bytes()), at::kDouble);
  dtrain::collectives::BroadcastOptions from_last;
  from_last.root = world->size() - 1;
  world->broadcast(base, from_last)->wait();
  profile.machine.base_bytes_per_rank = static_cast<std::int64_t>(base.item<double>());
  // The GPT's tp communicator and dropout streams: this rank alone (a split
  // is collective, so every rank takes part).
  auto self = world->split(world->rank(), 0);
  auto alone = std::make_shared<const dtrain::parallel::ParallelContext>(self, 1, 1);
  dtrain::parallel::pipeline::LayerTimingOptions timing;
  timing.timed_runs = timed_runs;
  // As many ranks as there are cores measure at once (training runs every
  // rank at once, and they share the memory system); with more ranks than
  // cores the planner scales the time itself (MachineProfile::cores).
  const int workers =
      measure_alone ? 1 : std::max(1, std::min(world->size(), cores > 0 ? cores : world->size()));
  others_sleep_while_workers_work(world->rank(), world->size(), workers, [&] {
    at::set_num_threads(threads);
    torch::manual_seed(0);
    if (model_name == "gpt") {
      auto rng = std::make_shared<dtrain::parallel::RngStreams>(*alone, 0);
      dtrain::gpt::Gpt model(gpt, alone->tp(), rng);
      model->train();
      const torch::Tensor ids =
          torch::randint(gpt.vocab_size, {microbatch, gpt.context}, torch::kLong);
      profile.model.layers = dtrain::plan::measure_layers(model->layers(), ids, timing);
    } else {
      dtrain::resnet::ResNet model = dtrain::resnet::make_resnet(model_name, image[0], classes);
      model->train();
      std::vector<std::int64_t> shape = {microbatch};
      shape.insert(shape.end(), image.begin(), image.end());
      profile.model.layers =
          dtrain::plan::measure_layers(model->layers(), torch::randn(shape), timing);
    }
  });
  // Each layer's time: the mean over the ranks that measured it. The layers
  // travel to the other ranks only in the file rank 0 writes.
  {
    const std::int64_t n = static_cast<std::int64_t>(profile.model.layers.size());
    at::Tensor count = at::full({1}, static_cast<std::int64_t>(n), at::kLong);
    dtrain::collectives::AllReduceOptions most;
    most.op = dtrain::collectives::ReduceOp::kMax;
    world->all_reduce(count, most)->wait();
    at::Tensor times = at::zeros({2 * count.item<std::int64_t>()}, at::kDouble);
    for (std::int64_t i = 0; i < n; ++i) {
      times[2 * i] = profile.model.layers[static_cast<std::size_t>(i)].forward_seconds;
      times[2 * i + 1] = profile.model.layers[static_cast<std::size_t>(i)].backward_seconds;
    }
    world->all_reduce(times)->wait();
    for (std::int64_t i = 0; i < n; ++i) {
      profile.model.layers[static_cast<std::size_t>(i)].forward_seconds =
          times[2 * i].item<double>() / workers;
      profile.model.layers[static_cast<std::size_t>(i)].backward_seconds =
          times[2 * i + 1].item<double>() / workers;
    }
  }
  profile.model.name = model_name;
  profile.model.optimizer_states = optimizer_states;
  profile.model.limits.layers = static_cast<int>(profile.model.layers.size());
  if (model_name == "gpt") {
    // dtrain-gpt cuts by blocks, the same number per stage (gpt.h,
    // pipeline_partition): the embedding goes with the first, ln_f and the
    // head with the last.
    profile.model.limits.layers = static_cast<int>(gpt.layers);
    profile.model.limits.stages_must_divide = {gpt.layers};
    profile.model.unit = "tokens";
    profile.model.units_per_sample = gpt.context;
    profile.model.limits.tp_must_divide = {gpt.heads, gpt.embedding};  // the vocabulary is padded
    profile.model.limits.sequence = gpt.context;
    for (dtrain::plan::LayerProfile& l : profile.model.layers) {
      const bool block = l.name.rfind("blocks.", 0) == 0;
      l.tensor_parallel = l.name != "ln_f";
      l.stage_unit = block;
      l.tp_all_reduces = block ? 2 : l.name == "embedding" ? 1 : 0;
      if (block || l.name == "ln_f") {
        const std::int64_t replicated = std::min(l.saved_bytes, 3 * l.output_bytes);
        l.replicated_saved_bytes = block ? replicated : l.saved_bytes;
        l.saved_bytes -= l.replicated_saved_bytes;
      }
    }
  } else {
    profile.model.unit = "images";
    profile.model.limits.zero_with_pp = true;  // dtrain-resnet --zero with --pp: ZeRO-1 per stage
  }

  const int n = world->size();
  const std::size_t small = 4 << 10, large = 16 << 20;
  at::Tensor buffer = at::zeros({static_cast<std::int64_t>(large / 4)}, at::kFloat);
  double t_small =
      time_op(*world, 3, 50, [&] { world->all_reduce(buffer.narrow(0, 0, small / 4))->wait(); });
  double t_large = time_op(*world, 2, 8, [&] { world->all_reduce(buffer)->wait(); });
  dtrain::plan::MachineProfile& machine = profile.machine;
  const double factor = 2.0 * (n - 1) / n;
  int fitted = 1;
  try {
    fit(factor * small, t_small, factor * large, t_large, machine.all_reduce_latency,
        machine.all_reduce_bandwidth);
    // Ping-pong between ranks 0 and 1: half the round trip.
    auto ping_pong = [&](std::size_t bytes) {
      at::Tensor m = buffer.narrow(0, 0, static_cast<std::int64_t>(bytes / 4));
      dtrain::collectives::PointToPointOptions channel;  // one shape per (peer, tag)
      channel.tag = bytes > small ? 1 : 0;
      return time_op(*world, 3, bytes > small ? 8 : 50,
                     [&] {
                       if (world->rank() == 0) {
                         world->send(m, 1, channel)->wait();
                         world->recv(m, 1, channel)->wait();
                       } else if (world->rank() == 1) {
                         world->recv(m, 0, channel)->wait();
                         world->send(m, 0, channel)->wait();
                       }
                     }) /
             2;
    };
    const double p_small = ping_pong(small);
    const double p_large = ping_pong(large);
    fit(small, p_small, large, p_large, machine.p2p_latency, machine.p2p_bandwidth);
  } catch (const dtrain::InvalidArgument& e) {
    if (world->rank() == 0) std::cerr << "strategy_profile: " << e.what() << "\n";
    fitted = 0;
  }
  if (!fitted) return 1;
  machine.cores = cores;
  char description[256];
  std::snprintf(description, sizeof(description),
                "measured by strategy_profile on %d ranks, %d core(s); layers on 1 rank with %d "
                "thread(s), microbatch %d",
                n, cores, threads, microbatch);
  profile.machine_description = description;
  if (world->rank() == 0) {
    std::ofstream out(out_path);
    out << dtrain::plan::profile_to_json(profile);
    if (!out.good()) {
      std::cerr << "strategy_profile: cannot write " << out_path << "\n";
      return 2;
    }
    std::printf("%s: %zu layers, all-reduce %.1f us + %.2f GB/s, p2p %.1f us + %.2f GB/s -> %s\n",
                model_name.c_str(), profile.model.layers.size(), machine.all_reduce_latency * 1e6,
                machine.all_reduce_bandwidth / 1e9, machine.p2p_latency * 1e6,
                machine.p2p_bandwidth / 1e9, out_path.c_str());
  }
  return 0;
}
