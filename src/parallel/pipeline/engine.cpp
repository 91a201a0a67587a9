// PipelineEngine: one rank's interpreter of a pipeline schedule.
//
// State between actions is kept per (stage, microbatch) in a Slot: the
// stage's input (a leaf that requires grad, except on stage 0), its output
// (the backward root; the scaled loss on the last stage), the gradient of
// the output and the gradient of the input. Consecutive send/recv actions are
// collected and posted as one batch when the next non-communication action
// (or the end of the list) is reached; a slot remembers which batch brings
// its received tensor, and the compute action that needs it waits for that
// batch only.

#include "dtrain/parallel/pipeline/engine.h"

#include <torch/autograd.h>
#include <torch/nn/modules/container/any.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <numeric>
#include <set>
#include <sstream>
#include <tuple>
#include <utility>

#include "dtrain/error.h"
#include "dtrain/memory.h"
#include "dtrain/parallel/pipeline/simulator.h"

namespace dtrain::parallel::pipeline {

using collectives::Communicator;
using collectives::P2POp;
using collectives::Work;

namespace {

// Tags: each (link between stages s and s+1, direction, microbatch size) is
// one channel of batch_send_recv, so that every message of a channel has one
// shape. Link l, direction d (0 activations, 1 gradients) and the k-th
// distinct microbatch size seen on that link and direction (the same order
// on both ends: the simulator checks that both ends list a pair's messages
// in the same order) give tag (2 l + d) * kSizesPerChannel + k.
constexpr int kSizesPerChannel = 1000;
constexpr int kMaxTag = 1'000'000;

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

// TiedGradientSum::kPerMicrobatch at the end of a step: every holder's
// gradient of each microbatch (`captured`, undefined where its use got none)
// gathered over `comm`, then added as autograd adds them on one stage that
// holds every use: per microbatch the uses from the latest stage to the
// first, then into .grad microbatch by microbatch in `order`. Every holder
// computes the same sum in the same order, so the copies stay bitwise equal.
void sum_tied_per_microbatch(const std::shared_ptr<Communicator>& comm, torch::Tensor& param,
                             bool grad_defined_at_start, const std::vector<torch::Tensor>& captured,
                             const std::vector<int>& holder_stages, const std::vector<int>& order) {
  torch::NoGradGuard no_grad;
  const auto m = static_cast<std::int64_t>(captured.size());
  std::vector<torch::Tensor> rows;
  torch::Tensor present = torch::zeros({m}, torch::kDouble);
  for (std::int64_t k = 0; k < m; ++k) {
    const torch::Tensor& g = captured[static_cast<std::size_t>(k)];
    rows.push_back(g.defined() ? g.reshape(param.sizes()) : torch::zeros_like(param));
    present[k] = g.defined() ? 1.0 : 0.0;
  }
  const auto holders = static_cast<std::int64_t>(comm->size());
  std::vector<std::int64_t> shape{holders, m};
  shape.insert(shape.end(), param.sizes().begin(), param.sizes().end());
  torch::Tensor all = torch::empty(shape, param.options());
  comm->all_gather(all, torch::stack(rows))->wait();
  torch::Tensor all_present = torch::empty({holders, m}, torch::kDouble);
  comm->all_gather(all_present, present)->wait();
  // The holders from the latest stage to the first.
  std::vector<std::int64_t> by_stage(static_cast<std::size_t>(holders));
  std::iota(by_stage.begin(), by_stage.end(), 0);
  std::sort(by_stage.begin(), by_stage.end(), [&](std::int64_t a, std::int64_t b) {
    return holder_stages[static_cast<std::size_t>(a)] > holder_stages[static_cast<std::size_t>(b)];
  });
  // .grad holds this copy's own accumulation, which the sum replaces. It
  // starts as autograd's would: zero if it was (zeroed) at the step's start,
  // else the first microbatch's sum itself.
  torch::Tensor grad;
  if (grad_defined_at_start) grad = param.mutable_grad().zero_();
  for (int k : order) {
    torch::Tensor sum;
    for (std::int64_t h : by_stage) {
      if (all_present[h][k].item<double>() == 0.0) continue;
      const torch::Tensor part = all[h][k];
      sum = sum.defined() ? sum + part : part.clone();
    }
    if (!sum.defined()) continue;
    if (grad.defined()) {
      grad.add_(sum);
    } else {
      grad = sum;
    }
  }
  if (!grad.defined()) grad = torch::zeros_like(param);
  if (!param.grad().defined()) {
    param.mutable_grad() = grad;
  } else if (!grad.is_same(param.grad())) {
    param.mutable_grad().copy_(grad);  // keeps .grad's storage (a DDP bucket view)
  }
}

}  // namespace

void PipelineOptions::validate() const {
  if (!custom_schedule) schedule.validate();
  for (std::size_t s = 1; s < stage_input_shapes.size(); ++s) {
    for (std::int64_t d : stage_input_shapes[s]) {
      DTRAIN_CHECK_ARG(d >= 0, "PipelineOptions::stage_input_shapes[", s,
                       "] = ", shape_string(stage_input_shapes[s]), " has a negative dimension");
    }
  }
  ddp.validate();
}

struct PipelineEngine::Impl {
  struct Slot {
    torch::Tensor input;         // the stage's input (leaf requiring grad for s > 0)
    torch::Tensor output;        // backward root: the output, or the scaled loss
    torch::Tensor output_grad;   // gradient of `output` (undefined for the loss)
    torch::Tensor input_grad;    // gradient of `input`, after B or I
    int input_batch = -1;        // the batch that receives `input`
    int output_grad_batch = -1;  // the batch that receives `output_grad`
  };
  struct Batch {
    std::shared_ptr<Work> work;
    std::string actions;  // for error messages
    bool waited = false;
  };
  // The copies of tied parameters this rank holds, summed over `comm`.
  struct TiedGroup {
    std::shared_ptr<Communicator> comm;
    std::vector<torch::Tensor> params;
    std::vector<int> local_stages;  // this rank's stages that hold them
    // TiedGradientSum::kPerMicrobatch, per parameter: the stage each member
    // of `comm` holds it in (by comm rank), the microbatches in the order the
    // first holding stage runs their backward, and this step's gradient of
    // each microbatch (by microbatch).
    std::vector<std::vector<int>> holder_stages;
    std::vector<std::vector<int>> microbatch_order;
    std::vector<std::vector<torch::Tensor>> captured;
    std::vector<bool> grad_defined_at_start;  // this step's, by parameter
  };

  std::vector<PipelineStage> stages;                          // by global stage id (ours only)
  std::vector<std::vector<torch::Tensor>> stage_params;       // trainable, by stage id
  std::vector<std::unique_ptr<DistributedDataParallel>> ddp;  // by stage id, dp > 1
  std::vector<TiedGroup> tied;
  std::map<std::tuple<int, int, std::int64_t>, int> channel_ids;
  std::map<std::pair<int, int>, int> channels_per_link;
  bool failed = false;

  // This rank's batches as the list forms them (maximal runs of send/recv
  // actions), for posting receives ahead (PipelineOptions::receive_ahead).
  struct PlannedBatch {
    int first = 0;             // index of its first action in the rank's list
    int end = 0;               // one past its last
    int activation_recvs = 0;  // recvF actions in it
    bool receives_activations_only = false;
  };
  std::vector<PlannedBatch> plan;
  std::vector<int> plan_of_action;  // index into `plan`, -1 for other actions
  int peak_stored = 0;              // the simulator's peak stored (stage, microbatch) pairs

  // Per step: receives posted ahead.
  std::vector<bool> plan_posted;
  int next_unposted = 0;          // first batch of `plan` not posted yet
  int pending_plan = -1;          // the batch of `pending_ops`
  std::vector<double> posted_at;  // per action of the list: when its batch was posted
  int stored = 0;                 // (stage, microbatch) pairs between F and their last backward
  int awaiting_forward = 0;       // activations received (or being) whose F has not started

  // Per step.
  std::vector<std::vector<Slot>> slots;  // [stage][microbatch]
  std::vector<Batch> batches;
  int first_open = 0;  // batches before it are complete and released
  std::vector<P2POp> pending_ops;
  std::string pending_text;
  std::vector<int> pending_ddp;  // stages whose DDP waits for the tied sum
  int backward_microbatch = -1;  // the microbatch of the running B or W (tied capture)
  // The hooks on tied parameters (kPerMicrobatch), removed with the engine:
  // the parameters belong to the caller's model and outlive it.
  std::vector<std::pair<torch::Tensor, unsigned>> hooks;

  int tag_for(int link, int direction, std::int64_t size) {
    const auto key = std::make_tuple(link, direction, size);
    auto it = channel_ids.find(key);
    if (it == channel_ids.end()) {
      int& count = channels_per_link[{link, direction}];
      DTRAIN_CHECK_ARG(count < kSizesPerChannel, "pipeline: more than ", kSizesPerChannel,
                       " distinct microbatch sizes between stages ", link, " and ", link + 1);
      it = channel_ids.emplace(key, count++).first;
    }
    const int tag = (2 * link + direction) * kSizesPerChannel + it->second;
    DTRAIN_CHECK_ARG(tag < kMaxTag, "pipeline: too many stages for the message tags");
    return tag;
  }

  void flush(Communicator& pp) {
    if (pending_ops.empty()) return;
    Batch batch;
    batch.actions = pending_text;
    batch.work = pp.batch_send_recv(pending_ops);
    batches.push_back(std::move(batch));
    pending_ops.clear();
    pending_text.clear();
    if (pending_plan >= 0) {
      plan_posted[static_cast<std::size_t>(pending_plan)] = true;
      next_unposted = std::max(next_unposted, pending_plan + 1);
      pending_plan = -1;
    }
  }

  void wait_batch(int index, int pp_rank) {
    Batch& batch = batches.at(static_cast<std::size_t>(index));
    if (batch.waited) return;
    try {
      batch.work->wait();
    } catch (const TimeoutError& e) {
      DTRAIN_THROW(TimeoutError, "pipeline rank ", pp_rank, ", batch [", batch.actions,
                   "]: ", e.what());
    } catch (const CommError& e) {
      DTRAIN_THROW(CommError, "pipeline rank ", pp_rank, ", batch [", batch.actions,
                   "]: ", e.what());
    }
    batch.waited = true;
    batch.work.reset();  // the Work holds the batch's tensors: sent outputs are freed now
  }

  // Lets go of the batches that have completed, so that the memory of what
  // they sent returns without waiting for the end of the step.
  void release_completed(int pp_rank) {
    for (; first_open < static_cast<int>(batches.size()); ++first_open) {
      Batch& batch = batches[static_cast<std::size_t>(first_open)];
      if (!batch.waited && !batch.work->is_completed()) break;
      wait_batch(first_open, pp_rank);
    }
  }
};

PipelineEngine::PipelineEngine(const std::vector<Layer>& layers, const StagePartition& partition,
                               ParallelContext context, PipelineOptions options)
    : context_(std::move(context)), options_(std::move(options)), impl_(std::make_unique<Impl>()) {
  options_.validate();
  const int p = context_.pp_size();
  if (options_.custom_schedule) {
    schedule_ = *options_.custom_schedule;
  } else {
    ScheduleOptions so = options_.schedule;
    so.num_ranks = p;
    schedule_ = make_schedule(so);
  }
  DTRAIN_CHECK_ARG(schedule_.num_ranks == p, "pipeline schedule '", schedule_.name, "' is for ",
                   schedule_.num_ranks, " pipeline ranks but the context has pp = ", p);
  // The simulator's checks (a rejected list never runs), and the peak of
  // stored activations that bounds the receives posted ahead.
  const SimulationReport simulated = simulate(schedule_);
  const int num_stages = schedule_.num_stages();
  partition.validate();
  DTRAIN_CHECK_ARG(partition.num_stages() == num_stages, "the partition ", partition.to_string(),
                   " has ", partition.num_stages(), " stages but the schedule '", schedule_.name,
                   "' has ", num_stages, " (p * v): cut the model into ", num_stages, " stages");
  DTRAIN_CHECK_ARG(partition.num_layers() == static_cast<int>(layers.size()), "the partition ",
                   partition.to_string(), " covers ", partition.num_layers(),
                   " layers but the model has ", layers.size());
  DTRAIN_CHECK_ARG(static_cast<int>(options_.stage_input_shapes.size()) == num_stages,
                   "PipelineOptions::stage_input_shapes has ", options_.stage_input_shapes.size(),
                   " entries but there are ", num_stages,
                   " stages: give each stage's per-sample input shape (stage_input_shapes() "
                   "computes them from a sample batch)");

  Impl& im = *impl_;
  const int me = context_.pp_rank();
  stage_ids_ = schedule_.stages_of_rank(me);
  im.peak_stored = simulated.ranks[static_cast<std::size_t>(me)].peak_stored;
  const auto& list = schedule_.actions[static_cast<std::size_t>(me)];
  im.plan_of_action.assign(list.size(), -1);
  for (int i = 0; i < static_cast<int>(list.size()); ++i) {
    const Action& a = list[static_cast<std::size_t>(i)];
    if (!a.is_communication()) continue;
    if (i == 0 || !list[static_cast<std::size_t>(i - 1)].is_communication()) {
      im.plan.push_back({i, i, 0, true});
    }
    Impl::PlannedBatch& batch = im.plan.back();
    batch.end = i + 1;
    if (a.kind == ActionKind::kRecvActivation) {
      ++batch.activation_recvs;
    } else {
      batch.receives_activations_only = false;
    }
    im.plan_of_action[static_cast<std::size_t>(i)] = static_cast<int>(im.plan.size()) - 1;
  }
  im.stages.resize(static_cast<std::size_t>(num_stages), nullptr);
  im.stage_params.resize(static_cast<std::size_t>(num_stages));
  for (int s : stage_ids_) {
    im.stages[s] = PipelineStage(layers, partition, s);
    for (const auto& p_item : im.stages[s]->parameters(/*recurse=*/true)) {
      if (p_item.requires_grad()) im.stage_params[s].push_back(p_item);
    }
  }

  // Tied weights: one communicator per distinct set of holding ranks, made
  // by every pp rank in the same order (the list is the same everywhere).
  const std::vector<TiedParameter> tied = find_tied_parameters(layers, partition);
  std::vector<std::vector<int>> rank_sets;
  std::vector<std::shared_ptr<Communicator>> set_comms;
  for (const TiedParameter& t : tied) {
    std::set<int> ranks;
    for (int s : t.stages) ranks.insert(schedule_.rank_of_stage(s));
    std::vector<int> set(ranks.begin(), ranks.end());
    std::vector<int> local;
    for (int s : t.stages) {
      if (schedule_.rank_of_stage(s) == me) local.push_back(s);
    }
    DTRAIN_CHECK_ARG(local.size() <= 1 || context_.dp_size() == 1, "the parameter '",
                     t.names.front(), "' is shared by ", local.size(), " stages on pipeline rank ",
                     me,
                     "; with dp > 1 each stage's DistributedDataParallel would own its gradient: "
                     "place those stages on different ranks or cut the model elsewhere");
    if (set.size() < 2) continue;  // all uses on one rank: autograd sums them
    // Per microbatch, each holding rank's copy must see one use's gradient
    // per backward: one stage per holding rank (checked on every rank alike).
    std::vector<int> holders;
    for (int r : set) {
      std::vector<int> held;
      for (int s : t.stages) {
        if (schedule_.rank_of_stage(s) == r) held.push_back(s);
      }
      DTRAIN_CHECK_ARG(
          options_.tied_gradients != TiedGradientSum::kPerMicrobatch || held.size() == 1,
          "TiedGradientSum::kPerMicrobatch: pipeline rank ", r, " holds the tied parameter '",
          t.names.front(), "' in ", held.size(), " stages; it needs one stage per holding rank");
      holders.push_back(held.front());
    }
    auto found = std::find(rank_sets.begin(), rank_sets.end(), set);
    std::size_t index = static_cast<std::size_t>(found - rank_sets.begin());
    if (found == rank_sets.end()) {
      rank_sets.push_back(set);
      const bool member = std::binary_search(set.begin(), set.end(), me);
      collectives::SplitOptions split_options;
      set_comms.push_back(context_.pp()->split(member ? 0 : -1, me, split_options));
      index = rank_sets.size() - 1;
    }
    if (local.empty()) continue;
    // This rank's copy: the tensor its first holding stage registers.
    torch::Tensor param;
    for (std::size_t k = 0; k < t.names.size() && !param.defined(); ++k) {
      for (int s : local) {
        const auto named = im.stages[s]->named_parameters(/*recurse=*/true);
        if (const torch::Tensor* found_param = named.find(t.names[k])) {
          param = *found_param;
          break;
        }
      }
    }
    DTRAIN_CHECK(param.defined(), "tied parameter '", t.names.front(), "' not found in stage ",
                 local.front());
    Impl::TiedGroup* group = nullptr;
    for (Impl::TiedGroup& g : im.tied) {
      if (g.comm == set_comms[index] && g.local_stages == local) group = &g;
    }
    if (group == nullptr) {
      im.tied.emplace_back();
      group = &im.tied.back();
      group->comm = set_comms[index];
      group->local_stages = local;
    }
    group->params.push_back(param);
    if (options_.tied_gradients == TiedGradientSum::kPerMicrobatch) {
      std::vector<int> order;
      const int first = t.stages.front();
      for (const Action& a :
           schedule_.actions[static_cast<std::size_t>(schedule_.rank_of_stage(first))]) {
        if (a.stage == first &&
            (a.kind == ActionKind::kBackward || a.kind == ActionKind::kBackwardWeight)) {
          order.push_back(a.microbatch);
        }
      }
      group->holder_stages.push_back(holders);
      group->microbatch_order.push_back(std::move(order));
      group->captured.emplace_back();
      const std::size_t slot = group->captured.size() - 1;
      const std::size_t group_index = static_cast<std::size_t>(group - im.tied.data());
      // The hook sees the gradient of this microbatch's uses on this stage
      // before autograd adds it to .grad (which keeps its own copy: this
      // one holds a reference, so autograd never takes it over).
      Impl* impl = &im;
      const unsigned hook =
          param.register_hook([impl, group_index, slot](const torch::Tensor& grad) {
            const int mb = impl->backward_microbatch;
            auto& captured = impl->tied[group_index].captured[slot];
            if (mb < 0 || mb >= static_cast<int>(captured.size())) return;
            captured[static_cast<std::size_t>(mb)] =
                captured[static_cast<std::size_t>(mb)].defined()
                    ? captured[static_cast<std::size_t>(mb)] + grad
                    : grad;
          });
      im.hooks.emplace_back(param, hook);
    }
    // The first holding stage's value everywhere.
    collectives::BroadcastOptions root;
    const int first_rank = schedule_.rank_of_stage(t.stages.front());
    root.root = static_cast<int>(
        std::lower_bound(rank_sets[index].begin(), rank_sets[index].end(), first_rank) -
        rank_sets[index].begin());
    torch::NoGradGuard no_grad;
    set_comms[index]->broadcast(param.detach(), root)->wait();
  }

  if (context_.dp_size() > 1 && options_.dp_reduction == DataParallelReduction::kDdp) {
    im.ddp.resize(static_cast<std::size_t>(num_stages));
    for (int s : stage_ids_) {
      im.ddp[s] = std::make_unique<DistributedDataParallel>(im.stages[s].ptr(), context_.dp(),
                                                            options_.ddp);
    }
  }
}

PipelineEngine::~PipelineEngine() {
  if (!impl_) return;
  for (auto& [param, hook] : impl_->hooks) param.remove_hook(hook);
  for (auto& batch : impl_->batches) {
    if (batch.waited || !batch.work) continue;
    try {
      batch.work->wait();  // the buffers must outlive the messages
    } catch (...) {
    }
  }
}

PipelineStage PipelineEngine::stage(int stage) const {
  DTRAIN_CHECK_ARG(std::find(stage_ids_.begin(), stage_ids_.end(), stage) != stage_ids_.end(),
                   "stage ", stage, " is not on pipeline rank ", context_.pp_rank());
  return impl_->stages[stage];
}

std::vector<torch::Tensor> PipelineEngine::parameters() const {
  std::vector<torch::Tensor> out;
  for (const auto& item : named_parameters()) out.push_back(item.second);
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> PipelineEngine::named_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::set<const void*> seen;
  for (int s : stage_ids_) {
    for (const auto& item : impl_->stages[s]->named_parameters(/*recurse=*/true)) {
      if (!item.value().requires_grad()) continue;
      if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;
      out.emplace_back(item.key(), item.value());
    }
  }
  return out;
}

PipelineStepResult PipelineEngine::step(const torch::Tensor& input, const torch::Tensor& target,
                                        const LossFunction& loss) {
  DTRAIN_CHECK_ARG(input.defined() && input.dim() >= 1,
                   "PipelineEngine::step: the input batch needs a batch dimension");
  const std::vector<std::int64_t> sizes =
      microbatch_sizes(input.size(0), schedule_.num_microbatches);
  std::vector<torch::Tensor> inputs = input.split_with_sizes(sizes, 0);
  std::vector<torch::Tensor> targets;
  if (target.defined()) {
    DTRAIN_CHECK_ARG(target.dim() >= 1 && target.size(0) == input.size(0),
                     "PipelineEngine::step: the target batch has ",
                     target.dim() >= 1 ? target.size(0) : 0, " samples, the input batch ",
                     input.size(0));
    targets = target.split_with_sizes(sizes, 0);
  } else {
    targets.resize(inputs.size());
  }
  return step(inputs, targets, loss);
}

PipelineStepResult PipelineEngine::step(const std::vector<torch::Tensor>& inputs,
                                        const std::vector<torch::Tensor>& targets,
                                        const LossFunction& loss) {
  Impl& im = *impl_;
  DTRAIN_CHECK(!im.failed,
               "PipelineEngine: an earlier step failed in communication; build a new engine on "
               "new communicators");
  const int m = schedule_.num_microbatches;
  const int num_stages = schedule_.num_stages();
  DTRAIN_CHECK_ARG(static_cast<int>(inputs.size()) == m, "PipelineEngine::step got ", inputs.size(),
                   " microbatches, the schedule '", schedule_.name, "' has ", m);
  DTRAIN_CHECK_ARG(targets.size() == inputs.size(), "PipelineEngine::step got ", targets.size(),
                   " targets for ", inputs.size(), " microbatches");
  std::vector<std::int64_t> sizes(static_cast<std::size_t>(m));
  std::int64_t total = 0;
  for (int i = 0; i < m; ++i) {
    DTRAIN_CHECK_ARG(inputs[i].defined() && inputs[i].dim() >= 1 && inputs[i].size(0) >= 1,
                     "PipelineEngine::step: microbatch ", i, " is empty or has no batch dimension");
    sizes[i] = inputs[i].size(0);
    total += sizes[i];
  }
  const bool holds_last = schedule_.rank_of_stage(num_stages - 1) == context_.pp_rank();
  if (holds_last) {
    DTRAIN_CHECK_ARG(static_cast<bool>(loss), "PipelineEngine::step needs a loss function");
  }

  const int me = context_.pp_rank();
  Communicator& pp = *context_.pp();
  im.failed = true;  // until the step completes
  im.slots.assign(static_cast<std::size_t>(num_stages), {});
  for (int s : stage_ids_) im.slots[s].resize(static_cast<std::size_t>(m));
  im.batches.clear();
  im.first_open = 0;
  im.pending_ops.clear();
  im.pending_text.clear();
  im.pending_ddp.clear();
  im.plan_posted.assign(im.plan.size(), false);
  im.next_unposted = 0;
  im.pending_plan = -1;
  im.posted_at.assign(schedule_.actions[static_cast<std::size_t>(me)].size(), 0.0);
  im.stored = 0;
  im.awaiting_forward = 0;
  im.backward_microbatch = -1;
  for (auto& g : im.tied) {
    for (auto& captured : g.captured) captured.assign(static_cast<std::size_t>(m), torch::Tensor());
    g.grad_defined_at_start.clear();
    for (const auto& param : g.params) g.grad_defined_at_start.push_back(param.grad().defined());
  }
  trace_.clear();
  stats_ = PipelineStepStats{};

  // Zero this rank's gradients; accumulate every backward without DDP's sync.
  std::vector<std::unique_ptr<DistributedDataParallel::NoSyncGuard>> no_sync;
  for (int s : stage_ids_) {
    if (!im.ddp.empty()) {
      im.ddp[s]->zero_grad();
      no_sync.push_back(std::make_unique<DistributedDataParallel::NoSyncGuard>(*im.ddp[s]));
    } else {
      for (auto& param : im.stage_params[s]) {
        if (param.grad().defined()) param.mutable_grad().zero_();
      }
    }
  }
  if (options_.record_memory) {
    stats_.heap_bytes_at_start = heap_bytes_in_use();
    stats_.peak_heap_bytes = stats_.heap_bytes_at_start;
  }

  PipelineStepResult result;
  if (holds_last) result.microbatch_losses.resize(static_cast<std::size_t>(m));
  const auto local = [&](int s) {
    return s >= 0 && s < num_stages && schedule_.rank_of_stage(s) == me;
  };
  const auto wire_shape = [&](int stage, int mb) {
    std::vector<std::int64_t> shape{sizes[mb]};
    const auto& sample = options_.stage_input_shapes[stage];
    shape.insert(shape.end(), sample.begin(), sample.end());
    return shape;
  };
  const auto wire_options = torch::TensorOptions().dtype(options_.activation_dtype);
  // Adds the receive of an activation to the batch being collected.
  const auto add_recv_activation = [&](const Action& a) {
    Impl::Slot& slot = im.slots[a.stage][a.microbatch];
    torch::Tensor buffer =
        torch::empty(wire_shape(a.stage, a.microbatch), wire_options);  // fresh each time
    im.pending_ops.push_back(
        P2POp::recv(buffer, a.peer, im.tag_for(a.stage - 1, 0, sizes[a.microbatch])));
    slot.input = buffer.requires_grad_(true);
    slot.input_batch = static_cast<int>(im.batches.size());  // the batch being collected
    im.pending_text += (im.pending_text.empty() ? "" : " ") + a.to_string();
    ++im.awaiting_forward;
  };
  // Receives posted ahead (PipelineOptions::receive_ahead): the batches
  // after action `here` that only receive activations are posted now, in
  // list order, each as its own batch, up to the first batch that sends or
  // receives a gradient, while the rank's stored activations and the
  // received ones waiting for their F stay within the simulator's peak of
  // stored activations for this rank (so 1F1B keeps its memory bound).
  // The rank's batches keep their order on its stream and are only posted
  // earlier, so every batch begins no later than without it and no
  // deadlock is added; the sender's messages complete as soon as they
  // arrive, which releases its sent outputs (deallocation) sooner.
  const auto& my_list = schedule_.actions[static_cast<std::size_t>(me)];
  const auto post_ahead = [&](int here) {
    if (!options_.receive_ahead) return;
    while (im.next_unposted < static_cast<int>(im.plan.size())) {
      const Impl::PlannedBatch& next = im.plan[static_cast<std::size_t>(im.next_unposted)];
      if (next.first <= here || !next.receives_activations_only ||
          im.stored + im.awaiting_forward + next.activation_recvs > im.peak_stored) {
        return;
      }
      im.pending_plan = im.next_unposted;
      for (int i = next.first; i < next.end; ++i) {
        add_recv_activation(my_list[static_cast<std::size_t>(i)]);
        im.posted_at[static_cast<std::size_t>(i)] = now_seconds();
      }
      im.flush(pp);
    }
  };

  for (int index = 0; index < static_cast<int>(my_list.size()); ++index) {
    const Action& a = my_list[static_cast<std::size_t>(index)];
    ActionRecord record;
    record.action = a;
    const int planned = im.plan_of_action[static_cast<std::size_t>(index)];
    if (planned >= 0 && im.plan_posted[static_cast<std::size_t>(planned)]) {
      // Posted ahead: already in flight.
      record.start_seconds = record.end_seconds = im.posted_at[static_cast<std::size_t>(index)];
      trace_.push_back(record);
      continue;
    }
    if (a.is_communication()) {
      im.pending_plan = planned;
    } else {
      im.flush(pp);
      post_ahead(index);
    }
    im.release_completed(me);
    const int s = a.stage;
    const int mb = a.microbatch;
    switch (a.kind) {
      case ActionKind::kForward: {
        Impl::Slot& slot = im.slots[s][mb];
        const double wait_start = now_seconds();
        if (s == 0) {
          slot.input = inputs[mb];
        } else if (slot.input_batch >= 0) {
          im.wait_batch(slot.input_batch, me);
        }
        DTRAIN_CHECK(slot.input.defined(), "pipeline rank ", me, ": ", a.to_string(),
                     " has no input (the schedule passed validation; this is a bug)");
        record.start_seconds = now_seconds();
        record.wait_seconds = record.start_seconds - wait_start;
        ++im.stored;
        if (s > 0 && slot.input_batch >= 0) --im.awaiting_forward;
        torch::Tensor out = im.stages[s]->forward(slot.input);
        if (s == num_stages - 1) {
          torch::Tensor l = loss(out, targets[mb]);
          DTRAIN_CHECK_ARG(l.numel() == 1, "the loss function returned ", l.sizes(),
                           "; it must return a scalar");
          if (options_.loss_scaling == LossScaling::kMean) {
            l = l * (static_cast<double>(sizes[mb]) / static_cast<double>(total));
          }
          result.microbatch_losses[mb] = l.detach();
          slot.output = l;
        } else {
          slot.output = out;
          if (local(s + 1)) {  // the next stage is here: pass it without a message
            Impl::Slot& next = im.slots[s + 1][mb];
            next.input = out.detach().requires_grad_(true);
          }
        }
        record.end_seconds = now_seconds();
        break;
      }
      case ActionKind::kBackward:
      case ActionKind::kBackwardInput:
      case ActionKind::kBackwardWeight: {
        Impl::Slot& slot = im.slots[s][mb];
        const double wait_start = now_seconds();
        if (s < num_stages - 1 && slot.output_grad_batch >= 0) {
          im.wait_batch(slot.output_grad_batch, me);
        }
        DTRAIN_CHECK(slot.output.defined() && (s == num_stages - 1 || slot.output_grad.defined()),
                     "pipeline rank ", me, ": ", a.to_string(),
                     " has no output or output gradient (a bug: the schedule passed validation)");
        record.start_seconds = now_seconds();
        record.wait_seconds = record.start_seconds - wait_start;
        const std::vector<torch::Tensor> roots{slot.output};
        std::vector<torch::Tensor> root_grads{slot.output_grad};
        const bool input_needs_grad = slot.input.defined() && slot.input.requires_grad();
        im.backward_microbatch = mb;
        if (!slot.output.requires_grad()) {
          // Nothing to differentiate: a first stage without parameters.
        } else if (a.kind == ActionKind::kBackward) {
          torch::autograd::backward(roots, root_grads);
          // Stage 0's input is the caller's data: its gradient (if it asked
          // for one) stays where autograd put it.
          if (input_needs_grad && s > 0) slot.input_grad = slot.input.grad();
        } else if (a.kind == ActionKind::kBackwardInput) {
          if (input_needs_grad) {
            slot.input_grad = torch::autograd::grad(roots, {slot.input}, root_grads,
                                                    /*retain_graph=*/true)[0];
          }
        } else if (!im.stage_params[s].empty()) {
          torch::autograd::backward(roots, root_grads, /*retain_graph=*/false,
                                    /*create_graph=*/false, im.stage_params[s]);
        }
        im.backward_microbatch = -1;
        if (slot.input_grad.defined() && local(s - 1)) {
          im.slots[s - 1][mb].output_grad = slot.input_grad;
        }
        if (a.kind != ActionKind::kBackwardInput) {  // the stage is done with this microbatch
          slot.output = torch::Tensor();
          slot.output_grad = torch::Tensor();
          slot.input = torch::Tensor();
          --im.stored;
        }
        record.end_seconds = now_seconds();
        break;
      }
      case ActionKind::kSendActivation: {
        Impl::Slot& slot = im.slots[s][mb];
        // A separate handle on the same storage, so the output's own storage
        // can be swapped out below while the message still reads it.
        torch::Tensor wire = slot.output.detach();
        im.pending_ops.push_back(P2POp::send(wire, a.peer, im.tag_for(s, 0, sizes[mb])));
        const std::size_t bytes = wire.nbytes();
        stats_.sent_output_bytes += bytes;
        // Only the output and `wire` hold the storage: autograd did not save
        // it, so the graph never reads it again.
        if (options_.deallocate_sent_outputs && slot.output.storage().use_count() == 2) {
          slot.output.set_data(torch::empty({0}, slot.output.options()));
          stats_.deallocated_bytes += bytes;
        }
        im.pending_text += (im.pending_text.empty() ? "" : " ") + a.to_string();
        record.start_seconds = record.end_seconds = now_seconds();
        break;
      }
      case ActionKind::kSendGradient: {
        Impl::Slot& slot = im.slots[s][mb];
        DTRAIN_CHECK(slot.input_grad.defined(), "pipeline rank ", me, ": ", a.to_string(),
                     " has no input gradient");
        im.pending_ops.push_back(
            P2POp::send(slot.input_grad, a.peer, im.tag_for(s - 1, 1, sizes[mb])));
        slot.input_grad = torch::Tensor();  // the batch keeps it alive until sent
        im.pending_text += (im.pending_text.empty() ? "" : " ") + a.to_string();
        record.start_seconds = record.end_seconds = now_seconds();
        break;
      }
      case ActionKind::kRecvActivation: {
        add_recv_activation(a);
        record.start_seconds = record.end_seconds = now_seconds();
        break;
      }
      case ActionKind::kRecvGradient: {
        Impl::Slot& slot = im.slots[s][mb];
        torch::Tensor buffer = torch::empty(wire_shape(s + 1, mb), wire_options);
        im.pending_ops.push_back(P2POp::recv(buffer, a.peer, im.tag_for(s, 1, sizes[mb])));
        slot.output_grad = buffer;
        slot.output_grad_batch = static_cast<int>(im.batches.size());
        im.pending_text += (im.pending_text.empty() ? "" : " ") + a.to_string();
        record.start_seconds = record.end_seconds = now_seconds();
        break;
      }
      case ActionKind::kReduceGradients: {
        record.start_seconds = record.end_seconds = now_seconds();
        // The stage's gradients are complete. Its data-parallel average
        // starts now, unless it holds a tied weight: the sum of the copies
        // comes first, at the end of the step (see below).
        const bool holds_tied = std::any_of(im.tied.begin(), im.tied.end(), [&](const auto& g) {
          return std::find(g.local_stages.begin(), g.local_stages.end(), s) != g.local_stages.end();
        });
        if (!im.ddp.empty()) {
          if (holds_tied) {
            im.pending_ddp.push_back(s);
          } else {
            im.ddp[s]->start_reduction();
          }
        }
        break;
      }
    }
    if (options_.record_memory) {
      record.heap_bytes = heap_bytes_in_use();
      stats_.peak_heap_bytes = std::max(stats_.peak_heap_bytes, record.heap_bytes);
    }
    trace_.push_back(record);
  }
  im.flush(pp);
  for (int i = 0; i < static_cast<int>(im.batches.size()); ++i) im.wait_batch(i, me);
  // Tied weights: the sum of the copies' gradients over the holding ranks.
  // Only after every message of the step: a small all-reduce issued while
  // its communicator is idle runs on the calling thread (CommunicatorOptions::
  // inline_max_bytes), and the holder of the last stage reaches its reduce
  // before the first stage has received its last gradient.
  for (auto& g : im.tied) {
    for (std::size_t j = 0; j < g.params.size(); ++j) {
      torch::Tensor& param = g.params[j];
      if (options_.tied_gradients == TiedGradientSum::kPerMicrobatch) {
        sum_tied_per_microbatch(g.comm, param, g.grad_defined_at_start[j], g.captured[j],
                                g.holder_stages[j], g.microbatch_order[j]);
        continue;
      }
      if (!param.grad().defined()) param.mutable_grad() = torch::zeros_like(param);
      g.comm->all_reduce(param.grad())->wait();
    }
  }
  for (int s : im.pending_ddp) im.ddp[s]->start_reduction();
  no_sync.clear();
  for (int s : stage_ids_) {
    if (!im.ddp.empty()) im.ddp[s]->synchronize();
  }
  im.slots.clear();
  im.batches.clear();

  if (holds_last) {
    torch::Tensor sum = result.microbatch_losses[0].clone();
    for (int i = 1; i < m; ++i) sum += result.microbatch_losses[i];
    result.loss = sum;
  }
  im.failed = false;
  return result;
}

std::vector<std::vector<std::int64_t>> stage_input_shapes(const std::vector<Layer>& layers,
                                                          const StagePartition& partition,
                                                          const torch::Tensor& sample_input) {
  partition.validate();
  DTRAIN_CHECK_ARG(partition.num_layers() == static_cast<int>(layers.size()), "the partition ",
                   partition.to_string(), " covers ", partition.num_layers(),
                   " layers but the model has ", layers.size());
  DTRAIN_CHECK_ARG(sample_input.defined() && sample_input.dim() >= 1,
                   "stage_input_shapes needs a sample batch with a batch dimension");
  torch::NoGradGuard no_grad;
  std::vector<std::vector<std::int64_t>> shapes(static_cast<std::size_t>(partition.num_stages()));
  torch::Tensor x = sample_input;
  for (int s = 0; s < partition.num_stages(); ++s) {
    shapes[s].assign(x.sizes().begin() + 1, x.sizes().end());
    for (int i = partition.first_layer(s); i < partition.end_layer(s); ++i) {
      torch::nn::AnyModule layer = layers[static_cast<std::size_t>(i)].module;  // shares the module
      const auto module = layer.ptr();
      const bool training = module->is_training();
      module->eval();
      x = layer.forward(x);
      module->train(training);
    }
  }
  return shapes;
}

std::string trace_to_csv(const std::vector<ActionRecord>& trace, int rank, bool header) {
  std::ostringstream os;
  os.precision(9);
  os << std::fixed;
  if (header) os << "rank,kind,stage,microbatch,start,end,wait,heap\n";
  for (const ActionRecord& r : trace) {
    os << rank << ',' << action_kind_name(r.action.kind) << ',' << r.action.stage << ','
       << r.action.microbatch << ',' << r.start_seconds << ',' << r.end_seconds << ','
       << r.wait_seconds << ',' << r.heap_bytes << '\n';
  }
  return os.str();
}

}  // namespace dtrain::parallel::pipeline
