// Reduction kernels: one loop per (type, op), written so that the compiler
// vectorizes them (contiguous, restrict-qualified, no calls in the loop).
// The 16-bit floating types reduce in float32 and round back to nearest-even.

#include <algorithm>
#include <cmath>
#include <cstring>

#include <c10/util/Half.h>

#include "dtrain/error.h"
#include "src/collectives/algorithms/element_type.h"

namespace dtrain::collectives::detail {
namespace {

// bfloat16 <-> float32 by bit manipulation (vectorizes, unlike a call).
inline float bf16_to_float(std::uint16_t bits) {
  std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

inline std::uint16_t float_to_bf16(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN, keep sign
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<std::uint16_t>(bits >> 16);
}

struct SumOp {
  template <typename T>
  static T apply(T a, T b) {
    return static_cast<T>(a + b);
  }
};
struct ProductOp {
  template <typename T>
  static T apply(T a, T b) {
    return static_cast<T>(a * b);
  }
};
struct MinOp {
  template <typename T>
  static T apply(T a, T b) {
    return b < a ? b : a;
  }
};
struct MaxOp {
  template <typename T>
  static T apply(T a, T b) {
    return a < b ? b : a;
  }
};

template <typename T, typename Op>
void reduce_native(void* inout_raw, const void* in_raw, std::size_t count) {
  T* __restrict inout = static_cast<T*>(inout_raw);
  const T* __restrict in = static_cast<const T*>(in_raw);
  for (std::size_t i = 0; i < count; ++i) {
    inout[i] = Op::apply(inout[i], in[i]);
  }
}

template <typename Op>
void reduce_bf16(void* inout_raw, const void* in_raw, std::size_t count) {
  auto* __restrict inout = static_cast<std::uint16_t*>(inout_raw);
  const auto* __restrict in = static_cast<const std::uint16_t*>(in_raw);
  for (std::size_t i = 0; i < count; ++i) {
    inout[i] = float_to_bf16(Op::apply(bf16_to_float(inout[i]), bf16_to_float(in[i])));
  }
}

template <typename Op>
void reduce_f16(void* inout_raw, const void* in_raw, std::size_t count) {
  auto* __restrict inout = static_cast<c10::Half*>(inout_raw);
  const auto* __restrict in = static_cast<const c10::Half*>(in_raw);
  for (std::size_t i = 0; i < count; ++i) {
    inout[i] = c10::Half(Op::apply(static_cast<float>(inout[i]), static_cast<float>(in[i])));
  }
}

template <typename Op>
ReduceFn pick(ElementType type) {
  switch (type) {
    case ElementType::kFloat32:
      return &reduce_native<float, Op>;
    case ElementType::kFloat64:
      return &reduce_native<double, Op>;
    case ElementType::kBFloat16:
      return &reduce_bf16<Op>;
    case ElementType::kFloat16:
      return &reduce_f16<Op>;
    case ElementType::kInt32:
      return &reduce_native<std::int32_t, Op>;
    case ElementType::kInt64:
      return &reduce_native<std::int64_t, Op>;
    case ElementType::kUInt8:
      return &reduce_native<std::uint8_t, Op>;
  }
  return nullptr;
}

template <typename T>
void divide_native(void* data, std::size_t count, int divisor) {
  T* values = static_cast<T*>(data);
  const T d = static_cast<T>(divisor);
  for (std::size_t i = 0; i < count; ++i) values[i] = values[i] / d;
}

}  // namespace

std::size_t element_size(ElementType type) noexcept {
  switch (type) {
    case ElementType::kFloat32:
    case ElementType::kInt32:
      return 4;
    case ElementType::kFloat64:
    case ElementType::kInt64:
      return 8;
    case ElementType::kBFloat16:
    case ElementType::kFloat16:
      return 2;
    case ElementType::kUInt8:
      return 1;
  }
  return 0;
}

const char* to_string(ElementType type) noexcept {
  switch (type) {
    case ElementType::kFloat32:
      return "float32";
    case ElementType::kFloat64:
      return "float64";
    case ElementType::kBFloat16:
      return "bfloat16";
    case ElementType::kFloat16:
      return "float16";
    case ElementType::kInt32:
      return "int32";
    case ElementType::kInt64:
      return "int64";
    case ElementType::kUInt8:
      return "uint8";
  }
  return "unknown";
}

bool is_floating(ElementType type) noexcept {
  return type == ElementType::kFloat32 || type == ElementType::kFloat64 ||
         type == ElementType::kBFloat16 || type == ElementType::kFloat16;
}

Reducer make_reducer(ElementType type, ReduceOp op) {
  DTRAIN_CHECK_ARG(op != ReduceOp::kAvg || is_floating(type),
                   "ReduceOp::kAvg needs a floating dtype, got ", to_string(type),
                   "; reduce with kSum and divide yourself");
  Reducer reducer;
  reducer.type = type;
  reducer.op = op;
  reducer.element_size = element_size(type);
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      reducer.fn = pick<SumOp>(type);
      break;
    case ReduceOp::kProduct:
      reducer.fn = pick<ProductOp>(type);
      break;
    case ReduceOp::kMin:
      reducer.fn = pick<MinOp>(type);
      reducer.order_sensitive = true;
      break;
    case ReduceOp::kMax:
      reducer.fn = pick<MaxOp>(type);
      reducer.order_sensitive = true;
      break;
  }
  DTRAIN_CHECK(reducer.fn != nullptr, "no reduce kernel for ", to_string(type));
  return reducer;
}

void divide_in_place(void* data, std::size_t count, ElementType type, int divisor) {
  if (divisor == 1) return;  // x / 1 == x: a 1-rank average touches no memory
  switch (type) {
    case ElementType::kFloat32:
      return divide_native<float>(data, count, divisor);
    case ElementType::kFloat64:
      return divide_native<double>(data, count, divisor);
    case ElementType::kBFloat16: {
      auto* values = static_cast<std::uint16_t*>(data);
      const float d = static_cast<float>(divisor);
      for (std::size_t i = 0; i < count; ++i) {
        values[i] = float_to_bf16(bf16_to_float(values[i]) / d);
      }
      return;
    }
    case ElementType::kFloat16: {
      auto* values = static_cast<c10::Half*>(data);
      const float d = static_cast<float>(divisor);
      for (std::size_t i = 0; i < count; ++i) {
        values[i] = c10::Half(static_cast<float>(values[i]) / d);
      }
      return;
    }
    default:
      DTRAIN_THROW(InvalidArgument, "cannot average ", to_string(type), " values");
  }
}

}  // namespace dtrain::collectives::detail
