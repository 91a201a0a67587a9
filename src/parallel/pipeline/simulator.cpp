// The pipeline simulator: structural checks, then an event-driven run of
// the execution model in schedule.h (which also finds deadlocks).

#include "dtrain/parallel/pipeline/simulator.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "dtrain/error.h"

namespace dtrain::parallel::pipeline {
namespace {

using detail::str_cat;

// More problems than this are summarised: a badly broken list would
// otherwise report one problem per action.
constexpr std::size_t kMaxProblems = 50;
// validate() puts this many in its message.
constexpr std::size_t kProblemsInMessage = 5;

constexpr int kNumKinds = 9;

struct Loc {
  int rank = -1;
  int index = -1;
  bool valid() const { return rank >= 0; }
};

bool is_cross(const Schedule& s, int a, int b) {
  return s.stage_ranks[static_cast<std::size_t>(a)] != s.stage_ranks[static_cast<std::size_t>(b)];
}

// Where each (kind, stage, microbatch) sits, and how often it occurs. Reduce
// actions use microbatch 0.
class ActionTable {
 public:
  ActionTable(int stages, int microbatches) : stages_(stages), microbatches_(microbatches) {
    const auto n = static_cast<std::size_t>(stages) * static_cast<std::size_t>(microbatches);
    for (int k = 0; k < kNumKinds; ++k) {
      loc_[k].assign(n, Loc{});
      count_[k].assign(n, 0);
    }
  }
  // Records an occurrence; returns the earlier one if this is a duplicate.
  Loc add(ActionKind kind, int stage, int microbatch, Loc where) {
    const std::size_t i = slot(stage, microbatch);
    const int k = static_cast<int>(kind);
    ++count_[k][i];
    if (loc_[k][i].valid()) return loc_[k][i];
    loc_[k][i] = where;
    return Loc{};
  }
  Loc at(ActionKind kind, int stage, int microbatch) const {
    return loc_[static_cast<int>(kind)][slot(stage, microbatch)];
  }
  int count(ActionKind kind, int stage, int microbatch) const {
    return count_[static_cast<int>(kind)][slot(stage, microbatch)];
  }

 private:
  std::size_t slot(int stage, int microbatch) const {
    return static_cast<std::size_t>(stage) * static_cast<std::size_t>(microbatches_) +
           static_cast<std::size_t>(microbatch < 0 ? 0 : microbatch);
  }
  int stages_;
  int microbatches_;
  std::vector<Loc> loc_[kNumKinds];
  std::vector<int> count_[kNumKinds];
};

// "rank 1's recvF1.0<0 (#3)"
std::string describe(const Schedule& s, Loc loc) {
  const Action& a =
      s.actions[static_cast<std::size_t>(loc.rank)][static_cast<std::size_t>(loc.index)];
  return str_cat("rank ", loc.rank, "'s ", a.to_string(), " (#", loc.index, ")");
}

// The action at the other end of a message: sendF(s) <-> recvF(s+1),
// sendB(s) <-> recvB(s-1).
Action matching_action(const Action& a, int my_rank) {
  switch (a.kind) {
    case ActionKind::kSendActivation:
      return Action::recv_activation(a.stage + 1, a.microbatch, my_rank);
    case ActionKind::kRecvActivation:
      return Action::send_activation(a.stage - 1, a.microbatch, my_rank);
    case ActionKind::kSendGradient:
      return Action::recv_gradient(a.stage - 1, a.microbatch, my_rank);
    case ActionKind::kRecvGradient:
      return Action::send_gradient(a.stage + 1, a.microbatch, my_rank);
    default:
      return a;
  }
}

// The identity of the message a send/recv moves, the same at both ends.
std::tuple<int, int, int> message_key(const Action& a) {
  switch (a.kind) {
    case ActionKind::kSendActivation:
      return {0, a.stage, a.microbatch};
    case ActionKind::kRecvActivation:
      return {0, a.stage - 1, a.microbatch};
    case ActionKind::kSendGradient:
      return {1, a.stage, a.microbatch};
    default:  // kRecvGradient
      return {1, a.stage + 1, a.microbatch};
  }
}

class Checker {
 public:
  explicit Checker(const Schedule& s) : s_(s) {}

  std::vector<std::string> run() {
    if (!check_shape()) return problems_;
    table_ = std::make_unique<ActionTable>(s_.num_stages(), s_.num_microbatches);
    check_actions();
    check_completeness();
    check_order();
    if (problems_.empty()) check_message_order();
    return problems_;
  }
  const ActionTable& table() const { return *table_; }
  void add(std::string problem) {
    if (problems_.size() < kMaxProblems) {
      problems_.push_back(std::move(problem));
    } else if (problems_.size() == kMaxProblems) {
      problems_.push_back("(further problems not listed)");
    }
  }

 private:
  bool check_shape() {
    const int p = s_.num_ranks;
    if (p < 1) add(str_cat("the schedule has ", p, " ranks; it needs at least 1"));
    if (s_.num_microbatches < 1) {
      add(str_cat("the schedule has ", s_.num_microbatches, " microbatches; it needs at least 1"));
    }
    if (s_.num_stages() < 1) add("the schedule has no stages (stage_ranks is empty)");
    if (p >= 1 && static_cast<int>(s_.actions.size()) != p) {
      add(str_cat("the schedule has ", s_.actions.size(), " action lists for ", p,
                  " ranks; it needs one per rank"));
    }
    for (int st = 0; st < s_.num_stages(); ++st) {
      const int r = s_.stage_ranks[static_cast<std::size_t>(st)];
      if (r < 0 || r >= p)
        add(str_cat("stage ", st, " is placed on rank ", r, ", outside 0..", p - 1));
    }
    if (!problems_.empty()) return false;
    // Every rank must run something: a rank without a stage would idle
    // through the whole step.
    for (int r = 0; r < p; ++r) {
      if (s_.stages_of_rank(r).empty()) add(str_cat("rank ", r, " has no stage"));
    }
    return problems_.empty();
  }

  void check_actions() {
    const int stages = s_.num_stages();
    const int m = s_.num_microbatches;
    for (int r = 0; r < s_.num_ranks; ++r) {
      const auto& list = s_.actions[static_cast<std::size_t>(r)];
      for (int i = 0; i < static_cast<int>(list.size()); ++i) {
        const Action& a = list[static_cast<std::size_t>(i)];
        const std::string where = str_cat("rank ", r, "'s ", a.to_string(), " (#", i, ")");
        if (a.stage < 0 || a.stage >= stages) {
          add(str_cat(where, ": stage ", a.stage, " is out of range (", stages, " stages)"));
          continue;
        }
        const bool reduce = a.kind == ActionKind::kReduceGradients;
        if (reduce ? a.microbatch != kNoMicrobatch : (a.microbatch < 0 || a.microbatch >= m)) {
          add(str_cat(where, ": microbatch ", a.microbatch, " is out of range (",
                      reduce ? "a reduce has none" : str_cat(m, " microbatches"), ")"));
          continue;
        }
        const int owner = s_.stage_ranks[static_cast<std::size_t>(a.stage)];
        if (owner != r) {
          add(str_cat(where, ": stage ", a.stage, " is placed on rank ", owner, ", not rank ", r));
          continue;
        }
        if (a.is_communication()) {
          const int other = a.neighbour_stage(stages);
          if (other < 0) {
            add(str_cat(where, ": stage ", a.stage, " is the ",
                        a.kind == ActionKind::kSendActivation || a.kind == ActionKind::kRecvGradient
                            ? "last stage; nothing follows it"
                            : "first stage; nothing precedes it"));
            continue;
          }
          const int other_rank = s_.stage_ranks[static_cast<std::size_t>(other)];
          if (other_rank == r) {
            add(str_cat(where, ": stages ", std::min(a.stage, other), " and ",
                        std::max(a.stage, other), " are both on rank ", r,
                        ", so the tensor passes locally; remove the ",
                        a.is_send() ? "send" : "recv"));
            continue;
          }
          if (a.peer != other_rank) {
            add(str_cat(where, ": its peer is rank ", a.peer, " but stage ", other, " is on rank ",
                        other_rank));
            continue;
          }
        } else if (a.peer != kNoPeer) {
          add(str_cat(where, ": only a send or recv has a peer"));
          continue;
        }
        const Loc first = table_->add(a.kind, a.stage, a.microbatch, Loc{r, i});
        if (first.valid()) {
          add(str_cat(where, " repeats ", describe(s_, first), "; each action runs once a step"));
        }
      }
    }
  }

  void check_completeness() {
    const ActionTable& t = *table_;
    const int stages = s_.num_stages();
    const int m = s_.num_microbatches;
    for (int st = 0; st < stages; ++st) {
      const int r = s_.stage_ranks[static_cast<std::size_t>(st)];
      for (int mb = 0; mb < m; ++mb) {
        const std::string sm = str_cat(st, '.', mb);
        if (t.count(ActionKind::kForward, st, mb) == 0) {
          add(str_cat("F", sm, " is missing: stage ", st, " microbatch ", mb,
                      " needs a forward on rank ", r));
        }
        const int b = t.count(ActionKind::kBackward, st, mb);
        const int in = t.count(ActionKind::kBackwardInput, st, mb);
        const int w = t.count(ActionKind::kBackwardWeight, st, mb);
        if (b == 0 && in == 0 && w == 0) {
          add(str_cat("stage ", st, " microbatch ", mb, " has no backward: add B", sm, ", or I", sm,
                      " and W", sm, ", on rank ", r));
        } else if (b > 0 && (in > 0 || w > 0)) {
          add(str_cat("stage ", st, " microbatch ", mb, " has both B", sm,
                      " and a split backward (I/W); use one or the other"));
        } else if (b == 0 && in == 0) {
          add(str_cat("W", sm, " on rank ", r, " has no I", sm, ": a split backward needs both"));
        } else if (b == 0 && w == 0) {
          add(str_cat("I", sm, " on rank ", r, " has no W", sm,
                      ": a split backward needs both, or use B", sm));
        }
        if (st + 1 < stages && is_cross(s_, st, st + 1)) {
          check_message(Action::send_activation(st, mb, s_.stage_ranks[st + 1]), r,
                        Action::recv_activation(st + 1, mb, r), s_.stage_ranks[st + 1],
                        "the activation");
        }
        if (st > 0 && is_cross(s_, st, st - 1)) {
          check_message(Action::send_gradient(st, mb, s_.stage_ranks[st - 1]), r,
                        Action::recv_gradient(st - 1, mb, r), s_.stage_ranks[st - 1],
                        "the input gradient");
        }
      }
      if (t.count(ActionKind::kReduceGradients, st, 0) == 0) {
        add(str_cat("stage ", st, " has no reduce: add reduce", st, " on rank ", r,
                    " after the stage's last B/W"));
      }
    }
  }

  void check_message(const Action& send, int from, const Action& recv, int to, const char* what) {
    const ActionTable& t = *table_;
    const Loc s = t.at(send.kind, send.stage, send.microbatch);
    const Loc r = t.at(recv.kind, recv.stage, recv.microbatch);
    if (s.valid() && r.valid()) return;
    if (!s.valid() && !r.valid()) {
      add(str_cat(what, " of stage ", send.stage, " microbatch ", send.microbatch,
                  " never goes from rank ", from, " to rank ", to, ": add ", send.to_string(),
                  " on rank ", from, " and ", recv.to_string(), " on rank ", to));
    } else if (!s.valid()) {
      add(str_cat(describe(s_, r), " waits for a message that never comes: rank ", from, " has no ",
                  send.to_string()));
    } else {
      add(str_cat(describe(s_, s), " is never received: rank ", to, " has no ", recv.to_string()));
    }
  }

  // `before` must come earlier than `at` in the same rank's list.
  void require_before(Loc before, Loc at, const char* relation) {
    if (!before.valid() || !at.valid()) return;  // missing: reported already
    if (before.rank == at.rank && before.index < at.index) return;
    add(str_cat(describe(s_, at), " comes before ", describe(s_, before), ", ", relation));
  }

  void check_order() {
    const ActionTable& t = *table_;
    const int stages = s_.num_stages();
    const int m = s_.num_microbatches;
    for (int st = 0; st < stages; ++st) {
      int last_backward_index = -1;
      Loc last_backward;
      for (int mb = 0; mb < m; ++mb) {
        const Loc f = t.at(ActionKind::kForward, st, mb);
        const Loc b = t.at(ActionKind::kBackward, st, mb);
        const Loc in = t.at(ActionKind::kBackwardInput, st, mb);
        const Loc w = t.at(ActionKind::kBackwardWeight, st, mb);
        const Loc grad = b.valid() ? b : in;  // the action that makes the input gradient
        if (st > 0) {
          if (is_cross(s_, st - 1, st)) {
            require_before(t.at(ActionKind::kRecvActivation, st, mb), f, "which brings its input");
          } else {
            require_before(t.at(ActionKind::kForward, st - 1, mb), f, "whose output it needs");
          }
        }
        require_before(f, grad, "its forward");
        require_before(in, w, "its input-gradient pass (W follows I)");
        if (st + 1 < stages) {
          if (is_cross(s_, st, st + 1)) {
            require_before(t.at(ActionKind::kRecvGradient, st, mb), grad,
                           "which brings its output gradient");
            require_before(f, t.at(ActionKind::kSendActivation, st, mb),
                           "which computes what it sends");
          } else {
            const Loc next_b = t.at(ActionKind::kBackward, st + 1, mb);
            require_before(next_b.valid() ? next_b : t.at(ActionKind::kBackwardInput, st + 1, mb),
                           grad, "which computes its output gradient");
          }
        }
        if (st > 0 && is_cross(s_, st - 1, st)) {
          require_before(grad, t.at(ActionKind::kSendGradient, st, mb),
                         "which computes what it sends");
        }
        for (const Loc end : {b, w}) {
          if (end.valid() && end.index > last_backward_index) {
            last_backward_index = end.index;
            last_backward = end;
          }
        }
      }
      require_before(last_backward, t.at(ActionKind::kReduceGradients, st, 0),
                     "the stage's last backward");
    }
  }

  void check_message_order() {
    const int p = s_.num_ranks;
    // sent[a * p + b]: messages rank a sends to b, in order; received
    // likewise from b's side.
    std::vector<std::vector<Loc>> sent(static_cast<std::size_t>(p * p));
    std::vector<std::vector<Loc>> received(static_cast<std::size_t>(p * p));
    for (int r = 0; r < p; ++r) {
      const auto& list = s_.actions[static_cast<std::size_t>(r)];
      for (int i = 0; i < static_cast<int>(list.size()); ++i) {
        const Action& a = list[static_cast<std::size_t>(i)];
        if (a.is_send()) sent[static_cast<std::size_t>(r * p + a.peer)].push_back({r, i});
        if (a.is_recv()) received[static_cast<std::size_t>(a.peer * p + r)].push_back({r, i});
      }
    }
    for (int from = 0; from < p; ++from) {
      for (int to = 0; to < p; ++to) {
        const auto& out = sent[static_cast<std::size_t>(from * p + to)];
        const auto& in = received[static_cast<std::size_t>(from * p + to)];
        for (std::size_t k = 0; k < out.size() && k < in.size(); ++k) {
          const Action& sa = s_.actions[from][static_cast<std::size_t>(out[k].index)];
          const Action& ra = s_.actions[to][static_cast<std::size_t>(in[k].index)];
          if (message_key(sa) != message_key(ra)) {
            add(str_cat("rank ", from, " sends to rank ", to, " in another order than rank ", to,
                        " receives: message ", k, " is ", describe(s_, out[k]), " but ",
                        describe(s_, in[k]),
                        "; messages between two ranks are matched in order, so list the recvs "
                        "in the order of the sends"));
            break;
          }
        }
      }
    }
  }

  const Schedule& s_;
  std::unique_ptr<ActionTable> table_;
  std::vector<std::string> problems_;
};

// Runs the lists in the execution model of schedule.h: compute in list
// order, communication in batches that begin in list order per rank and
// complete when both ends of every message have begun. Works on a valid
// schedule (Checker found nothing but deadlock is still possible).
class Engine {
 public:
  Engine(const Schedule& s, const ActionTable& table, const CostFunction& cost)
      : s_(s), table_(table), cost_(cost) {
    const int p = s.num_ranks;
    batch_of_.resize(static_cast<std::size_t>(p));
    input_batch_.resize(static_cast<std::size_t>(p));
    rank_batches_.resize(static_cast<std::size_t>(p));
    for (int r = 0; r < p; ++r) {
      const auto& list = s.actions[static_cast<std::size_t>(r)];
      auto& batch_of = batch_of_[static_cast<std::size_t>(r)];
      batch_of.assign(list.size(), -1);
      for (int i = 0; i < static_cast<int>(list.size()); ++i) {
        if (!list[static_cast<std::size_t>(i)].is_communication()) continue;
        if (i == 0 || !list[static_cast<std::size_t>(i - 1)].is_communication()) {
          Batch b;
          b.rank = r;
          b.local_index = static_cast<int>(rank_batches_[static_cast<std::size_t>(r)].size());
          b.first_action = i;
          rank_batches_[static_cast<std::size_t>(r)].push_back(static_cast<int>(batches_.size()));
          batches_.push_back(b);
        }
        batch_of[static_cast<std::size_t>(i)] = static_cast<int>(batches_.size()) - 1;
      }
    }
    // Messages of each batch, with the peer's batch and the message's cost
    // (always taken from the send).
    for (int r = 0; r < p; ++r) {
      const auto& list = s.actions[static_cast<std::size_t>(r)];
      for (int i = 0; i < static_cast<int>(list.size()); ++i) {
        const Action& a = list[static_cast<std::size_t>(i)];
        if (!a.is_communication()) continue;
        const Action peer_action = matching_action(a, r);
        const Loc peer = table.at(peer_action.kind, peer_action.stage, peer_action.microbatch);
        const Action& send = a.is_send() ? a : s.actions[peer.rank][peer.index];
        const int sender = a.is_send() ? r : peer.rank;
        Message msg;
        msg.action = i;
        msg.peer_batch = batch_of_[static_cast<std::size_t>(peer.rank)][peer.index];
        msg.peer_action = peer.index;
        msg.cost = checked_cost(sender, send);
        batches_[batch_of_[r][i]].messages.push_back(msg);
      }
    }
    // The batch that brings each compute action's input, if it comes from
    // another rank.
    for (int r = 0; r < p; ++r) {
      const auto& list = s.actions[static_cast<std::size_t>(r)];
      auto& input = input_batch_[static_cast<std::size_t>(r)];
      input.assign(list.size(), -1);
      for (int i = 0; i < static_cast<int>(list.size()); ++i) {
        const Action& a = list[static_cast<std::size_t>(i)];
        Loc recv;
        if (a.kind == ActionKind::kForward && a.stage > 0 && is_cross(s, a.stage - 1, a.stage)) {
          recv = table.at(ActionKind::kRecvActivation, a.stage, a.microbatch);
        } else if ((a.kind == ActionKind::kBackward || a.kind == ActionKind::kBackwardInput) &&
                   a.stage + 1 < s.num_stages() && is_cross(s, a.stage, a.stage + 1)) {
          recv = table.at(ActionKind::kRecvGradient, a.stage, a.microbatch);
        }
        if (recv.valid()) input[static_cast<std::size_t>(i)] = batch_of_[r][recv.index];
      }
    }
  }

  // Runs the schedule; returns false on deadlock (deadlock() says why).
  bool run() {
    const int p = s_.num_ranks;
    report_.ranks.assign(static_cast<std::size_t>(p), {});
    pc_.assign(static_cast<std::size_t>(p), 0);
    clock_.assign(static_cast<std::size_t>(p), 0.0);
    next_batch_.assign(static_cast<std::size_t>(p), 0);
    for (int r = 0; r < p; ++r) {
      report_.ranks[static_cast<std::size_t>(r)].times.assign(s_.actions[r].size(), {});
    }
    bool progress = true;
    while (progress) {
      progress = false;
      for (int r = 0; r < p; ++r) {
        if (complete_batches(r)) progress = true;
        if (advance(r)) progress = true;
        if (complete_batches(r)) progress = true;
      }
    }
    bool all_done = true;
    for (int r = 0; r < p; ++r) {
      if (!finished(r)) all_done = false;
    }
    if (!all_done) return false;
    for (int r = 0; r < p; ++r) {
      RankSimulation& rank = report_.ranks[static_cast<std::size_t>(r)];
      rank.finish = clock_[static_cast<std::size_t>(r)];
      for (int b : rank_batches_[static_cast<std::size_t>(r)]) {
        rank.finish = std::max(rank.finish, batches_[static_cast<std::size_t>(b)].complete);
      }
      report_.makespan = std::max(report_.makespan, rank.finish);
    }
    double busy = 0.0;
    for (RankSimulation& rank : report_.ranks) {
      rank.idle = report_.makespan - rank.busy;
      busy += rank.busy;
    }
    report_.idle_fraction =
        report_.makespan > 0.0 ? 1.0 - busy / (static_cast<double>(p) * report_.makespan) : 0.0;
    return true;
  }

  SimulationReport& report() { return report_; }

  // The cycle of ranks waiting for each other, each with what it waits for.
  std::string deadlock() const {
    const int p = s_.num_ranks;
    std::vector<int> waits_for(static_cast<std::size_t>(p), -1);
    std::vector<std::string> why(static_cast<std::size_t>(p));
    for (int r = 0; r < p; ++r) {
      if (finished(r)) continue;
      why[static_cast<std::size_t>(r)] = explain(r, &waits_for[static_cast<std::size_t>(r)]);
    }
    int start = 0;
    while (start < p && finished(start)) ++start;
    // Follow the waits from the first stuck rank until a rank repeats.
    std::vector<int> seen_at(static_cast<std::size_t>(p), -1);
    std::vector<int> path;
    int r = start;
    while (r >= 0 && seen_at[static_cast<std::size_t>(r)] < 0) {
      seen_at[static_cast<std::size_t>(r)] = static_cast<int>(path.size());
      path.push_back(r);
      r = waits_for[static_cast<std::size_t>(r)];
    }
    std::ostringstream out;
    out << "deadlock: ";
    const std::size_t first =
        r >= 0 ? static_cast<std::size_t>(seen_at[static_cast<std::size_t>(r)]) : 0;
    for (std::size_t k = first; k < path.size(); ++k) {
      out << (k > first ? "; " : "") << why[static_cast<std::size_t>(path[k])];
    }
    if (r >= 0) {
      out << " (cycle: rank " << path[first];
      for (std::size_t k = first + 1; k < path.size(); ++k) out << " -> rank " << path[k];
      out << " -> rank " << path[first] << ")";
    }
    return out.str();
  }

 private:
  struct Message {
    int action = -1;       // the send/recv in this rank's list
    int peer_batch = -1;   // the batch holding the other end
    int peer_action = -1;  // the other end in its rank's list
    double cost = 0.0;
  };
  struct Batch {
    int rank = -1;
    int local_index = -1;  // k-th batch of its rank
    int first_action = -1;
    std::vector<Message> messages;
    bool posted = false;
    bool done = false;
    double post = 0.0;
    double complete = 0.0;
  };

  double checked_cost(int rank, const Action& a) const {
    const double c = cost_(rank, a);
    DTRAIN_CHECK_ARG(std::isfinite(c) && c >= 0.0, "the cost of ", a.to_string(), " on rank ", rank,
                     " is ", c, "; costs must be finite and >= 0");
    return c;
  }

  bool finished(int r) const {
    return pc_[static_cast<std::size_t>(r)] ==
               static_cast<int>(s_.actions[static_cast<std::size_t>(r)].size()) &&
           next_batch_[static_cast<std::size_t>(r)] ==
               static_cast<int>(rank_batches_[static_cast<std::size_t>(r)].size());
  }

  // A batch has begun once it is posted and its rank's earlier batches have
  // completed; this is when.
  bool begun(int b, double* when) const {
    const Batch& batch = batches_[static_cast<std::size_t>(b)];
    if (!batch.posted || next_batch_[static_cast<std::size_t>(batch.rank)] < batch.local_index) {
      return false;
    }
    double t = batch.post;
    if (batch.local_index > 0) {
      const int prev = rank_batches_[static_cast<std::size_t>(batch.rank)]
                                    [static_cast<std::size_t>(batch.local_index - 1)];
      t = std::max(t, batches_[static_cast<std::size_t>(prev)].complete);
    }
    *when = t;
    return true;
  }

  // Completes rank r's batches in order while their messages' other ends
  // have begun.
  bool complete_batches(int r) {
    bool progress = false;
    auto& next = next_batch_[static_cast<std::size_t>(r)];
    const auto& mine = rank_batches_[static_cast<std::size_t>(r)];
    while (next < static_cast<int>(mine.size())) {
      const int b = mine[static_cast<std::size_t>(next)];
      double begin = 0.0;
      if (!begun(b, &begin)) break;
      double complete = begin;
      bool ready = true;
      for (const Message& msg : batches_[static_cast<std::size_t>(b)].messages) {
        double peer_begin = 0.0;
        if (!begun(msg.peer_batch, &peer_begin)) {
          ready = false;
          break;
        }
        complete = std::max(complete, std::max(begin, peer_begin) + msg.cost);
      }
      if (!ready) break;
      Batch& batch = batches_[static_cast<std::size_t>(b)];
      batch.done = true;
      batch.complete = complete;
      auto& times = report_.ranks[static_cast<std::size_t>(r)].times;
      for (const Message& msg : batch.messages) {
        times[static_cast<std::size_t>(msg.action)] = {begin, complete};
      }
      ++next;
      progress = true;
    }
    return progress;
  }

  // Runs rank r's actions until one waits for a batch that has not completed.
  bool advance(int r) {
    bool progress = false;
    const auto& list = s_.actions[static_cast<std::size_t>(r)];
    int& pc = pc_[static_cast<std::size_t>(r)];
    double& t = clock_[static_cast<std::size_t>(r)];
    RankSimulation& rank = report_.ranks[static_cast<std::size_t>(r)];
    while (pc < static_cast<int>(list.size())) {
      const Action& a = list[static_cast<std::size_t>(pc)];
      if (a.is_compute()) {
        const int input = input_batch_[static_cast<std::size_t>(r)][static_cast<std::size_t>(pc)];
        double start = t;
        if (input >= 0) {
          const Batch& batch = batches_[static_cast<std::size_t>(input)];
          if (!batch.done) break;
          start = std::max(start, batch.complete);
        }
        const double cost = checked_cost(r, a);
        rank.times[static_cast<std::size_t>(pc)] = {start, start + cost};
        rank.busy += cost;
        t = start + cost;
      } else if (a.is_communication()) {
        Batch& batch =
            batches_[static_cast<std::size_t>(batch_of_[r][static_cast<std::size_t>(pc)])];
        if (!batch.posted) {
          batch.posted = true;
          batch.post = t;
        }
      } else {
        rank.times[static_cast<std::size_t>(pc)] = {t, t};
      }
      ++pc;
      progress = true;
    }
    return progress;
  }

  // What stuck rank r waits for, and (in *peer) the rank it waits on.
  std::string explain(int r, int* peer) const {
    const auto& list = s_.actions[static_cast<std::size_t>(r)];
    const int pc = pc_[static_cast<std::size_t>(r)];
    const int eb =
        rank_batches_[static_cast<std::size_t>(r)]
                     [static_cast<std::size_t>(next_batch_[static_cast<std::size_t>(r)])];
    const Batch& earliest = batches_[static_cast<std::size_t>(eb)];
    std::ostringstream out;
    out << "rank " << r << " is stuck ";
    if (pc < static_cast<int>(list.size())) {
      out << "at " << list[static_cast<std::size_t>(pc)].to_string() << " (#" << pc << ")";
      const int input = input_batch_[static_cast<std::size_t>(r)][static_cast<std::size_t>(pc)];
      const Batch& wanted = batches_[static_cast<std::size_t>(input)];
      // The recv of the wanted batch that feeds this action.
      for (const Message& msg : wanted.messages) {
        const Action& a = list[static_cast<std::size_t>(msg.action)];
        if (a.is_recv() && a.stage == list[static_cast<std::size_t>(pc)].stage &&
            a.microbatch == list[static_cast<std::size_t>(pc)].microbatch) {
          out << " waiting for " << a.to_string() << " (#" << msg.action << ")";
        }
      }
      if (input != eb) {
        out << ", queued behind its earlier communication "
            << list[static_cast<std::size_t>(earliest.first_action)].to_string() << " (#"
            << earliest.first_action << ")";
      }
    } else {
      out << "at the end of its list waiting for its communication "
          << list[static_cast<std::size_t>(earliest.first_action)].to_string() << " (#"
          << earliest.first_action << ")";
    }
    for (const Message& msg : earliest.messages) {
      double ignored = 0.0;
      if (begun(msg.peer_batch, &ignored)) continue;
      const Batch& pb = batches_[static_cast<std::size_t>(msg.peer_batch)];
      const auto& peer_list = s_.actions[static_cast<std::size_t>(pb.rank)];
      *peer = pb.rank;
      out << ", whose " << list[static_cast<std::size_t>(msg.action)].to_string() << " needs rank "
          << pb.rank << "'s " << peer_list[static_cast<std::size_t>(msg.peer_action)].to_string()
          << " (#" << msg.peer_action << ")";
      if (!pb.posted) {
        out << ", which rank " << pb.rank << " has not reached";
      } else {
        const int peer_eb =
            rank_batches_[static_cast<std::size_t>(pb.rank)]
                         [static_cast<std::size_t>(next_batch_[static_cast<std::size_t>(pb.rank)])];
        const int peer_first = batches_[static_cast<std::size_t>(peer_eb)].first_action;
        out << ", posted behind rank " << pb.rank << "'s unfinished earlier communication "
            << peer_list[static_cast<std::size_t>(peer_first)].to_string() << " (#" << peer_first
            << ")";
      }
      break;
    }
    return out.str();
  }

  const Schedule& s_;
  const ActionTable& table_;
  const CostFunction& cost_;
  std::vector<Batch> batches_;
  std::vector<std::vector<int>> rank_batches_;  // per rank, its batches in order
  std::vector<std::vector<int>> batch_of_;      // per rank and action: its batch or -1
  std::vector<std::vector<int>> input_batch_;   // per rank and action: batch of its input
  std::vector<int> pc_;
  std::vector<double> clock_;
  std::vector<int> next_batch_;  // per rank: first batch not completed
  SimulationReport report_;
};

// Peaks of stored (stage, microbatch) pairs along each rank's list.
void count_stored(const Schedule& s, SimulationReport* report) {
  for (int r = 0; r < s.num_ranks; ++r) {
    int stored = 0;
    int until_input = 0;
    RankSimulation& rank = report->ranks[static_cast<std::size_t>(r)];
    for (const Action& a : s.actions[static_cast<std::size_t>(r)]) {
      switch (a.kind) {
        case ActionKind::kForward:
          ++stored;
          ++until_input;
          rank.peak_stored = std::max(rank.peak_stored, stored);
          rank.peak_stored_until_input_grad =
              std::max(rank.peak_stored_until_input_grad, until_input);
          break;
        case ActionKind::kBackward:
          --stored;
          --until_input;
          break;
        case ActionKind::kBackwardInput:
          --until_input;
          break;
        case ActionKind::kBackwardWeight:
          --stored;
          break;
        default:
          break;
      }
    }
  }
}

CostFunction cost_function(const SimulationOptions& options) {
  if (options.cost) return options.cost;
  options.costs.validate();
  const ActionCosts costs = options.costs;
  return [costs](int, const Action& a) {
    switch (a.kind) {
      case ActionKind::kForward:
        return costs.forward;
      case ActionKind::kBackward:
        return costs.backward;
      case ActionKind::kBackwardInput:
        return costs.backward_input;
      case ActionKind::kBackwardWeight:
        return costs.backward_weight;
      case ActionKind::kSendActivation:
      case ActionKind::kSendGradient:
      case ActionKind::kRecvActivation:
      case ActionKind::kRecvGradient:
        return costs.communication;
      case ActionKind::kReduceGradients:
        return 0.0;
    }
    return 0.0;
  };
}

std::string rejection(const Schedule& s, const std::vector<std::string>& problems) {
  std::ostringstream out;
  out << "pipeline schedule";
  if (!s.name.empty()) out << " '" << s.name << "'";
  out << " (" << s.num_ranks << " ranks, " << s.num_stages() << " stages, " << s.num_microbatches
      << " microbatches) is rejected: ";
  for (std::size_t i = 0; i < problems.size() && i < kProblemsInMessage; ++i) {
    out << (i ? "; " : "") << problems[i];
  }
  if (problems.size() > kProblemsInMessage) {
    out << "; and " << problems.size() - kProblemsInMessage << " more problems";
  }
  return out.str();
}

// Checks, then runs with `cost`. Problems go to *problems; the report is
// valid only when there are none.
SimulationReport check_and_run(const Schedule& s, const CostFunction& cost,
                               std::vector<std::string>* problems) {
  Checker checker(s);
  *problems = checker.run();
  if (!problems->empty()) return {};
  Engine engine(s, checker.table(), cost);
  if (!engine.run()) {
    problems->push_back(engine.deadlock());
    return {};
  }
  SimulationReport report = std::move(engine.report());
  count_stored(s, &report);
  return report;
}

}  // namespace

void ActionCosts::validate() const {
  const std::pair<const char*, double> all[] = {{"forward", forward},
                                                {"backward", backward},
                                                {"backward_input", backward_input},
                                                {"backward_weight", backward_weight},
                                                {"communication", communication}};
  for (const auto& [name, value] : all) {
    DTRAIN_CHECK_ARG(std::isfinite(value) && value >= 0.0, "the ", name, " cost is ", value,
                     "; costs must be finite and >= 0");
  }
}

std::vector<std::string> check(const Schedule& schedule) {
  std::vector<std::string> problems;
  check_and_run(schedule, cost_function({}), &problems);
  return problems;
}

void validate(const Schedule& schedule) {
  const std::vector<std::string> problems = check(schedule);
  DTRAIN_CHECK_ARG(problems.empty(), rejection(schedule, problems));
}

SimulationReport simulate(const Schedule& schedule, const SimulationOptions& options) {
  std::vector<std::string> problems;
  SimulationReport report = check_and_run(schedule, cost_function(options), &problems);
  DTRAIN_CHECK_ARG(problems.empty(), rejection(schedule, problems));
  return report;
}

std::string render_timeline(const Schedule& schedule, const SimulationReport& report,
                            double time_unit) {
  DTRAIN_CHECK_ARG(std::isfinite(time_unit) && time_unit > 0.0, "render_timeline: time_unit is ",
                   time_unit, "; it must be > 0");
  DTRAIN_CHECK_ARG(report.ranks.size() == schedule.actions.size(),
                   "render_timeline: the report is for ", report.ranks.size(),
                   " ranks, the schedule has ", schedule.actions.size());
  const bool several_stages = schedule.num_stages() > schedule.num_ranks;
  const auto label = [&](const Action& a) {
    const char letter = a.kind == ActionKind::kForward         ? 'F'
                        : a.kind == ActionKind::kBackward      ? 'B'
                        : a.kind == ActionKind::kBackwardInput ? 'I'
                                                               : 'W';
    return several_stages ? str_cat(letter, a.stage, '.', a.microbatch)
                          : str_cat(letter, a.microbatch);
  };
  const auto cells = static_cast<std::size_t>(std::ceil(report.makespan / time_unit - 1e-9));
  std::size_t width = 1;
  for (const auto& list : schedule.actions) {
    for (const Action& a : list) {
      if (a.is_compute()) width = std::max(width, label(a).size());
    }
  }
  std::ostringstream out;
  const std::string rank_header = str_cat("rank ", schedule.num_ranks - 1);
  for (int r = 0; r < schedule.num_ranks; ++r) {
    std::vector<std::string> row(cells, ".");
    const auto& list = schedule.actions[static_cast<std::size_t>(r)];
    const auto& times = report.ranks[static_cast<std::size_t>(r)].times;
    for (std::size_t i = 0; i < list.size(); ++i) {
      if (!list[i].is_compute()) continue;
      for (std::size_t c = 0; c < cells; ++c) {
        const double t = static_cast<double>(c) * time_unit;
        if (t >= times[i].start - 1e-9 && t < times[i].end - 1e-9) row[c] = label(list[i]);
      }
    }
    std::string name = str_cat("rank ", r);
    name.resize(rank_header.size(), ' ');
    out << name << " |";
    for (const std::string& cell : row) {
      out << cell << std::string(width - cell.size() + 1, ' ');
    }
    out << "|\n";
  }
  return out.str();
}

}  // namespace dtrain::parallel::pipeline
