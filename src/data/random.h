#pragma once
// The data pipeline's counter-based randomness (src/common/random.h).

#include "src/common/random.h"

namespace dtrain::data::detail {
using dtrain::detail::mix;
using dtrain::detail::mix64;
using dtrain::detail::SplitMix64;
}  // namespace dtrain::data::detail
