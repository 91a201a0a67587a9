// GPipe, 1F1B, interleaved 1F1B and ZB-H1 (formulas in generators.h). Each
// generator writes the compute order of every rank; insert_communication()
// adds the sends, recvs and reduces.

#include "dtrain/parallel/pipeline/generators.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "dtrain/error.h"

namespace dtrain::parallel::pipeline {
namespace {

Schedule empty_schedule(ScheduleKind kind, int p, int v, int m) {
  Schedule s;
  s.name = schedule_kind_name(kind);
  s.num_ranks = p;
  s.num_microbatches = m;
  s.stage_ranks = loop_placement(p, p * v);
  s.actions.assign(static_cast<std::size_t>(p), {});
  return s;
}

void gpipe_order(Schedule& s) {
  const int m = s.num_microbatches;
  for (int r = 0; r < s.num_ranks; ++r) {
    auto& list = s.actions[static_cast<std::size_t>(r)];
    for (int mb = 0; mb < m; ++mb) list.push_back(Action::forward(r, mb));
    for (int mb = 0; mb < m; ++mb) list.push_back(Action::backward(r, mb));
  }
}

// 1F1B on rank r (stage r): min(p-r-1, m) forwards to fill the pipeline,
// then one forward and one backward at a time, then the remaining
// backwards. With split_backward, each B becomes an I, and W(j) follows
// I(j + r): the last stages hold their W's back so that they fill the tail
// where, in 1F1B, those stages wait for nothing.
void one_f_one_b_order(Schedule& s, bool split_backward) {
  const int p = s.num_ranks;
  const int m = s.num_microbatches;
  for (int r = 0; r < p; ++r) {
    auto& list = s.actions[static_cast<std::size_t>(r)];
    const int warmup = std::min(p - r - 1, m);
    const int w_delay = split_backward ? r : 0;
    int next_w = 0;
    const auto backward = [&](int mb) {
      if (!split_backward) {
        list.push_back(Action::backward(r, mb));
        return;
      }
      list.push_back(Action::backward_input(r, mb));
      if (mb - w_delay >= 0) list.push_back(Action::backward_weight(r, next_w++));
    };
    for (int mb = 0; mb < warmup; ++mb) list.push_back(Action::forward(r, mb));
    for (int i = 0; i < m - warmup; ++i) {
      list.push_back(Action::forward(r, warmup + i));
      backward(i);
    }
    for (int mb = m - warmup; mb < m; ++mb) backward(mb);
    while (split_backward && next_w < m) list.push_back(Action::backward_weight(r, next_w++));
  }
}

// Megatron's interleaved 1F1B on rank r (m is a multiple of p, checked by
// ScheduleOptions::validate): the microbatches go in groups of p; within a
// group, forwards run stage by stage (chunk 0 for the whole group, then
// chunk 1, ...), backwards in reverse stage order. Rank r runs
// (v-1)*p + 2(p-r-1) forwards first: the chunk v-1 forward of the group's
// first microbatch, which its first backward needs, plus two per rank
// behind it to cover the round trip of the first backward.
void interleaved_order(Schedule& s, int v) {
  const int p = s.num_ranks;
  const int m = s.num_microbatches;
  const int total = v * m;
  for (int r = 0; r < p; ++r) {
    std::vector<std::pair<int, int>> forward_order;  // (stage, microbatch)
    std::vector<std::pair<int, int>> backward_order;
    for (int group = 0; group * p < m; ++group) {
      const int first = group * p;
      const int end = std::min(m, first + p);
      for (int chunk = 0; chunk < v; ++chunk) {
        for (int mb = first; mb < end; ++mb) {
          forward_order.emplace_back(chunk * p + r, mb);
          backward_order.emplace_back((v - 1 - chunk) * p + r, mb);
        }
      }
    }
    const int warmup = std::min(total, (v - 1) * p + 2 * (p - r - 1));
    auto& list = s.actions[static_cast<std::size_t>(r)];
    for (int i = 0; i < warmup; ++i) {
      list.push_back(Action::forward(forward_order[i].first, forward_order[i].second));
    }
    for (int i = 0; i < total - warmup; ++i) {
      const auto& f = forward_order[static_cast<std::size_t>(warmup + i)];
      const auto& b = backward_order[static_cast<std::size_t>(i)];
      list.push_back(Action::forward(f.first, f.second));
      list.push_back(Action::backward(b.first, b.second));
    }
    for (int i = total - warmup; i < total; ++i) {
      const auto& b = backward_order[static_cast<std::size_t>(i)];
      list.push_back(Action::backward(b.first, b.second));
    }
  }
}

}  // namespace

const char* schedule_kind_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kGPipe:
      return "gpipe";
    case ScheduleKind::kOneFOneB:
      return "1f1b";
    case ScheduleKind::kInterleaved:
      return "interleaved";
    case ScheduleKind::kZeroBubbleH1:
      return "zb-h1";
  }
  return "?";
}

ScheduleKind parse_schedule_kind(std::string_view name) {
  for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB,
                            ScheduleKind::kInterleaved, ScheduleKind::kZeroBubbleH1}) {
    if (name == schedule_kind_name(kind)) return kind;
  }
  DTRAIN_THROW(InvalidArgument, "unknown pipeline schedule '", name,
               "'; use gpipe, 1f1b, interleaved or zb-h1");
}

void ScheduleOptions::validate() const {
  DTRAIN_CHECK_ARG(num_ranks >= 1, "a pipeline needs at least 1 rank, got ", num_ranks);
  DTRAIN_CHECK_ARG(num_microbatches >= 1, "a pipeline step needs at least 1 microbatch, got ",
                   num_microbatches);
  DTRAIN_CHECK_ARG(stages_per_rank >= 1, "stages per rank must be at least 1, got ",
                   stages_per_rank);
  DTRAIN_CHECK_ARG(stages_per_rank == 1 || kind == ScheduleKind::kInterleaved, "the ",
                   schedule_kind_name(kind), " schedule runs one stage per rank, got ",
                   stages_per_rank, " stages per rank; use the interleaved schedule for more");
  // Inputs where no schedule of the kind reaches its idle-fraction formula
  // (generators.h) are refused rather than run with a larger bubble.
  DTRAIN_CHECK_ARG(kind != ScheduleKind::kInterleaved || stages_per_rank == 1 ||
                       num_microbatches % num_ranks == 0,
                   "the interleaved schedule with ", stages_per_rank,
                   " stages per rank needs the microbatches to be a multiple of the ", num_ranks,
                   " pipeline ranks, got ", num_microbatches, "; use ",
                   std::max(num_ranks, num_microbatches / num_ranks * num_ranks), " or ",
                   (num_microbatches / num_ranks + 1) * num_ranks,
                   " microbatches, or the 1f1b schedule");
  DTRAIN_CHECK_ARG(kind != ScheduleKind::kZeroBubbleH1 || num_microbatches >= num_ranks,
                   "the zb-h1 schedule on ", num_ranks, " pipeline ranks needs at least ",
                   num_ranks, " microbatches, got ", num_microbatches,
                   "; with fewer, the input gradients of the last microbatch cannot fill the "
                   "pipeline; use at least ",
                   num_ranks, " microbatches, or the 1f1b schedule");
}

Schedule make_schedule(const ScheduleOptions& options) {
  options.validate();
  const int p = options.num_ranks;
  const int v = options.stages_per_rank;
  const int m = options.num_microbatches;
  Schedule s = empty_schedule(options.kind, p, v, m);
  switch (options.kind) {
    case ScheduleKind::kGPipe:
      gpipe_order(s);
      break;
    case ScheduleKind::kOneFOneB:
      one_f_one_b_order(s, /*split_backward=*/false);
      break;
    case ScheduleKind::kInterleaved:
      if (v == 1) {
        one_f_one_b_order(s, /*split_backward=*/false);
      } else {
        interleaved_order(s, v);
      }
      break;
    case ScheduleKind::kZeroBubbleH1:
      one_f_one_b_order(s, /*split_backward=*/true);
      break;
  }
  return insert_communication(std::move(s));
}

}  // namespace dtrain::parallel::pipeline
