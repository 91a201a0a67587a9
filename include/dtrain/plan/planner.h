#pragma once
// Layouts and their cost: which dp x pp x tp layouts (with schedule,
// microbatches, sequence parallelism and ZeRO-1) a model admits on a world,
// and a cost model that predicts each one's step time, communication and
// peak memory from the model's per-layer profile and the machine's measured
// bandwidths. benchmarks/strategy_compare measures the same layouts, and
// `dtrain-plan` ranks them from a profile alone, for this machine or for a
// cluster described by its numbers.
//
// The cost model, per data-parallel rank's share b = global_batch / dp,
// cut into m microbatches of b / m samples (m = 1 without a pipeline):
//  * compute: each layer's forward and backward time per sample, measured at
//    tp = 1 on one rank, times the microbatch size; a tensor-parallel layer's
//    time divided by tp. Ranks beyond the machine's cores share them
//    (oversubscription): compute is stretched by ranks / cores.
//  * tensor parallelism: each tensor-parallel layer does `tp_all_reduces`
//    all-reduces of its output per microbatch forward, as many backward;
//    with sequence parallelism the same bytes move as all-gathers and
//    reduce-scatters, so the time is the same and the layer's activations are
//    stored split over tp.
//  * pipeline: the layers are cut into pp * v stages (uniformly by count, as
//    the programs do by default, or balanced by time), the schedule is
//    generated and run in the simulator (parallel/pipeline/simulator.h) with
//    these costs and the point-to-point time of each message; the
//    simulator's step length is the pipeline's, its idle time the bubble,
//    and its peak stored microbatches give the activation memory. A split
//    backward (ZB-H1) takes half the backward for I and half for W.
//  * data parallelism: a ring all-reduce of the stage's gradients (per tp
//    rank: its share), not overlapped with the backward; ZeRO-1 moves the same
//    bytes (reduce-scatter + all-gather) and shards the optimizer state.
//  * time of a collective of n bytes over k ranks: latency + 2 (k-1)/k n / B,
//    B the bus bandwidth as allreduce_perf reports it; a point-to-point
//    message: latency + n / B_p2p.
//  * memory per rank: the machine's base bytes (the process before it
//    trains), parameters, gradients and optimizer state of its stage (its tp
//    share; ZeRO-1 divides the optimizer state by dp), DDP's gradient buffer
//    when dp > 1, and the saved activations of the most microbatches its
//    schedule keeps at once.
// assumptions() prints this list with the machine's numbers.
//
// Thread-safety: pure functions of their arguments.

#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/parallel/pipeline/generators.h"

namespace dtrain::plan {

using parallel::pipeline::ScheduleKind;

/// What limits a model's layouts.
struct ModelLimits {
  /// Units a pipeline can cut between (>= 1; the profile's layers that are
  /// stage units): pp * stages_per_rank must not exceed it.
  int layers = 1;
  /// Numbers pp * stages_per_rank must divide (the GPT's blocks: its program
  /// gives every stage the same number). Empty: any stage count.
  std::vector<std::int64_t> stages_must_divide;
  /// Numbers tp must divide (attention heads, hidden and MLP widths). Empty:
  /// the model has no tensor-parallel layers, tp must be 1.
  std::vector<std::int64_t> tp_must_divide;
  /// Tokens per sample; > 0 allows sequence parallelism where tp divides it.
  std::int64_t sequence = 0;
  /// Whether the model's program combines ZeRO-1 with tp > 1 / with pp > 1.
  bool zero_with_tp = false;
  bool zero_with_pp = false;
};

/// Which layouts to consider.
struct SearchSpace {
  int world = 1;
  std::int64_t global_batch = 1;
  /// Microbatch counts for pp > 1, as multiples of pp (m = k * pp); each m
  /// must divide the data rank's batch.
  std::vector<int> microbatch_multiples = {1, 2, 4};
  std::vector<ScheduleKind> schedules = {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB,
                                         ScheduleKind::kInterleaved, ScheduleKind::kZeroBubbleH1};
  /// Stages per rank (v) of the interleaved schedule.
  int interleave = 2;
  bool try_zero = true;
  bool try_sequence_parallel = true;

  /// Throws InvalidArgument naming the bad value.
  void validate() const;
};

struct Layout {
  int dp = 1;
  int pp = 1;
  int tp = 1;
  /// Meaningful for pp > 1 only.
  ScheduleKind schedule = ScheduleKind::kOneFOneB;
  /// 1 for pp = 1.
  int microbatches = 1;
  /// v: > 1 only for the interleaved schedule.
  int stages_per_rank = 1;
  bool sequence_parallel = false;
  bool zero = false;

  /// "dp2 pp1 tp1", "dp1 pp2 tp1 1f1b m4", "dp1 pp1 tp2 sp", "dp2 pp1 tp1
  /// zero", "dp1 pp2 tp1 interleaved v2 m4".
  std::string name() const;
  bool operator==(const Layout& other) const;
  bool operator!=(const Layout& other) const { return !(*this == other); }
};

/// Why `layout` is not valid for this model and search space, or "" when it
/// is. The world, batch and divisibility rules, and the pipeline generator's
/// own rules (ScheduleOptions::validate) for the schedule.
std::string layout_problem(const ModelLimits& model, const SearchSpace& space,
                           const Layout& layout);

/// Every valid layout, ordered by tp, then pp (ascending; dp = world / (pp *
/// tp)), then schedule (as listed in space.schedules), microbatches
/// (ascending), sequence parallelism (off first) and ZeRO (off first).
std::vector<Layout> enumerate_layouts(const ModelLimits& model, const SearchSpace& space);

/// Every dp x pp x tp factorization of the world that admits no valid
/// layout, with the reason (layout_problem of its plainest form).
struct RejectedLayout {
  Layout layout;
  std::string reason;
};
std::vector<RejectedLayout> rejected_factorizations(const ModelLimits& model,
                                                    const SearchSpace& space);

/// One layer (a pipeline cut can fall before it), per sample.
struct LayerProfile {
  std::string name;
  std::int64_t parameters = 0;    ///< Elements.
  double forward_seconds = 0.0;   ///< Per sample, tp = 1, one rank.
  double backward_seconds = 0.0;  ///< Per sample: input and weight gradients.
  std::int64_t output_bytes = 0;  ///< Per sample: what the next layer receives.
  /// Per sample, kept for the backward: split over tp when the layer is
  /// tensor-parallel (the work inside its tensor-parallel regions)...
  std::int64_t saved_bytes = 0;
  /// ...and kept whole on every tp rank (LayerNorm and dropout inputs
  /// between the regions), split over tp only with sequence parallelism.
  std::int64_t replicated_saved_bytes = 0;
  /// Its work and parameters split over tp.
  bool tensor_parallel = false;
  /// All-reduces of output_bytes per sample in its forward under tp > 1 (as
  /// many in its backward).
  int tp_all_reduces = 0;
  /// Whether the pipeline splits by it. A layer that is not (the GPT's
  /// embedding, final LayerNorm and head) stays on the stage of the unit
  /// before it, or of the first unit when none is before it.
  bool stage_unit = true;
};

/// How the stage units are cut into stages: uniformly by count (as the
/// programs do by default; the later stages take the extra units), or
/// balanced by time (pipeline::partition_balanced).
enum class Partition { kUniform, kBalanced };

struct ModelProfile {
  std::string name;
  std::vector<LayerProfile> layers;
  ModelLimits limits;
  int bytes_per_parameter = 4;
  /// Optimizer state per parameter, in parameters (SGD with momentum 1,
  /// Adam 2).
  int optimizer_states = 1;
  /// Counted units per sample (1 for images, the context length for tokens)
  /// and their name.
  std::int64_t units_per_sample = 1;
  std::string unit = "samples";
  Partition partition = Partition::kUniform;

  /// Throws InvalidArgument naming the bad layer or value.
  void validate() const;
};

struct MachineProfile {
  /// Bus bandwidth of an all-reduce (bytes/s) and its latency (s).
  double all_reduce_bandwidth = 1e9;
  double all_reduce_latency = 50e-6;
  /// One point-to-point message: bandwidth (bytes/s) and latency (s).
  double p2p_bandwidth = 1e9;
  double p2p_latency = 20e-6;
  /// Cores the ranks share; 0: one per rank (no oversubscription).
  int cores = 0;
  /// Memory per rank in bytes; 0: no limit.
  std::int64_t memory_per_rank = 0;
  /// What a rank holds before it trains (the runtime, its libraries, the
  /// loader's buffers), added to every rank's predicted peak.
  std::int64_t base_bytes_per_rank = 0;

  void validate() const;
};

struct Prediction {
  Layout layout;
  double step_seconds = 0.0;
  /// The split of the step on its slowest rank: compute, communication
  /// (tensor-parallel collectives, point-to-point sends, the gradient
  /// all-reduce) and the pipeline bubble (waiting).
  double compute_seconds = 0.0;
  double communication_seconds = 0.0;
  double bubble_seconds = 0.0;
  /// global_batch * units_per_sample / step_seconds.
  double throughput = 0.0;
  /// Largest over the ranks.
  std::int64_t peak_bytes = 0;
  std::int64_t state_bytes = 0;       ///< Parameters, gradients, optimizer, DDP buffer.
  std::int64_t activation_bytes = 0;  ///< Saved activations at the peak.
  std::int64_t bytes_sent_per_step = 0;
  bool fits = true;
};

/// Bytes one rank sends in a ring all-reduce of `bytes` over `ranks`:
/// 2 (ranks-1)/ranks * bytes (0 for one rank).
double all_reduce_bytes_sent(double bytes, int ranks);
/// latency + all_reduce_bytes_sent / bandwidth (0 for one rank).
double all_reduce_seconds(const MachineProfile& machine, double bytes, int ranks);

/// The cost model above for one layout. Throws InvalidArgument when the
/// layout is not valid for the profile (layout_problem).
Prediction predict(const ModelProfile& model, const MachineProfile& machine,
                   const SearchSpace& space, const Layout& layout);

/// predict() for every enumerated layout, best first: the layouts that fit
/// in memory by step time, then those that do not.
std::vector<Prediction> rank_layouts(const ModelProfile& model, const MachineProfile& machine,
                                     const SearchSpace& space);

/// The model's assumptions with the machine's numbers, one per line.
std::string assumptions(const MachineProfile& machine);

/// What dtrain-plan reads: a model's profile and a machine's numbers, as
/// JSON (docs/strategies.md describes the fields). `machine.description`
/// says where the numbers came from.
struct PlanProfile {
  ModelProfile model;
  MachineProfile machine;
  std::string machine_description;
};

/// The JSON text of `profile` (validated first).
std::string profile_to_json(const PlanProfile& profile);
/// Reads profile_to_json's format; throws InvalidArgument naming `source` and
/// the missing or wrong field. Unknown fields are refused (a misspelt
/// "cores" must not silently mean 0).
PlanProfile profile_from_json(const std::string& text, const std::string& source);

/// One JSON object per prediction, in the given order, with the layout's
/// fields and name.
std::string predictions_to_json(const std::vector<Prediction>& predictions);

}  // namespace dtrain::plan
