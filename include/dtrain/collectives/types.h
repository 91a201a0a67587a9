#pragma once
// Value types shared by every Communicator backend: reduction ops,
// all-reduce algorithms, timeouts and the per-op options structs.
//
// Options structs are how new knobs are added without breaking signatures:
// every op takes exactly one, and every field has a documented default.

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dtrain::collectives {

/// Per-op timeout. Every blocking call in dtrain has one.
using Timeout = std::chrono::milliseconds;

/// Element-wise reduction applied by all_reduce and reduce_scatter.
enum class ReduceOp : std::uint8_t {
  kSum,
  kAvg,  ///< Sum divided by the communicator size; floating dtypes only.
  kMin,
  kMax,
  kProduct,
};

/// How a collective moves and reduces data (CPU/MPI backend). all_reduce
/// runs every one; reduce_scatter and all_gather run kAuto, kRing and kShm.
enum class Algorithm : std::uint8_t {
  /// Picks one of the others from the message size and world size, using
  /// crossover points measured with benchmarks/allreduce_perf (see
  /// docs/collectives.md). Deterministic: every rank picks the same.
  kAuto,
  /// Reduce-scatter then all-gather around a ring, chunked so that receiving
  /// the next chunk overlaps reducing the current one. Bandwidth-optimal:
  /// each rank sends 2(n-1)/n of the message.
  kRing,
  /// Reduce up a binary tree to rank 0, then broadcast down, chunked and
  /// pipelined. 2*log2(n) latency steps.
  kTree,
  /// Recursive halving-doubling (Rabenseifner): reduce-scatter by recursive
  /// halving, all-gather by recursive doubling; below a small size it
  /// exchanges whole vectors (recursive doubling, log2(n) steps).
  kRhd,
  /// The MPI library's own MPI_Iallreduce.
  kNative,
  /// Through memory shared by the ranks of one node: each rank reduces its
  /// segment straight out of its peers' shared buffers (no messages);
  /// reduce-scatter and all-gather likewise read their peers' pieces out of
  /// shared buffers. Needs every rank of the communicator on one node and
  /// CommunicatorOptions::shm_slot_bytes > 0; elsewhere it runs as kRing.
  kShm,
  /// Hierarchical, for ranks on several hosts with the same number (at least
  /// 2) on each: an all-reduce inside each host through shared memory, then
  /// local rank j of every host all-reduces slice j (1/L of the message)
  /// with its peers on the other hosts over the point-to-point transport,
  /// then each host gathers its slices. The links between hosts carry L
  /// times less than under a flat ring. Needs
  /// CommunicatorOptions::shm_slot_bytes > 0; elsewhere it runs as kRing.
  kHier,
};

const char* to_string(ReduceOp op);
const char* to_string(Algorithm algorithm);
/// Parses "auto", "ring", "tree", "rhd", "native", "shm" or "hier" (case-sensitive).
/// Throws InvalidArgument naming the valid choices otherwise.
Algorithm parse_algorithm(std::string_view name);

/// Options of Communicator::all_reduce.
struct AllReduceOptions {
  ReduceOp op = ReduceOp::kSum;
  /// Unset: the communicator's default (CommunicatorOptions::allreduce_algorithm).
  std::optional<Algorithm> algorithm;
  /// Unset: the communicator's default timeout.
  std::optional<Timeout> timeout;
};

/// Options of Communicator::broadcast.
struct BroadcastOptions {
  int root = 0;  ///< Rank (in this communicator) whose tensor is sent.
  std::optional<Timeout> timeout;
};

/// Options of Communicator::all_gather.
struct AllGatherOptions {
  /// kAuto, kRing or kShm (MPI backend; others are an InvalidArgument).
  /// Unset: kAuto, which runs kShm where all_reduce's kAuto would for a
  /// message of the output's size, else kRing. The NCCL backend takes only
  /// unset or kAuto (NCCL chooses).
  std::optional<Algorithm> algorithm;
  std::optional<Timeout> timeout;
};

/// Options of Communicator::reduce_scatter.
struct ReduceScatterOptions {
  ReduceOp op = ReduceOp::kSum;
  /// As AllGatherOptions::algorithm, for a message of the input's size.
  std::optional<Algorithm> algorithm;
  std::optional<Timeout> timeout;
};

/// Options of Communicator::send and Communicator::recv.
struct PointToPointOptions {
  /// Messages between one pair of ranks match by tag, in issue order.
  /// Must be in [0, 1'000'000).
  int tag = 0;
  std::optional<Timeout> timeout;
};

/// Options of Communicator::batch_send_recv.
struct BatchSendRecvOptions {
  /// Unset: the communicator's default timeout. One deadline for the whole
  /// batch (header exchange included).
  std::optional<Timeout> timeout;
};

/// Options of Communicator::barrier.
struct BarrierOptions {
  std::optional<Timeout> timeout;
};

/// Options of Communicator::split.
struct SplitOptions {
  /// Name of the new communicator in logs and errors. Empty: "<parent>/<color>".
  std::string name;
  /// Unset: the parent's default timeout (also used for the split itself).
  std::optional<Timeout> timeout;
};

/// Configuration of a communicator. Plain struct with documented defaults;
/// validate() throws InvalidArgument on nonsense.
struct CommunicatorOptions {
  /// Name used in logs and error messages ("world", "dp", "tp", ...).
  std::string name = "world";
  /// Default timeout of every op on this communicator (DTRAIN_TIMEOUT_MS).
  Timeout timeout = std::chrono::minutes(5);
  /// Default all-reduce algorithm (DTRAIN_ALLREDUCE_ALGO).
  Algorithm allreduce_algorithm = Algorithm::kAuto;
  /// Pipelining unit of the ring and tree algorithms, in bytes
  /// (DTRAIN_CHUNK_BYTES). Must be at least 4 KiB.
  std::size_t chunk_bytes = std::size_t{256} << 10;
  /// Collectives of at most this many bytes that are issued while the
  /// communicator is idle run on the caller's thread (the call returns with
  /// the op complete): a thread hand-off costs more than such an op takes.
  /// Larger ops, and ops issued while others are in flight, always run on the
  /// progress thread, so they overlap the caller's compute. On a 1-rank
  /// communicator, where a collective moves no data, every collective issued
  /// while idle runs inline. 0 disables both (DTRAIN_INLINE_MAX_BYTES).
  std::size_t inline_max_bytes = std::size_t{16} << 10;
  /// Size of each of the two shared-memory slots per rank that Algorithm::kShm
  /// cycles through (DTRAIN_SHM_SLOT_BYTES); a communicator whose ranks share
  /// a node maps 2 x this (plus 4 KiB) per rank when it is created. 0: no
  /// shared memory (kShm then runs as kRing). A multiple of 64, when not 0.
  std::size_t shm_slot_bytes = std::size_t{1} << 20;

  void validate() const;
};

}  // namespace dtrain::collectives
