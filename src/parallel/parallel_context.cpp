// ParallelContext, and the choice of one writer for every piece of state that
// several ranks hold.

#include "dtrain/parallel/parallel_context.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <map>

#include "dtrain/error.h"
#include "src/parallel/gather.h"

namespace dtrain::parallel {

using collectives::GridCoord;
using collectives::GridShape;

const char* axis_name(Axis axis) {
  switch (axis) {
    case Axis::kData:
      return "dp";
    case Axis::kPipeline:
      return "pp";
    case Axis::kTensor:
      return "tp";
  }
  return "?";
}

std::string AxisSet::to_string() const {
  std::string s = "{";
  for (Axis a : {Axis::kData, Axis::kPipeline, Axis::kTensor}) {
    if (!contains(a)) continue;
    if (s.size() > 1) s += ", ";
    s += axis_name(a);
  }
  return s + "}";
}

namespace {

int coordinate(const GridCoord& c, Axis axis) {
  switch (axis) {
    case Axis::kData:
      return c.dp;
    case Axis::kPipeline:
      return c.pp;
    case Axis::kTensor:
      return c.tp;
  }
  return 0;
}

// Declarations travel as "<key length>:<key> <bytes> <axis bits>\n" each.
std::string serialize(const std::vector<ReplicaDeclaration>& declarations) {
  std::string out;
  for (const ReplicaDeclaration& d : declarations) {
    out += std::to_string(d.key.size()) + ":" + d.key + " " + std::to_string(d.bytes) + " " +
           std::to_string(d.replicated_over.bits()) + "\n";
  }
  return out;
}

std::vector<ReplicaDeclaration> parse(const std::string& text) {
  std::vector<ReplicaDeclaration> out;
  std::size_t at = 0;
  while (at < text.size()) {
    const std::size_t colon = text.find(':', at);
    DTRAIN_CHECK(colon != std::string::npos, "malformed replica declarations");
    const std::size_t length = std::stoull(text.substr(at, colon - at));
    ReplicaDeclaration d;
    d.key = text.substr(colon + 1, length);
    std::size_t pos = colon + 1 + length;
    const std::size_t end = text.find('\n', pos);
    DTRAIN_CHECK(end != std::string::npos, "malformed replica declarations");
    unsigned long long bytes = 0;
    unsigned bits = 0;
    DTRAIN_CHECK(std::sscanf(text.c_str() + pos, " %llu %u", &bytes, &bits) == 2,
                 "malformed replica declarations");
    d.bytes = bytes;
    d.replicated_over = AxisSet::from_bits(bits);
    out.push_back(std::move(d));
    at = end + 1;
  }
  return out;
}

}  // namespace

namespace detail {

std::vector<std::string> all_gather_strings(collectives::Communicator& comm,
                                            const std::string& mine,
                                            std::optional<collectives::Timeout> timeout) {
  const int size = comm.size();
  collectives::AllGatherOptions options;
  options.timeout = timeout;
  at::Tensor length = at::full({1}, static_cast<std::int64_t>(mine.size()), at::kLong);
  at::Tensor lengths = at::empty({size}, at::kLong);
  comm.all_gather(lengths, length, options)->wait();
  std::int64_t longest = 1;
  for (int r = 0; r < size; ++r) longest = std::max(longest, lengths[r].item<std::int64_t>());
  at::Tensor buffer = at::zeros({longest}, at::kByte);
  std::copy(mine.begin(), mine.end(), buffer.data_ptr<std::uint8_t>());
  at::Tensor all = at::empty({size * longest}, at::kByte);
  comm.all_gather(all, buffer, options)->wait();
  std::vector<std::string> out;
  const auto* bytes = reinterpret_cast<const char*>(all.data_ptr<std::uint8_t>());
  for (int r = 0; r < size; ++r) {
    out.emplace_back(bytes + r * longest,
                     static_cast<std::size_t>(lengths[r].item<std::int64_t>()));
  }
  return out;
}

std::vector<bool> choose_writers(collectives::Communicator& comm, const GridShape& shape,
                                 const std::vector<ReplicaDeclaration>& mine,
                                 std::optional<collectives::Timeout> timeout) {
  DTRAIN_CHECK_ARG(comm.size() == shape.world_size(), "choosing writers over ", comm.size(),
                   " ranks for a grid of ", shape.world_size());
  const std::vector<std::string> texts = all_gather_strings(comm, serialize(mine), timeout);

  // Every key with the ranks that declared it. Everything below runs on
  // every rank on the same data, so every rank reaches the same answer (or
  // the same error).
  struct Holder {
    int rank;
    std::uint64_t bytes;
    AxisSet replicated_over;
  };
  std::map<std::string, std::vector<Holder>> holders;
  for (int r = 0; r < comm.size(); ++r) {
    for (const ReplicaDeclaration& d : parse(texts[static_cast<std::size_t>(r)])) {
      auto& list = holders[d.key];
      DTRAIN_CHECK_ARG(list.empty() || list.back().rank != r, "rank ", r, " declared '", d.key,
                       "' twice");
      list.push_back({r, d.bytes, d.replicated_over});
    }
  }
  std::vector<std::uint64_t> load(static_cast<std::size_t>(comm.size()), 0);
  std::vector<std::pair<const std::string*, const std::vector<Holder>*>> shared;
  for (const auto& [key, list] : holders) {
    const Holder& first = list.front();
    const GridCoord a = collectives::grid_coord(shape, first.rank);
    for (const Holder& other : list) {
      DTRAIN_CHECK_ARG(other.bytes == first.bytes, "'", key, "' is ", first.bytes,
                       " bytes on rank ", first.rank, " but ", other.bytes, " bytes on rank ",
                       other.rank, "; copies of one piece must have the same dtype and shape");
      const GridCoord b = collectives::grid_coord(shape, other.rank);
      for (Axis axis : {Axis::kData, Axis::kPipeline, Axis::kTensor}) {
        if (coordinate(a, axis) == coordinate(b, axis)) continue;
        DTRAIN_CHECK_ARG(
            first.replicated_over.contains(axis) && other.replicated_over.contains(axis), "ranks ",
            first.rank, " and ", other.rank, " both hold '", key, "' but differ along ",
            axis_name(axis), ", which it is not replicated over (",
            first.replicated_over.to_string(),
            "); give the pieces of different ranks different offsets, or declare the tensor "
            "replicated over ",
            axis_name(axis));
      }
    }
    if (list.size() == 1) {
      load[static_cast<std::size_t>(first.rank)] += first.bytes + 1;
    } else {
      shared.emplace_back(&key, &list);
    }
  }
  // Largest first, each to the least loaded of its holders (lowest rank on a
  // tie); +1 a piece so that empty ones spread too.
  std::stable_sort(shared.begin(), shared.end(), [](const auto& x, const auto& y) {
    return x.second->front().bytes > y.second->front().bytes;  // keys stay in order on a tie
  });
  std::map<std::string, int> writer;
  for (const auto& [key, list] : shared) {
    int best = list->front().rank;
    for (const Holder& h : *list) {
      if (load[static_cast<std::size_t>(h.rank)] < load[static_cast<std::size_t>(best)]) {
        best = h.rank;
      }
    }
    load[static_cast<std::size_t>(best)] += list->front().bytes + 1;
    writer[*key] = best;
  }
  std::vector<bool> out;
  out.reserve(mine.size());
  for (const ReplicaDeclaration& d : mine) {
    auto it = writer.find(d.key);
    out.push_back(it == writer.end() || it->second == comm.rank());
  }
  return out;
}

}  // namespace detail

ParallelContext::ParallelContext(std::shared_ptr<collectives::Communicator> world, int tp, int pp)
    : grid_(std::make_shared<const collectives::ProcessGrid>(std::move(world), tp, pp)) {}

ParallelContext::ParallelContext(std::shared_ptr<const collectives::ProcessGrid> grid)
    : grid_(std::move(grid)) {
  DTRAIN_CHECK_ARG(grid_ != nullptr, "ParallelContext needs a process grid");
}

ParallelContext ParallelContext::data_parallel(std::shared_ptr<collectives::Communicator> world) {
  return ParallelContext(std::move(world), 1, 1);
}

int ParallelContext::size(Axis axis) const noexcept {
  switch (axis) {
    case Axis::kData:
      return shape().dp;
    case Axis::kPipeline:
      return shape().pp;
    case Axis::kTensor:
      return shape().tp;
  }
  return 1;
}

int ParallelContext::rank(Axis axis) const noexcept { return coordinate(coord(), axis); }

std::shared_ptr<collectives::Communicator> ParallelContext::world() const {
  return grid_->world_ptr();
}

std::shared_ptr<collectives::Communicator> ParallelContext::comm(Axis axis) const {
  switch (axis) {
    case Axis::kData:
      return grid_->dp_ptr();
    case Axis::kPipeline:
      return grid_->pp_ptr();
    case Axis::kTensor:
      return grid_->tp_ptr();
  }
  return nullptr;
}

std::vector<int> ParallelContext::group_ranks(AxisSet axes) const {
  std::vector<int> out;
  for (int r = 0; r < world_size(); ++r) {
    const GridCoord c = collectives::grid_coord(shape(), r);
    bool same = true;
    for (Axis axis : {Axis::kData, Axis::kPipeline, Axis::kTensor}) {
      if (!axes.contains(axis) && coordinate(c, axis) != coordinate(coord(), axis)) same = false;
    }
    if (same) out.push_back(r);
  }
  return out;
}

std::vector<bool> ParallelContext::choose_writers(
    const std::vector<ReplicaDeclaration>& mine) const {
  return detail::choose_writers(*world(), shape(), mine);
}

}  // namespace dtrain::parallel
