#pragma once
// The pipeline simulator: runs all ranks' action lists (schedule.h) with
// given costs and no communication, checks them, and measures them.
//
// Checks (check(), validate(); each problem names the rank, the action and
// its position "#i" in the rank's list):
//  * shape: p, m, S >= 1, one list per rank, every stage on a rank;
//  * every action's stage, microbatch and peer are in range, a compute or
//    reduce action runs on its stage's rank, a send/recv's peer is the rank
//    of the neighbouring stage (and not the rank itself: stages on one rank
//    pass tensors locally, without messages);
//  * each (stage, microbatch) has exactly one F and either one B or one I and
//    one W; each stage has exactly one reduce; each message between two
//    ranks has exactly one send and one recv;
//  * order within a rank: a recv before the compute that consumes it, a
//    compute before the send of its result, F before its B/I, I before its
//    W, F(s) after F(s-1) and B/I(s) after B/I(s+1) when those stages share
//    the rank, a stage's reduce after its last B/W;
//  * message order: for each pair of ranks (a, b), the messages a sends to b
//    and those b receives from a are the same, in the same order
//    (activations and gradients together: see schedule.h);
//  * no deadlock: the lists are run in the execution model of schedule.h
//    (batches, one communication stream per rank). A deadlock is reported
//    as the cycle of ranks waiting for each other, each with the action it
//    is stuck at and the message it waits for. Deadlock does not depend on
//    the costs.
//
// Measures (simulate()):
//  * each action's start and end; a rank's busy time (the sum of its
//    compute costs) and its finish (its last compute, or the completion of
//    its last batch if later); the step's length = the latest finish;
//  * idle fraction = 1 - (busy time of all ranks) / (p * step length): the
//    bubble, counting a rank's wait at the start and at the end;
//  * stored activations per rank. A (stage, microbatch) is stored from the
//    start of its F until the end of the backward action that finishes with
//    it: its B, or its W when the backward is split, since W still needs the
//    stage's saved inputs and the output gradients. peak_stored is the most
//    stored at once. peak_stored_until_input_grad counts until the end of B
//    or I instead: after I, the rest of the autograd graph is freed and only
//    what W needs remains (Zero Bubble's accounting). Both count
//    (stage, microbatch) pairs, so an interleaved rank counts each of its
//    stages; a rank runs one action at a time, so the peaks depend only on
//    the order of its list, not on the costs.
//
// Thread-safety: pure functions of their arguments.

#include <functional>
#include <string>
#include <vector>

#include "dtrain/parallel/pipeline/schedule.h"

namespace dtrain::parallel::pipeline {

/// Time of each kind of action, in any unit. Unit costs by default: a
/// forward, an input-gradient and a weight-gradient pass take 1, a full
/// backward 2 (I + W), messages take no time.
struct ActionCosts {
  double forward = 1.0;
  double backward = 2.0;
  double backward_input = 1.0;
  double backward_weight = 1.0;
  /// Per message: from the moment both ends' batches have begun until it
  /// has arrived.
  double communication = 0.0;

  /// Throws InvalidArgument if a cost is negative or not finite.
  void validate() const;
};

/// Cost of one action on one rank, when the costs differ by stage or
/// microbatch (uneven stages, a short last microbatch). For a send, the cost
/// of its message. Must be >= 0. Reduce actions take no time.
using CostFunction = std::function<double(int rank, const Action& action)>;

struct SimulationOptions {
  ActionCosts costs;
  /// When set, used instead of `costs` for every action.
  CostFunction cost;
};

/// When one action ran. For a send/recv, its batch's begin and completion;
/// for a reduce, the moment it was reached (start == end).
struct ActionTime {
  double start = 0.0;
  double end = 0.0;
};

struct RankSimulation {
  /// Sum of the costs of the rank's F/B/I/W actions.
  double busy = 0.0;
  /// When the rank's last action completed.
  double finish = 0.0;
  /// step length - busy.
  double idle = 0.0;
  /// Most (stage, microbatch) pairs stored at once (until B or W).
  int peak_stored = 0;
  /// Most (stage, microbatch) pairs whose B or I has not ended.
  int peak_stored_until_input_grad = 0;
  /// One entry per action of the rank's list.
  std::vector<ActionTime> times;
};

struct SimulationReport {
  /// The step's length: the latest finish of any rank.
  double makespan = 0.0;
  /// Total idle time over p * makespan; 0 for an empty step.
  double idle_fraction = 0.0;
  std::vector<RankSimulation> ranks;
};

/// Everything wrong with `schedule` (empty when it is valid). The deadlock
/// check runs only when the other checks pass.
std::vector<std::string> check(const Schedule& schedule);

/// Throws InvalidArgument when check() finds a problem: "pipeline schedule
/// '<name>' (p ranks, S stages, m microbatches) is rejected: <problems>",
/// the first few problems and how many more. The runtime calls it before
/// running a schedule.
void validate(const Schedule& schedule);

/// Validates `schedule` (as validate()) and runs it with the given costs.
SimulationReport simulate(const Schedule& schedule, const SimulationOptions& options = {});

/// A text picture of a simulated step, one row per rank, one cell per
/// `time_unit` of time: the compute action running at the start of the cell
/// ("F3" = forward of microbatch 3; with several stages per rank "F2.3" =
/// stage 2, microbatch 3), '.' where the rank is idle. Meant for unit-like
/// costs; a cell shows what runs at its start.
std::string render_timeline(const Schedule& schedule, const SimulationReport& report,
                            double time_unit = 1.0);

}  // namespace dtrain::parallel::pipeline
