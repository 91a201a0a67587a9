#include "dtrain/parallel/zero_optimizer.h"

#include <torch/serialize.h>
#include <torch/torch.h>

#include <sstream>

#include "dtrain/error.h"
#include "src/parallel/buffers.h"

namespace dtrain::parallel {

ZeroRedundancyOptimizer::ZeroRedundancyOptimizer(std::shared_ptr<torch::nn::Module> module,
                                                 std::shared_ptr<collectives::Communicator> dp,
                                                 const OptimizerFactory& make_optimizer)
    : module_(std::move(module)), dp_(std::move(dp)) {
  DTRAIN_CHECK_ARG(module_ != nullptr && dp_ != nullptr,
                   "ZeroRedundancyOptimizer needs a module and a communicator");
  std::vector<torch::Tensor> params;
  for (const auto& item : module_->named_parameters(true)) {
    if (!item.value().requires_grad()) continue;
    params.push_back(item.value());
    flat_parameters_.push_back({item.key(), total_numel_, item.value()});
    total_numel_ += item.value().numel();
  }
  DTRAIN_CHECK_ARG(!params.empty(),
                   "ZeroRedundancyOptimizer: the module has no trainable parameters");
  const auto dtype = params.front().scalar_type();
  for (const auto& p : params) {
    DTRAIN_CHECK_ARG(p.scalar_type() == dtype && at::isFloatingType(dtype),
                     "ZeroRedundancyOptimizer: all trainable parameters must share one floating "
                     "dtype; found ",
                     dtype, " and ", p.scalar_type());
  }
  const std::int64_t n = dp_->size();
  const std::int64_t shard = (total_numel_ + n - 1) / n;
  const auto options = params.front().options().requires_grad(false);
  flat_params_ = torch::zeros({shard * n}, options);
  flat_grads_ = torch::zeros({shard * n}, options);
  {
    torch::NoGradGuard no_grad;
    std::int64_t offset = 0;
    for (auto& p : params) {
      flat_params_.narrow(0, offset, p.numel()).copy_(p.detach().reshape({-1}));
      p.set_data(flat_params_.narrow(0, offset, p.numel()).view(p.sizes()));
      p.mutable_grad() = flat_grads_.narrow(0, offset, p.numel()).view(p.sizes());
      offset += p.numel();
    }
    dp_->broadcast(flat_params_)->wait();  // every replica starts from rank 0's weights
  }
  shard_ = flat_params_.narrow(0, dp_->rank() * shard, shard).clone().set_requires_grad(true);
  shard_.mutable_grad() = torch::zeros({shard}, options);
  optimizer_ = make_optimizer({shard_});
  DTRAIN_CHECK_ARG(optimizer_ != nullptr, "ZeroRedundancyOptimizer: the factory returned null");
}

ZeroRedundancyOptimizer::ZeroRedundancyOptimizer(std::shared_ptr<torch::nn::Module> module,
                                                 const ParallelContext& context,
                                                 const OptimizerFactory& make_optimizer)
    : ZeroRedundancyOptimizer(std::move(module), context.dp(), make_optimizer) {}

void ZeroRedundancyOptimizer::zero_grad() { flat_grads_.zero_(); }

void ZeroRedundancyOptimizer::step() {
  collectives::ReduceScatterOptions average;
  average.op = collectives::ReduceOp::kAvg;
  dp_->reduce_scatter(shard_.mutable_grad(), flat_grads_, average)->wait();
  optimizer_->step();
  torch::NoGradGuard no_grad;
  auto gathered = dp_->all_gather(flat_params_, shard_.detach());
  // Buffers (BatchNorm's running statistics) follow rank 0, as under DDP.
  if (!buffers_) buffers_ = std::make_shared<detail::BufferBroadcast>(*module_);
  buffers_->run(*dp_);
  gathered->wait();
}

void ZeroRedundancyOptimizer::reload_shard_from_parameters() {
  torch::NoGradGuard no_grad;
  shard_.copy_(flat_params_.narrow(0, shard_offset(), shard_.numel()));
}

std::size_t ZeroRedundancyOptimizer::optimizer_state_bytes() const {
  torch::serialize::OutputArchive archive;
  optimizer_->save(archive);
  std::ostringstream bytes;
  archive.save_to(bytes);
  return bytes.str().size();
}

}  // namespace dtrain::parallel
