#include "src/parallel/buffers.h"

#include <torch/torch.h>

#include <map>

namespace dtrain::parallel::detail {

void broadcast_buffers(torch::nn::Module& module, collectives::Communicator& comm) {
  torch::NoGradGuard no_grad;
  std::map<at::ScalarType, std::vector<torch::Tensor>> by_dtype;
  for (const auto& b : module.buffers(true)) {
    if (b.defined() && b.numel() > 0) by_dtype[b.scalar_type()].push_back(b);
  }
  std::vector<std::pair<torch::Tensor, std::vector<torch::Tensor>*>> flats;
  std::vector<std::shared_ptr<collectives::Work>> pending;
  for (auto& [dtype, buffers] : by_dtype) {
    std::vector<torch::Tensor> pieces;
    for (const auto& b : buffers) pieces.push_back(b.detach().reshape({-1}));
    torch::Tensor flat = torch::cat(pieces);
    pending.push_back(comm.broadcast(flat));
    flats.emplace_back(flat, &buffers);
  }
  for (auto& w : pending) w->wait();
  for (auto& [flat, buffers] : flats) {
    std::int64_t offset = 0;
    for (auto& b : *buffers) {
      b.detach().copy_(flat.narrow(0, offset, b.numel()).view(b.sizes()));
      offset += b.numel();
    }
  }
}

}  // namespace dtrain::parallel::detail
