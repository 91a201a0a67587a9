#pragma once
// Type-erased element types and reductions used by the collective
// algorithms. Algorithms see only (element size, reduce function): they are
// written once, not per dtype.

#include <cstddef>
#include <cstdint>

#include "dtrain/collectives/types.h"

namespace dtrain::collectives::detail {

enum class ElementType : std::uint8_t {
  kFloat32,
  kFloat64,
  kBFloat16,
  kFloat16,
  kInt32,
  kInt64,
  kUInt8,
};

std::size_t element_size(ElementType type) noexcept;
const char* to_string(ElementType type) noexcept;
bool is_floating(ElementType type) noexcept;

/// inout[i] = inout[i] OP in[i] for i in [0, count).
using ReduceFn = void (*)(void* inout, const void* in, std::size_t count);

struct Reducer {
  ElementType type = ElementType::kFloat32;
  ReduceOp op = ReduceOp::kSum;
  std::size_t element_size = 4;
  ReduceFn fn = nullptr;
  /// True for min/max, whose result can depend on operand order (signed
  /// zeros, NaN payloads); algorithms then fix the order across ranks.
  bool order_sensitive = false;

  void operator()(void* inout, const void* in, std::size_t count) const { fn(inout, in, count); }
};

/// The reducer for (type, op). kAvg reduces as kSum; finish with
/// divide_in_place. Throws InvalidArgument for kAvg on integer types.
Reducer make_reducer(ElementType type, ReduceOp op);

/// data[i] /= divisor, computed in the element type (float math for the
/// 16-bit types). Floating types only.
void divide_in_place(void* data, std::size_t count, ElementType type, int divisor);

}  // namespace dtrain::collectives::detail
