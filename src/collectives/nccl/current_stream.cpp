// The caller's current stream, from LibTorch when it was built with CUDA.

#include "src/collectives/nccl/current_stream.h"

#if DTRAIN_NCCL_TORCH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace dtrain::collectives::detail {
namespace {

class TorchCurrentStreamProvider final : public CurrentStreamProvider {
 public:
  CudaStream current_stream(int device) override {
#if DTRAIN_NCCL_TORCH_CUDA
    return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
#else
    (void)device;
    return nullptr;  // the legacy default stream of the current device
#endif
  }
};

}  // namespace

std::shared_ptr<CurrentStreamProvider> make_torch_current_stream_provider() {
  return std::make_shared<TorchCurrentStreamProvider>();
}

}  // namespace dtrain::collectives::detail
