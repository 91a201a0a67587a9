// The few places where LibTorch's C++ API differs between the versions dtrain
// builds against (Debian 12's 1.13, Debian 13's 2.6, and the 2.x of a CUDA
// PyTorch). Code elsewhere uses these and never tests a version itself.

#pragma once

#include <torch/optim/optimizer.h>

#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

namespace dtrain::detail {

// The key of `torch::optim::Optimizer::state()`, the per-parameter state:
// LibTorch 1.x keys it by the text of the parameter's TensorImpl address,
// 2.x by the address itself (`void*`). Both are deduced from the map.
using OptimizerStateMap =
    std::remove_reference_t<decltype(std::declval<torch::optim::Optimizer&>().state())>;
using OptimizerStateKey = typename OptimizerStateMap::key_type;

// The key under which `optimizer.state()` holds the state of `param`, as the
// optimizer itself makes it in `step()`.
template <typename Key = OptimizerStateKey>
Key optimizer_state_key(const at::Tensor& param) {
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream text;  // what c10::guts::to_string did in 1.x
    text << param.unsafeGetTensorImpl();
    return text.str();
  } else {
    return static_cast<Key>(param.unsafeGetTensorImpl());
  }
}

// `F::apply(args...)` for a custom autograd function `F`. GCC 14 at -O2 and
// above reports -Warray-bounds and -Wstringop-overflow inside libstdc++'s
// std::vector<bool>::reserve on an empty vector, which LibTorch 2.x's
// Function<F>::apply calls on a node it has just made
// (`is_variable_input_.reserve(n)`). Nothing is copied there, so the reports
// are false; they are silenced for this call only.
template <typename F, typename... Args>
auto apply_autograd_function(Args&&... args) {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Warray-bounds"
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif
  return F::apply(std::forward<Args>(args)...);
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
}

}  // namespace dtrain::detail
