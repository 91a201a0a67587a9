// The tensor-parallel regions: conjugate pairs of collectives as autograd
// functions, and the plain collectives they are made of.

#include "dtrain/parallel/tensor_regions.h"

#include <torch/autograd.h>

#include <vector>

#include "dtrain/error.h"
#include "src/common/torch_compat.h"
#include "src/parallel/tensor/region_ops.h"

namespace dtrain::parallel {

namespace detail {

std::int64_t checked_dim(const char* what, const at::Tensor& input, std::int64_t dim,
                         const collectives::Communicator& comm, bool divisible) {
  DTRAIN_CHECK_ARG(input.defined(), what, ": the input tensor is undefined");
  const std::int64_t rank = input.dim();
  DTRAIN_CHECK_ARG(dim >= -rank && dim < rank, what, ": dimension ", dim,
                   " is outside a tensor of shape ", input.sizes());
  if (dim < 0) dim += rank;
  DTRAIN_CHECK_ARG(!divisible || input.size(dim) % comm.size() == 0, what, ": dimension ", dim,
                   " of size ", input.size(dim), " is not divisible by the group size ",
                   comm.size(), " of communicator '", comm.name(),
                   "'; make the size a multiple of it");
  return dim;
}

at::Tensor all_reduce_sum(const at::Tensor& input, collectives::Communicator& comm) {
  at::Tensor out = input.clone(at::MemoryFormat::Contiguous);
  if (comm.size() > 1) comm.all_reduce(out)->wait();
  return out;
}

at::Tensor all_gather_along(const at::Tensor& input, collectives::Communicator& comm,
                            std::int64_t dim) {
  const int n = comm.size();
  if (n == 1) return input.clone(at::MemoryFormat::Contiguous);
  const at::Tensor piece = input.contiguous();
  std::vector<std::int64_t> shape{n};
  for (std::int64_t s : piece.sizes()) shape.push_back(s);
  at::Tensor gathered = at::empty(shape, piece.options());
  comm.all_gather(gathered, piece)->wait();
  // Rank-major pieces: along dimension 0 that is already the concatenation.
  if (dim == 0) {
    shape.erase(shape.begin());
    shape[0] *= n;
    return gathered.view(shape);
  }
  return at::cat(gathered.unbind(0), dim);
}

at::Tensor reduce_scatter_along(const at::Tensor& input, collectives::Communicator& comm,
                                std::int64_t dim) {
  const int n = comm.size();
  if (n == 1) return input.clone(at::MemoryFormat::Contiguous);
  // reduce_scatter takes rank-major blocks: piece i of `dim` must be block i.
  const at::Tensor blocks = dim == 0 ? input.contiguous() : at::stack(input.chunk(n, dim), 0);
  std::vector<std::int64_t> shape = input.sizes().vec();
  shape[static_cast<std::size_t>(dim)] /= n;
  at::Tensor out = at::empty(shape, input.options());
  comm.reduce_scatter(out, blocks)->wait();
  return out;
}

at::Tensor slice_along(const at::Tensor& input, const collectives::Communicator& comm,
                       std::int64_t dim) {
  const std::int64_t size = input.size(dim) / comm.size();
  return input.narrow(dim, comm.rank() * size, size);
}

}  // namespace detail

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

collectives::Communicator& comm_of(AutogradContext* ctx) {
  return *reinterpret_cast<collectives::Communicator*>(ctx->saved_data["comm"].toInt());
}

std::int64_t address_of(collectives::Communicator& comm) {
  return reinterpret_cast<std::int64_t>(&comm);
}

// One autograd function per pair. `forward` and `backward` name the
// collective of each direction; the argument list (tensor, communicator,
// dimension) is the same for all of them.
enum class Op { kIdentity, kAllReduce, kSlice, kAllGather, kReduceScatter };

at::Tensor run(Op op, const at::Tensor& x, collectives::Communicator& comm, std::int64_t dim) {
  switch (op) {
    case Op::kIdentity:
      return x;
    case Op::kAllReduce:
      return detail::all_reduce_sum(x, comm);
    case Op::kSlice:
      // A copy, not a view: the result may be modified in place.
      return detail::slice_along(x, comm, dim).contiguous();
    case Op::kAllGather:
      return detail::all_gather_along(x, comm, dim);
    case Op::kReduceScatter:
      return detail::reduce_scatter_along(x, comm, dim);
  }
  return x;
}

template <Op kForward, Op kBackward>
struct RegionFunction : public torch::autograd::Function<RegionFunction<kForward, kBackward>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, std::int64_t comm,
                            std::int64_t dim) {
    ctx->saved_data["comm"] = comm;
    ctx->saved_data["dim"] = dim;
    return run(kForward, input, *reinterpret_cast<collectives::Communicator*>(comm), dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const std::int64_t dim = ctx->saved_data["dim"].toInt();
    return {run(kBackward, grad_outputs[0], comm_of(ctx), dim), at::Tensor(), at::Tensor()};
  }
};

template <Op kForward, Op kBackward>
at::Tensor apply(const at::Tensor& input, collectives::Communicator& comm, std::int64_t dim) {
  return dtrain::detail::apply_autograd_function<RegionFunction<kForward, kBackward>>(
      input, address_of(comm), dim);
}

}  // namespace

at::Tensor copy_to_tp_region(const at::Tensor& input, collectives::Communicator& comm) {
  DTRAIN_CHECK_ARG(input.defined(), "copy_to_tp_region: the input tensor is undefined");
  return apply<Op::kIdentity, Op::kAllReduce>(input, comm, 0);
}

at::Tensor reduce_from_tp_region(const at::Tensor& input, collectives::Communicator& comm) {
  DTRAIN_CHECK_ARG(input.defined(), "reduce_from_tp_region: the input tensor is undefined");
  return apply<Op::kAllReduce, Op::kIdentity>(input, comm, 0);
}

at::Tensor scatter_to_tp_region(const at::Tensor& input, collectives::Communicator& comm) {
  const std::int64_t dim = detail::checked_dim("scatter_to_tp_region", input, -1, comm, true);
  return apply<Op::kSlice, Op::kAllGather>(input, comm, dim);
}

at::Tensor gather_from_tp_region(const at::Tensor& input, collectives::Communicator& comm) {
  const std::int64_t dim = detail::checked_dim("gather_from_tp_region", input, -1, comm, false);
  return apply<Op::kAllGather, Op::kSlice>(input, comm, dim);
}

at::Tensor gather_from_sequence_region(const at::Tensor& input, collectives::Communicator& comm,
                                       std::int64_t dim) {
  dim = detail::checked_dim("gather_from_sequence_region", input, dim, comm, false);
  return apply<Op::kAllGather, Op::kReduceScatter>(input, comm, dim);
}

at::Tensor reduce_scatter_to_sequence_region(const at::Tensor& input,
                                             collectives::Communicator& comm, std::int64_t dim) {
  dim = detail::checked_dim("reduce_scatter_to_sequence_region (sequence length)", input, dim, comm,
                            true);
  return apply<Op::kReduceScatter, Op::kAllGather>(input, comm, dim);
}

at::Tensor scatter_to_sequence_region(const at::Tensor& input, collectives::Communicator& comm,
                                      std::int64_t dim) {
  dim = detail::checked_dim("scatter_to_sequence_region (sequence length)", input, dim, comm, true);
  return apply<Op::kSlice, Op::kAllGather>(input, comm, dim);
}

}  // namespace dtrain::parallel
