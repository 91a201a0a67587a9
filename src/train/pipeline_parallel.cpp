#include "dtrain/train/pipeline_parallel.h"

#include <torch/utils.h>

#include <chrono>
#include <map>
#include <string>

#include "dtrain/checkpoint/state.h"
#include "dtrain/error.h"
#include "dtrain/parallel/pipeline/schedule.h"
#include "dtrain/parallel/tensor_parallel.h"

namespace dtrain::train {

namespace pl = parallel::pipeline;

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The engine's clock (ActionRecord: steady clock seconds since its epoch).
double steady_seconds() {
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

// Tags of the evaluation's messages: link l (stages l and l+1), the k-th
// batch size seen on it, tag l * kSizesPerLink + k (both ends see the same
// sizes in the same order: every rank of a pipeline reads the same batches).
constexpr int kSizesPerLink = 1000;
constexpr int kMaxTag = 1'000'000;

}  // namespace

void PipelineParallelOptions::validate(int pp_size) const {
  pl::ScheduleOptions s = schedule;
  s.num_ranks = pp_size;
  s.validate();
  ddp.validate();
}

parallel::ModuleLayout stage_layout(const torch::nn::Module& stage, int stage_index,
                                    const std::vector<pl::TiedParameter>& tied) {
  parallel::ModuleLayout layout = parallel::tensor_parallel_layout(stage);
  std::map<std::string, std::string> first_name;
  for (const pl::TiedParameter& t : tied) {
    for (const std::string& name : t.names) first_name[name] = t.names.front();
  }
  for (const auto& item : stage.named_parameters(/*recurse=*/true)) {
    parallel::Placement p = layout.placement(item.key(), item.value());
    if (first_name.count(item.key()) != 0) {
      p.replicated_over = p.replicated_over.with(parallel::Axis::kPipeline);
    } else {
      p = p.on_stage(stage_index);
    }
    layout.placements[item.key()] = p;
  }
  if (!first_name.empty()) {
    layout.global_name = [first_name](const std::string& local) {
      const auto it = first_name.find(local);
      return it == first_name.end() ? local : it->second;
    };
  }
  for (const auto& item : stage.named_buffers(/*recurse=*/true)) {
    layout.placements[item.key()] =
        parallel::Placement::replicated(item.value().sizes().vec()).on_stage(stage_index);
  }
  return layout;
}

PipelineParallel::PipelineParallel(std::vector<pl::Layer> layers,
                                   const pl::StagePartition& partition,
                                   const at::Tensor& sample_input,
                                   std::shared_ptr<const parallel::ParallelContext> context,
                                   const OptimizerFactory& make_optimizer, Objective objective,
                                   PipelineParallelOptions options)
    : layers_(std::move(layers)),
      context_(std::move(context)),
      objective_(std::move(objective)),
      options_(std::move(options)) {
  DTRAIN_CHECK_ARG(context_ && make_optimizer,
                   "PipelineParallel needs a parallel context and an optimizer factory");
  DTRAIN_CHECK_ARG(objective_.loss && objective_.loss_sum && objective_.correct,
                   "PipelineParallel needs an Objective with loss, loss_sum and correct");
  options_.validate(context_->pp_size());
  DTRAIN_CHECK_ARG(!options_.zero || context_->tp_size() == 1, "ZeRO-1 per pipeline stage with tp ",
                   context_->tp_size(),
                   " is not supported (nor in DataParallel): use DDP per stage (zero = false) "
                   "with tensor parallelism");
  stage_input_shapes_ = pl::stage_input_shapes(layers_, partition, sample_input);

  pl::PipelineOptions engine_options;
  engine_options.schedule = options_.schedule;
  engine_options.schedule.num_ranks = context_->pp_size();
  engine_options.stage_input_shapes = stage_input_shapes_;
  engine_options.ddp = options_.ddp;
  engine_options.activation_dtype = options_.activation_dtype;
  engine_options.tied_gradients = options_.tied_gradients;
  if (options_.zero) engine_options.dp_reduction = pl::DataParallelReduction::kNone;
  engine_ = std::make_unique<pl::PipelineEngine>(layers_, partition, *context_, engine_options);
  if (options_.zero) {
    for (int s : engine_->stage_ids()) {
      zero_.push_back(std::make_unique<parallel::ZeroRedundancyOptimizer>(
          engine_->stage(s).ptr(), context_->dp(), make_optimizer));
    }
  } else {
    optimizer_ = make_optimizer(engine_->parameters());
  }
  rng_ = std::make_unique<parallel::RngStreams>(*context_, options_.seed, sample_input.device());
  const auto& schedule = engine_->schedule();
  holds_last_stage_ = schedule.rank_of_stage(schedule.num_stages() - 1) == context_->pp_rank();
  reports_ = holds_last_stage_ && context_->tp_rank() == 0;
  tied_ = pl::find_tied_parameters(layers_, partition);
  collectives::SplitOptions split;
  split.name = context_->pp()->name() + "/eval";
  eval_comm_ = context_->pp()->split(0, context_->pp_rank(), split);
}

PipelineParallel::~PipelineParallel() = default;

std::string PipelineParallel::name() const {
  const auto& s = engine_->schedule();
  return "pipeline " + s.name + " (pp " + std::to_string(context_->pp_size()) + ", " +
         std::to_string(s.num_stages()) + " stages, " + std::to_string(s.num_microbatches) +
         " microbatches)" +
         (options_.zero             ? " + ZeRO-1 per stage"
          : context_->dp_size() > 1 ? " + DDP per stage"
                                    : "");
}

torch::optim::Optimizer& PipelineParallel::optimizer() {
  return zero_.empty() ? *optimizer_ : zero_.front()->optimizer();
}

void PipelineParallel::set_lr(double lr) {
  for (auto& zero : zero_) {
    for (auto& group : zero->optimizer().param_groups()) group.options().set_lr(lr);
  }
  if (optimizer_) {
    for (auto& group : optimizer_->param_groups()) group.options().set_lr(lr);
  }
}

StepResult PipelineParallel::train_step(Batch& batch, const StepInfo& info) {
  using SystemClock = std::chrono::system_clock;
  step_correct_ = 0;
  const pl::LossFunction loss = [this](const at::Tensor& output, const at::Tensor& target) {
    step_correct_ += objective_.correct(output.detach(), target).item<double>();
    return objective_.loss(output, target);
  };
  const auto t1 = Clock::now();
  const pl::PipelineStepResult result = engine_->step(batch.inputs, batch.targets, loss);
  const auto t2 = Clock::now();
  const SystemTime s2 = SystemClock::now();
  const double steady_at_s2 = steady_seconds();
  if (zero_.empty()) {
    optimizer_->step();
  } else {
    for (auto& zero : zero_) zero->step();  // the stage's reduce-scatter, update, all-gather
  }
  const auto t3 = Clock::now();
  const SystemTime s3 = SystemClock::now();

  StepResult r;
  if (reports_) {
    const double n = static_cast<double>(batch.targets.numel());
    r.local_loss = result.loss.item<double>();
    r.sums.loss_sum = r.local_loss * n;
    r.sums.correct = step_correct_;
    r.sums.samples = n;
  }
  double compute = 0;
  double waits = 0;
  for (const pl::ActionRecord& a : engine_->last_trace()) {
    if (a.action.is_compute()) compute += a.end_seconds - a.start_seconds;
    waits += a.wait_seconds;
  }
  const double pipeline = seconds(t2 - t1);
  r.metrics = {{"forward_s", seconds(t1 - info.data_ready)},  // moving the batch to the device
               {"pipeline_s", pipeline},
               {"compute_s", compute},
               {"input_wait_s", waits},
               {"idle_fraction", pipeline > 0 ? 1.0 - compute / pipeline : 0.0},
               {"optimizer_s", seconds(t3 - t2)}};
  if (info.trace) {
    const std::int64_t step = info.step + 1;
    // Engine times are steady-clock seconds; traces share the system clock.
    const auto wall = [&](double steady) {
      return s2 - std::chrono::duration_cast<SystemClock::duration>(
                      std::chrono::duration<double>(steady_at_s2 - steady));
    };
    for (const pl::ActionRecord& a : engine_->last_trace()) {
      nlohmann::json args = {{"step", step}, {"stage", a.action.stage}};
      if (a.action.microbatch != pl::kNoMicrobatch) args["microbatch"] = a.action.microbatch;
      if (a.action.is_compute()) {
        args["wait_s"] = a.wait_seconds;
        r.spans.push_back({pl::action_kind_name(a.action.kind), wall(a.start_seconds),
                           wall(a.end_seconds), 0, std::move(args)});
      } else {
        if (a.action.peer != pl::kNoPeer) args["peer"] = a.action.peer;
        r.spans.push_back({pl::action_kind_name(a.action.kind), wall(a.start_seconds),
                           wall(a.end_seconds), 1, std::move(args)});
      }
    }
    r.spans.push_back({"optimizer", s2, s3, 0, {{"step", step}}});
  }
  return r;
}

void PipelineParallel::set_training(bool training) {
  for (int s : engine_->stage_ids()) engine_->stage(s)->train(training);
}

ReportSums PipelineParallel::eval_step(Batch& batch) {
  ReportSums sums;
  const std::int64_t n = batch.inputs.defined() ? batch.inputs.size(0) : 0;
  if (n == 0) return sums;  // every rank of the pipeline sees the same (empty) batch
  const pl::Schedule& schedule = engine_->schedule();
  const int num_stages = schedule.num_stages();
  const int me = context_->pp_rank();
  const auto tag_of = [&](int link) {
    auto it = eval_tags_.find({link, n});
    if (it == eval_tags_.end()) {
      int count = 0;
      for (const auto& [key, tag] : eval_tags_) count += key.first == link ? 1 : 0;
      DTRAIN_CHECK_ARG(count < kSizesPerLink, "pipeline evaluation: more than ", kSizesPerLink,
                       " distinct batch sizes");
      it = eval_tags_.emplace(std::make_pair(link, n), link * kSizesPerLink + count).first;
    }
    DTRAIN_CHECK_ARG(it->second < kMaxTag, "pipeline evaluation: too many stages for the tags");
    collectives::PointToPointOptions o;
    o.tag = it->second;
    return o;
  };
  at::Tensor x;
  for (int s = 0; s < num_stages; ++s) {
    if (schedule.rank_of_stage(s) != me) continue;
    if (s == 0) {
      x = batch.inputs;
    } else if (const int from = schedule.rank_of_stage(s - 1); from != me) {
      std::vector<std::int64_t> shape{n};
      shape.insert(shape.end(), stage_input_shapes_[s].begin(), stage_input_shapes_[s].end());
      x = torch::empty(shape, batch.inputs.options().dtype(options_.activation_dtype));
      eval_comm_->recv(x, from, tag_of(s - 1))->wait();
    }
    x = engine_->stage(s)->forward(x);
    if (s + 1 < num_stages) {
      if (const int to = schedule.rank_of_stage(s + 1); to != me) {
        eval_comm_->send(x.contiguous(), to, tag_of(s))->wait();
      }
    }
  }
  if (holds_last_stage_) {
    // Collective over tp (the objective); counted by tp rank 0.
    const double loss_sum = objective_.loss_sum(x, batch.targets).item<double>();
    const double correct = objective_.correct(x, batch.targets).item<double>();
    if (reports_) {
      sums.loss_sum = loss_sum;
      sums.correct = correct;
      sums.samples = static_cast<double>(batch.targets.numel());
    }
  }
  return sums;
}

checkpoint::StateDict PipelineParallel::state_dict() const {
  checkpoint::StateDict state;
  for (std::size_t k = 0; k < engine_->stage_ids().size(); ++k) {
    const int s = engine_->stage_ids()[k];
    const pl::PipelineStage stage = engine_->stage(s);
    const parallel::ModuleLayout layout = stage_layout(*stage, s, tied_);
    checkpoint::add_module(state, *stage, layout);
    if (zero_.empty()) {
      checkpoint::add_optimizer(state, *optimizer_, *stage, layout);
    } else {
      checkpoint::add_zero_optimizer(state, *zero_[k], layout);
    }
  }
  checkpoint::add_rng_streams(state, *rng_);
  return state;
}

void PipelineParallel::load_state(const checkpoint::Checkpoint& checkpoint) {
  for (std::size_t k = 0; k < engine_->stage_ids().size(); ++k) {
    const int s = engine_->stage_ids()[k];
    pl::PipelineStage stage = engine_->stage(s);
    const parallel::ModuleLayout layout = stage_layout(*stage, s, tied_);
    checkpoint::load_module(checkpoint, *stage, layout);
    if (zero_.empty()) {
      checkpoint::load_optimizer(checkpoint, *optimizer_, *stage, layout);
    } else {
      checkpoint::load_zero_optimizer(checkpoint, *zero_[k], layout);
    }
  }
  checkpoint::load_rng_streams(checkpoint, *rng_);
}

}  // namespace dtrain::train
