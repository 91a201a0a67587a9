#pragma once
// The collectives the tensor-parallel regions, layers and loss are made of,
// on plain tensors (no autograd): each one waits for its op.

#include <ATen/ATen.h>

#include <cstdint>

#include "dtrain/collectives/communicator.h"

namespace dtrain::parallel::detail {

/// `dim` of `input` made non-negative; InvalidArgument naming `what` if it is
/// outside the tensor, or (when `divisible`) if comm.size() does not divide
/// that dimension's size.
std::int64_t checked_dim(const char* what, const at::Tensor& input, std::int64_t dim,
                         const collectives::Communicator& comm, bool divisible);

/// The sum over the group, in a new tensor (`input` is not modified).
at::Tensor all_reduce_sum(const at::Tensor& input, collectives::Communicator& comm);
/// The ranks' tensors concatenated along `dim`, in rank order.
at::Tensor all_gather_along(const at::Tensor& input, collectives::Communicator& comm,
                            std::int64_t dim);
/// This rank's piece along `dim` of the sum over the group.
at::Tensor reduce_scatter_along(const at::Tensor& input, collectives::Communicator& comm,
                                std::int64_t dim);
/// This rank's piece along `dim` (a view).
at::Tensor slice_along(const at::Tensor& input, const collectives::Communicator& comm,
                       std::int64_t dim);

}  // namespace dtrain::parallel::detail
