// Layouts and the cost model of include/dtrain/plan/planner.h.

#include "dtrain/plan/planner.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/parallel/pipeline/partition.h"
#include "dtrain/parallel/pipeline/simulator.h"

namespace dtrain::plan {

namespace pipeline = parallel::pipeline;

namespace {

std::vector<int> divisors(int n) {
  std::vector<int> out;
  for (int d = 1; d <= n; ++d) {
    if (n % d == 0) out.push_back(d);
  }
  return out;
}

bool finite_non_negative(double v) { return std::isfinite(v) && v >= 0.0; }

}  // namespace

void SearchSpace::validate() const {
  DTRAIN_CHECK_ARG(world >= 1, "the world must have at least 1 rank, got ", world);
  DTRAIN_CHECK_ARG(global_batch >= 1, "the global batch must be at least 1, got ", global_batch);
  DTRAIN_CHECK_ARG(!microbatch_multiples.empty(), "give at least one microbatch multiple");
  for (int k : microbatch_multiples) {
    DTRAIN_CHECK_ARG(k >= 1, "a microbatch multiple must be at least 1, got ", k);
  }
  DTRAIN_CHECK_ARG(interleave >= 2,
                   "the interleaved schedule needs at least 2 stages per rank, got ", interleave);
}

std::string Layout::name() const {
  std::ostringstream out;
  out << "dp" << dp << " pp" << pp << " tp" << tp;
  if (pp > 1) {
    out << ' ' << pipeline::schedule_kind_name(schedule);
    if (stages_per_rank > 1) out << " v" << stages_per_rank;
    out << " m" << microbatches;
  }
  if (sequence_parallel) out << " sp";
  if (zero) out << " zero";
  return out.str();
}

bool Layout::operator==(const Layout& o) const {
  return dp == o.dp && pp == o.pp && tp == o.tp && (pp == 1 || schedule == o.schedule) &&
         microbatches == o.microbatches && stages_per_rank == o.stages_per_rank &&
         sequence_parallel == o.sequence_parallel && zero == o.zero;
}

std::string layout_problem(const ModelLimits& model, const SearchSpace& space, const Layout& l) {
  std::ostringstream why;
  if (l.dp < 1 || l.pp < 1 || l.tp < 1) {
    why << "dp, pp and tp must be at least 1, got " << l.dp << ", " << l.pp << ", " << l.tp;
    return why.str();
  }
  if (l.dp * l.pp * l.tp != space.world) {
    why << "dp x pp x tp = " << l.dp * l.pp * l.tp << ", not the world's " << space.world
        << " ranks";
    return why.str();
  }
  if (space.global_batch % l.dp != 0) {
    why << "dp " << l.dp << " does not divide the global batch " << space.global_batch;
    return why.str();
  }
  if (l.tp > 1) {
    if (model.tp_must_divide.empty())
      return "the model has no tensor-parallel layers (tp must be 1)";
    for (std::int64_t x : model.tp_must_divide) {
      if (x % l.tp != 0) {
        why << "tp " << l.tp << " does not divide " << x;
        return why.str();
      }
    }
  }
  if (l.pp * l.stages_per_rank > model.layers) {
    why << "pp " << l.pp << " x " << l.stages_per_rank
        << " stage(s) per rank is more stages than the " << model.layers << " layers";
    return why.str();
  }
  for (std::int64_t x : model.stages_must_divide) {
    if (x % (l.pp * l.stages_per_rank) != 0) {
      why << "pp " << l.pp << " x " << l.stages_per_rank << " stage(s) per rank do not divide "
          << x;
      return why.str();
    }
  }
  const std::int64_t batch = space.global_batch / l.dp;
  if (l.pp == 1) {
    if (l.microbatches != 1 || l.stages_per_rank != 1) {
      return "microbatches and stages per rank need pp > 1";
    }
  } else {
    pipeline::ScheduleOptions o;
    o.kind = l.schedule;
    o.num_ranks = l.pp;
    o.num_microbatches = l.microbatches;
    o.stages_per_rank = l.stages_per_rank;
    try {
      o.validate();
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    if (batch % l.microbatches != 0) {
      why << l.microbatches << " microbatches do not divide the data rank's batch of " << batch;
      return why.str();
    }
  }
  if (l.sequence_parallel) {
    if (l.tp == 1) return "sequence parallelism needs tp > 1";
    if (model.sequence <= 0) return "the model has no sequence to split";
    if (model.sequence % l.tp != 0) {
      why << "tp " << l.tp << " does not divide the sequence of " << model.sequence;
      return why.str();
    }
  }
  if (l.zero) {
    if (l.dp == 1) return "ZeRO-1 needs dp > 1";
    if (l.tp > 1 && !model.zero_with_tp)
      return "the model's program does not combine ZeRO-1 with tp > 1";
    if (l.pp > 1 && !model.zero_with_pp)
      return "the model's program does not combine ZeRO-1 with pp > 1";
  }
  return "";
}

namespace {

// Every layout of one dp x pp x tp factorization, valid or not, in the
// documented order.
std::vector<Layout> candidates(const SearchSpace& space, int dp, int pp, int tp) {
  std::vector<Layout> pipelines;
  Layout base;
  base.dp = dp;
  base.pp = pp;
  base.tp = tp;
  if (pp == 1) {
    pipelines.push_back(base);
  } else {
    std::vector<int> ms;
    for (int k : space.microbatch_multiples) ms.push_back(k * pp);
    std::sort(ms.begin(), ms.end());
    ms.erase(std::unique(ms.begin(), ms.end()), ms.end());
    for (ScheduleKind kind : space.schedules) {
      for (int m : ms) {
        Layout l = base;
        l.schedule = kind;
        l.stages_per_rank = kind == ScheduleKind::kInterleaved ? space.interleave : 1;
        l.microbatches = m;
        pipelines.push_back(l);
      }
    }
  }
  std::vector<Layout> out;
  for (const Layout& p : pipelines) {
    for (bool sp : {false, true}) {
      if (sp && !space.try_sequence_parallel) continue;
      for (bool zero : {false, true}) {
        if (zero && !space.try_zero) continue;
        Layout l = p;
        l.sequence_parallel = sp;
        l.zero = zero;
        out.push_back(l);
      }
    }
  }
  return out;
}

}  // namespace

std::vector<Layout> enumerate_layouts(const ModelLimits& model, const SearchSpace& space) {
  space.validate();
  std::vector<Layout> out;
  for (int tp : divisors(space.world)) {
    for (int pp : divisors(space.world / tp)) {
      for (const Layout& l : candidates(space, space.world / (tp * pp), pp, tp)) {
        if (layout_problem(model, space, l).empty()) out.push_back(l);
      }
    }
  }
  return out;
}

std::vector<RejectedLayout> rejected_factorizations(const ModelLimits& model,
                                                    const SearchSpace& space) {
  space.validate();
  std::vector<RejectedLayout> out;
  for (int tp : divisors(space.world)) {
    for (int pp : divisors(space.world / tp)) {
      const int dp = space.world / (tp * pp);
      bool any = false;
      for (const Layout& l : candidates(space, dp, pp, tp)) {
        any = any || layout_problem(model, space, l).empty();
      }
      if (any) continue;
      Layout plain;
      plain.dp = dp;
      plain.pp = pp;
      plain.tp = tp;
      plain.microbatches = pp;
      std::string reason = layout_problem(model, space, plain);
      if (reason.empty()) reason = "no schedule and microbatch count of the search space fits";
      out.push_back({plain, reason});
    }
  }
  return out;
}

void ModelProfile::validate() const {
  DTRAIN_CHECK_ARG(!layers.empty(), "model profile '", name, "' has no layers");
  const auto units = std::count_if(layers.begin(), layers.end(),
                                   [](const LayerProfile& l) { return l.stage_unit; });
  DTRAIN_CHECK_ARG(units >= 1 && units == limits.layers, "model profile '", name, "' has ", units,
                   " stage unit(s) among its layers but its limits say ", limits.layers);
  for (const LayerProfile& l : layers) {
    DTRAIN_CHECK_ARG(
        finite_non_negative(l.forward_seconds) && finite_non_negative(l.backward_seconds),
        "layer '", l.name, "' has a negative or non-finite time");
    DTRAIN_CHECK_ARG(l.parameters >= 0 && l.output_bytes >= 0 && l.saved_bytes >= 0 &&
                         l.replicated_saved_bytes >= 0 && l.tp_all_reduces >= 0,
                     "layer '", l.name, "' has a negative size or count");
  }
  DTRAIN_CHECK_ARG(bytes_per_parameter >= 1, "bytes per parameter must be at least 1, got ",
                   bytes_per_parameter);
  DTRAIN_CHECK_ARG(optimizer_states >= 0, "optimizer states must be >= 0, got ", optimizer_states);
  DTRAIN_CHECK_ARG(units_per_sample >= 1, "units per sample must be at least 1, got ",
                   units_per_sample);
}

void MachineProfile::validate() const {
  DTRAIN_CHECK_ARG(std::isfinite(all_reduce_bandwidth) && all_reduce_bandwidth > 0,
                   "the all-reduce bandwidth must be > 0 bytes/s, got ", all_reduce_bandwidth);
  DTRAIN_CHECK_ARG(std::isfinite(p2p_bandwidth) && p2p_bandwidth > 0,
                   "the point-to-point bandwidth must be > 0 bytes/s, got ", p2p_bandwidth);
  DTRAIN_CHECK_ARG(finite_non_negative(all_reduce_latency) && finite_non_negative(p2p_latency),
                   "latencies must be >= 0 s");
  DTRAIN_CHECK_ARG(cores >= 0, "cores must be >= 0 (0: one per rank), got ", cores);
  DTRAIN_CHECK_ARG(memory_per_rank >= 0, "memory per rank must be >= 0 (0: no limit), got ",
                   memory_per_rank);
  DTRAIN_CHECK_ARG(base_bytes_per_rank >= 0, "base bytes per rank must be >= 0, got ",
                   base_bytes_per_rank);
}

double all_reduce_bytes_sent(double bytes, int ranks) {
  return ranks <= 1 ? 0.0 : 2.0 * (ranks - 1) / ranks * bytes;
}

double all_reduce_seconds(const MachineProfile& machine, double bytes, int ranks) {
  if (ranks <= 1) return 0.0;
  return machine.all_reduce_latency +
         all_reduce_bytes_sent(bytes, ranks) / machine.all_reduce_bandwidth;
}

namespace {

// What one stage costs per microbatch, and holds.
struct StageCost {
  double forward_compute = 0.0;
  double backward_compute = 0.0;
  double tp_seconds = 0.0;     // tensor-parallel collectives of one pass (forward or backward)
  double tp_bytes_sent = 0.0;  // of one pass
  double message_bytes = 0.0;  // its output, sent to the next stage
  double saved_bytes = 0.0;    // stored per microbatch
  double parameters = 0.0;     // this rank's share
};

}  // namespace

Prediction predict(const ModelProfile& model, const MachineProfile& machine,
                   const SearchSpace& space, const Layout& layout) {
  model.validate();
  machine.validate();
  space.validate();
  const std::string problem = layout_problem(model.limits, space, layout);
  DTRAIN_CHECK_ARG(problem.empty(), "layout '", layout.name(), "' is not valid: ", problem);

  const int tp = layout.tp;
  const int m = layout.microbatches;
  const double microbatch = static_cast<double>(space.global_batch / layout.dp) / m;
  const double stretch =
      machine.cores > 0 ? std::max(1.0, static_cast<double>(space.world) / machine.cores) : 1.0;
  const int num_stages = layout.pp * layout.stages_per_rank;
  const int num_layers = static_cast<int>(model.layers.size());

  auto share = [tp](const LayerProfile& l, double v) { return l.tensor_parallel ? v / tp : v; };
  // The stage units, each with the layers that go with it: unit k holds
  // layers [first[k], first[k + 1]); the layers before the first unit go
  // with it.
  std::vector<int> first;
  std::vector<double> unit_weights;
  double leading = 0.0;
  for (int i = 0; i < num_layers; ++i) {
    const LayerProfile& l = model.layers[i];
    const double w = share(l, l.forward_seconds + l.backward_seconds);
    if (l.stage_unit) {
      first.push_back(first.empty() ? 0 : i);
      unit_weights.push_back(first.size() == 1 ? leading : 0.0);
    }
    if (unit_weights.empty()) {
      leading += w;
    } else {
      unit_weights.back() += w;
    }
  }
  const pipeline::StagePartition units =
      model.partition == Partition::kUniform
          ? pipeline::partition_uniform(static_cast<int>(first.size()), num_stages)
          : pipeline::partition_balanced(unit_weights, num_stages);
  pipeline::StagePartition cut;
  for (int s = 0; s < num_stages; ++s) cut.bounds.push_back(first[units.bounds[s]]);
  cut.bounds.push_back(num_layers);

  std::vector<StageCost> stages(num_stages);
  for (int s = 0; s < num_stages; ++s) {
    StageCost& c = stages[s];
    for (int i = cut.first_layer(s); i < cut.end_layer(s); ++i) {
      const LayerProfile& l = model.layers[i];
      c.forward_compute += share(l, l.forward_seconds) * microbatch * stretch;
      c.backward_compute += share(l, l.backward_seconds) * microbatch * stretch;
      if (l.tensor_parallel && tp > 1) {
        const double bytes = static_cast<double>(l.output_bytes) * microbatch;
        c.tp_seconds += l.tp_all_reduces * all_reduce_seconds(machine, bytes, tp);
        c.tp_bytes_sent += l.tp_all_reduces * all_reduce_bytes_sent(bytes, tp);
      }
      c.saved_bytes += share(l, static_cast<double>(l.saved_bytes)) * microbatch;
      c.saved_bytes += static_cast<double>(l.replicated_saved_bytes) * microbatch /
                       (layout.sequence_parallel ? tp : 1);
      c.parameters += share(l, static_cast<double>(l.parameters));
    }
    const LayerProfile& last = model.layers[cut.end_layer(s) - 1];
    c.message_bytes =
        static_cast<double>(last.output_bytes) * microbatch / (layout.sequence_parallel ? tp : 1);
  }
  auto message_seconds = [&machine](double bytes) {
    return machine.p2p_latency + bytes / machine.p2p_bandwidth;
  };

  // Per pipeline rank: the pipeline's time, its compute and communication,
  // its stored microbatches.
  const int p = layout.pp;
  std::vector<double> compute(p, 0.0), comm(p, 0.0), sent(p, 0.0), activations(p, 0.0),
      parameters(p, 0.0);
  double pipeline_seconds = 0.0;
  if (p == 1) {
    const StageCost& c = stages[0];
    compute[0] = c.forward_compute + c.backward_compute;
    comm[0] = 2.0 * c.tp_seconds;
    sent[0] = 2.0 * c.tp_bytes_sent;
    activations[0] = c.saved_bytes;
    parameters[0] = c.parameters;
    pipeline_seconds = compute[0] + comm[0];
  } else {
    pipeline::ScheduleOptions o;
    o.kind = layout.schedule;
    o.num_ranks = p;
    o.num_microbatches = m;
    o.stages_per_rank = layout.stages_per_rank;
    const pipeline::Schedule schedule = pipeline::make_schedule(o);
    pipeline::SimulationOptions sim;
    sim.cost = [&](int, const pipeline::Action& a) -> double {
      const StageCost& c = stages[a.stage];
      switch (a.kind) {
        case pipeline::ActionKind::kForward:
          return c.forward_compute + c.tp_seconds;
        case pipeline::ActionKind::kBackward:
          return c.backward_compute + c.tp_seconds;
        case pipeline::ActionKind::kBackwardInput:
          return c.backward_compute / 2 + c.tp_seconds;
        case pipeline::ActionKind::kBackwardWeight:
          return c.backward_compute / 2;
        case pipeline::ActionKind::kSendActivation:
          return message_seconds(c.message_bytes);
        case pipeline::ActionKind::kSendGradient:
          return message_seconds(stages[a.stage - 1].message_bytes);
        default:
          return 0.0;
      }
    };
    const pipeline::SimulationReport report = pipeline::simulate(schedule, sim);
    pipeline_seconds = report.makespan;
    for (int r = 0; r < p; ++r) {
      double largest_saved = 0.0;
      for (int s : schedule.stages_of_rank(r)) {
        const StageCost& c = stages[s];
        compute[r] += m * (c.forward_compute + c.backward_compute);
        comm[r] += m * 2.0 * c.tp_seconds;
        sent[r] += m * 2.0 * c.tp_bytes_sent;
        parameters[r] += c.parameters;
        largest_saved = std::max(largest_saved, c.saved_bytes);
      }
      for (const pipeline::Action& a : schedule.actions[r]) {
        if (a.kind == pipeline::ActionKind::kSendActivation) {
          comm[r] += message_seconds(stages[a.stage].message_bytes);
          sent[r] += stages[a.stage].message_bytes;
        } else if (a.kind == pipeline::ActionKind::kSendGradient) {
          comm[r] += message_seconds(stages[a.stage - 1].message_bytes);
          sent[r] += stages[a.stage - 1].message_bytes;
        }
      }
      activations[r] = report.ranks[r].peak_stored * largest_saved;
    }
  }

  Prediction out;
  out.layout = layout;
  const double bpp = model.bytes_per_parameter;
  int slowest = 0;
  double slowest_total = -1.0;
  for (int r = 0; r < p; ++r) {
    const double gradient_bytes = parameters[r] * bpp;
    const double reduce = all_reduce_seconds(machine, gradient_bytes, layout.dp);
    const double total = compute[r] + comm[r] + reduce;
    if (total > slowest_total) {
      slowest_total = total;
      slowest = r;
    }
    comm[r] += reduce;
    sent[r] += all_reduce_bytes_sent(gradient_bytes, layout.dp);
    const double optimizer =
        model.optimizer_states * parameters[r] * bpp / (layout.zero ? layout.dp : 1);
    const double ddp_buffer = layout.dp > 1 ? gradient_bytes : 0.0;
    const double state = 2.0 * parameters[r] * bpp + optimizer + ddp_buffer;
    const auto peak = machine.base_bytes_per_rank +
                      static_cast<std::int64_t>(std::llround(state + activations[r]));
    if (peak > out.peak_bytes) {
      out.peak_bytes = peak;
      out.state_bytes = static_cast<std::int64_t>(std::llround(state));
      out.activation_bytes = static_cast<std::int64_t>(std::llround(activations[r]));
    }
    out.bytes_sent_per_step =
        std::max(out.bytes_sent_per_step, static_cast<std::int64_t>(std::llround(sent[r])));
  }
  const double reduce_seconds = all_reduce_seconds(machine, parameters[slowest] * bpp, layout.dp);
  out.step_seconds = pipeline_seconds + reduce_seconds;
  out.compute_seconds = compute[slowest];
  out.communication_seconds = comm[slowest];
  out.bubble_seconds =
      std::max(0.0, out.step_seconds - out.compute_seconds - out.communication_seconds);
  out.throughput =
      static_cast<double>(space.global_batch * model.units_per_sample) / out.step_seconds;
  out.fits = machine.memory_per_rank == 0 || out.peak_bytes <= machine.memory_per_rank;
  return out;
}

std::vector<Prediction> rank_layouts(const ModelProfile& model, const MachineProfile& machine,
                                     const SearchSpace& space) {
  std::vector<Prediction> out;
  for (const Layout& l : enumerate_layouts(model.limits, space)) {
    out.push_back(predict(model, machine, space, l));
  }
  std::stable_sort(out.begin(), out.end(), [](const Prediction& a, const Prediction& b) {
    if (a.fits != b.fits) return a.fits;
    return a.step_seconds < b.step_seconds;
  });
  return out;
}

std::string assumptions(const MachineProfile& machine) {
  std::ostringstream out;
  out << "- compute: the profile's per-layer forward/backward times (tp = 1, one rank) times the "
         "microbatch size (per-sample times measured at one size are taken to hold at every "
         "size); tensor-parallel layers divided by tp";
  if (machine.cores > 0) {
    out << "; ranks beyond " << machine.cores
        << " cores share them (compute stretched by ranks / cores)";
  }
  out << "\n- collectives: latency " << machine.all_reduce_latency * 1e6
      << " us + 2 (k-1)/k bytes / " << machine.all_reduce_bandwidth / 1e9
      << " GB/s (bus bandwidth) over k ranks; the gradient all-reduce is not overlapped with the "
         "backward; ZeRO-1 moves the same bytes\n"
      << "- point-to-point: latency " << machine.p2p_latency * 1e6 << " us + bytes / "
      << machine.p2p_bandwidth / 1e9 << " GB/s per message\n"
      << "- tensor parallelism: each tensor-parallel layer's all-reduces of its output, as many "
         "forward as backward; sequence parallelism moves the same bytes and splits the replicated "
         "activations over tp\n"
      << "- pipeline: layers cut into pp x v stages, the schedule run in the pipeline simulator; "
         "a split backward is half input, half weight gradient\n"
      << "- memory: " << machine.base_bytes_per_rank / double(1 << 20)
      << " MiB per rank before training, weights, gradients and optimizer state of the rank's "
         "stage(s) (ZeRO-1 divides "
         "the optimizer state by dp), a gradient buffer when dp > 1, and the saved activations of "
         "the most microbatches the schedule stores at once";
  if (machine.memory_per_rank > 0) {
    out << "; limit " << machine.memory_per_rank / double(1 << 20) << " MiB per rank";
  }
  out << "\n";
  return out.str();
}

}  // namespace dtrain::plan
