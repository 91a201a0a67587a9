// StateDict, the Checkpoint reader and list_checkpoints.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/error.h"
#include "src/checkpoint/checksums.h"
#include "src/checkpoint/format.h"

namespace dtrain::checkpoint {

namespace fs = std::filesystem;

namespace {

bool valid_name(const std::string& name) {
  if (name.empty() || name.front() == '/' || name.back() == '/') return false;
  std::size_t segment = 0;
  for (char c : name) {
    if (c == '/') {
      if (segment == 0) return false;
      segment = 0;
      continue;
    }
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '.' || c == '-';
    if (!ok) return false;
    ++segment;
  }
  return name.find("./") == std::string::npos && name.rfind('.', 0) != 0;
}

std::int64_t volume(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

}  // namespace

// ---------------------------------------------------------------------------
// StateDict

void StateDict::add(const std::string& name, const at::Tensor& tensor,
                    parallel::Placement placement) {
  DTRAIN_CHECK_ARG(valid_name(name), "checkpoint tensor name '", name,
                   "' must be '/'-separated segments of [A-Za-z0-9_.-], not starting with '.'");
  DTRAIN_CHECK_ARG(tensor.defined(), "checkpoint tensor '", name, "' is undefined");
  DTRAIN_CHECK_ARG(detail::dtype_name(tensor.scalar_type()) != nullptr, "checkpoint tensor '", name,
                   "' has unsupported dtype ", tensor.scalar_type());
  for (const Entry& e : entries_) {
    DTRAIN_CHECK_ARG(e.name != name, "checkpoint tensor '", name, "' added twice");
  }
  placement.check(name, tensor);
  entries_.push_back({name, tensor, std::move(placement)});
}

void StateDict::add_replicated(const std::string& name, const at::Tensor& tensor) {
  DTRAIN_CHECK_ARG(tensor.defined(), "checkpoint tensor '", name, "' is undefined");
  add(name, tensor, parallel::Placement::replicated(tensor.sizes().vec()));
}

void StateDict::add_shard(const std::string& name, const at::Tensor& piece,
                          std::vector<std::int64_t> global_shape,
                          std::vector<std::int64_t> offset) {
  DTRAIN_CHECK_ARG(piece.defined(), "checkpoint tensor '", name, "' is undefined");
  add(name, piece,
      parallel::Placement::block(std::move(global_shape), std::move(offset), piece.sizes().vec()));
}

void StateDict::add_per_rank(const std::string& name, const at::Tensor& tensor, int rank,
                             int world_size) {
  DTRAIN_CHECK_ARG(tensor.defined(), "checkpoint tensor '", name, "' is undefined");
  DTRAIN_CHECK_ARG(rank >= 0 && rank < world_size, "rank ", rank, " is not in [0, ", world_size,
                   ")");
  std::vector<std::int64_t> global{world_size};
  std::vector<std::int64_t> offset{rank};
  for (std::int64_t d : tensor.sizes()) {
    global.push_back(d);
    offset.push_back(0);
  }
  add_shard(name, tensor.unsqueeze(0), std::move(global), std::move(offset));
}

// ---------------------------------------------------------------------------
// Checkpoint

struct Checkpoint::Impl {
  std::string directory;
  detail::Manifest manifest;
  mutable std::map<std::string, io::Handle> open_files;  // closed with the checkpoint

  hid_t file(const std::string& name) const {
    auto it = open_files.find(name);
    if (it == open_files.end()) {
      it = open_files.emplace(name, detail::open_piece_file((fs::path(directory) / name).string()))
               .first;
    }
    return it->second.get();
  }
};

Checkpoint::Checkpoint(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Checkpoint Checkpoint::open(const std::string& directory) {
  const fs::path manifest_path = fs::path(directory) / detail::kManifestName;
  std::ifstream in(manifest_path, std::ios::binary);
  DTRAIN_CHECK_T(CheckpointError, in.good(), "checkpoint ", directory,
                 " has no readable manifest.json (an incomplete save is never loaded)");
  std::stringstream text;
  text << in.rdbuf();
  auto impl = std::make_shared<Impl>();
  impl->directory = directory;
  impl->manifest = detail::parse_manifest(text.str(), manifest_path.string());
  return Checkpoint(std::move(impl));
}

const std::string& Checkpoint::directory() const { return impl_->directory; }
std::int64_t Checkpoint::step() const { return impl_->manifest.step; }
int Checkpoint::world_size() const { return impl_->manifest.world_size; }
const collectives::GridShape& Checkpoint::grid() const { return impl_->manifest.grid; }
const std::map<std::string, std::string>& Checkpoint::metadata() const {
  return impl_->manifest.metadata;
}
const std::string& Checkpoint::metadata(const std::string& key) const {
  auto it = impl_->manifest.metadata.find(key);
  DTRAIN_CHECK_T(CheckpointError, it != impl_->manifest.metadata.end(), "checkpoint ",
                 impl_->directory, " has no metadata '", key, "'");
  return it->second;
}
const std::vector<FileInfo>& Checkpoint::files() const { return impl_->manifest.files; }

std::vector<std::string> Checkpoint::tensor_names() const {
  std::vector<std::string> names;
  for (const auto& [name, info] : impl_->manifest.tensors) names.push_back(name);
  return names;
}

bool Checkpoint::contains(const std::string& name) const {
  return impl_->manifest.tensors.count(name) == 1;
}

const TensorInfo& Checkpoint::info(const std::string& name) const {
  auto it = impl_->manifest.tensors.find(name);
  DTRAIN_CHECK_T(CheckpointError, it != impl_->manifest.tensors.end(), "checkpoint ",
                 impl_->directory, " has no tensor '", name, "'");
  return it->second;
}

void Checkpoint::verify_file(const FileInfo& file) const {
  const fs::path path = fs::path(impl_->directory) / file.file;
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  DTRAIN_CHECK_T(CheckpointError, !ec, "checkpoint file ", path.string(), " is missing (",
                 ec.message(), ")");
  DTRAIN_CHECK_T(CheckpointError, size == file.bytes, "checkpoint file ", path.string(), " has ",
                 size, " bytes but the manifest records ", file.bytes, " (truncated or replaced)");
  const std::string digest = detail::digest_file(path.string(), file.digest_algorithm);
  DTRAIN_CHECK_T(CheckpointError, digest == file.digest, "checkpoint file ", path.string(),
                 " is corrupt: its ", file.digest_algorithm, " digest is ", digest,
                 " but the manifest records ", file.digest);
}

void Checkpoint::verify() const {
  for (const FileInfo& f : impl_->manifest.files) verify_file(f);
}

at::Tensor Checkpoint::read(const std::string& name) const {
  const TensorInfo& t = info(name);
  return read(name, std::vector<std::int64_t>(t.global_shape.size(), 0), t.global_shape);
}

at::Tensor Checkpoint::read(const std::string& name, const std::vector<std::int64_t>& offset,
                            const std::vector<std::int64_t>& shape) const {
  const TensorInfo& t = info(name);
  const std::size_t nd = t.global_shape.size();
  DTRAIN_CHECK_T(CheckpointError, offset.size() == nd && shape.size() == nd, "reading tensor '",
                 name, "': the region has ", offset.size(), "/", shape.size(),
                 " dimensions, the tensor ", nd);
  for (std::size_t d = 0; d < nd; ++d) {
    DTRAIN_CHECK_T(CheckpointError,
                   offset[d] >= 0 && shape[d] >= 0 && offset[d] + shape[d] <= t.global_shape[d],
                   "reading tensor '", name, "': the region leaves the global shape in dimension ",
                   d);
  }
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(t.dtype));
  std::int64_t covered = 0;
  for (const PieceInfo& p : t.pieces) {
    std::vector<std::int64_t> lo(nd), count(nd);
    bool overlaps = true;
    for (std::size_t d = 0; d < nd; ++d) {
      lo[d] = std::max(offset[d], p.offset[d]);
      const std::int64_t hi = std::min(offset[d] + shape[d], p.offset[d] + p.shape[d]);
      count[d] = hi - lo[d];
      if (count[d] <= 0 && !(shape[d] == 0 && p.shape[d] == 0)) overlaps = false;
    }
    if (!overlaps) continue;
    std::vector<std::int64_t> start(nd);
    for (std::size_t d = 0; d < nd; ++d) start[d] = lo[d] - p.offset[d];
    at::Tensor dst = out;
    for (std::size_t d = 0; d < nd; ++d) {
      dst = dst.narrow(static_cast<std::int64_t>(d), lo[d] - offset[d], count[d]);
    }
    const bool direct = dst.is_contiguous();
    at::Tensor buffer = direct ? dst : at::empty(count, out.options());
    const std::string path = (fs::path(impl_->directory) / p.file).string();
    detail::read_piece(impl_->file(p.file), path, name, p.dataset, start, count, buffer);
    if (!direct) dst.copy_(buffer);
    covered += volume(count);
  }
  DTRAIN_CHECK_T(CheckpointError, covered == volume(shape), "checkpoint ", impl_->directory,
                 ": the stored pieces of tensor '", name, "' cover ", covered, " of the ",
                 volume(shape), " elements asked for");
  return out;
}

// ---------------------------------------------------------------------------

namespace {
// step-N directories under `directory`, oldest first: those with a manifest
// (`with_manifest`) or those without.
std::vector<CheckpointEntry> step_directories(const std::string& directory, bool with_manifest) {
  std::vector<CheckpointEntry> out;
  std::error_code ec;
  if (!fs::is_directory(directory, ec)) return out;
  for (const auto& entry : fs::directory_iterator(directory, ec)) {
    const std::int64_t step = detail::parse_step_dir_name(entry.path().filename().string());
    if (step < 0 || !entry.is_directory(ec)) continue;
    if (fs::exists(entry.path() / detail::kManifestName, ec) != with_manifest) continue;
    out.push_back({step, entry.path().string()});
  }
  std::sort(out.begin(), out.end(),
            [](const CheckpointEntry& a, const CheckpointEntry& b) { return a.step < b.step; });
  return out;
}
}  // namespace

std::vector<CheckpointEntry> list_checkpoints(const std::string& directory) {
  return step_directories(directory, true);
}

std::vector<CheckpointEntry> list_damaged_checkpoints(const std::string& directory) {
  return step_directories(directory, false);
}

std::string damaged_checkpoint_message(const CheckpointEntry& entry) {
  return entry.directory + ": no " + detail::kManifestName +
         "; a save renames its directory to step-N only after writing the manifest, so it was "
         "deleted or lost, and step " +
         std::to_string(entry.step) +
         " cannot be loaded (restore the manifest, or remove the directory once you no longer "
         "need its files)";
}

}  // namespace dtrain::checkpoint
