// dtrain-ckpt: list, verify and inspect checkpoints.
//
//   dtrain-ckpt list DIR           committed checkpoints under DIR, oldest first
//   dtrain-ckpt verify PATH        every file's size and digest (PATH: one
//                                  checkpoint, or DIR for all of them)
//   dtrain-ckpt inspect PATH       step, writers, metadata, tensors and pieces
//                                  (PATH: one checkpoint, or DIR for the newest)
//   dtrain-ckpt diff A B [PREFIX]  compares the tensors (under PREFIX, e.g.
//                                  model/) of two checkpoints bitwise
//
// Exit status: 0 when everything checked is fine (diff: identical), 1 when a
// checkpoint is bad (diff: they differ), 2 for usage errors. `verify DIR`
// counts a step-N directory without manifest.json as bad (only damage makes
// one: a save renames its directory after writing the manifest).

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/error.h"
#include "src/cli/cli.h"

namespace {

namespace fs = std::filesystem;
using namespace dtrain::checkpoint;

int usage(const char* problem) {
  if (problem != nullptr) std::cerr << "dtrain-ckpt: " << problem << "\n";
  std::cerr << "usage: dtrain-ckpt list DIR | verify PATH | inspect PATH | diff A B [PREFIX]  (-h "
               "for help)\n";
  return dtrain::cli::kExitUsage;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + std::to_string(shape[i]);
  return out + "]";
}

// PATH is either one checkpoint (has manifest.json) or a directory of them.
std::vector<std::string> checkpoints_at(const std::string& path, bool newest_only) {
  if (fs::exists(fs::path(path) / "manifest.json")) return {path};
  std::vector<std::string> out;
  for (const auto& e : list_checkpoints(path)) out.push_back(e.directory);
  if (newest_only && !out.empty()) out.erase(out.begin(), out.end() - 1);
  return out;
}

int list(const std::string& dir) {
  if (!fs::is_directory(dir)) {
    std::cerr << "dtrain-ckpt: " << dir << " is not a directory\n";
    return 2;
  }
  const auto entries = list_checkpoints(dir);
  std::printf("%-12s %-8s %-12s %s\n", "step", "ranks", "MiB", "directory");
  for (const auto& e : entries) {
    try {
      const Checkpoint c = Checkpoint::open(e.directory);
      std::uint64_t bytes = 0;
      for (const auto& f : c.files()) bytes += f.bytes;
      std::printf("%-12lld %-8d %-12.1f %s\n", static_cast<long long>(e.step), c.world_size(),
                  static_cast<double>(bytes) / (1 << 20), e.directory.c_str());
    } catch (const dtrain::Error& err) {
      std::printf("%-12lld %-8s %-12s %s  (%s)\n", static_cast<long long>(e.step), "?", "?",
                  e.directory.c_str(), err.what());
    }
  }
  if (entries.empty()) std::printf("(no committed checkpoints in %s)\n", dir.c_str());
  for (const auto& e : list_damaged_checkpoints(dir)) {
    std::printf("damaged: %s\n", damaged_checkpoint_message(e).c_str());
  }
  return 0;
}

// step-N directories without a manifest at PATH: PATH itself, or in it.
std::vector<CheckpointEntry> damaged_at(const std::string& path) {
  if (fs::exists(fs::path(path) / "manifest.json")) return {};
  std::error_code ec;
  const fs::path parent = fs::path(path).lexically_normal().parent_path();
  for (const auto& e : list_damaged_checkpoints(parent.empty() ? "." : parent.string())) {
    if (fs::equivalent(e.directory, path, ec)) return {e};
  }
  return list_damaged_checkpoints(path);
}

int verify(const std::string& path) {
  const auto targets = checkpoints_at(path, false);
  const auto damaged = damaged_at(path);
  if (targets.empty() && damaged.empty()) {
    std::cerr << "dtrain-ckpt: no checkpoint at " << path << "\n";
    return 1;
  }
  int bad = 0;
  for (const auto& e : damaged) {
    std::printf("BAD   %s\n", damaged_checkpoint_message(e).c_str());
    ++bad;
  }
  for (const std::string& dir : targets) {
    try {
      const Checkpoint c = Checkpoint::open(dir);
      c.verify();
      std::printf("ok    %s (step %lld, %zu files)\n", dir.c_str(),
                  static_cast<long long>(c.step()), c.files().size());
    } catch (const dtrain::Error& e) {
      std::printf("BAD   %s: %s\n", dir.c_str(), e.what());
      ++bad;
    }
  }
  return bad == 0 ? 0 : 1;
}

int inspect(const std::string& path) {
  const auto targets = checkpoints_at(path, true);
  if (targets.empty()) {
    std::cerr << "dtrain-ckpt: no checkpoint at " << path << "\n";
    return 1;
  }
  const Checkpoint c = Checkpoint::open(targets.front());
  std::printf("checkpoint  %s\nstep        %lld\nwritten by  %d rank(s) (dp %d x pp %d x tp %d)\n",
              c.directory().c_str(), static_cast<long long>(c.step()), c.world_size(), c.grid().dp,
              c.grid().pp, c.grid().tp);
  std::printf("metadata\n");
  for (const auto& [k, v] : c.metadata()) std::printf("  %-24s %s\n", k.c_str(), v.c_str());
  std::printf("files\n");
  for (const auto& f : c.files()) {
    std::printf("  %-16s rank %-5d %12llu bytes  %s %s\n", f.file.c_str(), f.rank,
                static_cast<unsigned long long>(f.bytes), f.digest_algorithm.c_str(),
                f.digest.c_str());
  }
  std::printf("tensors\n");
  for (const std::string& name : c.tensor_names()) {
    const TensorInfo& t = c.info(name);
    std::printf("  %-48s %-9s %-18s", name.c_str(), c10::toString(t.dtype),
                shape_text(t.global_shape).c_str());
    for (const auto& p : t.pieces) {
      std::printf(" %s@%s+%s", p.file.c_str(), shape_text(p.offset).c_str(),
                  shape_text(p.shape).c_str());
    }
    std::printf("\n");
  }
  return 0;
}

int diff(const std::string& a_path, const std::string& b_path, const std::string& prefix) {
  const auto a_dirs = checkpoints_at(a_path, true);
  const auto b_dirs = checkpoints_at(b_path, true);
  if (a_dirs.empty() || b_dirs.empty()) {
    std::cerr << "dtrain-ckpt: no checkpoint at " << (a_dirs.empty() ? a_path : b_path) << "\n";
    return 2;
  }
  const Checkpoint a = Checkpoint::open(a_dirs.front());
  const Checkpoint b = Checkpoint::open(b_dirs.front());
  int differences = 0;
  int compared = 0;
  auto under = [&](const std::string& name) { return name.compare(0, prefix.size(), prefix) == 0; };
  for (const std::string& name : a.tensor_names()) {
    if (!under(name)) continue;
    if (!b.contains(name)) {
      std::printf("only in A  %s\n", name.c_str());
      ++differences;
      continue;
    }
    const at::Tensor x = a.read(name);
    const at::Tensor y = b.read(name);
    ++compared;
    if (x.sizes() != y.sizes() || x.scalar_type() != y.scalar_type()) {
      std::printf("differs    %s (shape or dtype)\n", name.c_str());
      ++differences;
    } else if (!x.equal(y)) {
      const double max = x.is_floating_point() || y.is_floating_point()
                             ? (x.to(at::kDouble) - y.to(at::kDouble)).abs().max().item<double>()
                             : 0.0;
      std::printf("differs    %s (max |a-b| %.3g)\n", name.c_str(), max);
      ++differences;
    }
  }
  for (const std::string& name : b.tensor_names()) {
    if (under(name) && !a.contains(name)) {
      std::printf("only in B  %s\n", name.c_str());
      ++differences;
    }
  }
  std::printf("%d tensor(s) compared, %d difference(s): %s vs %s\n", compared, differences,
              a.directory().c_str(), b.directory().c_str());
  return differences == 0 && compared > 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("dtrain-ckpt", "list, verify and inspect dtrain checkpoints");
  cli.add_options()("command", "list, verify, inspect or diff", cxxopts::value<std::string>())(
      "paths", "the command's paths", cxxopts::value<std::vector<std::string>>())(
      "h,help", "print this help");
  cli.parse_positional({"command", "paths"});
  std::string command;
  std::vector<std::string> paths;
  try {
    const auto parsed = dtrain::cli::parse(cli, argc, argv);
    if (parsed.count("help")) {
      std::cout << "dtrain-ckpt: list, verify and inspect dtrain checkpoints\n\n"
                   "  dtrain-ckpt list DIR       committed checkpoints under DIR, oldest first\n"
                   "  dtrain-ckpt verify PATH    sizes and digests of every file (PATH: one\n"
                   "                             checkpoint, or a directory of them; a step-N\n"
                   "                             directory without manifest.json is bad)\n"
                   "  dtrain-ckpt inspect PATH   step, metadata, files, tensors and their pieces\n"
                   "                             (PATH: one checkpoint, or the newest in DIR)\n"
                   "  dtrain-ckpt diff A B [PREFIX]\n"
                   "                             bitwise comparison of the tensors (under PREFIX)\n"
                   "                             of two checkpoints (or the newest in two DIRs)\n\n"
                   "Exit status: 0 fine, 1 a checkpoint is bad or missing, 2 usage error.\n";
      return 0;
    }
    if (parsed.count("command") == 0) return usage(nullptr);
    command = parsed["command"].as<std::string>();
    if (parsed.count("paths")) paths = parsed["paths"].as<std::vector<std::string>>();
  } catch (const dtrain::cli::UsageError& e) {
    return usage(e.what());
  }
  if (command == "diff") {
    if (paths.size() != 2 && paths.size() != 3) {
      return usage("diff needs two checkpoints and an optional prefix");
    }
    try {
      return diff(paths[0], paths[1], paths.size() == 3 ? paths[2] : "");
    } catch (const dtrain::Error& e) {
      std::cerr << "dtrain-ckpt: " << e.what() << "\n";
      return 2;
    }
  }
  if (command != "list" && command != "verify" && command != "inspect") {
    return usage(("unknown command '" + command + "'").c_str());
  }
  if (paths.size() != 1) return usage("expected one PATH after the command");
  const std::string& path = paths.front();
  try {
    if (command == "list") return list(path);
    if (command == "verify") return verify(path);
    return inspect(path);
  } catch (const dtrain::Error& e) {
    std::cerr << "dtrain-ckpt: " << e.what() << "\n";
    return 1;
  }
}
