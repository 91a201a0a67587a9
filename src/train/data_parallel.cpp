#include "dtrain/train/data_parallel.h"

#include <torch/nn/functional/loss.h>
#include <torch/utils.h>

#include "dtrain/checkpoint/state.h"
#include "dtrain/error.h"
#include "dtrain/parallel/zero_optimizer.h"

namespace dtrain::train {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

Objective classification(double label_smoothing) {
  namespace F = torch::nn::functional;
  Objective o;
  o.loss = [label_smoothing](const at::Tensor& logits, const at::Tensor& labels) {
    return F::cross_entropy(logits, labels,
                            F::CrossEntropyFuncOptions().label_smoothing(label_smoothing));
  };
  o.loss_sum = [](const at::Tensor& logits, const at::Tensor& labels) {
    return F::cross_entropy(logits, labels, F::CrossEntropyFuncOptions().reduction(torch::kSum));
  };
  o.correct = [](const at::Tensor& logits, const at::Tensor& labels) {
    return logits.argmax(1).eq(labels).sum();
  };
  return o;
}

DataParallel::DataParallel(std::shared_ptr<torch::nn::Module> module, Forward forward,
                           std::shared_ptr<collectives::Communicator> comm,
                           const OptimizerFactory& make_optimizer, Objective objective,
                           DataParallelOptions options)
    : module_(std::move(module)),
      forward_(std::move(forward)),
      objective_(std::move(objective)),
      options_(std::move(options)) {
  DTRAIN_CHECK_ARG(module_ && forward_ && comm && make_optimizer,
                   "DataParallel needs a module, its forward, a communicator and an optimizer "
                   "factory");
  DTRAIN_CHECK_ARG(objective_.loss && objective_.loss_sum && objective_.correct,
                   "DataParallel needs an Objective with loss, loss_sum and correct");
  DTRAIN_CHECK_ARG(!options_.zero || options_.layout.placements.empty(),
                   "DataParallel: ZeRO-1 over a tensor-parallel model (a layout with ",
                   options_.layout.placements.size(),
                   " placements) is not supported; use DDP (zero = false)");
  rank_ = comm->rank();
  world_size_ = comm->size();
  if (options_.zero) {
    zero_ = std::make_unique<parallel::ZeroRedundancyOptimizer>(module_, comm, make_optimizer);
  } else {
    ddp_ = std::make_unique<parallel::DistributedDataParallel>(module_, comm, options_.ddp);
    optimizer_ = make_optimizer(module_->parameters());
  }
}

DataParallel::~DataParallel() = default;

std::string DataParallel::name() const { return zero_ ? "ZeRO-1" : "DDP"; }

torch::optim::Optimizer& DataParallel::optimizer() {
  return zero_ ? zero_->optimizer() : *optimizer_;
}

void DataParallel::set_lr(double lr) {
  for (auto& group : optimizer().param_groups()) group.options().set_lr(lr);
}

StepResult DataParallel::train_step(Batch& batch, const StepInfo& info) {
  using SystemClock = std::chrono::system_clock;
  if (zero_) {
    zero_->zero_grad();
  } else {
    ddp_->zero_grad();
  }
  at::Tensor output = forward_(batch.inputs);
  at::Tensor loss = objective_.loss(output, batch.targets);
  const auto t2 = Clock::now();
  const SystemTime s2 = SystemClock::now();
  loss.backward();
  const auto t3 = Clock::now();
  const SystemTime s3 = SystemClock::now();
  double exposed = 0;
  if (ddp_) {
    ddp_->synchronize();
    exposed = ddp_->last_step_stats().exposed_comm_seconds;
  }
  const auto t4 = Clock::now();
  const SystemTime s4 = SystemClock::now();
  if (zero_) {
    zero_->step();  // its gradient reduction is exposed communication too
  } else {
    optimizer_->step();
  }
  const auto t5 = Clock::now();
  const SystemTime s5 = SystemClock::now();

  StepResult r;
  const double n = static_cast<double>(batch.targets.numel());
  r.local_loss = loss.item<double>();
  // correct() may communicate (over a tp group): every rank calls it.
  const double correct = objective_.correct(output, batch.targets).item<double>();
  if (options_.report) {
    r.sums.loss_sum = r.local_loss * n;
    r.sums.correct = correct;
    r.sums.samples = n;
  }
  r.metrics = {{"forward_s", seconds(t2 - info.data_ready)},
               {"backward_s", seconds(t3 - t2)},
               // Under ZeRO-1 the gradient reduce-scatter and the parameter
               // all-gather run inside step(): they count as optimizer time.
               {"comm_exposed_s", exposed},
               {"optimizer_s", seconds(t5 - t4)},
               {"sync_s", seconds(t4 - t3)}};
  if (info.trace) {
    const std::int64_t step = info.step + 1;
    r.spans.push_back({"forward", info.data_ready_wall, s2, 0, {{"step", step}}});
    r.spans.push_back({"backward", s2, s3, 0, {{"step", step}}});
    if (ddp_) {
      r.spans.push_back({"synchronize", s3, s4, 0, {{"step", step}}});
      for (const auto& b : ddp_->last_step_stats().bucket_timings) {
        r.spans.push_back({"allreduce bucket " + std::to_string(b.bucket),
                           b.issued,
                           b.completed,
                           1,
                           {{"bytes", b.bytes}, {"step", step}}});
      }
    }
    r.spans.push_back({zero_ ? "optimizer (zero-1)" : "optimizer", s4, s5, 0, {{"step", step}}});
  }
  return r;
}

void DataParallel::set_training(bool training) { module_->train(training); }

ReportSums DataParallel::eval_step(Batch& batch) {
  at::Tensor output = forward_(batch.inputs);
  const double loss_sum = objective_.loss_sum(output, batch.targets).item<double>();
  const double correct = objective_.correct(output, batch.targets).item<double>();
  ReportSums sums;
  if (options_.report) {
    sums.loss_sum = loss_sum;
    sums.correct = correct;
    sums.samples = static_cast<double>(batch.targets.numel());
  }
  return sums;
}

checkpoint::StateDict DataParallel::state_dict() const {
  checkpoint::StateDict state;
  checkpoint::add_module(state, *module_, options_.layout);
  if (zero_) {
    checkpoint::add_zero_optimizer(state, *zero_, options_.layout);
  } else {
    checkpoint::add_optimizer(state, *optimizer_, *module_, options_.layout);
  }
  if (options_.rng) {
    checkpoint::add_rng_streams(state, *options_.rng);
  } else {
    checkpoint::add_rng_state(state, rank_, world_size_);
  }
  return state;
}

void DataParallel::load_state(const checkpoint::Checkpoint& checkpoint) {
  checkpoint::load_module(checkpoint, *module_, options_.layout);
  if (zero_) {
    checkpoint::load_zero_optimizer(checkpoint, *zero_, options_.layout);
  } else {
    checkpoint::load_optimizer(checkpoint, *optimizer_, *module_, options_.layout);
  }
  if (options_.rng) {
    checkpoint::load_rng_streams(checkpoint, *options_.rng);
  } else {
    checkpoint::load_rng_state(checkpoint, rank_);
  }
}

}  // namespace dtrain::train
