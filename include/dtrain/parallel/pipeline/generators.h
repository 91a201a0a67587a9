#pragma once
// Generators of the standard pipeline schedules (schedule.h). Each builds the
// compute order of every rank and adds the communication with
// insert_communication(); every schedule they return passes validate().
// Backward passes of a stage always run in microbatch order 0, 1, ..., m-1,
// so weight gradients accumulate in the order one process with gradient
// accumulation uses.
//
// With p ranks, m microbatches, unit costs (F = I = W = 1, B = 2, no
// communication time; simulator.h), idle fraction = idle time of all ranks
// over p times the step's length:
//
//   gpipe        all F, then all B.              (p-1)/(m+p-1)
//                Stores m microbatches per stage.
//   1f1b         PipeDream-Flush / Megatron's    (p-1)/(m+p-1)
//                non-interleaved schedule: stage s runs min(p-s-1, m)
//                forwards, then alternates one F and one B.
//                Stores min(p-s, m) microbatches at stage s.
//   interleaved  Megatron's interleaved 1F1B:    (p-1)/(v*m+p-1)
//                v stages per rank (loop placement, stage s on rank s % p);
//                microbatches go in groups of p through the rank's stages
//                in order, backward in reverse stage order; rank r runs
//                (v-1)*p + 2(p-r-1) forwards before its first backward.
//                With v > 1, m must be a multiple of p (as in Megatron);
//                other m are refused: with m = 1, for one, the chain of one
//                microbatch through all v*p stages alone is longer than the
//                formula's step. v = 1 is 1f1b and takes any m.
//   zb-h1        Zero Bubble's ZB-H1 (Qi et al., arXiv 2401.10241): 1f1b
//                with B split into I and W; stage s runs its W's s
//                microbatches late, so they fill the cool-down bubble.
//                Idle fraction (p-1)/(3m+p-1). Needs m >= p; fewer are
//                refused: the last stage then ends its m F's and m I's no
//                earlier than p-1+2m, the last I takes p-1 more to reach
//                stage 0 and its W one more, a step of 2m+2p-1 > 3m+p-1.
//                Microbatches whose I has not run: min(p-s, m) at stage s,
//                as 1f1b; whose W has not run: at most min(p, m).
//
// gpipe, 1f1b and zb-h1 place one stage per rank (stages_per_rank must be
// 1). m < p and m = 1 work for gpipe and 1f1b (and interleaved with v = 1).

#include <string>
#include <string_view>

#include "dtrain/parallel/pipeline/schedule.h"

namespace dtrain::parallel::pipeline {

enum class ScheduleKind {
  kGPipe,         ///< "gpipe"
  kOneFOneB,      ///< "1f1b"
  kInterleaved,   ///< "interleaved"
  kZeroBubbleH1,  ///< "zb-h1"
};

/// "gpipe", "1f1b", "interleaved" or "zb-h1" (also the Schedule::name).
const char* schedule_kind_name(ScheduleKind kind);
/// The inverse of schedule_kind_name; throws InvalidArgument listing the
/// names for anything else.
ScheduleKind parse_schedule_kind(std::string_view name);

struct ScheduleOptions {
  ScheduleKind kind = ScheduleKind::kOneFOneB;
  /// p: pipeline ranks, >= 1.
  int num_ranks = 1;
  /// m: microbatches per step, >= 1.
  int num_microbatches = 1;
  /// v: stages per rank, >= 1; above 1 only for kInterleaved.
  int stages_per_rank = 1;

  /// Throws InvalidArgument saying which value is wrong and what to use,
  /// also for the refused inputs above.
  void validate() const;
};

/// The schedule `options` describe (validated first).
Schedule make_schedule(const ScheduleOptions& options);

}  // namespace dtrain::parallel::pipeline
