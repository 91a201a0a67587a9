#pragma once
// The communication regions of tensor parallelism (Megatron-LM's mappings),
// as autograd functions over the tensor-parallel communicator.
//
// A tensor-parallel layer runs between two regions: its input enters the
// region of the tp ranks, its output leaves it. Each function here is one
// side of such a boundary, and its backward is the conjugate collective:
//
//   function                           forward                 backward
//   copy_to_tp_region                  identity                all-reduce (sum)
//   reduce_from_tp_region              all-reduce (sum)        identity
//   scatter_to_tp_region               keep my slice (last)    all-gather (last)
//   gather_from_tp_region              all-gather (last)       keep my slice (last)
//   gather_from_sequence_region        all-gather (dim)        reduce-scatter (dim)
//   reduce_scatter_to_sequence_region  reduce-scatter (dim)    all-gather (dim)
//   scatter_to_sequence_region         keep my slice (dim)     all-gather (dim)
//
// "last" is the last dimension (the hidden or vocabulary dimension that
// column- and row-parallel layers split); "dim" is the sequence dimension of
// sequence parallelism, 0 by default ([sequence, batch, hidden], as
// Megatron-LM lays activations out, makes every piece contiguous). Rank i's
// slice is the i-th of size() equal pieces along the dimension, so
// gather(scatter(x)) == x.
//
// Every function waits for its collective before it returns, in forward and
// in backward, so the ranks of a group issue their collectives in the same
// order (autograd runs the backward functions of one graph in an order that
// depends only on the graph, the same on every rank).
//
// The communicator must outlive the backward pass of every graph built with
// it (the functions keep a pointer to it). A communicator of one rank makes
// every function an identity that communicates nothing.
//
// Errors: InvalidArgument, before anything is communicated, when the split
// dimension is not divisible by comm.size(); the message names the function,
// the dimension, its size and the group size.

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "dtrain/collectives/communicator.h"

namespace dtrain::parallel {

/// Identity forward; all-reduces (sums) the gradient in backward. Feeds a
/// tensor every tp rank holds whole into a column-parallel layer.
at::Tensor copy_to_tp_region(const at::Tensor& input, collectives::Communicator& comm);

/// All-reduces (sums) in forward; passes the gradient through. Leaves a
/// row-parallel layer, whose ranks hold partial sums.
at::Tensor reduce_from_tp_region(const at::Tensor& input, collectives::Communicator& comm);

/// Keeps this rank's slice of the last dimension; all-gathers the gradient.
at::Tensor scatter_to_tp_region(const at::Tensor& input, collectives::Communicator& comm);

/// All-gathers the slices of the last dimension (rank order); keeps this
/// rank's slice of the gradient.
at::Tensor gather_from_tp_region(const at::Tensor& input, collectives::Communicator& comm);

/// Sequence parallelism: all-gathers the sequence shards along `dim`;
/// reduce-scatters the gradient along `dim` (the gradient of the gathered
/// tensor is a partial sum on every rank: it fed a column-parallel layer).
at::Tensor gather_from_sequence_region(const at::Tensor& input, collectives::Communicator& comm,
                                       std::int64_t dim = 0);

/// Sequence parallelism: reduce-scatters partial sums along `dim`, leaving
/// this rank's sequence shard of the sum; all-gathers the gradient. Leaves a
/// row-parallel layer in place of reduce_from_tp_region.
at::Tensor reduce_scatter_to_sequence_region(const at::Tensor& input,
                                             collectives::Communicator& comm, std::int64_t dim = 0);

/// Sequence parallelism: keeps this rank's sequence shard of a tensor every
/// rank holds whole; all-gathers the gradient.
at::Tensor scatter_to_sequence_region(const at::Tensor& input, collectives::Communicator& comm,
                                      std::int64_t dim = 0);

}  // namespace dtrain::parallel
