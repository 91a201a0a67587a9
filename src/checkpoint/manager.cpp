// CheckpointManager: staged, (a)synchronous, atomically committed saves and
// resume from the newest checkpoint that verifies.

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <iostream>
#include <mutex>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "src/checkpoint/format.h"
#include "src/parallel/flat_range.h"
#include "src/parallel/gather.h"

#include <hdf5.h>

namespace dtrain::checkpoint {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

const char* to_string(SavePhase phase) {
  switch (phase) {
    case SavePhase::kAfterWrite:
      return "after_write";
    case SavePhase::kBeforeRename:
      return "before_rename";
  }
  return "?";
}

namespace {

std::string region_text(const std::vector<std::int64_t>& values) {
  std::string s;
  for (std::size_t i = 0; i < values.size(); ++i) s += (i ? "," : "") + std::to_string(values[i]);
  return s;
}

// One block of a global tensor that this rank holds: a StateDict entry, or
// one of the blocks that an entry's flat range covers.
struct HeldPiece {
  const StateDict::Entry* entry = nullptr;
  at::Tensor data;  // the block's shape
  std::vector<std::int64_t> offset;
  std::vector<std::int64_t> shape;
  std::string key;  // name and region: equal on the ranks that hold copies
};

std::vector<HeldPiece> held_pieces(const StateDict& state) {
  std::vector<HeldPiece> out;
  for (const StateDict::Entry& e : state.entries()) {
    const parallel::Placement& p = e.placement;
    auto add = [&](at::Tensor data, std::vector<std::int64_t> offset,
                   std::vector<std::int64_t> shape) {
      HeldPiece h;
      h.entry = &e;
      h.key = e.name + "@" + region_text(offset) + "+" + region_text(shape);
      h.data = std::move(data);
      h.offset = std::move(offset);
      h.shape = std::move(shape);
      out.push_back(std::move(h));
    };
    if (!p.is_flat()) {
      add(e.tensor, p.offset, p.shape);
      continue;
    }
    for (const auto& b : parallel::detail::flat_range_blocks(p.shape, p.flat_begin, p.flat_end)) {
      std::int64_t count = 1;
      std::vector<std::int64_t> offset = p.offset;
      for (std::size_t d = 0; d < b.shape.size(); ++d) {
        count *= b.shape[d];
        offset[d] += b.offset[d];
      }
      add(e.tensor.narrow(0, b.flat_offset, count).reshape(b.shape), std::move(offset), b.shape);
    }
  }
  return out;
}

}  // namespace

SavePhase parse_save_phase(const std::string& name) {
  for (SavePhase phase : {SavePhase::kAfterWrite, SavePhase::kBeforeRename}) {
    if (name == to_string(phase)) return phase;
  }
  DTRAIN_THROW(InvalidArgument, "unknown checkpoint save phase '", name,
               "'; expected after_write or before_rename");
}

void CheckpointOptions::validate() const {
  DTRAIN_CHECK_ARG(!directory.empty(), "the checkpoint directory is empty");
  DTRAIN_CHECK_ARG(keep_last >= 1, "keep_last must be >= 1, got ", keep_last);
}

struct CheckpointManager::Impl {
  CheckpointOptions options;
  std::shared_ptr<collectives::Communicator> comm;
  collectives::GridShape grid;  // ranks of `comm` are the grid's ranks
  int rank = 0;
  int size = 1;
  std::map<std::string, at::Tensor> staging;  // reused host buffers, by piece key
  // Which of this rank's pieces it writes, for the declarations in
  // `plan_signature` (every rank's, as of the last gathering).
  std::string plan_signature;
  std::vector<bool> plan;
  detail::FileImage image;  // reused buffer of this rank's file
  std::future<void> pending;
  mutable std::mutex mutex;
  WriteStats last;

  void warn(const std::string& message) const {
    if (options.on_warning) {
      options.on_warning(message);
    } else {
      std::cerr << "[dtrain rank " << rank << "] warning: " << message << std::endl;
    }
  }

  template <typename Options>
  Options with_timeout() const {
    Options o;
    if (options.timeout) o.timeout = *options.timeout;
    return o;
  }

  // Every rank's string, in rank order.
  std::vector<std::string> all_gather_strings(const std::string& mine) {
    return parallel::detail::all_gather_strings(*comm, mine, options.timeout);
  }

  // Collective: for each of `pieces`, whether this rank writes it. Gathers
  // every rank's declarations only when some rank's differ from the last
  // save's (one small all-reduce otherwise).
  std::vector<bool> writers(const std::vector<HeldPiece>& pieces) {
    std::vector<parallel::ReplicaDeclaration> declarations;
    std::string signature;
    for (const HeldPiece& p : pieces) {
      parallel::ReplicaDeclaration d;
      d.key = p.key;
      d.bytes = p.data.nbytes();
      d.replicated_over = p.entry->placement.replicated_over;
      signature += d.key + " " + std::to_string(d.bytes) + " " +
                   std::to_string(d.replicated_over.bits()) + " " +
                   detail::dtype_name(p.data.scalar_type()) + "\n";
      declarations.push_back(std::move(d));
    }
    if (all_reduce_max(signature == plan_signature && !plan_signature.empty() ? 0 : 1) != 0) {
      plan_signature.clear();  // stays clear if the choice throws
      plan = parallel::detail::choose_writers(*comm, grid, declarations, options.timeout);
      plan_signature = signature;
    }
    return plan;
  }

  std::int64_t broadcast_int(std::int64_t value) {
    at::Tensor t = at::full({1}, value, at::kLong);
    comm->broadcast(t, with_timeout<collectives::BroadcastOptions>())->wait();
    return t.item<std::int64_t>();
  }

  std::int64_t all_reduce_max(std::int64_t value) {
    at::Tensor t = at::full({1}, value, at::kLong);
    auto o = with_timeout<collectives::AllReduceOptions>();
    o.op = collectives::ReduceOp::kMax;
    comm->all_reduce(t, o)->wait();
    return t.item<std::int64_t>();
  }

  // A name for `dir` that resume never considers.
  static fs::path trash_name(const fs::path& dir) {
    return dir.parent_path() /
           (".trash-" + dir.filename().string() + "-" + std::to_string(::getpid()));
  }

  // Deletes a checkpoint directory: out of sight first (or, if it cannot be
  // renamed, its manifest first), so a half-deleted one never looks complete.
  void discard(const fs::path& dir) {
    std::error_code ec;
    const fs::path trash = trash_name(dir);
    fs::rename(dir, trash, ec);
    if (ec) {
      fs::remove(dir / detail::kManifestName, ec);
      fs::remove_all(dir, ec);
    } else {
      fs::remove_all(trash, ec);
    }
    if (ec) warn("could not delete " + dir.string() + ": " + ec.message());
  }

  // Deletes the oldest checkpoints beyond keep_last, never `keep` (the one
  // just committed, even if older steps sort after it).
  void prune(std::int64_t keep) {
    auto committed = list_checkpoints(options.directory);
    std::size_t excess = committed.size() > static_cast<std::size_t>(options.keep_last)
                             ? committed.size() - static_cast<std::size_t>(options.keep_last)
                             : 0;
    for (const auto& entry : committed) {
      if (excess == 0) break;
      if (entry.step == keep) continue;
      discard(entry.directory);
      --excess;
    }
  }

  // Runs on every rank (in the background when async): write, agree, commit.
  void write_and_commit(std::int64_t step, const std::vector<detail::PieceToWrite>& pieces,
                        const std::map<std::string, std::string>& metadata) {
    const fs::path dir(options.directory);
    const fs::path tmp = dir / detail::tmp_dir_name(step);
    const fs::path final_dir = dir / detail::step_dir_name(step);
    detail::FileRecord record;
    record.info.file = detail::rank_file_name(rank);
    record.info.rank = rank;
    const auto write_start = Clock::now();
    detail::FileWriteTimes times;
    try {
      fs::create_directories(tmp);
      const fs::path path = tmp / record.info.file;
      fs::remove(path);
      detail::ImageWriteOptions write_options;
      write_options.sync = options.fsync;
      write_options.direct_io = options.direct_io;
      record.info = detail::write_piece_file(path.string(), step, rank, size, pieces, write_options,
                                             image, &times);
      for (const auto& p : pieces) record.pieces.push_back(p.record);
      if (options.fault_hook) options.fault_hook(SavePhase::kAfterWrite, step);
    } catch (const std::exception& e) {
      record.error = e.what();
    }
    const double write_seconds = seconds_since(write_start);
    const auto commit_start = Clock::now();

    std::vector<detail::FileRecord> records;
    std::string failures;
    for (const std::string& text : all_gather_strings(detail::serialize(record))) {
      records.push_back(detail::parse_file_record(text));
      const auto& r = records.back();
      if (!r.error.empty()) failures += "\n  rank " + std::to_string(r.info.rank) + ": " + r.error;
    }
    if (!failures.empty()) {
      if (rank == 0) {
        std::error_code ec;
        fs::remove_all(tmp, ec);
      }
      DTRAIN_THROW(CheckpointError, "checkpoint step ", step, " was not saved in ",
                   options.directory, " (the previous checkpoints are untouched):", failures);
    }

    std::string commit_error;
    if (rank == 0) {
      bool committed = false;
      try {
        const detail::Manifest manifest = detail::make_manifest(step, metadata, records, grid);
        detail::write_file_atomically((tmp / detail::kManifestName).string(),
                                      detail::serialize(manifest), options.fsync);
        if (options.fsync) detail::fsync_path(tmp.string(), true);
        if (options.fault_hook) options.fault_hook(SavePhase::kBeforeRename, step);
        // An older save of the same step is moved aside first and deleted only
        // once the new one is in place; a crash in between leaves the new one
        // complete in .tmp-step-N, which the next manager puts in place.
        fs::path replaced;
        if (fs::exists(final_dir)) {
          replaced = trash_name(final_dir);
          fs::rename(final_dir, replaced);
        }
        fs::rename(tmp, final_dir);
        committed = true;
        if (!replaced.empty()) fs::remove_all(replaced);
      } catch (const std::exception& e) {
        commit_error = e.what();
      }
      if (committed) {
        // The checkpoint is in place: what follows can only warn.
        try {
          if (options.fsync) detail::fsync_path(dir.string(), true);
          prune(step);  // before the other ranks learn of the commit: they see the final state
        } catch (const std::exception& e) {
          warn("checkpoint step " + std::to_string(step) + " is committed, but: " + e.what());
        }
      }
    }
    const std::int64_t status = broadcast_int(commit_error.empty() ? 0 : 1);
    if (status != 0) {
      DTRAIN_THROW(
          CheckpointError, "checkpoint step ", step, " was not committed in ", options.directory,
          ": ", rank == 0 ? commit_error : std::string("rank 0 failed to commit (see its error)"),
          " (the previous checkpoints are untouched)");
    }
    std::lock_guard<std::mutex> lock(mutex);
    last.step = step;
    last.write_seconds = write_seconds;
    last.encode_seconds = times.encode_seconds;
    last.io_seconds = times.write_seconds;
    last.fsync_seconds = times.fsync_seconds;
    last.commit_seconds = seconds_since(commit_start);
    last.bytes = record.info.bytes;
    last.direct_io = times.direct_io;
  }

  void wait_pending() {
    if (pending.valid()) pending.get();
  }
};

CheckpointManager::CheckpointManager(CheckpointOptions options,
                                     const parallel::ParallelContext& context)
    : CheckpointManager(std::move(options), context.world(), context.shape()) {}

CheckpointManager::CheckpointManager(CheckpointOptions options,
                                     const std::shared_ptr<collectives::Communicator>& comm)
    : CheckpointManager(std::move(options), comm,
                        collectives::GridShape{comm != nullptr ? comm->size() : 1, 1, 1}) {}

CheckpointManager::CheckpointManager(CheckpointOptions options,
                                     const std::shared_ptr<collectives::Communicator>& comm,
                                     const collectives::GridShape& grid)
    : impl_(std::make_unique<Impl>()) {
  options.validate();
  DTRAIN_CHECK_ARG(comm != nullptr, "CheckpointManager needs a communicator");
  DTRAIN_CHECK_ARG(grid.world_size() == comm->size(), "CheckpointManager: a grid of ",
                   grid.world_size(), " ranks over a communicator of ", comm->size());
  impl_->options = std::move(options);
  impl_->grid = grid;
  if (!impl_->options.timeout) {
    // The commit waits for the slowest rank's whole write: allow far more
    // than an ordinary collective.
    impl_->options.timeout = std::chrono::minutes(30);
  }
  impl_->comm = comm->split(0, comm->rank());
  hbool_t threadsafe = 0;
  H5is_library_threadsafe(&threadsafe);
  if (impl_->options.async && threadsafe == 0) {
    impl_->options.async = false;  // HDF5 calls from a second thread need the thread-safe build
  }
  impl_->rank = impl_->comm->rank();
  impl_->size = impl_->comm->size();

  const fs::path dir(impl_->options.directory);
  std::string problem;
  try {
    fs::create_directories(dir);
    const fs::path probe =
        dir / (".probe-rank-" + std::to_string(impl_->rank) + "-" + std::to_string(::getpid()));
    {
      std::ofstream out(probe);
      out << "probe\n";
      out.flush();
      if (!out.good()) throw std::runtime_error("cannot write " + probe.string());
    }
    fs::remove(probe);
  } catch (const std::exception& e) {
    problem = "rank " + std::to_string(impl_->rank) + ": " + e.what();
  }
  if (problem.empty() && impl_->rank == 0) {
    // Leftovers of saves that were interrupted (never committed) or of deletions.
    std::error_code ec;
    std::vector<fs::path> leftovers;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(".tmp-step-", 0) == 0) leftovers.insert(leftovers.begin(), entry.path());
      if (name.rfind(".trash-", 0) == 0) leftovers.push_back(entry.path());
    }
    for (const fs::path& path : leftovers) {  // temporaries first, then trash
      const std::string name = path.filename().string();
      const fs::path final_dir = dir / name.substr(5);  // ".tmp-step-N" -> "step-N"
      if (name.rfind(".tmp-step-", 0) == 0 && !fs::exists(final_dir) &&
          fs::exists(path / detail::kManifestName)) {
        // Every rank had agreed and rank 0 had written the manifest: the
        // save was complete but for the rename. Finish it if it verifies.
        try {
          Checkpoint::open(path.string()).verify();
          fs::rename(path, final_dir);
          impl_->warn("completed the commit of " + final_dir.string() +
                      ", interrupted before its rename");
          continue;
        } catch (const std::exception& e) {
          impl_->warn("not completing " + path.string() + ": " + e.what());
        }
      }
      impl_->warn("removing " + path.string() + ", left by an interrupted save");
      std::error_code rm;
      fs::remove_all(path, rm);
    }
  }
  std::string problems;
  for (const std::string& p : impl_->all_gather_strings(problem)) {
    if (!p.empty()) problems += "\n  " + p;
  }
  DTRAIN_CHECK_T(CheckpointError, problems.empty(), "the checkpoint directory ",
                 impl_->options.directory, " is not usable:", problems);
}

CheckpointManager::~CheckpointManager() {
  try {
    impl_->wait_pending();
  } catch (const std::exception& e) {
    impl_->warn(std::string("the last checkpoint save failed: ") + e.what());
  }
}

const CheckpointOptions& CheckpointManager::options() const { return impl_->options; }

void CheckpointManager::wait() { impl_->wait_pending(); }

WriteStats CheckpointManager::last_write() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->last;
}

SaveStats CheckpointManager::save(std::int64_t step, const StateDict& state,
                                  const std::map<std::string, std::string>& metadata) {
  DTRAIN_CHECK_ARG(step >= 0, "checkpoint step must be >= 0, got ", step);
  const auto start = Clock::now();
  SaveStats stats;
  impl_->wait_pending();
  stats.wait_seconds = seconds_since(start);

  // Each piece is written by exactly one of the ranks that hold it.
  const std::vector<HeldPiece> held = held_pieces(state);
  const std::vector<bool> writes = impl_->writers(held);
  std::vector<detail::PieceToWrite> pieces;
  std::map<std::string, int> pieces_of_tensor;  // in this rank's file
  int extra_pieces = 0;
  for (std::size_t i = 0; i < held.size(); ++i) {
    if (!writes[i]) continue;
    const HeldPiece& h = held[i];
    const std::string& name = h.entry->name;
    // A synchronous save writes before returning, so a contiguous CPU tensor
    // is written as it is; an asynchronous one snapshots it first.
    at::Tensor buffer = h.data.detach();
    if (impl_->options.async || !buffer.is_cpu() || !buffer.is_contiguous()) {
      at::Tensor& staged = impl_->staging[h.key];
      if (!staged.defined() || staged.sizes() != buffer.sizes() ||
          staged.scalar_type() != buffer.scalar_type()) {
        staged = at::empty(buffer.sizes(), at::TensorOptions().dtype(buffer.scalar_type()));
      }
      staged.copy_(buffer);
      buffer = staged;
    }
    detail::PieceToWrite piece;
    piece.record.name = name;
    // The first piece of a tensor in this file is the dataset of its name
    // (what h5py users look for); further ones (ZeRO's blocks) go aside.
    if (pieces_of_tensor[name]++ > 0)
      piece.record.dataset = detail::extra_piece_dataset(++extra_pieces);
    piece.record.dtype = buffer.scalar_type();
    piece.record.global_shape = h.entry->placement.global_shape;
    piece.record.offset = h.offset;
    piece.record.shape = h.shape;
    piece.data = buffer;
    stats.bytes += buffer.nbytes();
    pieces.push_back(std::move(piece));
  }
  auto job = [impl = impl_.get(), step, pieces = std::move(pieces), metadata]() {
    impl->write_and_commit(step, pieces, metadata);
  };
  if (impl_->options.async) {
    impl_->pending = std::async(std::launch::async, std::move(job));
  } else {
    job();
  }
  stats.stall_seconds = seconds_since(start);
  return stats;
}

std::vector<CheckpointEntry> CheckpointManager::list() const {
  return list_checkpoints(impl_->options.directory);
}

std::optional<CheckpointEntry> CheckpointManager::latest_valid() {
  impl_->wait_pending();
  // Rank 0's view of the directory decides which checkpoints are tried.
  std::vector<CheckpointEntry> entries = list();
  if (impl_->rank == 0) {
    for (const CheckpointEntry& damaged : list_damaged_checkpoints(impl_->options.directory)) {
      impl_->warn("skipping checkpoint " + damaged_checkpoint_message(damaged));
    }
  }
  const std::int64_t count = impl_->broadcast_int(static_cast<std::int64_t>(entries.size()));
  at::Tensor steps = at::full({std::max<std::int64_t>(count, 1)}, -1, at::kLong);
  for (std::int64_t i = 0; impl_->rank == 0 && i < count; ++i) {
    steps[i] = entries[static_cast<std::size_t>(i)].step;
  }
  impl_->comm->broadcast(steps, impl_->with_timeout<collectives::BroadcastOptions>())->wait();
  for (std::int64_t i = count - 1; i >= 0; --i) {
    const std::int64_t step = steps[i].item<std::int64_t>();
    const std::string directory =
        (fs::path(impl_->options.directory) / detail::step_dir_name(step)).string();
    std::string problem;
    try {
      const Checkpoint ckpt = Checkpoint::open(directory);
      DTRAIN_CHECK_T(CheckpointError, ckpt.step() == step, directory,
                     "/manifest.json records step ", ckpt.step());
      // The ranks share the digest work: file i is checked by rank i % size.
      const auto& files = ckpt.files();
      for (std::size_t f = static_cast<std::size_t>(impl_->rank); f < files.size();
           f += static_cast<std::size_t>(impl_->size)) {
        ckpt.verify_file(files[f]);
      }
    } catch (const std::exception& e) {  // any failure: every rank must reach the all-reduce
      problem = e.what();
    }
    const bool bad = impl_->all_reduce_max(problem.empty() ? 0 : 1) != 0;
    if (!bad) return CheckpointEntry{step, directory};
    if (!problem.empty()) {
      impl_->warn("skipping checkpoint " + directory + ": " + problem +
                  (i > 0 ? "; trying the one before" : "; no older checkpoint"));
    }
  }
  return std::nullopt;
}

}  // namespace dtrain::checkpoint
