#include "src/parallel/buffers.h"

#include <torch/torch.h>

#include <map>

namespace dtrain::parallel::detail {

BufferBroadcast::BufferBroadcast(const torch::nn::Module& module) {
  std::map<at::ScalarType, std::vector<torch::Tensor>> by_dtype;
  for (const auto& b : module.buffers(true)) {
    if (b.defined() && b.numel() > 0) by_dtype[b.scalar_type()].push_back(b.detach());
  }
  for (auto& [dtype, buffers] : by_dtype) {
    std::int64_t total = 0;
    for (const auto& b : buffers) total += b.numel();
    groups_.push_back({torch::empty({total}, buffers.front().options()), std::move(buffers)});
  }
}

void BufferBroadcast::run(collectives::Communicator& comm) {
  torch::NoGradGuard no_grad;
  std::vector<std::shared_ptr<collectives::Work>> pending;
  for (Group& g : groups_) {
    std::int64_t offset = 0;
    for (const auto& b : g.buffers) {
      g.flat.narrow(0, offset, b.numel()).copy_(b.reshape({-1}));
      offset += b.numel();
    }
    pending.push_back(comm.broadcast(g.flat));
  }
  for (auto& w : pending) w->wait();
  for (Group& g : groups_) {
    std::int64_t offset = 0;
    for (auto& b : g.buffers) {
      b.copy_(g.flat.narrow(0, offset, b.numel()).view(b.sizes()));
      offset += b.numel();
    }
  }
}

}  // namespace dtrain::parallel::detail
