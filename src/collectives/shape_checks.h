#pragma once
// Argument checks shared by every Communicator backend, on plain counts so
// that each backend can call them with its own tensor representation.

#include <cstddef>

#include "dtrain/error.h"

namespace dtrain::collectives::detail {

/// all_gather and reduce_scatter: the `larger` buffer must hold exactly
/// `size` blocks of the `smaller` one, rank-major. Throws InvalidArgument
/// naming the op and both buffers otherwise.
inline void check_rank_major_counts(const char* op, const char* larger_name,
                                    std::size_t larger_count, const char* smaller_name,
                                    std::size_t smaller_count, int size) {
  const std::size_t needed = smaller_count * static_cast<std::size_t>(size);
  DTRAIN_CHECK_ARG(larger_count == needed, op, ": ", larger_name, " has ", larger_count,
                   " elements; it needs size() * ", smaller_name, ".numel() = ", size, " * ",
                   smaller_count, " = ", needed);
}

}  // namespace dtrain::collectives::detail
