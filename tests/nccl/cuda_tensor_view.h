#pragma once
// at::Tensor views of CUDA memory that work with the CPU-only LibTorch: a
// tensor whose storage claims to live on cuda:<device> at `data`, built
// without touching ATen's CUDA hooks. Only its metadata is usable (sizes,
// strides, dtype, device, data_ptr); no ATen kernel can run on it, which is
// exactly what the NCCL backend promises not to do. The mock tests point it
// at fake addresses; the gpu tests at cudaMalloc'd memory.

#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>

#include <cstdint>
#include <vector>

namespace dtrain::collectives::testing {

inline at::Tensor cuda_tensor_view(void* data, std::vector<std::int64_t> sizes,
                                   at::ScalarType dtype = at::kFloat, int device = 0,
                                   std::vector<std::int64_t> strides = {}) {
  const caffe2::TypeMeta meta = c10::scalarTypeToTypeMeta(dtype);
  std::int64_t elements = 1;
  for (std::int64_t s : sizes) elements *= s;
  c10::Device where(c10::kCUDA, static_cast<c10::DeviceIndex>(device));
  c10::Storage storage(c10::Storage::use_byte_size_t(),
                       static_cast<std::size_t>(elements) * meta.itemsize(),
                       c10::DataPtr(data, where), /*allocator=*/nullptr, /*resizable=*/false);
  at::Tensor tensor = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CUDA), meta);
  if (strides.empty()) {
    tensor.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  } else {
    tensor.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides);
  }
  return tensor;
}

}  // namespace dtrain::collectives::testing
