#pragma once
// A pipeline schedule is data: for each pipeline rank, the list of actions it
// runs in one training step, in order.
//
// Stages. The model is cut into S = p * v stages (partition.h), numbered in
// model order 0 .. S-1; stage s runs on pipeline rank stage_ranks[s]. With
// one stage per rank (v = 1) stage s is rank s. Interleaved schedules give
// each rank v stages ("virtual stages" or "chunks"), by default in the loop
// placement stage s -> rank s % p (loop_placement()): with p = 2, v = 2,
// rank 0 runs stages 0 and 2, rank 1 stages 1 and 3. A pipeline rank is the
// rank in the pipeline communicator (ParallelContext::pp(), ordered by the
// pp coordinate), not the world rank.
//
// Actions (their text form in brackets, s = stage, m = microbatch, r = peer):
//   F   forward of stage s on microbatch m                      [Fs.m]
//   B   full backward: input and weight gradients together     [Bs.m]
//   I   input-gradient backward only (zero-bubble split)        [Is.m]
//   W   weight-gradient backward only, after its I             [Ws.m]
//   send/recv of an activation (forward direction): the output of stage s
//       goes to stage s+1 on another rank                       [sendFs.m>r]
//       and arrives there as stage s+1's input                  [recvFs+1.m<r]
//   send/recv of a gradient (backward direction): the gradient of stage s's
//       input goes to stage s-1 on another rank                 [sendBs.m>r]
//       and arrives as the gradient of stage s-1's output       [recvBs-1.m<r]
//   reduce: stage s has finished its last backward of the step, so its
//       gradients are complete on this rank; the stage's data-parallel
//       reduction (DDP all-reduce, ZeRO reduce-scatter) and the sum of tied
//       weights (partition.h) may start here                   [reduces]
// The stage of an action is always the stage of the rank that runs it: a
// send names the stage that produced the tensor, a recv the stage that
// consumes it. Between two stages on the same rank nothing is sent: the
// tensor passes locally.
//
// Every (stage, microbatch) has exactly one F and either one B or one I and
// one W; every stage has exactly one reduce, after its last B/W. simulator.h
// checks this and everything below (validate()).
//
// Execution model (what the runtime implements and the simulator models):
//  * A rank runs its list in order, one compute action (F/B/I/W) at a time.
//  * Consecutive send/recv actions of a list form one batch, posted as one
//    batched point-to-point call (batch_send_recv). Posting does not block.
//    A rank's batches run one after another, in list order (one stream per
//    rank): a batch begins once it is posted and the rank's previous batch
//    has completed. A message completes when the batches of both its ends
//    have begun; a batch completes when all its messages have.
//  * A compute action that consumes a received tensor waits for the batch
//    holding that recv. At the end of its list a rank waits for all its
//    batches (its sends included).
//  * Messages between two ranks are matched in order: the k-th message rank
//    a sends to rank b is the k-th message rank b receives from rank a,
//    activations and gradients alike (NCCL has no tags), so both ends must
//    list them in the same order.
//  * A reduce action takes no pipeline time; the reduction it starts runs
//    on the data-parallel communicator, overlapped with later actions. The
//    step's optimizer update waits for all of them.
//
// How the runtime (engine.h) consumes a schedule:
//   validate(schedule);                         // refuse a bad list up front
//   for (const Action& a : schedule.actions[pp_rank]) switch (a.kind) ...
// holding, per (stage, microbatch), the stage's input and output tensors
// between actions; stages_of_rank(pp_rank) says which model stages to build.
//
// Text form (to_text / parse_schedule), for printing and for writing one's
// own schedule:
//
//   # 1F1B, 2 ranks, 2 microbatches
//   pipeline ranks=2 microbatches=2 stages=2 name=1f1b
//   0: F0.0 sendF0.0>1 F0.1 sendF0.1>1 recvB0.0<1 B0.0 recvB0.1<1 B0.1 reduce0
//   1: recvF1.0<0 F1.0 B1.0 sendB1.0>0 recvF1.1<0 F1.1 B1.1 reduce1 sendB1.1>0
//
//  * '#' starts a comment; blank lines are ignored.
//  * The header line comes first: `pipeline` then key=value words:
//    ranks (p, required), microbatches (m, required), stages (default p),
//    placement (`loop`, the default, or the rank of each stage separated by
//    '|', e.g. 0|1|1|0), name (a label; no spaces).
//  * A rank row is the rank number, ':' or ',', then actions separated by
//    spaces, tabs or commas (a CSV row works). A rank may have several rows;
//    they are joined in order, so one action per line works too.
//  * The peer of a send/recv may be left out (`sendF0.1`): it is the rank of
//    the neighbouring stage.
// parse errors name the line and column and what is wrong.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace dtrain::parallel::pipeline {

enum class ActionKind : std::uint8_t {
  kForward,          ///< F
  kBackward,         ///< B: input and weight gradients
  kBackwardInput,    ///< I: input gradient only
  kBackwardWeight,   ///< W: weight gradient only (after I)
  kSendActivation,   ///< sendF: this stage's output to the next stage
  kRecvActivation,   ///< recvF: this stage's input from the previous stage
  kSendGradient,     ///< sendB: gradient of this stage's input to the previous stage
  kRecvGradient,     ///< recvB: gradient of this stage's output from the next stage
  kReduceGradients,  ///< reduce: this stage's gradients are complete
};

/// The kind's short name above: "F", "B", "I", "W", "sendF", "recvF",
/// "sendB", "recvB" or "reduce" (trace CSV and trace span names).
const char* action_kind_name(ActionKind kind) noexcept;

/// Microbatch of a reduce action (which is per stage, not per microbatch).
constexpr int kNoMicrobatch = -1;
/// Peer of a compute or reduce action.
constexpr int kNoPeer = -1;

/// One action of one rank's list. Plain value type.
struct Action {
  ActionKind kind = ActionKind::kForward;
  /// The stage this rank runs the action for (0 .. S-1).
  int stage = 0;
  /// 0 .. m-1; kNoMicrobatch for reduce.
  int microbatch = 0;
  /// For send/recv: the pipeline rank at the other end; kNoPeer otherwise.
  int peer = kNoPeer;

  static Action forward(int stage, int microbatch);
  static Action backward(int stage, int microbatch);
  static Action backward_input(int stage, int microbatch);
  static Action backward_weight(int stage, int microbatch);
  static Action send_activation(int stage, int microbatch, int peer);
  static Action recv_activation(int stage, int microbatch, int peer);
  static Action send_gradient(int stage, int microbatch, int peer);
  static Action recv_gradient(int stage, int microbatch, int peer);
  static Action reduce(int stage);

  /// F, B, I or W.
  bool is_compute() const noexcept;
  bool is_send() const noexcept;
  bool is_recv() const noexcept;
  /// A send or a recv.
  bool is_communication() const noexcept { return is_send() || is_recv(); }
  /// For a send or recv: the stage at the other end (stage + 1 for
  /// activations sent and gradients received, stage - 1 for the others), or
  /// -1 when there is none among `num_stages`; -1 for every other action.
  int neighbour_stage(int num_stages) const noexcept;

  /// The text form, e.g. "F3.12", "sendB2.0>1", "reduce3".
  std::string to_string() const;

  bool operator==(const Action& other) const noexcept {
    return kind == other.kind && stage == other.stage && microbatch == other.microbatch &&
           peer == other.peer;
  }
  bool operator!=(const Action& other) const noexcept { return !(*this == other); }
};

/// The programs of all ranks of one pipeline for one training step.
struct Schedule {
  /// A label ("gpipe", "1f1b", "interleaved", "zb-h1", or what a text said).
  std::string name;
  /// p: the pipeline ranks.
  int num_ranks = 1;
  /// m: microbatches per step.
  int num_microbatches = 1;
  /// The pipeline rank of each stage; its size is the number of stages S.
  std::vector<int> stage_ranks;
  /// actions[r]: pipeline rank r's list, in order. Size num_ranks.
  std::vector<std::vector<Action>> actions;

  int num_stages() const noexcept { return static_cast<int>(stage_ranks.size()); }
  /// Pipeline rank of `stage`; throws InvalidArgument when out of range.
  int rank_of_stage(int stage) const;
  /// The stages on `rank`, ascending (the model chunks the rank builds).
  std::vector<int> stages_of_rank(int rank) const;

  bool operator==(const Schedule& other) const;
  bool operator!=(const Schedule& other) const { return !(*this == other); }
};

/// The loop placement: stage s on rank s % num_ranks. Throws InvalidArgument
/// unless num_ranks >= 1 and num_stages is a positive multiple of it.
std::vector<int> loop_placement(int num_ranks, int num_stages);

/// Adds the communication to a schedule that lists only compute actions
/// (F/B/I/W, and reduce actions if it wants to place them itself), and a
/// stage's reduce right after its last B/W unless the input has one. Four
/// placements of the sends and recvs are tried:
///  * latest: each send right after the compute action that produces its
///    tensor, each recv right before the compute action that consumes it
///    (moved earlier only as far as needed to receive a pair of ranks'
///    messages in the order they are sent);
///  * Megatron steps: a forward directly followed by a backward is one step;
///    the gradient the backward needs is received before the forward and the
///    forward's output is sent after the backward, so one batch between two
///    steps carries both results and both inputs of the next step;
///  * early activations: an activation whose forward directly follows a
///    backward is received before that backward;
///  * both of the last two.
/// Of those the simulator accepts, the one with the shortest step under unit
/// costs is returned (the first on a tie); if none passes, the latest
/// placement, which validate() then rejects with the reason. Generators
/// build their lists this way; a user may write only the compute order and
/// let this add the rest. Throws InvalidArgument if `compute_only` already
/// holds a send or recv, or an action names a stage or microbatch out of
/// range.
Schedule insert_communication(Schedule compute_only);

/// The text form described above; parse_schedule(to_text(s)) == s.
std::string to_text(const Schedule& schedule);

/// Parses the text form. `source` names the text in error messages (a file
/// name). Throws InvalidArgument naming the line, the column and what is
/// wrong. Only the syntax and ranges are checked here; validate() checks the
/// rest.
Schedule parse_schedule(std::string_view text, const std::string& source = "schedule");

/// Parses one action token (without peer defaults: a send/recv must name
/// its peer). Throws InvalidArgument saying what is wrong.
Action parse_action(std::string_view token);

/// Sizes of the microbatches of a batch of `batch_size` samples cut into
/// `num_microbatches` contiguous pieces in sample order: the first
/// batch_size % num_microbatches microbatches hold one sample more than the
/// others (10 into 4: 3 3 2 2). Throws InvalidArgument if the batch has
/// fewer samples than microbatches (an empty microbatch would run a stage on
/// nothing) or either is < 1.
std::vector<std::int64_t> microbatch_sizes(std::int64_t batch_size, int num_microbatches);

}  // namespace dtrain::parallel::pipeline
