// Pipeline schedules: the generators over the grid of the formulas, the
// simulator's checks on broken lists, the text form.

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "dtrain/error.h"
#include "dtrain/parallel/pipeline/generators.h"
#include "dtrain/parallel/pipeline/schedule.h"
#include "dtrain/parallel/pipeline/simulator.h"

namespace {

using namespace dtrain::parallel::pipeline;

constexpr ScheduleKind kAllKinds[] = {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB,
                                      ScheduleKind::kInterleaved, ScheduleKind::kZeroBubbleH1};

// Whether the generator accepts (p, m, v) for `kind`; generators.h lists the
// refused inputs (where no schedule meets the idle-fraction formula).
bool accepted(ScheduleKind kind, int p, int m, int v) {
  if (v > 1) return kind == ScheduleKind::kInterleaved && m % p == 0;
  if (kind == ScheduleKind::kZeroBubbleH1) return m >= p;
  return true;
}

// The step length the formulas promise with unit costs (F = I = W = 1,
// B = 2): every rank is busy 3*v*m, idle fraction f means a step of
// busy / (1 - f).
double formula_step(ScheduleKind kind, int p, int m, int v) {
  switch (kind) {
    case ScheduleKind::kGPipe:
    case ScheduleKind::kOneFOneB:
      return 3.0 * (m + p - 1);  // idle (p-1)/(m+p-1)
    case ScheduleKind::kInterleaved:
      return 3.0 * (v * m + p - 1);  // idle (p-1)/(v*m+p-1)
    case ScheduleKind::kZeroBubbleH1:
      return 3.0 * m + p - 1;  // idle (p-1)/(3m+p-1)
  }
  return 0.0;
}

double formula_idle(ScheduleKind kind, int p, int m, int v) {
  switch (kind) {
    case ScheduleKind::kGPipe:
    case ScheduleKind::kOneFOneB:
      return static_cast<double>(p - 1) / (m + p - 1);
    case ScheduleKind::kInterleaved:
      return static_cast<double>(p - 1) / (v * m + p - 1);
    case ScheduleKind::kZeroBubbleH1:
      return static_cast<double>(p - 1) / (3 * m + p - 1);
  }
  return 0.0;
}

// Counts each (kind, stage, microbatch) over all lists, independently of the
// simulator's own checks.
void expect_complete(const Schedule& s, const std::string& where) {
  std::map<std::tuple<ActionKind, int, int>, int> count;
  for (int r = 0; r < s.num_ranks; ++r) {
    for (const Action& a : s.actions[static_cast<std::size_t>(r)]) {
      EXPECT_EQ(s.rank_of_stage(a.stage), r) << where << ": " << a.to_string();
      ++count[{a.kind, a.stage, a.microbatch}];
    }
  }
  const bool split = s.name == "zb-h1";
  for (int st = 0; st < s.num_stages(); ++st) {
    for (int mb = 0; mb < s.num_microbatches; ++mb) {
      EXPECT_EQ((count[{ActionKind::kForward, st, mb}]), 1) << where << " F" << st << "." << mb;
      EXPECT_EQ((count[{ActionKind::kBackward, st, mb}]), split ? 0 : 1)
          << where << " B" << st << "." << mb;
      EXPECT_EQ((count[{ActionKind::kBackwardInput, st, mb}]), split ? 1 : 0)
          << where << " I" << st << "." << mb;
      EXPECT_EQ((count[{ActionKind::kBackwardWeight, st, mb}]), split ? 1 : 0)
          << where << " W" << st << "." << mb;
    }
    EXPECT_EQ((count[{ActionKind::kReduceGradients, st, kNoMicrobatch}]), 1)
        << where << " reduce" << st;
  }
}

// F before its B (or I, and I before W) in the rank's list.
void expect_forward_first(const Schedule& s, const std::string& where) {
  for (const auto& list : s.actions) {
    std::map<std::pair<int, int>, std::size_t> forward_at;
    std::map<std::pair<int, int>, std::size_t> input_at;
    for (std::size_t i = 0; i < list.size(); ++i) {
      const Action& a = list[i];
      const std::pair<int, int> key{a.stage, a.microbatch};
      if (a.kind == ActionKind::kForward) forward_at[key] = i;
      if (a.kind == ActionKind::kBackward || a.kind == ActionKind::kBackwardInput) {
        EXPECT_TRUE(forward_at.count(key)) << where << ": " << a.to_string() << " before its F";
        input_at[key] = i;
      }
      if (a.kind == ActionKind::kBackwardWeight) {
        EXPECT_TRUE(input_at.count(key)) << where << ": " << a.to_string() << " before its I";
      }
    }
  }
}

TEST(PipelineGenerators, GridMeetsTheFormulasOrRefuses) {
  int simulated = 0;
  int refused = 0;
  for (ScheduleKind kind : kAllKinds) {
    for (int p = 1; p <= 8; ++p) {
      for (int m = 1; m <= 32; ++m) {
        for (int v : {1, 2, 4}) {
          ScheduleOptions options;
          options.kind = kind;
          options.num_ranks = p;
          options.num_microbatches = m;
          options.stages_per_rank = v;
          const std::string where = std::string(schedule_kind_name(kind)) +
                                    " p=" + std::to_string(p) + " m=" + std::to_string(m) +
                                    " v=" + std::to_string(v);
          if (!accepted(kind, p, m, v)) {
            EXPECT_THROW(make_schedule(options), dtrain::InvalidArgument) << where;
            ++refused;
            continue;
          }
          Schedule s;
          ASSERT_NO_THROW(s = make_schedule(options)) << where;
          const std::vector<std::string> problems = check(s);
          ASSERT_TRUE(problems.empty()) << where << ": " << problems.front();
          expect_complete(s, where);
          expect_forward_first(s, where);
          const SimulationReport report = simulate(s);  // unit costs, F = I = W = 1
          ++simulated;
          EXPECT_EQ(report.makespan, formula_step(kind, p, m, v)) << where;
          EXPECT_NEAR(report.idle_fraction, formula_idle(kind, p, m, v), 1e-12) << where;
          for (int r = 0; r < p; ++r) {
            const RankSimulation& rank = report.ranks[static_cast<std::size_t>(r)];
            EXPECT_EQ(rank.busy, 3.0 * v * m) << where << " rank " << r;
            if (kind == ScheduleKind::kGPipe) {
              EXPECT_EQ(rank.peak_stored, m) << where << " rank " << r;
            }
            if (kind == ScheduleKind::kOneFOneB || (kind == ScheduleKind::kInterleaved && v == 1)) {
              EXPECT_EQ(rank.peak_stored, std::min(p - r, m)) << where << " stage " << r;
            }
            if (kind == ScheduleKind::kInterleaved && v > 1) {
              // Megatron's warm-up forwards, then one more before the first B.
              EXPECT_EQ(rank.peak_stored, std::min((v - 1) * p + 2 * (p - r - 1) + 1, v * m))
                  << where << " rank " << r;
            }
            if (kind == ScheduleKind::kZeroBubbleH1) {
              // 1F1B's activation memory until I; W's inputs at most min(p, m) more.
              EXPECT_EQ(rank.peak_stored_until_input_grad, std::min(p - r, m))
                  << where << " stage " << r;
              EXPECT_LE(rank.peak_stored, std::min(p, m)) << where << " stage " << r;
            }
          }
          // The text form reads back to the same schedule.
          EXPECT_EQ(parse_schedule(to_text(s)), s) << where;
          if (HasFailure()) return;  // one broken cell is enough to read
        }
      }
    }
  }
  // gpipe and 1f1b: 8 * 32 each; interleaved: 8 * 32 with v = 1 and, for
  // v = 2 and 4, the m that are multiples of p (85 each); zb-h1: m >= p (228).
  EXPECT_EQ(simulated, 256 + 256 + 256 + 2 * 85 + 228);
  EXPECT_EQ(simulated + refused, 4 * 8 * 32 * 3);
}

// Uneven microbatches (3m-1 samples: the last microbatch is one sample
// short) cost in proportion to their size. The schedules stay valid, every
// rank is busy exactly its work, and the step is no shorter than that.
TEST(PipelineGenerators, UnevenMicrobatchesRunWithGivenCosts) {
  for (ScheduleKind kind : kAllKinds) {
    for (int p : {2, 3, 4}) {
      for (int m : {1, 2, 3, 4, 5, 8}) {  // m < p and m = 1 where the schedule takes them
        const int v = kind == ScheduleKind::kInterleaved ? 2 : 1;
        if (!accepted(kind, p, m, v)) continue;
        const std::vector<std::int64_t> sizes = microbatch_sizes(3 * m - 1, m);
        ScheduleOptions options;
        options.kind = kind;
        options.num_ranks = p;
        options.num_microbatches = m;
        options.stages_per_rank = v;
        const Schedule s = make_schedule(options);
        SimulationOptions sim;
        sim.cost = [&](int, const Action& a) {
          const double size =
              a.microbatch >= 0 ? static_cast<double>(sizes[static_cast<std::size_t>(a.microbatch)])
                                : 0.0;
          switch (a.kind) {
            case ActionKind::kForward:
            case ActionKind::kBackwardInput:
            case ActionKind::kBackwardWeight:
              return size;
            case ActionKind::kBackward:
              return 2.0 * size;
            default:
              return 0.0;
          }
        };
        const SimulationReport report = simulate(s, sim);
        double work = 0.0;
        for (std::int64_t size : sizes) work += 3.0 * static_cast<double>(size) * v;
        for (const RankSimulation& rank : report.ranks) {
          EXPECT_DOUBLE_EQ(rank.busy, work);
          EXPECT_GE(report.makespan, work);
        }
      }
    }
  }
}

TEST(PipelineGenerators, RefusalsSayWhatToUse) {
  ScheduleOptions options;
  options.kind = ScheduleKind::kInterleaved;
  options.num_ranks = 4;
  options.num_microbatches = 6;
  options.stages_per_rank = 2;
  try {
    make_schedule(options);
    FAIL() << "interleaved with m % p != 0 was accepted";
  } catch (const dtrain::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("multiple of"), std::string::npos) << e.what();
  }
  options.kind = ScheduleKind::kZeroBubbleH1;
  options.stages_per_rank = 1;
  options.num_microbatches = 3;
  try {
    make_schedule(options);
    FAIL() << "zb-h1 with m < p was accepted";
  } catch (const dtrain::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("at least 4 microbatches"), std::string::npos) << e.what();
  }
  options.kind = ScheduleKind::kOneFOneB;
  options.stages_per_rank = 2;
  EXPECT_THROW(make_schedule(options), dtrain::InvalidArgument);
  EXPECT_THROW(parse_schedule_kind("1f1b-interleaved"), dtrain::InvalidArgument);
}

// --- the simulator on broken lists --------------------------------------

std::string problems_of(const Schedule& s) {
  std::string all;
  for (const std::string& p : check(s)) all += p + "\n";
  return all;
}

TEST(PipelineSimulator, FindsADeadlockAndNamesTheRanksAndActions) {
  // Rank 1 wants both forwards before its first backward, rank 0 wants the
  // first backward's gradient before its second forward.
  const Schedule s = parse_schedule(
      "pipeline ranks=2 microbatches=2\n"
      "0: F0.0 sendF0.0>1 recvB0.0<1 B0.0 F0.1 sendF0.1>1 recvB0.1<1 B0.1 reduce0\n"
      "1: recvF1.0<0 F1.0 recvF1.1<0 F1.1 B1.0 sendB1.0>0 B1.1 reduce1 sendB1.1>0\n");
  const std::vector<std::string> problems = check(s);
  ASSERT_EQ(problems.size(), 1u) << problems_of(s);
  const std::string& deadlock = problems.front();
  EXPECT_NE(deadlock.find("deadlock"), std::string::npos) << deadlock;
  EXPECT_NE(deadlock.find("rank 0 is stuck at B0.0"), std::string::npos) << deadlock;
  EXPECT_NE(deadlock.find("rank 1 is stuck at F1.1"), std::string::npos) << deadlock;
  EXPECT_NE(deadlock.find("sendB1.0>0"), std::string::npos) << deadlock;
  EXPECT_NE(deadlock.find("sendF0.1>1"), std::string::npos) << deadlock;
  EXPECT_NE(deadlock.find("cycle: rank 0 -> rank 1 -> rank 0"), std::string::npos) << deadlock;
  try {
    validate(s);
    FAIL() << "validate() accepted a deadlocking schedule";
  } catch (const dtrain::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("is rejected: deadlock"), std::string::npos) << e.what();
  }
  EXPECT_THROW(simulate(s), dtrain::InvalidArgument);
}

Schedule generated(ScheduleKind kind, int p, int m, int v = 1) {
  ScheduleOptions options;
  options.kind = kind;
  options.num_ranks = p;
  options.num_microbatches = m;
  options.stages_per_rank = v;
  return make_schedule(options);
}

void erase_action(Schedule& s, int rank, const Action& a) {
  auto& list = s.actions[static_cast<std::size_t>(rank)];
  const auto it = std::find(list.begin(), list.end(), a);
  ASSERT_NE(it, list.end()) << a.to_string();
  list.erase(it);
}

TEST(PipelineSimulator, FindsAMissingBackward) {
  Schedule s = generated(ScheduleKind::kOneFOneB, 3, 4);
  erase_action(s, 1, Action::backward(1, 2));
  const std::string problems = problems_of(s);
  EXPECT_NE(problems.find("stage 1 microbatch 2 has no backward"), std::string::npos) << problems;
  EXPECT_THROW(validate(s), dtrain::InvalidArgument);

  Schedule split = generated(ScheduleKind::kZeroBubbleH1, 3, 4);
  erase_action(split, 2, Action::backward_weight(2, 0));
  EXPECT_NE(problems_of(split).find("I2.0 on rank 2 has no W2.0"), std::string::npos)
      << problems_of(split);
}

TEST(PipelineSimulator, FindsABackwardBeforeItsForward) {
  Schedule s = generated(ScheduleKind::kGPipe, 2, 2);
  auto& list = s.actions[1];
  const auto f = std::find(list.begin(), list.end(), Action::forward(1, 1));
  const auto b = std::find(list.begin(), list.end(), Action::backward(1, 1));
  ASSERT_TRUE(f != list.end() && b != list.end());
  std::iter_swap(f, b);
  const std::string problems = problems_of(s);
  EXPECT_NE(problems.find("rank 1's B1.1"), std::string::npos) << problems;
  EXPECT_NE(problems.find("comes before rank 1's F1.1"), std::string::npos) << problems;
  EXPECT_NE(problems.find("its forward"), std::string::npos) << problems;
}

TEST(PipelineSimulator, FindsDuplicatesUnmatchedMessagesAndWrongOrder) {
  Schedule dup = generated(ScheduleKind::kOneFOneB, 2, 2);
  dup.actions[0].insert(dup.actions[0].begin(), Action::forward(0, 0));
  EXPECT_NE(problems_of(dup).find("repeats"), std::string::npos) << problems_of(dup);

  Schedule unmatched = generated(ScheduleKind::kOneFOneB, 2, 2);
  erase_action(unmatched, 1, Action::recv_activation(1, 1, 0));
  EXPECT_NE(problems_of(unmatched).find("is never received"), std::string::npos)
      << problems_of(unmatched);

  // Rank 1 receives the two activations in the other order.
  const Schedule order = parse_schedule(
      "pipeline ranks=2 microbatches=2\n"
      "0: F0.0 sendF0.0 F0.1 sendF0.1 recvB0.0 B0.0 recvB0.1 B0.1 reduce0\n"
      "1: recvF1.1 recvF1.0 F1.0 F1.1 B1.0 sendB1.0 B1.1 sendB1.1 reduce1\n");
  EXPECT_NE(problems_of(order).find("in another order than rank 1 receives"), std::string::npos)
      << problems_of(order);

  Schedule wrong_rank = generated(ScheduleKind::kGPipe, 2, 1);
  wrong_rank.actions[0].push_back(Action::forward(1, 0));
  EXPECT_NE(problems_of(wrong_rank).find("stage 1 is placed on rank 1, not rank 0"),
            std::string::npos)
      << problems_of(wrong_rank);
}

TEST(PipelineSimulator, CostsShapeTheStepButNotTheChecks) {
  const Schedule s = generated(ScheduleKind::kOneFOneB, 2, 4);
  SimulationOptions sim;
  sim.costs.forward = 2.0;
  sim.costs.backward = 4.0;
  EXPECT_DOUBLE_EQ(simulate(s, sim).makespan, 2.0 * 3.0 * (4 + 2 - 1));
  sim.costs.communication = 1.0;
  EXPECT_GT(simulate(s, sim).makespan, 2.0 * 3.0 * (4 + 2 - 1));
  sim.costs.forward = -1.0;
  EXPECT_THROW(simulate(s, sim), dtrain::InvalidArgument);
}

TEST(PipelineSimulator, TimelineDrawsTheBubble) {
  const Schedule s = generated(ScheduleKind::kGPipe, 2, 2);
  const std::string picture = render_timeline(s, simulate(s));
  EXPECT_EQ(picture,
            "rank 0 |F0 F1 .  .  .  B0 B0 B1 B1 |\n"
            "rank 1 |.  F0 F1 B0 B0 B1 B1 .  .  |\n");
}

// --- the text form --------------------------------------------------------

std::string parse_error(const std::string& text) {
  try {
    parse_schedule(text, "my.schedule");
  } catch (const dtrain::InvalidArgument& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(PipelineText, ReadsCsvOneActionPerLineAndDefaultPeers) {
  const Schedule expected = generated(ScheduleKind::kOneFOneB, 2, 2);
  std::string csv = "pipeline,ranks=2,microbatches=2,name=1f1b\n";
  for (int r = 0; r < 2; ++r) {
    for (const Action& a : expected.actions[static_cast<std::size_t>(r)]) {
      std::string token = a.to_string();
      token = token.substr(0, token.find_first_of("<>"));  // default peers
      csv += std::to_string(r) + "," + token + "\n";
    }
  }
  EXPECT_EQ(parse_schedule(csv), expected);
  // A comment and blank lines are ignored; a custom placement is kept.
  const Schedule placed = parse_schedule(
      "# two stages on rank 1\n\npipeline ranks=2 microbatches=1 placement=0|1|1\n"
      "0: F0.0 sendF0.0 recvB0.0 B0.0 reduce0\n"
      "1: recvF1.0 F1.0 F2.0 B2.0 reduce2 B1.0 sendB1.0 reduce1\n");
  EXPECT_EQ(placed.stage_ranks, (std::vector<int>{0, 1, 1}));
  EXPECT_EQ(problems_of(placed), "");
  EXPECT_EQ(parse_schedule(to_text(placed)), placed);
}

TEST(PipelineText, ErrorsNameTheLineColumnAndProblem) {
  EXPECT_EQ(parse_error("pipeline ranks=2 microbatches=2\n0: F0.0 X1.0\n"),
            "my.schedule:2:9: 'X1.0' is not an action: an action is F<stage>.<microbatch> (also "
            "B, I, W), sendF/recvF/sendB/recvB<stage>.<microbatch> with >peer or <peer, or "
            "reduce<stage>");
  EXPECT_NE(parse_error("pipeline ranks=2 microbatches=2\n\n0: F0.5\n")
                .find("my.schedule:3:4: "
                      "'F0.5': microbatch 5 "
                      "is out of range"),
            std::string::npos);
  EXPECT_NE(parse_error("0: F0.0\n").find("my.schedule:1:1: expected the header"),
            std::string::npos);
  EXPECT_NE(parse_error("pipeline ranks=2\n")
                .find("my.schedule:1:1: the header needs "
                      "microbatches=<m>"),
            std::string::npos);
  EXPECT_NE(
      parse_error("pipeline ranks=2 microbatches=1\n2: F0.0\n").find("rank 2 is out of range"),
      std::string::npos);
  EXPECT_NE(parse_error("pipeline ranks=2 microbatches=1\n0: F0\n").find("expected '.'"),
            std::string::npos);
  EXPECT_NE(parse_error("pipeline ranks=2 microbatches=1\n0: sendF0.0<1\n").find("'>'"),
            std::string::npos);
  EXPECT_NE(parse_error("pipeline ranks=2 microbatches=1\n0: recvF0.0\n").find("no neighbour"),
            std::string::npos);
  EXPECT_NE(parse_error("pipeline ranks=2 microbatches=1 stages=3\n").find("multiple of the ranks"),
            std::string::npos);
  EXPECT_NE(parse_error("pipeline ranks=x microbatches=1\n").find("ranks='x' is not a number"),
            std::string::npos);
  EXPECT_NE(parse_error("pipeline ranks=2 microbatches=1 colour=red\n").find("unknown header key"),
            std::string::npos);
  EXPECT_NE(parse_error("").find("no header line"), std::string::npos);
  EXPECT_THROW(parse_action("sendF0.1"), dtrain::InvalidArgument);
  EXPECT_EQ(parse_action("sendB2.3>1"), Action::send_gradient(2, 3, 1));
}

TEST(PipelineText, MicrobatchSizesAreEvenOrFrontLoaded) {
  EXPECT_EQ(microbatch_sizes(10, 4), (std::vector<std::int64_t>{3, 3, 2, 2}));
  EXPECT_EQ(microbatch_sizes(8, 8), (std::vector<std::int64_t>(8, 1)));
  EXPECT_THROW(microbatch_sizes(3, 4), dtrain::InvalidArgument);
  EXPECT_THROW(microbatch_sizes(3, 0), dtrain::InvalidArgument);
}

}  // namespace
