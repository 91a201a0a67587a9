#pragma once
// The tensors of failed ops, kept for the life of the process.

#include <ATen/core/Tensor.h>

#include <vector>

namespace dtrain::collectives::detail {

/// After an op fails, MPI may still use its tensors: a receive that MPI has
/// already matched cannot be cancelled and goes on being filled when its
/// sender moves again, a freed send may still be read, and a nonblocking
/// collective cannot be cancelled at all. So what is kept here is never
/// freed, not even when the graveyard (or the communicator that owns it) is
/// destroyed: the destructor lets go of the tensors without releasing them.
/// Not thread-safe: the owner serializes keep().
class TensorGraveyard {
 public:
  TensorGraveyard() = default;
  TensorGraveyard(const TensorGraveyard&) = delete;
  TensorGraveyard& operator=(const TensorGraveyard&) = delete;
  ~TensorGraveyard() {
    for (at::Tensor& tensor : tensors_) {
      if (tensor.defined()) (void)tensor.unsafeReleaseTensorImpl();
    }
  }

  /// Keeps `tensor` (an undefined one is ignored) for good.
  void keep(const at::Tensor& tensor) {
    if (tensor.defined()) tensors_.push_back(tensor);
  }

 private:
  std::vector<at::Tensor> tensors_;
};

}  // namespace dtrain::collectives::detail
