// Actions, schedules, and the communication a compute-only list implies.

#include "dtrain/parallel/pipeline/schedule.h"

#include <algorithm>
#include <map>
#include <tuple>
#include <utility>

#include "dtrain/error.h"
#include "dtrain/parallel/pipeline/simulator.h"

namespace dtrain::parallel::pipeline {

Action Action::forward(int stage, int microbatch) {
  return {ActionKind::kForward, stage, microbatch, kNoPeer};
}
Action Action::backward(int stage, int microbatch) {
  return {ActionKind::kBackward, stage, microbatch, kNoPeer};
}
Action Action::backward_input(int stage, int microbatch) {
  return {ActionKind::kBackwardInput, stage, microbatch, kNoPeer};
}
Action Action::backward_weight(int stage, int microbatch) {
  return {ActionKind::kBackwardWeight, stage, microbatch, kNoPeer};
}
Action Action::send_activation(int stage, int microbatch, int peer) {
  return {ActionKind::kSendActivation, stage, microbatch, peer};
}
Action Action::recv_activation(int stage, int microbatch, int peer) {
  return {ActionKind::kRecvActivation, stage, microbatch, peer};
}
Action Action::send_gradient(int stage, int microbatch, int peer) {
  return {ActionKind::kSendGradient, stage, microbatch, peer};
}
Action Action::recv_gradient(int stage, int microbatch, int peer) {
  return {ActionKind::kRecvGradient, stage, microbatch, peer};
}
Action Action::reduce(int stage) {
  return {ActionKind::kReduceGradients, stage, kNoMicrobatch, kNoPeer};
}

const char* action_kind_name(ActionKind kind) noexcept {
  switch (kind) {
    case ActionKind::kForward:
      return "F";
    case ActionKind::kBackward:
      return "B";
    case ActionKind::kBackwardInput:
      return "I";
    case ActionKind::kBackwardWeight:
      return "W";
    case ActionKind::kSendActivation:
      return "sendF";
    case ActionKind::kRecvActivation:
      return "recvF";
    case ActionKind::kSendGradient:
      return "sendB";
    case ActionKind::kRecvGradient:
      return "recvB";
    case ActionKind::kReduceGradients:
      return "reduce";
  }
  return "?";
}

bool Action::is_compute() const noexcept {
  return kind == ActionKind::kForward || kind == ActionKind::kBackward ||
         kind == ActionKind::kBackwardInput || kind == ActionKind::kBackwardWeight;
}
bool Action::is_send() const noexcept {
  return kind == ActionKind::kSendActivation || kind == ActionKind::kSendGradient;
}
bool Action::is_recv() const noexcept {
  return kind == ActionKind::kRecvActivation || kind == ActionKind::kRecvGradient;
}

int Action::neighbour_stage(int num_stages) const noexcept {
  int other = -1;
  switch (kind) {
    case ActionKind::kSendActivation:
    case ActionKind::kRecvGradient:
      other = stage + 1;
      break;
    case ActionKind::kRecvActivation:
    case ActionKind::kSendGradient:
      other = stage - 1;
      break;
    default:
      return -1;
  }
  return other >= 0 && other < num_stages ? other : -1;
}

std::string Action::to_string() const {
  const char* name = action_kind_name(kind);
  if (kind == ActionKind::kReduceGradients) return detail::str_cat(name, stage);
  if (is_compute()) return detail::str_cat(name, stage, '.', microbatch);
  return detail::str_cat(name, stage, '.', microbatch, is_send() ? '>' : '<', peer);
}

int Schedule::rank_of_stage(int stage) const {
  DTRAIN_CHECK_ARG(stage >= 0 && stage < num_stages(), "stage ", stage,
                   " is out of range: the schedule has ", num_stages(), " stages");
  return stage_ranks[static_cast<std::size_t>(stage)];
}

std::vector<int> Schedule::stages_of_rank(int rank) const {
  std::vector<int> stages;
  for (int s = 0; s < num_stages(); ++s) {
    if (stage_ranks[static_cast<std::size_t>(s)] == rank) stages.push_back(s);
  }
  return stages;
}

bool Schedule::operator==(const Schedule& other) const {
  return name == other.name && num_ranks == other.num_ranks &&
         num_microbatches == other.num_microbatches && stage_ranks == other.stage_ranks &&
         actions == other.actions;
}

std::vector<int> loop_placement(int num_ranks, int num_stages) {
  DTRAIN_CHECK_ARG(num_ranks >= 1, "a pipeline needs at least 1 rank, got ", num_ranks);
  DTRAIN_CHECK_ARG(num_stages >= num_ranks && num_stages % num_ranks == 0,
                   "the loop placement needs a positive multiple of the ", num_ranks,
                   " ranks as the number of stages, got ", num_stages);
  std::vector<int> ranks(static_cast<std::size_t>(num_stages));
  for (int s = 0; s < num_stages; ++s) ranks[static_cast<std::size_t>(s)] = s % num_ranks;
  return ranks;
}

namespace {

bool is_backward_end(ActionKind kind) {
  return kind == ActionKind::kBackward || kind == ActionKind::kBackwardWeight;
}

// The cross-rank message a compute action produces, if any: its kind, the
// receiving rank and the stage that consumes it there.
struct Produced {
  ActionKind send_kind;
  ActionKind recv_kind;
  int to_rank;
  int consumer_stage;
};

// Sends go right after their producer. Recvs go right before their consumer,
// except where a pair of ranks would then receive in another order than it
// sends: messages from rank a to rank b are matched in order, so b's k-th
// recv from a must come before its (k+1)-th. Walking a's messages to b
// backwards, each recv is placed at min(its consumer, the next recv's
// place); only those that must move are hoisted.
Schedule place_communication(Schedule schedule, bool megatron_steps, bool early_activations) {
  const int p = schedule.num_ranks;
  const int stages = schedule.num_stages();
  const int m = schedule.num_microbatches;
  DTRAIN_CHECK_ARG(
      p >= 1 && m >= 1 && stages >= 1 && static_cast<int>(schedule.actions.size()) == p,
      "insert_communication: the schedule needs at least 1 rank, stage and "
      "microbatch and one action list per rank (",
      p, " ranks, ", stages, " stages, ", m, " microbatches, ", schedule.actions.size(), " lists)");
  for (int s = 0; s < stages; ++s) {
    const int r = schedule.stage_ranks[static_cast<std::size_t>(s)];
    DTRAIN_CHECK_ARG(r >= 0 && r < p, "insert_communication: stage ", s, " is placed on rank ", r,
                     ", outside 0..", p - 1);
  }
  for (int r = 0; r < p; ++r) {
    for (const Action& a : schedule.actions[static_cast<std::size_t>(r)]) {
      DTRAIN_CHECK_ARG(!a.is_communication(), "insert_communication: rank ", r, " already has ",
                       a.to_string(),
                       "; give it only compute (and reduce) actions, or place all "
                       "communication yourself");
      DTRAIN_CHECK_ARG(a.stage >= 0 && a.stage < stages, "insert_communication: ", a.to_string(),
                       " on rank ", r, " names stage ", a.stage, " of ", stages);
      DTRAIN_CHECK_ARG(
          a.kind == ActionKind::kReduceGradients || (a.microbatch >= 0 && a.microbatch < m),
          "insert_communication: ", a.to_string(), " on rank ", r, " names microbatch ",
          a.microbatch, " of ", m);
    }
  }
  const auto rank_of = [&](int stage) {
    return schedule.stage_ranks[static_cast<std::size_t>(stage)];
  };
  const auto produced = [&](const Action& a, int rank, Produced* out) {
    if (a.kind == ActionKind::kForward && a.stage + 1 < stages && rank_of(a.stage + 1) != rank) {
      *out = {ActionKind::kSendActivation, ActionKind::kRecvActivation, rank_of(a.stage + 1),
              a.stage + 1};
      return true;
    }
    if ((a.kind == ActionKind::kBackward || a.kind == ActionKind::kBackwardInput) && a.stage > 0 &&
        rank_of(a.stage - 1) != rank) {
      *out = {ActionKind::kSendGradient, ActionKind::kRecvGradient, rank_of(a.stage - 1),
              a.stage - 1};
      return true;
    }
    return false;
  };

  // Where each consumer sits in its rank's list: (kind, stage, microbatch) ->
  // index. A consumer of an activation is an F; of a gradient, a B or I.
  std::vector<std::map<std::tuple<int, int, int>, int>> consumer_index(static_cast<std::size_t>(p));
  for (int r = 0; r < p; ++r) {
    const auto& list = schedule.actions[static_cast<std::size_t>(r)];
    for (int i = 0; i < static_cast<int>(list.size()); ++i) {
      const Action& a = list[static_cast<std::size_t>(i)];
      const int key_kind =
          a.kind == ActionKind::kForward                                              ? 0
          : (a.kind == ActionKind::kBackward || a.kind == ActionKind::kBackwardInput) ? 1
                                                                                      : -1;
      if (key_kind >= 0)
        consumer_index[static_cast<std::size_t>(r)].emplace(
            std::make_tuple(key_kind, a.stage, a.microbatch), i);
    }
  }

  // Whether list[i] is a forward directly followed by a backward (B or I):
  // a step of 1F1B's steady state.
  const auto forward_then_backward = [&](int rank, int i) {
    const auto& list = schedule.actions[static_cast<std::size_t>(rank)];
    return i >= 0 && i + 1 < static_cast<int>(list.size()) &&
           list[static_cast<std::size_t>(i)].kind == ActionKind::kForward &&
           (list[static_cast<std::size_t>(i) + 1].kind == ActionKind::kBackward ||
            list[static_cast<std::size_t>(i) + 1].kind == ActionKind::kBackwardInput);
  };
  // Where a recv goes at the latest: before its consumer. In the Megatron
  // placement (megatron_steps), a forward-backward pair is one step: the
  // gradient its backward needs is received before its forward, and the
  // forward's output is sent after its backward, so one batch between two
  // steps sends both results and receives both inputs of the next step.
  // Interleaved orders need this: with a separate batch for each send, two
  // neighbours can each wait for the other to receive behind its own send.
  // With early_activations as well, an activation whose forward directly
  // follows a backward is received before that backward, so the sender's
  // batch holding it does not wait behind the backward.
  const auto recv_place = [&](int rank, int key_kind, int consumer) {
    if (megatron_steps && key_kind == 1 && forward_then_backward(rank, consumer - 1)) {
      return consumer - 1;
    }
    const auto& list = schedule.actions[static_cast<std::size_t>(rank)];
    if (early_activations && key_kind == 0 && consumer >= 1 &&
        consumer < static_cast<int>(list.size()) &&
        (list[static_cast<std::size_t>(consumer) - 1].kind == ActionKind::kBackward ||
         list[static_cast<std::size_t>(consumer) - 1].kind == ActionKind::kBackwardInput)) {
      return consumer - 1;
    }
    return consumer;
  };

  // The sends of each rank in the order it posts them, each with the index
  // of the compute action it follows.
  std::vector<std::vector<std::pair<int, Action>>> sends(static_cast<std::size_t>(p));
  for (int r = 0; r < p; ++r) {
    const auto& list = schedule.actions[static_cast<std::size_t>(r)];
    std::vector<std::pair<int, Action>> deferred;  // a forward's send, after its backward
    for (int i = 0; i < static_cast<int>(list.size()); ++i) {
      const Action& a = list[static_cast<std::size_t>(i)];
      Produced msg{};
      if (a.is_compute() && produced(a, r, &msg)) {
        const Action send{msg.send_kind, a.stage, a.microbatch, msg.to_rank};
        if (megatron_steps && forward_then_backward(r, i)) {
          deferred.emplace_back(i + 1, send);
        } else {
          sends[static_cast<std::size_t>(r)].emplace_back(i, send);
        }
      }
      if (!deferred.empty() && deferred.front().first == i) {
        sends[static_cast<std::size_t>(r)].push_back(deferred.front());
        deferred.clear();
      }
    }
  }

  // The recvs each rank gets: (insert-before index, sender, order) -> action.
  std::vector<std::vector<std::pair<std::tuple<int, int, int>, Action>>> recvs(
      static_cast<std::size_t>(p));
  for (int from = 0; from < p; ++from) {
    // Messages from `from` to each rank, in send order.
    std::vector<std::vector<Action>> outgoing(static_cast<std::size_t>(p));
    for (const auto& [after, send] : sends[static_cast<std::size_t>(from)]) {
      const bool activation = send.kind == ActionKind::kSendActivation;
      const Action recv{activation ? ActionKind::kRecvActivation : ActionKind::kRecvGradient,
                        activation ? send.stage + 1 : send.stage - 1, send.microbatch, from};
      outgoing[static_cast<std::size_t>(send.peer)].push_back(recv);
    }
    for (int to = 0; to < p; ++to) {
      const auto& msgs = outgoing[static_cast<std::size_t>(to)];
      const auto& index = consumer_index[static_cast<std::size_t>(to)];
      const int list_size = static_cast<int>(schedule.actions[static_cast<std::size_t>(to)].size());
      int place = list_size;  // no consumer: at the end (validate() will name it)
      for (int k = static_cast<int>(msgs.size()) - 1; k >= 0; --k) {
        const Action& recv = msgs[static_cast<std::size_t>(k)];
        const int key_kind = recv.kind == ActionKind::kRecvActivation ? 0 : 1;
        const auto it = index.find(std::make_tuple(key_kind, recv.stage, recv.microbatch));
        const int consumer = it == index.end() ? list_size : it->second;
        place = std::min(place, recv_place(to, key_kind, consumer));
        recvs[static_cast<std::size_t>(to)].push_back({std::make_tuple(place, from, k), recv});
      }
    }
  }

  // Last backward (B or W) of each stage, for the reduce actions not given.
  std::vector<int> has_reduce(static_cast<std::size_t>(stages), 0);
  std::vector<int> last_backward(static_cast<std::size_t>(stages), -1);
  for (int r = 0; r < p; ++r) {
    const auto& list = schedule.actions[static_cast<std::size_t>(r)];
    for (int i = 0; i < static_cast<int>(list.size()); ++i) {
      const Action& a = list[static_cast<std::size_t>(i)];
      if (a.kind == ActionKind::kReduceGradients) has_reduce[static_cast<std::size_t>(a.stage)] = 1;
      if (is_backward_end(a.kind)) last_backward[static_cast<std::size_t>(a.stage)] = i;
    }
  }

  for (int r = 0; r < p; ++r) {
    auto& incoming = recvs[static_cast<std::size_t>(r)];
    std::sort(incoming.begin(), incoming.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    const auto& list = schedule.actions[static_cast<std::size_t>(r)];
    std::vector<Action> out;
    out.reserve(list.size() * 2 + incoming.size());
    std::size_t next_recv = 0;
    std::size_t next_send = 0;
    const auto& my_sends = sends[static_cast<std::size_t>(r)];
    for (int i = 0; i <= static_cast<int>(list.size()); ++i) {
      while (next_recv < incoming.size() && std::get<0>(incoming[next_recv].first) == i) {
        out.push_back(incoming[next_recv++].second);
      }
      if (i == static_cast<int>(list.size())) break;
      const Action& a = list[static_cast<std::size_t>(i)];
      out.push_back(a);
      if (!a.is_compute()) continue;
      if (is_backward_end(a.kind) && !has_reduce[static_cast<std::size_t>(a.stage)] &&
          last_backward[static_cast<std::size_t>(a.stage)] == i) {
        out.push_back(Action::reduce(a.stage));
      }
      while (next_send < my_sends.size() && my_sends[next_send].first == i) {
        out.push_back(my_sends[next_send++].second);
      }
    }
    schedule.actions[static_cast<std::size_t>(r)] = std::move(out);
  }
  return schedule;
}

}  // namespace

// Receiving each tensor right before its consumer suits GPipe and 1F1B; in
// interleaved orders it deadlocks (see gradient_recv_place), and there the
// Megatron placement is needed, which in turn deadlocks GPipe (its
// gradients depend on the forward they would be posted before). The first
// placement the simulator accepts is taken.
Schedule insert_communication(Schedule compute_only) {
  Schedule best;
  double best_step = 0.0;
  for (const auto& [megatron_steps, early_activations] :
       {std::pair<bool, bool>{false, false}, {true, false}, {false, true}, {true, true}}) {
    Schedule candidate = place_communication(compute_only, megatron_steps, early_activations);
    double step = 0.0;
    try {
      step = simulate(candidate).makespan;  // unit costs; throws if check() finds a problem
    } catch (const InvalidArgument&) {
      continue;
    }
    if (best.actions.empty() || step < best_step) {
      best = std::move(candidate);
      best_step = step;
    }
  }
  if (!best.actions.empty()) return best;
  return place_communication(std::move(compute_only), false, false);  // validate() says why
}

std::vector<std::int64_t> microbatch_sizes(std::int64_t batch_size, int num_microbatches) {
  DTRAIN_CHECK_ARG(num_microbatches >= 1, "the number of microbatches must be at least 1, got ",
                   num_microbatches);
  DTRAIN_CHECK_ARG(batch_size >= num_microbatches, "a batch of ", batch_size,
                   " samples cannot be cut into ", num_microbatches,
                   " microbatches: each needs at least one sample; use at most ", batch_size,
                   " microbatches or a larger batch");
  std::vector<std::int64_t> sizes(static_cast<std::size_t>(num_microbatches),
                                  batch_size / num_microbatches);
  for (std::int64_t i = 0; i < batch_size % num_microbatches; ++i) {
    ++sizes[static_cast<std::size_t>(i)];
  }
  return sizes;
}

}  // namespace dtrain::parallel::pipeline
