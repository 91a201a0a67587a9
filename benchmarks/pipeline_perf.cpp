// pipeline_perf: the pipeline engine's bubble, memory and throughput on real
// ranks.
//
//   mpiexec -n 4 pipeline_perf --table bubble      # sleeping stages, p = 4
//   mpiexec -n 2 pipeline_perf --table memory      # GPipe vs 1F1B, deallocation
//   mpiexec -n 2 pipeline_perf --table throughput  # pp=2 1F1B vs dp=2 DDP
//   mpiexec -n 2 pipeline_perf --table compute     # the bubble with real compute
//
// bubble: every stage is one layer that sleeps (F = --f-ms, B = --b-ms, of
// which half is the input gradient and half the weight gradient, so ZB-H1's
// I and W each take B/2). Sleeping takes no CPU, so p ranks on 2 cores stand
// in for p devices. The idle fraction is measured from the per-action trace:
// 1 - (sum of every rank's compute time) / (p x step length), the step
// running from the earliest rank's entry into step() to the latest compute
// end, averaged over the timed steps; next to it the formula of
// generators.h. The last rows compare ZB-H1 with 1F1B at m = 4.
//
// memory: stages of elementwise layers whose boundary tensor is --act-mib per
// microbatch; the peak heap bytes in use (glibc, after each action) above the
// step's start, per rank, for GPipe and 1F1B, with and without releasing sent
// outputs, and with deallocation but without posting receives ahead
// (PipelineOptions::receive_ahead; "ahead" column), the engine before it.
//
// throughput: an MLP at equal global batch (stages cut by parameter count
// unless --partition uniform): pp = 2 with 1F1B and m
// microbatches against dp = 2 with DistributedDataParallel, alternating
// every --block steps within each round, samples per second per round; then per rank where a step's
// time went (ms per step, over all timed steps): pp_step = the engine's step, pp_compute its F/B
// time, pp_wait the compute actions' waits for their input, pp_rest the remainder (posting
// messages, waiting for sends at the end, bookkeeping); dp_compute forward + backward, dp_sync
// DDP's wait for its all-reduce; *_opt the optimizer.
//
// compute: the bubble of GPipe and 1F1B with stages that compute (--layers
// Linear + ReLU layers of --width per stage, --rows rows per microbatch, one
// intra-op thread), so one rank per core: p = 2 on this machine. Measured
// as for `bubble`, next to the formula; each rank's mean forward and
// backward time of a microbatch in the last step are printed too (the issue
// asks for >= 10 ms per microbatch; the formula assumes equal stages), and
// the last step's measured idle fraction next to the schedule simulated with
// that step's own action times ("simulated": what the schedule gives with
// the compute the machine delivered; "engine": the points the engine and
// its messages added to it).
//
// --trace PREFIX writes each rank's trace of the last timed step of every
// bubble row to PREFIX-<schedule>-m<m>-rank<r>.csv (scripts/pipeline_timeline.py).

#include <torch/torch.h>
#include <cxxopts.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "dtrain/parallel/distributed_data_parallel.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/pipeline/engine.h"
#include "dtrain/parallel/pipeline/simulator.h"
#include "dtrain/runtime.h"
#include "src/cli/cli.h"
#include "src/common/torch_compat.h"

namespace {

using dtrain::parallel::ParallelContext;
using namespace dtrain::parallel::pipeline;
using Clock = std::chrono::steady_clock;

double now_seconds() {
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

void sleep_ms(double ms) {
  if (ms > 0) std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(ms));
}

// y = x * scale, sleeping f_ms in forward, i_ms for the input's gradient and
// w_ms for the scale's: a stage whose costs are known exactly.
struct SleepFunction : torch::autograd::Function<SleepFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor x,
                               torch::Tensor scale, double f_ms, double i_ms, double w_ms) {
    ctx->save_for_backward({x, scale});
    ctx->saved_data["i"] = i_ms;
    ctx->saved_data["w"] = w_ms;
    sleep_ms(f_ms);
    return x * scale;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    torch::Tensor gx, gscale;
    if (ctx->needs_input_grad(0)) {
      sleep_ms(ctx->saved_data["i"].toDouble());
      gx = grads[0] * saved[1];
    }
    if (ctx->needs_input_grad(1)) {
      sleep_ms(ctx->saved_data["w"].toDouble());
      gscale = (grads[0] * saved[0]).sum().reshape({1});
    }
    return {gx, gscale, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

struct SleepLayerImpl : torch::nn::Module {
  SleepLayerImpl(double f, double i, double w) : f_ms(f), i_ms(i), w_ms(w) {
    scale = register_parameter("scale", torch::ones({1}));
  }
  torch::Tensor forward(torch::Tensor x) {
    return dtrain::detail::apply_autograd_function<SleepFunction>(x, scale, f_ms, i_ms, w_ms);
  }
  double f_ms, i_ms, w_ms;
  torch::Tensor scale;
};
TORCH_MODULE(SleepLayer);

// x * weight (weight over the last dimension): saves x, cheap.
struct ScaleImpl : torch::nn::Module {
  explicit ScaleImpl(int64_t features) {
    weight = register_parameter("weight", torch::full({features}, 0.9));
  }
  torch::Tensor forward(torch::Tensor x) { return x * weight; }
  torch::Tensor weight;
};
TORCH_MODULE(Scale);

torch::Tensor square_loss(const torch::Tensor& out, const torch::Tensor&) {
  return out.square().mean();
}
torch::Tensor ce_loss(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::nn::functional::cross_entropy(out, target);
}

struct StepTiming {
  double idle_fraction = 0;
  double step_seconds = 0;
  // The last timed step's.
  double last_idle_fraction = 0;
};

// Runs warmup + iters steps; measures the bubble from the traces.
std::string format_ms(double ms) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f", ms);
  return text;
}

StepTiming timed_steps(PipelineEngine& engine, const ParallelContext& ctx, const torch::Tensor& x,
                       const torch::Tensor& y, const LossFunction& loss, int warmup, int iters) {
  auto world = ctx.world();
  StepTiming out;
  for (int i = 0; i < warmup + iters; ++i) {
    world->barrier()->wait();
    const double entry = now_seconds();
    engine.step(x, y, loss);
    double busy = 0, last_end = entry;
    for (const ActionRecord& r : engine.last_trace()) {
      if (!r.action.is_compute()) continue;
      busy += r.end_seconds - r.start_seconds;
      last_end = std::max(last_end, r.end_seconds);
    }
    // Per rank: -entry (for the min), last end, busy.
    torch::Tensor mine = torch::tensor({-entry, last_end, busy}, torch::kDouble);
    torch::Tensor all = torch::empty({world->size(), 3}, torch::kDouble);
    world->all_gather(all, mine)->wait();
    if (i < warmup) continue;
    const double start = -all.select(1, 0).max().item<double>();
    const double end = all.select(1, 1).max().item<double>();
    const double total_busy = all.select(1, 2).sum().item<double>();
    const double length = end - start;
    out.last_idle_fraction = 1.0 - total_busy / (world->size() * length);
    out.idle_fraction += out.last_idle_fraction;
    out.step_seconds += length;
  }
  out.idle_fraction /= iters;
  out.step_seconds /= iters;
  return out;
}

double formula(ScheduleKind kind, int p, int m, int v) {
  switch (kind) {
    case ScheduleKind::kInterleaved:
      return (p - 1.0) / (v * m + p - 1.0);
    case ScheduleKind::kZeroBubbleH1:
      return (p - 1.0) / (3.0 * m + p - 1.0);
    default:
      return (p - 1.0) / (m + p - 1.0);
  }
}

void write_trace(const std::string& prefix, const std::string& row, const PipelineEngine& engine,
                 int rank) {
  if (prefix.empty()) return;
  std::ofstream out(prefix + "-" + row + "-rank" + std::to_string(rank) + ".csv");
  out << trace_to_csv(engine.last_trace(), rank);
}

void bubble_table(std::shared_ptr<dtrain::collectives::Communicator> world, double f_ms,
                  double b_ms, int warmup, int iters, const std::string& trace) {
  const int p = world->size();
  ParallelContext ctx(world, 1, p);
  if (world->rank() == 0) {
    std::printf("# bubble: p = %d, F = %.0f ms, B = %.0f ms (I = W = %.0f ms), %d timed steps\n", p,
                f_ms, b_ms, b_ms / 2, iters);
    std::printf("%-12s %3s %3s %10s %10s %8s %10s\n", "schedule", "v", "m", "measured", "formula",
                "points", "step_s");
  }
  struct Row {
    ScheduleKind kind;
    int v, m;
  };
  std::vector<Row> rows;
  for (int m : {4, 8, 16}) rows.push_back({ScheduleKind::kGPipe, 1, m});
  for (int m : {4, 8, 16}) rows.push_back({ScheduleKind::kOneFOneB, 1, m});
  for (int m : {4, 8, 16}) rows.push_back({ScheduleKind::kInterleaved, 2, m});
  for (int m : {4, 8, 16}) rows.push_back({ScheduleKind::kZeroBubbleH1, 1, m});
  double zb4 = 0, ofob4 = 0;
  for (const Row& row : rows) {
    if (row.kind == ScheduleKind::kInterleaved && row.m % p != 0) continue;
    if (row.kind == ScheduleKind::kZeroBubbleH1 && row.m < p) continue;
    const int stages = p * row.v;
    torch::nn::Sequential model;
    for (int s = 0; s < stages; ++s) model->push_back(SleepLayer(f_ms, b_ms / 2, b_ms / 2));
    const auto layers = layers_of(model);
    const auto partition = partition_uniform(stages, stages);
    PipelineOptions options;
    options.schedule.kind = row.kind;
    options.schedule.num_microbatches = row.m;
    options.schedule.stages_per_rank = row.v;
    options.stage_input_shapes.assign(stages, {4});
    PipelineEngine engine(layers, partition, ctx, options);
    // The input requires grad so that stage 0's backward also computes (and
    // sleeps for) an input gradient, like every other stage.
    const torch::Tensor x = torch::randn({row.m, 4}).requires_grad_(true);
    const StepTiming t = timed_steps(engine, ctx, x, torch::Tensor(), square_loss, warmup, iters);
    const double want = formula(row.kind, p, row.m, row.v);
    if (row.m == 4 && row.kind == ScheduleKind::kZeroBubbleH1) zb4 = t.step_seconds;
    if (row.m == 4 && row.kind == ScheduleKind::kOneFOneB) ofob4 = t.step_seconds;
    const std::string name = schedule_kind_name(row.kind);
    write_trace(trace, name + "-m" + std::to_string(row.m), engine, world->rank());
    if (world->rank() == 0) {
      std::printf("%-12s %3d %3d %10.4f %10.4f %+8.2f %10.3f\n", name.c_str(), row.v, row.m,
                  t.idle_fraction, want, 100 * (t.idle_fraction - want), t.step_seconds);
    }
  }
  if (world->rank() == 0 && zb4 > 0 && ofob4 > 0) {
    std::printf("zb-h1 vs 1f1b at m = 4: step %.3f s vs %.3f s, throughput %.3fx\n", zb4, ofob4,
                ofob4 / zb4);
  }
}

void memory_table(std::shared_ptr<dtrain::collectives::Communicator> world, double act_mib, int m,
                  int warmup, int iters) {
  const int p = world->size();
  ParallelContext ctx(world, 1, p);
  const int64_t features = 1024;
  const int64_t rows = static_cast<int64_t>(act_mib * (1 << 20) / (4.0 * features));
  const double act_bytes = static_cast<double>(rows * features * 4);
  if (world->rank() == 0) {
    std::printf("# memory: p = %d, m = %d, %.1f MiB per microbatch at each stage boundary\n", p, m,
                act_bytes / (1 << 20));
    std::printf("%-8s %-8s %-6s %5s %14s %14s %14s\n", "schedule", "dealloc", "ahead", "rank",
                "peak_MiB", "sent_MiB", "released_MiB");
  }
  torch::nn::Sequential model;
  for (int s = 0; s < p; ++s) {
    model->push_back(Scale(features));
    model->push_back(torch::nn::Tanh());
    model->push_back(Scale(features));
  }
  const auto layers = layers_of(model);
  const auto partition = partition_uniform(static_cast<int>(layers.size()), p);
  const torch::Tensor x = torch::randn({rows * m, features});
  double peak[2][2] = {{0, 0}, {0, 0}};  // [gpipe?][dealloc?] on this rank, receiving ahead
  double peak_not_ahead[2] = {0, 0};     // [gpipe?] deallocating, not receiving ahead
  for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB}) {
    for (const auto& [dealloc, ahead] :
         {std::pair<bool, bool>{true, true}, {false, true}, {true, false}}) {
      PipelineOptions options;
      options.receive_ahead = ahead;
      options.schedule.kind = kind;
      options.schedule.num_microbatches = m;
      options.stage_input_shapes = stage_input_shapes(layers, partition, x.narrow(0, 0, 1));
      options.deallocate_sent_outputs = dealloc;
      options.record_memory = true;
      PipelineEngine engine(layers, partition, ctx, options);
      double best = 1e300;
      PipelineStepStats stats;
      for (int i = 0; i < warmup + iters; ++i) {
        engine.step(x, torch::Tensor(), square_loss);
        if (i < warmup) continue;
        stats = engine.last_stats();
        best =
            std::min(best, static_cast<double>(stats.peak_heap_bytes - stats.heap_bytes_at_start));
      }
      (ahead ? peak[kind == ScheduleKind::kGPipe][dealloc]
             : peak_not_ahead[kind == ScheduleKind::kGPipe]) = best;
      for (int r = 0; r < p; ++r) {
        world->barrier()->wait();
        if (r != world->rank()) continue;
        std::printf("%-8s %-8s %-6s %5d %14.1f %14.1f %14.1f\n", schedule_kind_name(kind),
                    dealloc ? "on" : "off", ahead ? "on" : "off", r, best / (1 << 20),
                    stats.sent_output_bytes / double(1 << 20),
                    stats.deallocated_bytes / double(1 << 20));
        std::fflush(stdout);
      }
    }
  }
  for (int r = 0; r < p; ++r) {
    world->barrier()->wait();
    if (r != world->rank()) continue;
    std::printf(
        "rank %d: gpipe - 1f1b peak = %.1f MiB (0.8 (m-p) x activation = %.1f MiB); "
        "deallocation saved %.1f MiB in gpipe, %.1f MiB in 1f1b (%.1f, %.1f without receiving "
        "ahead)\n",
        r, (peak[1][1] - peak[0][1]) / (1 << 20), 0.8 * (m - p) * act_bytes / (1 << 20),
        (peak[1][0] - peak[1][1]) / (1 << 20), (peak[0][0] - peak[0][1]) / (1 << 20),
        (peak[1][0] - peak_not_ahead[1]) / (1 << 20), (peak[0][0] - peak_not_ahead[0]) / (1 << 20));
    std::fflush(stdout);
  }
}

void compute_table(std::shared_ptr<dtrain::collectives::Communicator> world, int width, int rows,
                   int layers_per_stage, int warmup, int iters) {
  const int p = world->size();
  ParallelContext ctx(world, 1, p);
  if (world->rank() == 0) {
    std::printf(
        "# compute: p = %d, %d x Linear(%d, %d) + ReLU per stage, %d rows per microbatch, "
        "%d timed steps\n",
        p, layers_per_stage, width, width, rows, iters);
    std::printf("%-12s %3s %10s %10s %8s %10s %12s %12s %10s %10s %8s\n", "schedule", "m",
                "measured", "formula", "points", "step_s", "F_ms/rank", "B_ms/rank", "last_step",
                "simulated", "engine");
  }
  for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB}) {
    for (int m : {4, 8, 16}) {
      torch::manual_seed(7);
      torch::nn::Sequential model;
      for (int l = 0; l < p * layers_per_stage; ++l) {
        model->push_back(torch::nn::Linear(width, width));
        model->push_back(torch::nn::ReLU());
      }
      const auto layers = layers_of(model);
      const auto partition = partition_uniform(static_cast<int>(layers.size()), p);
      PipelineOptions options;
      options.schedule.kind = kind;
      options.schedule.num_microbatches = m;
      options.stage_input_shapes.assign(p, {width});
      PipelineEngine engine(layers, partition, ctx, options);
      // Stage 0's input requires grad, so its backward computes the same
      // products as the other stages' (as in the bubble table).
      const torch::Tensor x =
          torch::randn({static_cast<std::int64_t>(rows) * m, width}).requires_grad_(true);
      const StepTiming t = timed_steps(engine, ctx, x, torch::Tensor(), square_loss, warmup, iters);
      // This rank's mean forward and backward time per microbatch (last step).
      double forward = 0, backward = 0;
      int forwards = 0, backwards = 0;
      for (const ActionRecord& r : engine.last_trace()) {
        if (r.action.kind == ActionKind::kForward) {
          forward += r.end_seconds - r.start_seconds;
          ++forwards;
        } else if (r.action.kind == ActionKind::kBackward) {
          backward += r.end_seconds - r.start_seconds;
          ++backwards;
        }
      }
      torch::Tensor mine = torch::tensor(
          {1e3 * forward / std::max(forwards, 1), 1e3 * backward / std::max(backwards, 1)},
          torch::kDouble);
      torch::Tensor all = torch::empty({world->size(), 2}, torch::kDouble);
      world->all_gather(all, mine)->wait();
      const double want = formula(kind, p, m, 1);
      // The schedule simulated with the last step's own action times (each
      // rank's F and B of each microbatch as measured, messages free): the
      // idle fraction the schedule gives with the compute this machine
      // delivered, unequal stages and slow actions included. The measured
      // idle fraction of that step minus this one is what the engine and its
      // messages added.
      const std::int64_t slots = 2 * m;
      torch::Tensor costs = torch::full({slots, 3}, -1.0, torch::kDouble);
      std::int64_t n = 0;
      for (const ActionRecord& r : engine.last_trace()) {
        if (!r.action.is_compute() || n == slots) continue;
        costs[n][0] = static_cast<double>(static_cast<int>(r.action.kind));
        costs[n][1] = r.action.microbatch;
        costs[n][2] = r.end_seconds - r.start_seconds;
        ++n;
      }
      torch::Tensor all_costs = torch::empty({world->size(), slots, 3}, torch::kDouble);
      world->all_gather(all_costs, costs)->wait();
      if (world->rank() == 0) {
        SimulationOptions sim;
        sim.cost = [&](int rank, const Action& a) {
          if (!a.is_compute()) return 0.0;
          for (std::int64_t i = 0; i < slots; ++i) {
            const auto row = all_costs[rank][i];
            if (row[0].item<double>() == static_cast<int>(a.kind) &&
                row[1].item<double>() == a.microbatch) {
              return row[2].item<double>();
            }
          }
          return 0.0;
        };
        const double simulated = simulate(engine.schedule(), sim).idle_fraction;
        std::string f_ms, b_ms;
        for (int r = 0; r < world->size(); ++r) {
          f_ms += (r ? "/" : "") + format_ms(all[r][0].item<double>());
          b_ms += (r ? "/" : "") + format_ms(all[r][1].item<double>());
        }
        std::printf("%-12s %3d %10.4f %10.4f %+8.2f %10.3f %12s %12s %10.4f %10.4f %+8.2f\n",
                    schedule_kind_name(kind), m, t.idle_fraction, want,
                    100 * (t.idle_fraction - want), t.step_seconds, f_ms.c_str(), b_ms.c_str(),
                    t.last_idle_fraction, simulated, 100 * (t.last_idle_fraction - simulated));
        std::fflush(stdout);
      }
    }
  }
}

torch::nn::Sequential make_mlp(int width, int layers_count, int classes) {
  torch::manual_seed(3);
  torch::nn::Sequential model;
  for (int i = 0; i < layers_count; ++i) {
    model->push_back(torch::nn::Linear(width, width));
    model->push_back(torch::nn::ReLU());
  }
  model->push_back(torch::nn::Linear(width, classes));
  return model;
}

void throughput_table(std::shared_ptr<dtrain::collectives::Communicator> world, int m,
                      int global_batch, int width, int rounds, int warmup, int iters,
                      const std::string& cut, int block) {
  const int n = world->size();
  DTRAIN_CHECK_ARG(global_batch % (n * m) == 0, "--global-batch must be a multiple of ranks x m");
  DTRAIN_CHECK_ARG(block >= 1, "--block must be >= 1, got ", block);
  torch::manual_seed(5);
  const torch::Tensor x = torch::randn({global_batch, width});
  const torch::Tensor y = torch::randint(0, 10, {global_batch}, torch::kLong);
  // pp = n: every rank sees the whole global batch in m microbatches.
  ParallelContext pp_ctx(world, 1, n);
  auto pp_model = make_mlp(width, 8, 10);
  const auto layers = layers_of(pp_model);
  // By parameters (the default), each stage gets half the Linear layers; the
  // uniform cut by layer count gives the last stage one Linear more; by time,
  // what the layers' measured forward + backward times balance.
  DTRAIN_CHECK_ARG(cut == "params" || cut == "uniform" || cut == "time",
                   "--partition: '" + cut + "' is not one of params, uniform, time");
  StagePartition partition;
  if (cut == "time") {
    // Each layer's forward + backward on a microbatch (partition_by_time's
    // measurement), averaged over the ranks so that every rank cuts alike.
    torch::Tensor times = torch::tensor(
        measure_layer_times(layers, {x.narrow(0, 0, global_batch / m)}), torch::kDouble);
    dtrain::collectives::AllReduceOptions average;
    average.op = dtrain::collectives::ReduceOp::kAvg;
    world->all_reduce(times, average)->wait();
    partition = partition_balanced(
        std::vector<double>(times.data_ptr<double>(), times.data_ptr<double>() + times.numel()), n);
  } else {
    partition = cut == "params" ? partition_balanced(parameter_counts(layers), n)
                                : partition_uniform(static_cast<int>(layers.size()), n);
  }
  PipelineOptions options;
  options.schedule.kind = ScheduleKind::kOneFOneB;
  options.schedule.num_microbatches = m;
  options.stage_input_shapes = stage_input_shapes(layers, partition, x.narrow(0, 0, 1));
  PipelineEngine engine(layers, partition, pp_ctx, options);
  torch::optim::SGD pp_sgd(engine.parameters(), 0.01);
  // dp = n: each rank its slice, DDP.
  auto dp_model = make_mlp(width, 8, 10);
  dtrain::parallel::DistributedDataParallel ddp(dp_model.ptr(), world);
  torch::optim::SGD dp_sgd(dp_model->parameters(), 0.01);
  const int64_t local = global_batch / n;
  const torch::Tensor xl = x.narrow(0, world->rank() * local, local);
  const torch::Tensor yl = y.narrow(0, world->rank() * local, local);

  // Where the time goes, summed over the timed steps of all rounds, per rank:
  // pp: the engine's step, its F/B compute, the waits of compute actions for
  // their input, the optimizer; dp: forward + backward, DDP's synchronize,
  // the optimizer.
  double pp_step = 0, pp_compute = 0, pp_wait = 0, pp_opt = 0;
  double dp_compute = 0, dp_sync = 0, dp_opt = 0;
  int pp_steps = 0, dp_steps = 0;
  bool timed = false;
  auto time_pp = [&](int steps) {
    world->barrier()->wait();
    const double start = now_seconds();
    for (int i = 0; i < steps; ++i) {
      const double t0 = now_seconds();
      engine.step(x, y, ce_loss);
      const double t1 = now_seconds();
      pp_sgd.step();
      if (!timed) continue;
      pp_step += t1 - t0;
      pp_opt += now_seconds() - t1;
      for (const ActionRecord& r : engine.last_trace()) {
        if (!r.action.is_compute()) continue;
        pp_compute += r.end_seconds - r.start_seconds;
        pp_wait += r.wait_seconds;
      }
      ++pp_steps;
    }
    world->barrier()->wait();
    return now_seconds() - start;
  };
  auto time_dp = [&](int steps) {
    world->barrier()->wait();
    const double start = now_seconds();
    for (int i = 0; i < steps; ++i) {
      const double t0 = now_seconds();
      ddp.zero_grad();
      ce_loss(dp_model->forward(xl), yl).backward();
      const double t1 = now_seconds();
      ddp.synchronize();
      const double t2 = now_seconds();
      dp_sgd.step();
      if (!timed) continue;
      dp_compute += t1 - t0;
      dp_sync += t2 - t1;
      dp_opt += now_seconds() - t2;
      ++dp_steps;
    }
    world->barrier()->wait();
    return now_seconds() - start;
  };
  time_pp(warmup);
  time_dp(warmup);
  if (world->rank() == 0) {
    std::printf(
        "# throughput: %d ranks, MLP 8 x %d, global batch %d, pp: 1f1b m = %d, stages %s (%s)\n", n,
        width, global_batch, m, partition.to_string().c_str(), cut.c_str());
    std::printf("%5s %14s %14s %8s\n", "round", "pp_samples/s", "dp_samples/s", "pp/dp");
  }
  timed = true;
  // Within a round the two alternate every `block` steps, so that a change
  // in the machine's speed (a shared host: up to 2x from one second to the
  // next) falls on both alike.
  for (int r = 0; r < rounds; ++r) {
    double tp = 0, td = 0;
    for (int done = 0; done < iters; done += block) {
      const int steps = std::min(block, iters - done);
      tp += time_pp(steps);
      td += time_dp(steps);
    }
    if (world->rank() == 0) {
      std::printf("%5d %14.1f %14.1f %8.3f\n", r, iters * global_batch / tp,
                  iters * global_batch / td, td / tp);
      std::fflush(stdout);
    }
  }
  // Per rank, ms per step.
  for (int r = 0; r < n; ++r) {
    world->barrier()->wait();
    if (r != world->rank()) continue;
    if (r == 0) {
      std::printf("%4s %9s %10s %8s %8s %8s | %10s %8s %8s\n", "rank", "pp_step", "pp_compute",
                  "pp_wait", "pp_rest", "pp_opt", "dp_compute", "dp_sync", "dp_opt");
    }
    const double ps = pp_steps > 0 ? 1e3 / pp_steps : 0, ds = dp_steps > 0 ? 1e3 / dp_steps : 0;
    std::printf("%4d %9.2f %10.2f %8.2f %8.2f %8.2f | %10.2f %8.2f %8.2f\n", r, pp_step * ps,
                pp_compute * ps, pp_wait * ps, (pp_step - pp_compute - pp_wait) * ps, pp_opt * ps,
                dp_compute * ds, dp_sync * ds, dp_opt * ds);
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  dtrain::Runtime runtime(&argc, &argv);
  cxxopts::Options cli("pipeline_perf", "pipeline engine: bubble, memory, throughput");
  cli.add_options()("table", "bubble, memory, throughput or compute",
                    cxxopts::value<std::string>()->default_value("bubble"))(
      "f-ms", "forward sleep per stage (bubble)", cxxopts::value<double>()->default_value("20"))(
      "b-ms", "backward sleep per stage (bubble)", cxxopts::value<double>()->default_value("40"))(
      "act-mib", "activation MiB per microbatch (memory)",
      cxxopts::value<double>()->default_value("8"))("m,microbatches",
                                                    "microbatches (memory, throughput)",
                                                    cxxopts::value<int>()->default_value("16"))(
      "global-batch", "throughput: global batch", cxxopts::value<int>()->default_value("512"))(
      "width", "throughput: MLP width (compute: 1024 unless given)",
      cxxopts::value<int>()->default_value("512"))("rows", "compute: rows per microbatch",
                                                   cxxopts::value<int>()->default_value("64"))(
      "layers", "compute: Linear layers per stage", cxxopts::value<int>()->default_value("4"))(
      "rounds", "throughput: alternating rounds", cxxopts::value<int>()->default_value("3"))(
      "block", "throughput: steps of one before switching to the other within a round",
      cxxopts::value<int>()->default_value("2"))(
      "partition",
      "throughput: stage cut, params (balanced by parameters), time (by measured time) or uniform",
      cxxopts::value<std::string>()->default_value("params"))(
      "w,warmup_iters", "warm-up steps", cxxopts::value<int>()->default_value("1"))(
      "n,iters", "timed steps", cxxopts::value<int>()->default_value("3"))(
      "threads", "intra-op threads per rank", cxxopts::value<int>()->default_value("1"))(
      "trace", "bubble: write per-rank traces to PREFIX-<row>-rank<r>.csv",
      cxxopts::value<std::string>()->default_value(""))("h,help", "print this help");
  try {
    auto parsed = dtrain::cli::parse(cli, argc, argv);
    if (parsed.count("help")) {
      if (runtime.rank() == 0) std::cout << cli.help() << std::endl;
      return 0;
    }
    torch::set_num_threads(parsed["threads"].as<int>());
    auto world = runtime.world();
    const std::string table = parsed["table"].as<std::string>();
    const int warmup = parsed["warmup_iters"].as<int>();
    const int iters = parsed["iters"].as<int>();
    if (table == "bubble") {
      bubble_table(world, parsed["f-ms"].as<double>(), parsed["b-ms"].as<double>(), warmup, iters,
                   parsed["trace"].as<std::string>());
    } else if (table == "memory") {
      memory_table(world, parsed["act-mib"].as<double>(), parsed["microbatches"].as<int>(), warmup,
                   iters);
    } else if (table == "throughput") {
      throughput_table(world, parsed["microbatches"].as<int>(), parsed["global-batch"].as<int>(),
                       parsed["width"].as<int>(), parsed["rounds"].as<int>(), warmup, iters,
                       parsed["partition"].as<std::string>(), parsed["block"].as<int>());
    } else if (table == "compute") {
      compute_table(world, parsed.count("width") ? parsed["width"].as<int>() : 1024,
                    parsed["rows"].as<int>(), parsed["layers"].as<int>(), warmup, iters);
    } else {
      DTRAIN_THROW(dtrain::InvalidArgument, "--table: '", table,
                   "' is not one of bubble, memory, throughput, compute");
    }
  } catch (const std::exception& e) {
    std::cerr << "pipeline_perf: " << e.what() << std::endl;
    return 2;
  }
  return 0;
}
