// Checkpoints over 1-4 ranks: round trip of replicated, sharded and per-rank
// tensors; async saves; keep-last; skipping corrupt or partial checkpoints;
// a failed save (file size limit, unwritable directory) leaving the previous
// ones untouched; ZeRO-1 state written by N ranks and resumed on M.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/checkpoint/state.h"
#include "dtrain/collectives/communicator.h"
#include "dtrain/data/dataset.h"
#include "dtrain/error.h"
#include "dtrain/parallel/zero_optimizer.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::checkpoint {
namespace {

namespace fs = std::filesystem;
using dtrain::testing::runtime;

std::string shared_dir(collectives::Communicator& comm, const std::string& name) {
  return dtrain::testing::shared_temp_dir(comm, "dtrain-ckpt-" + name);
}

CheckpointOptions sync_options(const std::string& dir) {
  CheckpointOptions o;
  o.directory = dir;
  o.async = false;
  o.keep_last = 10;
  return o;
}

void flip_bytes(const std::string& path, std::int64_t at, int count) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f.good()) << path;
  for (int i = 0; i < count; ++i) {
    f.seekg(at + i);
    char c = 0;
    f.read(&c, 1);
    f.seekp(at + i);
    c = static_cast<char>(~c);
    f.write(&c, 1);
  }
}

TEST(CheckpointTest, RoundTripOfReplicatedShardedAndPerRankTensors) {
  auto comm = dtrain::testing::fresh_world("ckpt-roundtrip");
  const int rank = comm->rank();
  const int world = comm->size();
  const std::string dir = shared_dir(*comm, "roundtrip");
  CheckpointManager manager(sync_options(dir), comm);

  torch::manual_seed(3);
  const at::Tensor a = torch::randn({5, 3});
  const at::Tensor b = torch::randn({7}, torch::kDouble);
  const at::Tensor scalar = torch::scalar_tensor(42, torch::kLong);
  const at::Tensor bf = torch::randn({4}).to(torch::kBFloat16);
  const at::Tensor empty = torch::zeros({0, 3});
  const at::Tensor big = torch::randn({300, 1000});  // > 1 MiB: several chunks
  const std::int64_t total = 10 * world + 3;
  const at::Tensor flat = torch::arange(total, torch::kFloat);
  const std::int64_t offset = 10 * rank;
  const std::int64_t length = rank == world - 1 ? 13 : 10;

  StateDict state;
  state.add_replicated("model/a", a);
  state.add_replicated("model/b", b);
  state.add_replicated("model/scalar", scalar);
  state.add_replicated("model/bf", bf);
  state.add_replicated("model/empty", empty);
  state.add_replicated("model/big", big);
  state.add_shard("opt/flat", flat.narrow(0, offset, length), {total}, {offset});
  state.add_per_rank("rng/x", torch::full({4}, rank, torch::kInt), rank, world);
  manager.save(5, state, {{"sampler", "epoch=1 consumed_samples=64"}});

  const auto entries = manager.list();
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0].step, 5);
  const Checkpoint ckpt = Checkpoint::open(entries[0].directory);
  ckpt.verify();
  EXPECT_EQ(ckpt.step(), 5);
  EXPECT_EQ(ckpt.world_size(), world);
  EXPECT_EQ(ckpt.metadata("sampler"), "epoch=1 consumed_samples=64");
  EXPECT_EQ(ckpt.files().size(), static_cast<std::size_t>(world));
  EXPECT_TRUE(torch::equal(ckpt.read("model/a"), a));
  EXPECT_TRUE(torch::equal(ckpt.read("model/b"), b));
  EXPECT_EQ(ckpt.read("model/scalar").item<std::int64_t>(), 42);
  EXPECT_EQ(ckpt.read("model/scalar").dim(), 0);
  EXPECT_TRUE(torch::equal(ckpt.read("model/bf"), bf));
  EXPECT_EQ(ckpt.read("model/empty").sizes(), empty.sizes());
  EXPECT_TRUE(torch::equal(ckpt.read("model/big"), big));
  EXPECT_TRUE(torch::equal(ckpt.read("opt/flat"), flat));
  // A region across two ranks' pieces.
  if (world > 1) {
    EXPECT_TRUE(torch::equal(ckpt.read("opt/flat", {7}, {6}), flat.narrow(0, 7, 6)));
  }
  const at::Tensor rows = ckpt.read("rng/x");
  ASSERT_EQ(rows.sizes(), (std::vector<std::int64_t>{world, 4}));
  for (int r = 0; r < world; ++r) EXPECT_EQ(rows[r][0].item<int>(), r);

  // Replicated tensors are stored once, and spread over the ranks.
  std::set<std::string> holders;
  for (const char* name : {"model/a", "model/b", "model/scalar", "model/bf", "model/big"}) {
    ASSERT_EQ(ckpt.info(name).pieces.size(), 1u) << name;
    holders.insert(ckpt.info(name).pieces[0].file);
  }
  if (world > 1) {
    EXPECT_GT(holders.size(), 1u);
  }
  EXPECT_EQ(ckpt.info("opt/flat").pieces.size(), static_cast<std::size_t>(world));
  EXPECT_THROW(ckpt.read("opt/missing"), CheckpointError);
  EXPECT_THROW(ckpt.read("opt/flat", {0}, {total + 1}), CheckpointError);

  // The files open in h5py as plain arrays with their global shape and offset.
  if (rank == 0 && fs::exists("/usr/bin/python3")) {
    const std::string file = (fs::path(entries[0].directory) / "rank-00000.h5").string();
    const std::string cmd =
        "/usr/bin/python3 -c \"import h5py,sys; f=h5py.File(sys.argv[1],'r'); "
        "d=f['opt/flat']; assert d.attrs['global_shape'][0]==" +
        std::to_string(total) + " and d.attrs['offset'][0]==0 and d.shape==(" +
        std::to_string(world == 1 ? 13 : 10) + ",), d.shape; assert d.fletcher32\" " + file;
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }
  comm->barrier()->wait();
}

TEST(CheckpointTest, AsyncSaveSnapshotsTheStateAndKeepsTheLastK) {
  auto comm = dtrain::testing::fresh_world("ckpt-async");
  const std::string dir = shared_dir(*comm, "async");
  CheckpointOptions options;
  options.directory = dir;
  options.keep_last = 2;
  options.async = true;
  CheckpointManager manager(options, comm);
  at::Tensor w = torch::zeros({256, 256});
  for (int step = 1; step <= 4; ++step) {
    w.fill_(static_cast<float>(step));
    StateDict state;
    state.add_replicated("model/w", w);
    const SaveStats stats = manager.save(step, state);
    // The stall is measured, and the wait for the previous save is part of it.
    EXPECT_GT(stats.stall_seconds, 0.0);
    EXPECT_LE(stats.wait_seconds, stats.stall_seconds);
    // One rank stages the replicated tensor: over the ranks, its bytes once.
    // (Over the test's world communicator: `comm` is busy with the save.)
    at::Tensor staged = at::full({1}, static_cast<std::int64_t>(stats.bytes), at::kLong);
    dtrain::testing::world().all_reduce(staged)->wait();
    EXPECT_EQ(staged.item<std::int64_t>(), 256 * 256 * 4) << "step " << step;
    w.fill_(-1.0f);  // changed while the save runs in the background
  }
  manager.wait();
  EXPECT_EQ(manager.last_write().step, 4);
  const auto entries = manager.list();
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].step, 3);
  EXPECT_EQ(entries[1].step, 4);
  const Checkpoint ckpt = Checkpoint::open(entries[1].directory);
  EXPECT_TRUE(torch::equal(ckpt.read("model/w"), torch::full({256, 256}, 4.0f)));
  comm->barrier()->wait();
}

// An async save() returns while its file is still being written: the
// fault hook holds the write at kAfterWrite until the caller, back from
// save(), lets it go. A save() that wrote on the caller's thread would sit
// in the hook until the hook gave up.
TEST(CheckpointTest, AsyncSaveReturnsBeforeItsFileIsWritten) {
  auto comm = dtrain::testing::fresh_world("ckpt-async-hold");
  const std::string dir = shared_dir(*comm, "async-hold");
  struct Gate {
    std::promise<void> release;
    std::shared_future<void> released = release.get_future().share();
    std::atomic<bool> gave_up{false};
  };
  auto gate = std::make_shared<Gate>();
  CheckpointOptions options = sync_options(dir);
  options.async = true;
  options.fault_hook = [gate](SavePhase phase, std::int64_t) {
    if (phase != SavePhase::kAfterWrite) return;
    if (gate->released.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
      gate->gave_up = true;
    }
  };
  CheckpointManager manager(options, comm);
  StateDict state;
  state.add_replicated("model/w", torch::full({64}, 1.0f));
  manager.save(1, state);
  gate->release.set_value();
  manager.wait();
  EXPECT_FALSE(gate->gave_up.load()) << "save() waited for its own write";
  EXPECT_EQ(manager.last_write().step, 1);
  comm->barrier()->wait();
}

// CheckpointOptions::fault_hook sees the phases of a save in order, and an
// exception from it at either phase fails that save on every rank, leaving
// the previous checkpoint the newest.
TEST(CheckpointTest, AFaultAtEitherPhaseFailsTheSaveEverywhereAndKeepsThePrevious) {
  auto comm = dtrain::testing::fresh_world("ckpt-fault-hook");
  const int rank = comm->rank();
  for (const SavePhase fail_at : {SavePhase::kAfterWrite, SavePhase::kBeforeRename}) {
    for (const bool async : {false, true}) {
      const std::string dir = shared_dir(*comm, "fault-hook");
      auto seen = std::make_shared<std::vector<std::pair<SavePhase, std::int64_t>>>();
      CheckpointOptions options = sync_options(dir);
      options.async = async;
      // kAfterWrite: the last rank fails (its peers' files are fine);
      // kBeforeRename happens on rank 0 only.
      const int failing_rank = fail_at == SavePhase::kAfterWrite ? comm->size() - 1 : 0;
      options.fault_hook = [seen, fail_at, failing_rank, rank](SavePhase phase, std::int64_t step) {
        seen->emplace_back(phase, step);
        if (step == 2 && phase == fail_at && rank == failing_rank) {
          throw std::runtime_error(std::string("injected fault at ") + to_string(phase));
        }
      };
      CheckpointManager manager(options, comm);
      StateDict state;
      state.add_replicated("model/w", torch::full({64}, 1.0f));
      manager.save(1, state);
      manager.wait();
      std::vector<std::pair<SavePhase, std::int64_t>> want = {{SavePhase::kAfterWrite, 1}};
      if (rank == 0) want.emplace_back(SavePhase::kBeforeRename, 1);
      EXPECT_EQ(*seen, want) << "async " << async;

      std::string message;
      try {
        manager.save(2, state);
        manager.wait();
        ADD_FAILURE() << "the save of step 2 succeeded despite the fault at " << to_string(fail_at);
      } catch (const CheckpointError& e) {
        message = e.what();
      }
      EXPECT_NE(message.find("step 2"), std::string::npos) << message;
      if (rank == failing_rank) {
        EXPECT_NE(message.find("injected fault at " + std::string(to_string(fail_at))),
                  std::string::npos)
            << message;
      }
      std::vector<std::int64_t> steps;
      for (const auto& e : manager.list()) steps.push_back(e.step);
      EXPECT_EQ(steps, (std::vector<std::int64_t>{1})) << to_string(fail_at) << " async " << async;
      const auto latest = manager.latest_valid();
      ASSERT_TRUE(latest.has_value());
      EXPECT_EQ(latest->step, 1);
      comm->barrier()->wait();
    }
  }
}

TEST(CheckpointTest, SavePhasesHaveNamesForTheEnvironment) {
  for (const SavePhase phase : {SavePhase::kAfterWrite, SavePhase::kBeforeRename}) {
    EXPECT_EQ(parse_save_phase(to_string(phase)), phase);
  }
  EXPECT_THROW(parse_save_phase("after_commit"), InvalidArgument);
}

TEST(CheckpointTest, PruningNeverDeletesTheCheckpointJustSaved) {
  auto comm = dtrain::testing::fresh_world("ckpt-prune");
  const std::string dir = shared_dir(*comm, "prune");
  CheckpointOptions options = sync_options(dir);
  options.keep_last = 2;
  CheckpointManager manager(options, comm);
  for (int step : {10, 20, 5}) {  // 5: a later run saving below an older run's steps
    StateDict state;
    state.add_replicated("model/w", torch::full({8}, static_cast<float>(step)));
    manager.save(step, state);
  }
  std::vector<std::int64_t> steps;
  for (const auto& e : manager.list()) steps.push_back(e.step);
  EXPECT_EQ(steps, (std::vector<std::int64_t>{5, 20}));
  comm->barrier()->wait();
}

TEST(CheckpointTest, CorruptOrPartialNewestCheckpointIsSkippedWithAWarning) {
  auto comm = dtrain::testing::fresh_world("ckpt-corrupt");
  const std::string dir = shared_dir(*comm, "corrupt");
  std::vector<std::string> warnings;
  CheckpointOptions options = sync_options(dir);
  options.on_warning = [&](const std::string& w) { warnings.push_back(w); };
  CheckpointManager manager(options, comm);
  const at::Tensor big = torch::randn({512, 1024});
  for (int step : {10, 20}) {
    StateDict state;
    state.add_replicated("model/big", big * step);
    manager.save(step, state);
  }
  const std::string bad_file =
      manager.list().back().directory + "/" +
      Checkpoint::open(manager.list().back().directory).info("model/big").pieces[0].file;
  if (comm->rank() == 0) {
    flip_bytes(bad_file, static_cast<std::int64_t>(fs::file_size(bad_file) / 2), 16);
    // A later step whose manifest is gone: a save renames to step-N only
    // after writing it, so only damage leaves this.
    fs::create_directories(dir + "/step-000000030");
    std::ofstream(dir + "/step-000000030/rank-00000.h5") << "partial";
  }
  comm->barrier()->wait();
  // Reading the flipped chunk fails its Fletcher32 check, naming the file.
  try {
    Checkpoint::open(manager.list().back().directory).read("model/big");
    ADD_FAILURE() << "a corrupt chunk was read without error";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(fs::path(bad_file).filename().string()), std::string::npos)
        << e.what();
  }
  const auto latest = manager.latest_valid();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->step, 10);
  auto warned = [&](const std::vector<std::string>& needles) {
    for (const std::string& w : warnings) {
      bool all = true;
      for (const std::string& n : needles) all = all && w.find(n) != std::string::npos;
      if (all) return true;
    }
    return false;
  };
  // The rank that digested the bad file warned, naming it.
  const std::string name = fs::path(bad_file).filename().string();  // rank-RRRRR.h5
  const int writer = std::stoi(name.substr(5, 5));
  if (comm->rank() == writer % comm->size()) {  // file i is digested by rank i % size
    EXPECT_TRUE(warned({"skipping checkpoint", name})) << ::testing::PrintToString(warnings);
  }
  // Rank 0 warned about the step without a manifest, naming its directory.
  EXPECT_EQ(warned({"skipping checkpoint", dir + "/step-000000030", "no manifest.json"}),
            comm->rank() == 0)
      << ::testing::PrintToString(warnings);
  EXPECT_EQ(list_damaged_checkpoints(dir).size(), 1u);
  comm->barrier()->wait();
}

TEST(CheckpointTest, AFailedWriteLeavesThePreviousCheckpointsUntouched) {
  auto comm = dtrain::testing::fresh_world("ckpt-diskfull");
  const int last = comm->size() - 1;
  const std::string dir = shared_dir(*comm, "diskfull");
  CheckpointManager manager(sync_options(dir), comm);
  StateDict first;
  first.add_shard("model/w", torch::ones({1000}), {1000 * comm->size()}, {1000 * comm->rank()});
  manager.save(1, first);

  // The last rank hits its file-size limit (EFBIG, like a full disk).
  rlimit old{};
  if (comm->rank() == last) {
    ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
    rlimit small = old;
    small.rlim_cur = 64 * 1024;
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
    ::signal(SIGXFSZ, SIG_IGN);
  }
  StateDict second;
  second.add_shard("model/w", torch::ones({1 << 20}), {(1 << 20) * comm->size()},
                   {(1 << 20) * comm->rank()});
  try {
    manager.save(2, second);
    ADD_FAILURE() << "a save with a failing rank succeeded";
  } catch (const CheckpointError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("rank " + std::to_string(last)), std::string::npos) << what;
    EXPECT_NE(what.find("previous checkpoints are untouched"), std::string::npos) << what;
  }
  if (comm->rank() == last) {
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
  }
  comm->barrier()->wait();
  const auto entries = manager.list();
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0].step, 1);
  Checkpoint::open(entries[0].directory).verify();
  EXPECT_FALSE(fs::exists(dir + "/.tmp-step-000000002"));
  comm->barrier()->wait();
}

TEST(CheckpointTest, UnwritableDirectoryIsAClearErrorOnEveryRank) {
  auto comm = dtrain::testing::fresh_world("ckpt-unwritable");
  const std::string dir = shared_dir(*comm, "unwritable");
  if (comm->rank() == 0) std::ofstream(dir + "/a-file") << "x";
  comm->barrier()->wait();
  try {
    CheckpointManager manager(sync_options(dir + "/a-file/checkpoints"), comm);
    ADD_FAILURE() << "a directory below a regular file was accepted";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("a-file/checkpoints"), std::string::npos) << e.what();
  }
  comm->barrier()->wait();
}

// The state every damage test saves: a big replicated tensor and a shard per
// rank, so every rank writes a file.
StateDict damage_test_state(const collectives::Communicator& comm, float scale) {
  StateDict state;
  state.add_replicated("model/big", torch::arange(300000, torch::kFloat) * scale);
  state.add_shard("opt/flat", torch::full({1000}, scale), {1000 * comm.size()},
                  {1000 * comm.rank()});
  return state;
}

// The damage every reader must notice in a file of the newest checkpoint,
// wherever it is: a flipped byte early in the file (HDF5's own metadata, which
// no chunk checksum covers), one late in it, a file one byte short, a file
// gone.
// verify() names the file and resume falls back to the checkpoint before.
TEST(CheckpointTest, EveryDamagedFileIsFoundByVerifyAndResume) {
  auto comm = dtrain::testing::fresh_world("ckpt-damage");
  const std::string dir = shared_dir(*comm, "damage");
  std::vector<std::string> warnings;
  CheckpointOptions options = sync_options(dir);
  options.on_warning = [&](const std::string& w) { warnings.push_back(w); };
  CheckpointManager manager(options, comm);
  manager.save(10, damage_test_state(*comm, 1.0f));
  for (const std::string damage : {"early-byte", "late-byte", "truncated", "deleted"}) {
    manager.save(20, damage_test_state(*comm, 2.0f));  // a good step 20 again
    const Checkpoint good = Checkpoint::open(manager.list().back().directory);
    ASSERT_EQ(good.step(), 20);
    good.verify();
    EXPECT_EQ(good.files().front().digest_algorithm, "xxh3_128");
    const std::string victim = good.directory() + "/" + good.files().back().file;
    comm->barrier()->wait();  // every rank has checked the good one
    if (comm->rank() == 0) {
      const auto size = static_cast<std::int64_t>(fs::file_size(victim));
      if (damage == "early-byte") flip_bytes(victim, 200, 1);  // HDF5's object headers
      if (damage == "late-byte") flip_bytes(victim, size - 2000, 1);
      if (damage == "truncated") fs::resize_file(victim, static_cast<std::uintmax_t>(size - 1));
      if (damage == "deleted") fs::remove(victim);
    }
    comm->barrier()->wait();
    try {
      Checkpoint::open(good.directory()).verify();
      ADD_FAILURE() << damage << ": verify() passed";
    } catch (const CheckpointError& e) {
      EXPECT_NE(std::string(e.what()).find(fs::path(victim).filename().string()), std::string::npos)
          << damage << ": " << e.what();
    }
    warnings.clear();
    const auto latest = manager.latest_valid();
    ASSERT_TRUE(latest.has_value()) << damage;
    EXPECT_EQ(latest->step, 10) << damage;
    comm->barrier()->wait();
  }
}

// Checkpoints of format version 1 (a SHA-256 of every file) are still
// verified and read; damage to them is still found.
TEST(CheckpointTest, AVersion1CheckpointIsStillVerifiedAndRead) {
  auto comm = dtrain::testing::fresh_world("ckpt-version1");
  const std::string dir = shared_dir(*comm, "version1");
  std::vector<std::string> warnings;
  CheckpointOptions options = sync_options(dir);
  options.on_warning = [&](const std::string& w) { warnings.push_back(w); };
  CheckpointManager manager(options, comm);
  manager.save(5, damage_test_state(*comm, 3.0f));
  const std::string step_dir = manager.list().back().directory;
  if (comm->rank() == 0) {  // rewrite the manifest as version 1 wrote it
    const std::string path = step_dir + "/manifest.json";
    nlohmann::json manifest = nlohmann::json::parse(std::ifstream(path));
    manifest["version"] = 1;
    for (auto& f : manifest["files"]) {
      f.erase("xxh3_128");
      f["sha256"] = data::sha256_file(step_dir + "/" + f["file"].get<std::string>());
    }
    std::ofstream(path, std::ios::trunc) << manifest.dump(1);
  }
  comm->barrier()->wait();
  const auto latest = manager.latest_valid();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->step, 5);
  const Checkpoint ckpt = Checkpoint::open(step_dir);
  EXPECT_EQ(ckpt.files().front().digest_algorithm, "sha256");
  ckpt.verify();
  EXPECT_TRUE(torch::equal(ckpt.read("model/big"), torch::arange(300000, torch::kFloat) * 3.0f));
  comm->barrier()->wait();
  if (comm->rank() == 0) flip_bytes(step_dir + "/" + ckpt.files().back().file, 200, 1);
  comm->barrier()->wait();
  try {
    ckpt.verify();
    ADD_FAILURE() << "a damaged version-1 checkpoint verified";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("sha256"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(manager.latest_valid().has_value());
  comm->barrier()->wait();
}

TEST(CheckpointTest, ModuleOptimizerAndRngRoundTrip) {
  auto comm = dtrain::testing::fresh_world("ckpt-module");
  const std::string dir = shared_dir(*comm, "module");
  CheckpointManager manager(sync_options(dir), comm);
  torch::manual_seed(11);
  auto model = torch::nn::Sequential(torch::nn::Linear(6, 8), torch::nn::BatchNorm1d(8),
                                     torch::nn::Linear(8, 3));
  torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(1e-2));
  for (int i = 0; i < 3; ++i) {
    adam.zero_grad();
    model->forward(torch::randn({4, 6})).sum().backward();
    adam.step();
  }
  StateDict state;
  add_module(state, *model);
  add_optimizer(state, adam, *model);
  add_rng_state(state, comm->rank(), comm->size());
  manager.save(3, state);
  const at::Tensor expected_draw = torch::rand({5});
  auto saved = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());

  // A fresh model and optimizer restored from the checkpoint continue identically.
  torch::manual_seed(99);
  auto restored = torch::nn::Sequential(torch::nn::Linear(6, 8), torch::nn::BatchNorm1d(8),
                                        torch::nn::Linear(8, 3));
  torch::optim::Adam restored_adam(restored->parameters(), torch::optim::AdamOptions(1e-2));
  const Checkpoint ckpt = Checkpoint::open(manager.list().back().directory);
  load_module(ckpt, *restored);
  load_optimizer(ckpt, restored_adam, *restored);
  load_rng_state(ckpt, comm->rank());
  EXPECT_TRUE(torch::equal(torch::rand({5}), expected_draw));
  torch::manual_seed(5);
  const at::Tensor x = torch::randn({4, 6});
  for (auto [net, opt] :
       {std::make_pair(model.ptr(), &adam), std::make_pair(restored.ptr(), &restored_adam)}) {
    opt->zero_grad();
    net->forward(x).sum().backward();
    opt->step();
  }
  for (const auto& item : model->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), restored->named_parameters()[item.key()])) << item.key();
  }
  for (const auto& item : model->named_buffers()) {
    EXPECT_TRUE(torch::equal(item.value(), restored->named_buffers()[item.key()])) << item.key();
  }
  // A different model is refused, naming the tensor.
  auto other = torch::nn::Sequential(torch::nn::Linear(6, 9));
  try {
    load_module(ckpt, *other);
    ADD_FAILURE() << "a checkpoint of another model was loaded";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("model/0.weight"), std::string::npos) << e.what();
  }
  comm->barrier()->wait();
}

// ZeRO-1 (AdamW) trained on `writers` ranks for 3 steps and saved, then
// resumed on `readers` ranks for 2 more steps with the same global batch,
// equals 5 steps of one process with the global batch.
void check_zero_reshard(int writers, int readers) {
  auto world = dtrain::testing::fresh_world("ckpt-zero-" + std::to_string(writers) + "-" +
                                            std::to_string(readers));
  const int rank = world->rank();
  const std::string dir = shared_dir(*world, "zero");
  const int global_batch = 12;
  torch::manual_seed(21);
  std::vector<std::pair<at::Tensor, at::Tensor>> batches;
  for (int i = 0; i < 5; ++i) {
    batches.emplace_back(torch::randn({global_batch, 10}), torch::randint(0, 4, {global_batch}));
  }
  auto make_model = [] {
    torch::manual_seed(8);
    return torch::nn::Sequential(torch::nn::Linear(10, 17), torch::nn::Tanh(),
                                 torch::nn::Linear(17, 4));
  };
  auto adamw = [](std::vector<torch::Tensor> params) {
    return std::make_unique<torch::optim::AdamW>(
        params, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  };
  auto train = [&](torch::nn::Sequential& net, parallel::ZeroRedundancyOptimizer& zero,
                   collectives::Communicator& comm, int from, int to) {
    const int b = global_batch / comm.size();
    for (int s = from; s < to; ++s) {
      zero.zero_grad();
      torch::nn::functional::cross_entropy(
          net->forward(batches[s].first.narrow(0, comm.rank() * b, b)),
          batches[s].second.narrow(0, comm.rank() * b, b))
          .backward();
      zero.step();
    }
  };
  auto writer_comm = world->split(rank < writers ? 0 : -1, rank);
  if (writer_comm) {
    auto net = make_model();
    parallel::ZeroRedundancyOptimizer zero(net.ptr(), writer_comm, adamw);
    train(net, zero, *writer_comm, 0, 3);
    CheckpointManager manager(sync_options(dir), writer_comm);
    StateDict state;
    add_module(state, *net);
    add_zero_optimizer(state, zero);
    manager.save(3, state);
  }
  world->barrier()->wait();
  auto reader_comm = world->split(rank < readers ? 0 : -1, rank);
  if (reader_comm) {
    auto net = make_model();
    parallel::ZeroRedundancyOptimizer zero(net.ptr(), reader_comm, adamw);
    CheckpointManager manager(sync_options(dir), reader_comm);
    const auto latest = manager.latest_valid();
    ASSERT_TRUE(latest.has_value());
    const Checkpoint ckpt = Checkpoint::open(latest->directory);
    EXPECT_EQ(ckpt.world_size(), writers);
    load_module(ckpt, *net);
    load_zero_optimizer(ckpt, zero);
    train(net, zero, *reader_comm, 3, 5);

    auto reference = make_model();
    torch::optim::AdamW ref_opt(reference->parameters(),
                                torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
    for (int s = 0; s < 5; ++s) {
      ref_opt.zero_grad();
      torch::nn::functional::cross_entropy(reference->forward(batches[s].first), batches[s].second)
          .backward();
      ref_opt.step();
    }
    for (const auto& item : net->named_parameters()) {
      const at::Tensor& x = item.value();
      const at::Tensor y = reference->named_parameters()[item.key()];
      EXPECT_TRUE(torch::allclose(x, y, 1e-5, 1e-6))
          << writers << " -> " << readers << " ranks, " << item.key() << ": max difference "
          << (x - y).abs().max().item<double>();
    }
  }
  world->barrier()->wait();
}

TEST(CheckpointTest, ZeroStateWrittenByNRanksResumesOnM) {
  const int world = runtime().size();
  for (int k = 1; k <= world; ++k) check_zero_reshard(k, world);
  for (int k = 1; k < world; ++k) check_zero_reshard(world, k);
}

}  // namespace
}  // namespace dtrain::checkpoint
