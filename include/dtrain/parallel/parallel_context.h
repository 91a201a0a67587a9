#pragma once
// ParallelContext: the one object that describes how a job is laid out over
// its ranks, passed explicitly to every strategy, loader, RNG stream and
// checkpoint (there is no global parallel state).
//
// It is built on a ProcessGrid: world = dp x pp x tp, tp fastest-varying
//
//   rank = (dp_rank * pp + pp_rank) * tp + tp_rank
//
// and holds the grid, one communicator per axis, this rank's coordinates, and
// the answers the other parts need:
//
//  * Data: only the dp coordinate picks samples. data_rank() = dp rank and
//    data_world_size() = dp size: the ranks of one tensor-parallel group and
//    the stages of one pipeline read the same samples (the first stage feeds
//    them in, the last one needs the labels), and the dp replicas read
//    disjoint parts of each global batch.
//  * Copies: group_ranks(axes) lists the ranks that hold the same thing as
//    this rank along `axes` (its replicas over dp, its tp group, ...).
//  * Writers: a piece of state that several ranks hold (a weight replicated
//    over dp, an RNG stream shared by a tp group) is written once, by one of
//    them. choose_writers() decides who, from what every rank declares,
//    gathered once, never from what a rank assumes the others hold (pipeline
//    stages hold different tensors).
//
// A plain data-parallel job is the dp = N, pp = tp = 1 context
// (ParallelContext::data_parallel(world)).
//
// Worked example: 8 ranks, tp = 2, pp = 2, dp = 2; a 4-layer model whose
// layers 0-1 are stage 0 and layers 2-3 stage 1, with the weight of
// "layers.3.fc1" ([1024, 256]) split along dimension 0 over tp.
//
//   rank:     0  1  2  3  4  5  6  7
//   tp_rank:  0  1  0  1  0  1  0  1
//   pp_rank:  0  0  1  1  0  0  1  1
//   dp_rank:  0  0  0  0  1  1  1  1
//
// Rank 6 is (dp 1, pp 1, tp 0):
//   tp group {6, 7}, pp group {4, 6}, dp group {2, 6}
//   group_ranks({kData}) = {2, 6}; group_ranks({kData, kTensor}) = {2, 3, 6, 7}
//   data_rank() = 1 of data_world_size() = 2: ranks 4-7 read the second half
//   of every global batch, ranks 0-3 the first half.
//   It holds rows [0, 512) of "layers.3.fc1.weight" (stage 1, tp 0); rank 2
//   holds the same rows (its dp replica), so exactly one of {2, 6} writes
//   them to a checkpoint, and one of {3, 7} writes rows [512, 1024).
//   Under ZeRO over dp, ranks 2 and 6 each keep half of the optimizer state
//   of those rows, and each writes its own half.
//
// Thread-safety: the accessors are const and may be called from any thread;
// choose_writers() is a collective over world() and follows its rules (every
// rank, same order). Copies of a context share its grid and communicators.

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/collectives/process_grid.h"

namespace dtrain::parallel {

/// The three axes of the grid.
enum class Axis { kData, kPipeline, kTensor };

/// "dp", "pp" or "tp".
const char* axis_name(Axis axis);

/// A set of axes (for "replicated over", "the group along").
class AxisSet {
 public:
  constexpr AxisSet() = default;
  constexpr AxisSet(std::initializer_list<Axis> axes) {
    for (Axis a : axes) bits_ |= bit(a);
  }
  static constexpr AxisSet all() { return AxisSet({Axis::kData, Axis::kPipeline, Axis::kTensor}); }
  static constexpr AxisSet none() { return AxisSet(); }

  constexpr bool contains(Axis a) const { return (bits_ & bit(a)) != 0; }
  constexpr bool empty() const { return bits_ == 0; }
  constexpr AxisSet with(Axis a) const { return AxisSet(bits_ | bit(a)); }
  constexpr AxisSet without(Axis a) const { return AxisSet(bits_ & ~bit(a)); }
  constexpr bool operator==(AxisSet other) const { return bits_ == other.bits_; }
  constexpr bool operator!=(AxisSet other) const { return bits_ != other.bits_; }
  /// Bit 0 dp, bit 1 pp, bit 2 tp (for serialization).
  constexpr unsigned bits() const { return bits_; }
  static constexpr AxisSet from_bits(unsigned bits) { return AxisSet(bits & 7u); }
  /// "{dp, tp}".
  std::string to_string() const;

 private:
  constexpr explicit AxisSet(unsigned bits) : bits_(bits) {}
  static constexpr unsigned bit(Axis a) { return 1u << static_cast<unsigned>(a); }
  unsigned bits_ = 0;
};

/// One piece of state this rank holds, as declared to choose_writers().
struct ReplicaDeclaration {
  /// Identifies the piece: two ranks that declare the same key hold two
  /// copies of one piece (for checkpoints: the tensor's global name and the
  /// region of the global tensor).
  std::string key;
  /// Its size, to spread the writing over the ranks.
  std::uint64_t bytes = 0;
  /// The axes along which other ranks may hold a copy. Two ranks declaring
  /// the same key must differ only along these axes; otherwise their pieces
  /// were meant to differ (a forgotten tensor-parallel offset, say) and
  /// choose_writers() refuses them.
  AxisSet replicated_over = AxisSet::all();
};

class ParallelContext {
 public:
  /// Collective over `world`: builds the dp x pp x tp grid (dp = the rest)
  /// and its communicators (ProcessGrid). Throws InvalidArgument on every
  /// rank, before any split, if tp * pp does not divide world->size().
  explicit ParallelContext(std::shared_ptr<collectives::Communicator> world, int tp = 1,
                           int pp = 1);
  /// A context over a grid already built (shared, not copied).
  explicit ParallelContext(std::shared_ptr<const collectives::ProcessGrid> grid);
  /// Collective: the plain data-parallel layout, dp = world->size().
  static ParallelContext data_parallel(std::shared_ptr<collectives::Communicator> world);

  const collectives::ProcessGrid& grid() const noexcept { return *grid_; }
  const collectives::GridShape& shape() const noexcept { return grid_->shape(); }
  /// This rank's coordinates.
  const collectives::GridCoord& coord() const noexcept { return grid_->coord(); }

  /// This rank in the world, and the number of ranks.
  int rank() const noexcept { return grid_->world().rank(); }
  int world_size() const noexcept { return shape().world_size(); }
  /// Size of an axis, and this rank's coordinate along it.
  int size(Axis axis) const noexcept;
  int rank(Axis axis) const noexcept;
  int dp_size() const noexcept { return shape().dp; }
  int pp_size() const noexcept { return shape().pp; }
  int tp_size() const noexcept { return shape().tp; }
  int dp_rank() const noexcept { return coord().dp; }
  int pp_rank() const noexcept { return coord().pp; }
  int tp_rank() const noexcept { return coord().tp; }

  /// The world, and the communicator of each axis (the ranks that share
  /// this rank's other two coordinates, ordered by the axis's coordinate).
  std::shared_ptr<collectives::Communicator> world() const;
  std::shared_ptr<collectives::Communicator> comm(Axis axis) const;
  std::shared_ptr<collectives::Communicator> dp() const { return comm(Axis::kData); }
  std::shared_ptr<collectives::Communicator> pp() const { return comm(Axis::kPipeline); }
  std::shared_ptr<collectives::Communicator> tp() const { return comm(Axis::kTensor); }

  /// Which part of the data this rank reads: the dp coordinate of the
  /// global sampler's partition (pass both to DataLoader).
  int data_rank() const noexcept { return coord().dp; }
  int data_world_size() const noexcept { return shape().dp; }

  bool is_first_stage() const noexcept { return coord().pp == 0; }
  bool is_last_stage() const noexcept { return coord().pp == shape().pp - 1; }

  /// World ranks that share this rank's coordinates on every axis not in
  /// `axes`, in rank order (this rank included). No communication.
  std::vector<int> group_ranks(AxisSet axes) const;

  /// Collective over world(): gathers every rank's declarations and decides,
  /// for each of `mine`, whether this rank writes it. Every key is written by
  /// exactly one of the ranks that declared it: pieces declared once by
  /// their declarer; copies by the declarer with the least bytes assigned
  /// so far, largest pieces first (the same choice on every rank). Throws
  /// InvalidArgument on every rank if a key is declared twice by one rank,
  /// or by two ranks that differ along an axis outside its
  /// replicated_over (the message names the key, both ranks and the axis).
  std::vector<bool> choose_writers(const std::vector<ReplicaDeclaration>& mine) const;

 private:
  std::shared_ptr<const collectives::ProcessGrid> grid_;
};

}  // namespace dtrain::parallel
