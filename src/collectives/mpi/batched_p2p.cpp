#include "src/collectives/mpi/batched_p2p.h"

#include <ATen/ops/from_blob.h>

#include <array>
#include <cstring>
#include <sstream>

#include "dtrain/error.h"
#include "src/collectives/mpi/mpi_error.h"
#include "src/collectives/p2p_checks.h"

namespace dtrain::collectives::detail {
namespace {

static_assert(BatchedPointToPoint::kMaxDims + 3 <= 16, "a header is 16 int64");
static_assert(kMaxUserTag == 1'000'000, "header tags start at kMaxUserTag");

// A header: {kHeaderMagic, element type, number of dims, dims..., 0...}.
using Header = std::array<std::int64_t, 16>;
constexpr std::int64_t kHeaderMagic = 0x647472'70327031;  // "dtrp2p1"

void encode(const P2PSignature& signature, Header& header) {
  header.fill(0);
  header[0] = kHeaderMagic;
  header[1] = static_cast<std::int64_t>(signature.type);
  header[2] = static_cast<std::int64_t>(signature.shape.size());
  for (std::size_t d = 0; d < signature.shape.size(); ++d) header[3 + d] = signature.shape[d];
}

bool decode(const Header& header, P2PSignature& signature) {
  if (header[0] != kHeaderMagic || header[1] < 0 ||
      header[1] > static_cast<std::int64_t>(ElementType::kUInt8) || header[2] < 0 ||
      header[2] > BatchedPointToPoint::kMaxDims) {
    return false;
  }
  signature.type = static_cast<ElementType>(header[1]);
  signature.shape.assign(header.begin() + 3, header.begin() + 3 + header[2]);
  return true;
}

// The bytes a strided tensor spans, [begin, end); empty for no elements.
P2PCheckItem memory_of(const at::Tensor& tensor) {
  P2PCheckItem item;
  if (tensor.numel() == 0) return item;
  std::int64_t low = 0;
  std::int64_t high = 0;
  for (std::int64_t d = 0; d < tensor.dim(); ++d) {
    const std::int64_t reach = tensor.stride(d) * (tensor.size(d) - 1);
    (reach < 0 ? low : high) += reach;
  }
  const auto base = reinterpret_cast<std::uintptr_t>(tensor.data_ptr());
  const auto es = static_cast<std::int64_t>(tensor.element_size());
  item.begin = base + static_cast<std::uintptr_t>(low * es);
  item.end = base + static_cast<std::uintptr_t>((high + 1) * es);
  return item;
}

std::string channel_text(const P2PBatchOp& op) {
  return ::dtrain::detail::str_cat(op.is_recv ? "recv from" : "send to", " rank ", op.peer,
                                   ", tag ", op.tag);
}

}  // namespace

std::string P2PSignature::str() const {
  std::ostringstream out;
  out << "[";
  for (std::size_t d = 0; d < shape.size(); ++d) out << (d ? ", " : "") << shape[d];
  out << "] " << to_string(type);
  return out.str();
}

BatchedPointToPoint::BatchedPointToPoint(MPI_Comm comm, std::string comm_name, int rank, int size)
    : comm_name_(std::move(comm_name)), rank_(rank), size_(size) {
  // MPI_TAG_UB is one bound for the whole program, attached to
  // MPI_COMM_WORLD; communicators made by MPI_Comm_split do not carry it
  // (Open MPI reports no value there), which left split communicators (the
  // parallel context's dp/pp/tp) at MPI's guaranteed minimum of 32767 and
  // no room for the header tags above kMaxUserTag.
  (void)comm;
  void* tag_ub = nullptr;
  int flag = 0;
  DTRAIN_MPI_CHECK(MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &tag_ub, &flag));
  if (flag && tag_ub != nullptr) tag_ub_ = *static_cast<int*>(tag_ub);
}

std::vector<P2PBatchOp> BatchedPointToPoint::prepare(const char* op, const std::vector<P2POp>& ops,
                                                     const std::vector<ElementType>& types) {
  std::vector<P2PCheckItem> items;
  items.reserve(ops.size());
  for (const P2POp& p : ops) {
    P2PCheckItem item = memory_of(p.tensor);
    item.is_recv = p.kind == P2POp::Kind::kRecv;
    item.peer = p.peer;
    item.tag = p.tag;
    items.push_back(item);
  }
  check_p2p_batch(op, items, rank_, size_, comm_name_);

  std::vector<P2PBatchOp> out;
  out.reserve(ops.size());
  std::map<ChannelKey, std::size_t> opened;  // channels this batch declares -> op index
  for (std::size_t i = 0; i < ops.size(); ++i) {
    P2PBatchOp b;
    b.is_recv = items[i].is_recv;
    b.peer = ops[i].peer;
    b.tag = ops[i].tag;
    b.tensor = ops[i].tensor;
    b.signature.type = types[i];
    b.signature.shape = ops[i].tensor.sizes().vec();
    b.bytes = static_cast<std::size_t>(ops[i].tensor.numel()) * element_size(types[i]);
    DTRAIN_CHECK_ARG(ops[i].tensor.dim() <= kMaxDims, op, ": ", describe_p2p_item(items[i], i),
                     ": a tensor of ", ops[i].tensor.dim(),
                     " dimensions; point-to-point tensors may have at most ", kMaxDims,
                     " (reshape it before sending, and back after receiving)");
    DTRAIN_CHECK_ARG(header_tag(b.tag, true) <= tag_ub_, op, ": ", describe_p2p_item(items[i], i),
                     ": this MPI's largest tag is ", tag_ub_, ", which leaves tags below ",
                     (tag_ub_ - kHeaderTagBase) / 2, " for point-to-point messages");
    const ChannelKey key{b.peer, b.tag, b.is_recv};
    const P2PSignature* declared = nullptr;
    if (auto it = channels_.find(key); it != channels_.end()) {
      declared = &it->second;
    } else if (auto mine = opened.find(key); mine != opened.end()) {
      declared = &out[mine->second].signature;
      b.follows = static_cast<int>(mine->second);
    }
    if (declared != nullptr) {
      DTRAIN_CHECK_ARG(*declared == b.signature, op, " on communicator '", comm_name_,
                       "': ", describe_p2p_item(items[i], i), " passes ", b.signature.str(),
                       ", but this channel carries ", declared->str(),
                       " (set by its first message); a (peer, tag) channel carries one dtype "
                       "and shape: use another tag for another shape");
    } else {
      opened.emplace(key, i);
      b.first_of_channel = true;
    }
    out.push_back(std::move(b));
  }
  for (const auto& [key, index] : opened) channels_.emplace(key, out[index].signature);
  return out;
}

void BatchedPointToPoint::run(MpiTransport& transport, const OpDescriptor& what,
                              std::vector<P2PBatchOp>& ops) {
  try {
    // Stage non-contiguous tensors through per-op reused buffers.
    if (staging_.size() < ops.size()) staging_.resize(ops.size());
    std::vector<at::Tensor> staged(ops.size());
    for (std::size_t i = 0; i < ops.size(); ++i) {
      const at::Tensor& t = ops[i].tensor;
      if (t.is_contiguous()) {
        staged[i] = t;
      } else {
        staged[i] = at::from_blob(staging_[i].get(ops[i].bytes), t.sizes(), t.options());
        if (!ops[i].is_recv) staged[i].copy_(t);
      }
    }
    // Posts op i's message, then those of the later ops of its channel in
    // this batch (same channel, same order: MPI matches them in order).
    auto post_payload = [&](std::size_t i) {
      for (std::size_t j = i; j < ops.size(); ++j) {
        const P2PBatchOp& op = ops[j];
        if (j != i && op.follows != static_cast<int>(i)) continue;
        if (op.is_recv) {
          transport.irecv_tagged(staged[j].data_ptr(), op.bytes, op.peer, op.tag);
        } else {
          transport.isend_tagged(staged[j].data_ptr(), op.bytes, op.peer, op.tag);
        }
      }
    };

    // Channels this batch opens: both ends send their signature and receive
    // the other's. Everything is posted before anything is waited for.
    std::vector<std::size_t> opening;
    for (std::size_t i = 0; i < ops.size(); ++i) {
      if (ops[i].first_of_channel) opening.push_back(i);
    }
    Header* headers = nullptr;
    std::vector<Transport::Request> header_requests;
    std::map<Transport::Request, std::size_t> request_to_opening;  // -> index in `opening`
    if (!opening.empty()) {
      headers = static_cast<Header*>(headers_.get(2 * opening.size() * sizeof(Header)));
      for (std::size_t k = 0; k < opening.size(); ++k) {
        const P2PBatchOp& op = ops[opening[k]];
        encode(op.signature, headers[2 * k]);
        const auto in = transport.irecv_tagged(headers[2 * k + 1].data(), sizeof(Header), op.peer,
                                               header_tag(op.tag, !op.is_recv));
        const auto out = transport.isend_tagged(headers[2 * k].data(), sizeof(Header), op.peer,
                                                header_tag(op.tag, op.is_recv));
        header_requests.push_back(in);
        header_requests.push_back(out);
        request_to_opening[in] = k;
        request_to_opening[out] = k;
      }
    }
    // Messages of channels already set up go at once, receives first.
    for (bool receives : {true, false}) {
      for (std::size_t i = 0; i < ops.size(); ++i) {
        const P2PBatchOp& op = ops[i];
        if (!op.first_of_channel && op.follows < 0 && op.is_recv == receives) post_payload(i);
      }
    }
    // A channel's first message goes as soon as its own header exchange is
    // done and matched: it never waits for another channel's peer (which may
    // be waiting for this very message in an earlier batch).
    std::vector<int> header_left(opening.size(), 2);
    while (!header_requests.empty()) {
      for (Transport::Request r : transport.wait_some(header_requests)) {
        const std::size_t k = request_to_opening.at(r);
        if (--header_left[k] > 0) continue;
        const P2PBatchOp& op = ops[opening[k]];
        P2PSignature theirs;
        DTRAIN_CHECK_T(CommError, decode(headers[2 * k + 1], theirs), what.str(),
                       " on communicator '", comm_name_, "': ", channel_text(op), ": rank ",
                       op.peer, " sent a malformed header");
        if (theirs != op.signature) {
          const std::string me = "this rank (" + std::to_string(rank_) + ")";
          const std::string peer = "rank " + std::to_string(op.peer);
          DTRAIN_THROW(
              CommError, what.str(), " on communicator '", comm_name_, "': ", channel_text(op),
              ": the two ends disagree on dtype or shape: ", op.is_recv ? peer : me, " sends ",
              (op.is_recv ? theirs : op.signature).str(), ", ", op.is_recv ? me : peer, " expects ",
              (op.is_recv ? op.signature : theirs).str(), "; the message was not sent");
        }
        post_payload(opening[k]);
      }
    }
    transport.wait_all();
    for (std::size_t i = 0; i < ops.size(); ++i) {
      if (ops[i].is_recv && !staged[i].is_same(ops[i].tensor)) ops[i].tensor.copy_(staged[i]);
    }
  } catch (...) {
    for (P2PBatchOp& op : ops) graveyard_.keep(op.tensor);
    throw;
  }
}

void BatchedPointToPoint::leak() noexcept {
  headers_.leak();
  for (Scratch& s : staging_) s.leak();
}

}  // namespace dtrain::collectives::detail
