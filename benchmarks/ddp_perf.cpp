// ddp_perf: what DistributedDataParallel (or ZeRO-1) costs and what its
// overlap hides, per training step, against plain LibTorch in the same run.
//
//   scripts/launch/dtrain-mpirun -n 2 build/benchmarks/ddp_perf --model mlp
//   scripts/launch/dtrain-mpirun -n 2 build/benchmarks/ddp_perf --model resnet20 --json r.json
//   scripts/launch/dtrain-mpirun -n 2 build/benchmarks/ddp_perf --model mlp --zero
//
// Models (synthetic data, cross-entropy, SGD with momentum 0.9, 1 intra-op
// thread per rank unless --threads says otherwise):
//   mlp       784-4096-4096-4096-10 (36.8M parameters), 64 samples per rank
//   resnet20  CIFAR ResNet-20 on 1x28x28 inputs, 10 classes, global batch 128
//
// Rows, each after its own warm-up steps (excluded); --repeat R runs the
// list R times and keeps each row's fastest run:
//   libtorch   plain LibTorch loop on rank 0 alone (no DDP)
//   ddp        DDP on a 1-rank communicator (rank 0 alone): DDP's own cost
//   ddp        DDP on all ranks, overlap on and off, for each bucket cap
// With --zero, instead of the DDP rows (after the libtorch row):
//   zero/ring  ZeroRedundancyOptimizer on all ranks, its reduce-scatter and
//              all-gather over the ring (a communicator without shared memory)
//   zero/shm   the same over shared memory (Algorithm::kAuto's choice when
//              the ranks share a node)
// While rank 0 runs the 1-process rows the other ranks sleep (they do not
// spin in a barrier, which would take a core from rank 0).
//
// Columns are per step, the slowest rank's mean: forward (incl. loss),
// backward (with overlap, all-reduces start inside it), sync
// (ddp.synchronize(): the exposed communication plus the buffer broadcast),
// optimizer (zero_grad + step; under ZeRO-1 step() includes the gradient
// reduce-scatter, the parameter all-gather and the buffer broadcast), step
// (all of it). With overlap off every
// all-reduce runs inside synchronize(), so its sync time is the total
// all-reduce time; `hidden` on an overlap-on row is the share of that total
// (same bucket cap) that backward hid: 1 - sync(on) / sync(off).

#include <mpi.h>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "benchmarks/harness.h"
#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "dtrain/parallel/distributed_data_parallel.h"
#include "dtrain/parallel/zero_optimizer.h"
#include "dtrain/runtime.h"
#include "examples/resnet/resnet.h"

namespace {

using dtrain::collectives::Communicator;
using dtrain::parallel::DdpOptions;
using dtrain::parallel::DistributedDataParallel;
using dtrain::parallel::ZeroRedundancyOptimizer;
using Clock = std::chrono::steady_clock;

struct Config {
  std::string model;
  int global_batch = 0;    // 0: batch_per_rank * ranks
  int batch_per_rank = 0;  // used when global_batch is 0
  int warmup = 3;
  int iters = 10;
  int repeat = 1;
  std::vector<std::size_t> bucket_caps;
  bool zero = false;  // ZeRO-1 rows instead of DDP rows
  std::string json_path;

  int batch_for(int ranks) const {
    return global_batch > 0 ? global_batch / ranks : batch_per_rank;
  }
};

struct StepTimes {
  double forward = 0, backward = 0, sync = 0, exposed = 0, optimizer = 0, step = 0;
};

struct Row {
  std::string name;
  int ranks = 1;
  int batch_per_rank = 0;
  std::string overlap = "-";
  std::size_t bucket_cap = 0;  // 0: no DDP
  int buckets = 0;
  StepTimes t;
  double samples_per_s = 0;
  double hidden = -1;  // share of the all-reduce time hidden by overlap; -1: n/a
};

// A model, its forward, and the shape of one input sample.
struct Model {
  std::shared_ptr<torch::nn::Module> module;
  std::function<torch::Tensor(const torch::Tensor&)> forward;
  std::vector<std::int64_t> sample_shape;
};

Model make_model(const std::string& name) {
  torch::manual_seed(42);  // the same weights on every rank and for every row
  if (name == "mlp") {
    torch::nn::Sequential mlp(torch::nn::Linear(784, 4096), torch::nn::ReLU(),
                              torch::nn::Linear(4096, 4096), torch::nn::ReLU(),
                              torch::nn::Linear(4096, 4096), torch::nn::ReLU(),
                              torch::nn::Linear(4096, 10));
    return {mlp.ptr(), [mlp](const torch::Tensor& x) mutable { return mlp->forward(x); }, {784}};
  }
  if (name == "resnet20") {
    auto net = dtrain::resnet::make_resnet("resnet20", 1, 10);
    return {
        net.ptr(), [net](const torch::Tensor& x) mutable { return net->forward(x); }, {1, 28, 28}};
  }
  DTRAIN_THROW(dtrain::InvalidArgument, "unknown --model '", name, "' (mlp, resnet20)");
}

double max_over_ranks(double value) {
  double out = value;
  MPI_Allreduce(&value, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

// A barrier that sleeps instead of spinning, so that idle ranks leave the
// cores to the ranks being measured.
void sleeping_barrier() {
  MPI_Request request;
  MPI_Ibarrier(MPI_COMM_WORLD, &request);
  int done = 0;
  while (true) {
    MPI_Test(&request, &done, MPI_STATUS_IGNORE);
    if (done) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// Runs warm-up + timed steps with `ddp` or `zero` (at most one; neither: the
// plain LibTorch loop).
StepTimes train(Model& model, DistributedDataParallel* ddp, ZeroRedundancyOptimizer* zero,
                int batch, int rank, const Config& c, int* buckets) {
  torch::manual_seed(1000 + rank);
  std::vector<std::int64_t> shape = model.sample_shape;
  shape.insert(shape.begin(), batch);
  constexpr int kBatches = 4;  // cycled, so the loop does no data work
  std::vector<torch::Tensor> inputs, targets;
  for (int i = 0; i < kBatches; ++i) {
    inputs.push_back(torch::randn(shape));
    targets.push_back(torch::randint(0, 10, {batch}, torch::kLong));
  }
  torch::optim::SGD optimizer(model.module->parameters(),
                              torch::optim::SGDOptions(0.01).momentum(0.9));
  model.module->train();
  StepTimes sum;
  for (int step = 0; step < c.warmup + c.iters; ++step) {
    const bool timed = step >= c.warmup;
    const auto t0 = Clock::now();
    if (zero) {
      zero->zero_grad();
    } else if (ddp) {
      ddp->zero_grad();
    } else {
      optimizer.zero_grad();
    }
    const auto t1 = Clock::now();
    auto loss = torch::nn::functional::cross_entropy(model.forward(inputs[step % kBatches]),
                                                     targets[step % kBatches]);
    const auto t2 = Clock::now();
    loss.backward();
    const auto t3 = Clock::now();
    if (ddp) ddp->synchronize();
    const auto t4 = Clock::now();
    if (zero) {
      zero->step();
    } else {
      optimizer.step();
    }
    const auto t5 = Clock::now();
    if (!timed) continue;
    using D = std::chrono::duration<double>;
    sum.forward += D(t2 - t1).count();
    sum.backward += D(t3 - t2).count();
    sum.sync += D(t4 - t3).count();
    sum.exposed += ddp ? ddp->last_step_stats().exposed_comm_seconds : 0.0;
    sum.optimizer += D(t1 - t0).count() + D(t5 - t4).count();
    sum.step += D(t5 - t0).count();
  }
  if (ddp && buckets) *buckets = ddp->last_step_stats().buckets;
  const double n = c.iters;
  return {sum.forward / n, sum.backward / n,  sum.sync / n,
          sum.exposed / n, sum.optimizer / n, sum.step / n};
}

// One row: every rank of `comm` trains (comm null: plain LibTorch on rank 0)
// with DDP (`ddp_options`), ZeRO-1 (`zero`) or neither; ranks outside it
// wait asleep. Times are the slowest participating rank's.
Row measure(const std::string& name, const std::shared_ptr<Communicator>& comm, bool participates,
            int ranks, const DdpOptions* ddp_options, bool zero, int rank, const Config& c) {
  Row row;
  row.name = name;
  row.ranks = ranks;
  row.batch_per_rank = c.batch_for(ranks);
  if (ddp_options) {
    row.overlap = ddp_options->overlap ? "on" : "off";
    row.bucket_cap = ddp_options->bucket_cap_bytes;
  }
  StepTimes local;
  if (participates) {
    Model model = make_model(c.model);
    if (ddp_options) {
      DistributedDataParallel ddp(model.module, comm, *ddp_options);
      local = train(model, &ddp, nullptr, row.batch_per_rank, rank, c, &row.buckets);
    } else if (zero) {
      // The DDP rows' optimizer, its state sharded over the ranks.
      ZeroRedundancyOptimizer optimizer(model.module, comm, [](std::vector<torch::Tensor> shard) {
        return std::make_unique<torch::optim::SGD>(shard,
                                                   torch::optim::SGDOptions(0.01).momentum(0.9));
      });
      local = train(model, nullptr, &optimizer, row.batch_per_rank, rank, c, nullptr);
    } else {
      local = train(model, nullptr, nullptr, row.batch_per_rank, rank, c, nullptr);
    }
  }
  sleeping_barrier();
  row.t.forward = max_over_ranks(local.forward);
  row.t.backward = max_over_ranks(local.backward);
  row.t.sync = max_over_ranks(local.sync);
  row.t.exposed = max_over_ranks(local.exposed);
  row.t.optimizer = max_over_ranks(local.optimizer);
  row.t.step = max_over_ranks(local.step);
  int buckets = row.buckets;
  MPI_Allreduce(MPI_IN_PLACE, &buckets, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  row.buckets = buckets;
  row.samples_per_s = row.batch_per_rank * ranks / row.t.step;
  return row;
}

std::vector<std::size_t> parse_caps(const std::string& text) {
  std::vector<std::size_t> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (item.empty()) continue;
    const double mib = std::stod(item);
    DTRAIN_CHECK_ARG(mib > 0, "--bucket-mib: sizes must be > 0, got '", item, "'");
    out.push_back(static_cast<std::size_t>(mib * (1 << 20)));
  }
  DTRAIN_CHECK_ARG(!out.empty(), "--bucket-mib needs at least one size");
  return out;
}

void print_table(const std::vector<Row>& rows, const Config& c, std::int64_t params, int world) {
  std::printf(
      "# ddp_perf  model %s (%.2fM parameters)  world %d  warm-up %d  iters %d  repeat %d  "
      "threads %d\n",
      c.model.c_str(), params / 1e6, world, c.warmup, c.iters, c.repeat, at::get_num_threads());
  std::printf("# times in ms per step (slowest rank's mean); sync = ddp.synchronize() wait\n");
  std::printf("%-9s %5s %6s %7s %9s %7s %9s %9s %9s %9s %9s %10s %7s\n", "# row", "ranks", "batch",
              "overlap", "bucket", "buckets", "forward", "backward", "sync", "optim", "step",
              "samples/s", "hidden");
  for (const Row& r : rows) {
    const std::string bucket = r.bucket_cap ? dtrain::bench::format_bytes(r.bucket_cap) : "-";
    char hidden[16] = "-";
    if (r.hidden >= 0) std::snprintf(hidden, sizeof(hidden), "%.0f%%", 100 * r.hidden);
    std::printf("%-9s %5d %6d %7s %9s %7d %9.1f %9.1f %9.1f %9.1f %9.1f %10.1f %7s\n",
                r.name.c_str(), r.ranks, r.batch_per_rank, r.overlap.c_str(), bucket.c_str(),
                r.buckets, 1e3 * r.t.forward, 1e3 * r.t.backward, 1e3 * r.t.sync,
                1e3 * r.t.optimizer, 1e3 * r.t.step, r.samples_per_s, hidden);
  }
  if (c.zero) {
    if (rows.size() == 3 && rows[1].t.step > 0) {
      std::printf(
          "# ZeRO-1, reduce-scatter + all-gather over shared memory vs the ring: %.2fx the step "
          "time, %.2fx the optimizer time (incl. both collectives)\n",
          rows[2].t.step / rows[1].t.step, rows[2].t.optimizer / rows[1].t.optimizer);
    }
  } else if (rows.size() >= 2 && rows[0].t.step > 0) {
    std::printf("# DDP on 1 rank vs plain LibTorch: %+.1f%% step time\n",
                100 * (rows[1].t.step / rows[0].t.step - 1));
  }
}

nlohmann::json to_json(const std::vector<Row>& rows, const Config& c, std::int64_t params,
                       int world) {
  nlohmann::json doc = {{"benchmark", "ddp_perf"},
                        {"framework", "dtrain"},
                        {"model", c.model},
                        {"parameters", params},
                        {"world_size", world},
                        {"warmup", c.warmup},
                        {"iters", c.iters},
                        {"repeat", c.repeat},
                        {"threads", at::get_num_threads()},
                        {"rows", nlohmann::json::array()}};
  for (const Row& r : rows) {
    doc["rows"].push_back(
        {{"name", r.name},
         {"ranks", r.ranks},
         {"batch_per_rank", r.batch_per_rank},
         {"overlap", r.overlap},
         {"bucket_cap_bytes", r.bucket_cap},
         {"buckets", r.buckets},
         {"forward_ms", 1e3 * r.t.forward},
         {"backward_ms", 1e3 * r.t.backward},
         {"sync_ms", 1e3 * r.t.sync},
         {"exposed_comm_ms", 1e3 * r.t.exposed},
         {"optimizer_ms", 1e3 * r.t.optimizer},
         {"step_ms", 1e3 * r.t.step},
         {"samples_per_s", r.samples_per_s},
         {"hidden_fraction", r.hidden >= 0 ? nlohmann::json(r.hidden) : nlohmann::json(nullptr)}});
  }
  return doc;
}

}  // namespace

int main(int argc, char** argv) {
  dtrain::Runtime runtime(&argc, &argv);
  cxxopts::Options cli("ddp_perf", "DistributedDataParallel step time vs plain LibTorch");
  cli.add_options()("model", "mlp or resnet20",
                    cxxopts::value<std::string>()->default_value("mlp"))(
      "global-batch", "global batch (default: 128 for resnet20; split over the ranks)",
      cxxopts::value<int>()->default_value("0"))("batch-per-rank",
                                                 "samples per rank (default: 64 for mlp)",
                                                 cxxopts::value<int>()->default_value("0"))(
      "w,warmup_iters", "warm-up steps per row", cxxopts::value<int>()->default_value("3"))(
      "n,iters", "timed steps per row", cxxopts::value<int>()->default_value("10"))(
      "r,repeat", "run every row this many times (round-robin), keep each row's fastest",
      cxxopts::value<int>()->default_value("1"))(
      "bucket-mib", "bucket caps to sweep, in MiB",
      cxxopts::value<std::string>()->default_value("1,5,25,100"))(
      "zero",
      "ZeRO-1 rows instead of DDP rows: reduce-scatter and all-gather over the ring and over "
      "shared memory",
      cxxopts::value<bool>()->default_value("false"))("threads", "intra-op threads per rank",
                                                      cxxopts::value<int>()->default_value("1"))(
      "json", "also write the results to this JSON file",
      cxxopts::value<std::string>()->default_value(""))("h,help", "print this help");
  Config c;
  try {
    auto parsed = dtrain::cli::parse(cli, argc, argv);
    if (parsed.count("help")) {
      if (runtime.rank() == 0) std::cout << cli.help() << std::endl;
      return 0;
    }
    c.model = parsed["model"].as<std::string>();
    c.global_batch = parsed["global-batch"].as<int>();
    c.batch_per_rank = parsed["batch-per-rank"].as<int>();
    if (c.global_batch == 0 && c.batch_per_rank == 0) {
      if (c.model == "resnet20")
        c.global_batch = 128;
      else
        c.batch_per_rank = 64;
    }
    DTRAIN_CHECK_ARG(c.global_batch == 0 || c.batch_per_rank == 0,
                     "give --global-batch or --batch-per-rank, not both");
    DTRAIN_CHECK_ARG(c.global_batch % runtime.size() == 0 && c.global_batch >= 0, "--global-batch ",
                     c.global_batch, " is not divisible by the ", runtime.size(), " ranks");
    c.warmup = parsed["warmup_iters"].as<int>();
    c.iters = parsed["iters"].as<int>();
    DTRAIN_CHECK_ARG(c.iters >= 1 && c.warmup >= 0, "-n must be >= 1, -w >= 0");
    c.repeat = parsed["repeat"].as<int>();
    DTRAIN_CHECK_ARG(c.repeat >= 1, "--repeat must be >= 1");
    c.bucket_caps = parse_caps(parsed["bucket-mib"].as<std::string>());
    c.zero = parsed["zero"].as<bool>();
    c.json_path = parsed["json"].as<std::string>();
    const int threads = parsed["threads"].as<int>();
    DTRAIN_CHECK_ARG(threads >= 1, "--threads must be >= 1");
    at::set_num_threads(threads);
    make_model(c.model);  // rejects an unknown name before any work
  } catch (const std::exception& e) {
    if (runtime.rank() == 0) std::cerr << "ddp_perf: " << e.what() << "\n";
    return 2;
  }

  const int rank = runtime.rank();
  const int world = runtime.size();
  auto world_comm = runtime.world();
  // Rank 0 alone, for the 1-rank DDP row (split is collective over world).
  auto solo = world_comm->split(rank == 0 ? 0 : 1, rank);
  const std::int64_t params = dtrain::resnet::parameter_count(*make_model(c.model).module);

  // Each row is a (name, communicator, participates, ranks, options) spec;
  // with --repeat R the whole list runs R times round-robin and each row
  // keeps its fastest run (this machine is shared: the best run is the one
  // least disturbed by others).
  struct Spec {
    std::string name;
    std::shared_ptr<Communicator> comm;
    bool participates;
    int ranks;
    std::optional<DdpOptions> options;
    bool zero = false;
  };
  std::vector<Spec> specs;
  // The 1-process rows run what one rank would in a 1-rank job: the whole
  // global batch (resnet20), or the same batch per rank (mlp).
  specs.push_back({"libtorch", nullptr, rank == 0, 1, std::nullopt});
  std::shared_ptr<Communicator> no_shm;
  if (c.zero) {
    // Without shared memory the reduce-scatter and all-gather run the ring
    // (what they ran before they had a shared-memory path).
    dtrain::collectives::CommunicatorOptions ring_options = world_comm->options();
    ring_options.name = "world-no-shm";
    ring_options.shm_slot_bytes = 0;
    no_shm = runtime.world(ring_options);
    specs.push_back({"zero/ring", no_shm, true, world, std::nullopt, true});
    specs.push_back({"zero/shm", world_comm, true, world, std::nullopt, true});
  } else {
    specs.push_back({"ddp", solo, rank == 0, 1, DdpOptions{}});
  }
  if (world > 1 && !c.zero) {
    for (std::size_t cap : c.bucket_caps) {
      for (bool overlap : {true, false}) {
        DdpOptions options;
        options.overlap = overlap;
        options.bucket_cap_bytes = cap;
        options.first_bucket_cap_bytes = std::min(cap, options.first_bucket_cap_bytes);
        specs.push_back({"ddp", world_comm, true, world, options});
      }
    }
  }
  std::vector<Row> rows(specs.size());
  for (int rep = 0; rep < c.repeat; ++rep) {
    for (std::size_t i = 0; i < specs.size(); ++i) {
      const Spec& spec = specs[i];
      Row row = measure(spec.name, spec.comm, spec.participates, spec.ranks,
                        spec.options ? &*spec.options : nullptr, spec.zero, rank, c);
      if (rep == 0 || row.t.step < rows[i].t.step) rows[i] = row;
    }
  }
  // Overlap-on rows are followed by the overlap-off row of the same cap.
  for (std::size_t i = 2; !c.zero && i + 1 < rows.size(); i += 2) {
    if (rows[i + 1].t.sync > 0) {
      rows[i].hidden = std::max(0.0, 1 - rows[i].t.sync / rows[i + 1].t.sync);
    }
  }
  if (rank == 0) {
    print_table(rows, c, params, world);
    try {
      dtrain::bench::write_json(c.json_path, to_json(rows, c, params, world));
    } catch (const std::exception& e) {
      std::cerr << "ddp_perf: " << e.what() << "\n";
      return 1;
    }
  }
  return 0;
}
