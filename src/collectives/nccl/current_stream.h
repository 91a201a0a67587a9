#pragma once
// Where the NCCL backend learns the caller's current CUDA stream: the stream
// an op is ordered after, and the stream Work::wait() orders after the op.
// An interface so that tests can inject streams without CUDA.

#include <memory>

#include "src/collectives/nccl/nccl_api.h"

namespace dtrain::collectives::detail {

class CurrentStreamProvider {
 public:
  virtual ~CurrentStreamProvider() = default;
  /// The calling thread's current stream on `device`.
  virtual CudaStream current_stream(int device) = 0;
};

/// With a CUDA-enabled LibTorch (DTRAIN_NCCL_TORCH_CUDA):
/// c10::cuda::getCurrentCUDAStream(device). Otherwise the legacy default
/// stream (nullptr), which is what LibTorch without CUDA cannot override.
std::shared_ptr<CurrentStreamProvider> make_torch_current_stream_provider();

}  // namespace dtrain::collectives::detail
