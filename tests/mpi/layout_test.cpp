// Checkpoints across layouts: a model whose weights are split over tp,
// owned by pipeline stages and replicated over dp, with ZeRO or plain Adam
// state, written by every dp x pp x tp layout of the world and read back by
// every other, bitwise; every piece written exactly once; RNG streams
// restored by grid coordinates across a change of dp size; checkpoints of
// format version 2 (flat ZeRO state, "rng/cpu") loaded into a data-parallel
// layout.

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/checkpoint/state.h"
#include "dtrain/error.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/placement.h"
#include "dtrain/parallel/rng.h"
#include "dtrain/parallel/zero_optimizer.h"
#include "src/common/torch_compat.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::checkpoint {
namespace {

namespace fs = std::filesystem;
using dtrain::testing::runtime;
using parallel::Axis;
using parallel::ModuleLayout;
using parallel::ParallelContext;
using parallel::Placement;

std::string shared_dir(collectives::Communicator& comm, const std::string& name) {
  return dtrain::testing::shared_temp_dir(comm, "dtrain-layout-" + name);
}

CheckpointOptions sync_options(const std::string& dir) {
  CheckpointOptions o;
  o.directory = dir;
  o.async = false;
  o.fsync = false;  // throwaway directories
  o.keep_last = 100;
  return o;
}

// --- the global model ---------------------------------------------------------
// Four layers; layer i has "layers.i.fc1.weight" [8, 4] (column-parallel:
// split along 0), "layers.i.fc2.weight" [4, 8] (row-parallel: split along 1),
// "layers.i.norm.bias" [4] (whole) and a buffer "layers.i.norm.stats" [6].
// Pipeline stage s of pp owns layers [s * 4 / pp, (s + 1) * 4 / pp).
constexpr int kLayers = 4;
constexpr int kSplitExtent = 8;  // the dimension each split weight is split along

struct GlobalTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  int split_dim;  // -1: whole
  int layer;
  bool buffer;
};

std::vector<GlobalTensor> global_tensors() {
  std::vector<GlobalTensor> out;
  for (int i = 0; i < kLayers; ++i) {
    const std::string l = "layers." + std::to_string(i) + ".";
    out.push_back({l + "fc1.weight", {8, 4}, 0, i, false});
    out.push_back({l + "fc2.weight", {4, 8}, 1, i, false});
    out.push_back({l + "norm.bias", {4}, -1, i, false});
    out.push_back({l + "norm.stats", {6}, -1, i, true});
  }
  return out;
}

// Distinct, exactly representable values for every element of every global
// tensor (`field` 0: the parameter, 1 and 2: Adam's moments).
at::Tensor global_value(const GlobalTensor& t, int index, int field) {
  std::int64_t numel = 1;
  for (std::int64_t d : t.shape) numel *= d;
  return (torch::arange(numel, torch::kFloat) + 1000.0f * index + 100000.0f * field)
      .reshape(t.shape);
}

at::Tensor region(const at::Tensor& global, const Placement& p) {
  at::Tensor r = global;
  for (std::size_t d = 0; d < p.offset.size(); ++d) {
    r = r.narrow(static_cast<std::int64_t>(d), p.offset[d], p.shape[d]);
  }
  return r;
}

// What one rank of a layout holds: its stage's tensors, tp blocks of the
// split ones, under local names ("t<index>") mapped to global names.
struct LocalModel : torch::nn::Module {
  std::vector<int> indices;  // into global_tensors()
  ModuleLayout layout;
};

std::shared_ptr<LocalModel> make_local(const ParallelContext& ctx) {
  auto model = std::make_shared<LocalModel>();
  const auto tensors = global_tensors();
  auto names = std::make_shared<std::map<std::string, std::string>>();
  for (int i = 0; i < static_cast<int>(tensors.size()); ++i) {
    const GlobalTensor& t = tensors[static_cast<std::size_t>(i)];
    const int stage = t.layer * ctx.pp_size() / kLayers;
    if (stage != ctx.pp_rank()) continue;
    const std::string local = "t" + std::to_string(i);
    Placement p = t.split_dim >= 0 ? Placement::split(t.shape, t.split_dim, ctx)
                                   : Placement::replicated(t.shape);
    p = p.on_stage(stage);
    const at::Tensor value = region(global_value(t, i, 0), p).clone();
    if (t.buffer) {
      model->register_buffer(local, value);
    } else {
      model->register_parameter(local, value);
    }
    (*names)[local] = t.name;
    model->layout.placements[local] = p;
    model->indices.push_back(i);
  }
  model->layout.global_name = [names](const std::string& local) { return names->at(local); };
  return model;
}

torch::optim::AdamOptions adam_options() { return torch::optim::AdamOptions(0.1); }

std::unique_ptr<torch::optim::Optimizer> make_adam(std::vector<torch::Tensor> params) {
  return std::make_unique<torch::optim::Adam>(std::move(params), adam_options());
}

// The expected Adam state of the local block of global tensor `index`.
at::Tensor expected_field(const LocalModel& model, const std::string& local, int index, int field) {
  return region(global_value(global_tensors()[static_cast<std::size_t>(index)], index, field),
                model.layout.placements.at(local));
}

std::unique_ptr<torch::optim::AdamParamState> adam_state(at::Tensor exp_avg,
                                                         at::Tensor exp_avg_sq) {
  auto s = std::make_unique<torch::optim::AdamParamState>();
  s->step(3);
  s->exp_avg(std::move(exp_avg));
  s->exp_avg_sq(std::move(exp_avg_sq));
  return s;
}

// The index in global_tensors() of local name "t<index>".
int local_index(const std::string& local) { return std::stoi(local.substr(1)); }

// Sets the optimizer state the layout holds: parameters already hold the
// global values; Adam's moments get theirs (ZeRO: the shard's range).
void set_state(const LocalModel& model, torch::optim::Optimizer& adam) {
  for (const auto& item : model.named_parameters()) {
    const int index = local_index(item.key());
    adam.state()[dtrain::detail::optimizer_state_key(item.value())] =
        adam_state(expected_field(model, item.key(), index, 1).clone(),
                   expected_field(model, item.key(), index, 2).clone());
  }
}

at::Tensor zero_expected(const parallel::ZeroRedundancyOptimizer& zero, const LocalModel& model,
                         int field) {
  std::vector<at::Tensor> flat;
  for (const auto& p : zero.flat_parameters()) {
    flat.push_back(expected_field(model, p.name, local_index(p.name), field).reshape({-1}));
  }
  const at::Tensor all = torch::cat(flat);
  at::Tensor shard = torch::zeros({zero.shard_numel()});
  const std::int64_t begin = std::min(zero.shard_offset(), all.numel());
  const std::int64_t length = std::min(zero.shard_numel(), all.numel() - begin);
  if (length > 0) shard.narrow(0, 0, length).copy_(all.narrow(0, begin, length));
  return shard;
}

void set_zero_state(const LocalModel& model, parallel::ZeroRedundancyOptimizer& zero) {
  zero.optimizer().state()[dtrain::detail::optimizer_state_key(zero.shard())] =
      adam_state(zero_expected(zero, model, 1), zero_expected(zero, model, 2));
}

// (tp, pp) of every layout of `world` ranks.
std::vector<std::pair<int, int>> layouts(int world) {
  std::vector<std::pair<int, int>> out;
  for (int tp = 1; tp <= world; ++tp) {
    for (int pp = 1; tp * pp <= world; ++pp) {
      // tp must divide the split dimensions (8); pp the layers.
      if (world % (tp * pp) == 0 && kSplitExtent % tp == 0 && kLayers % pp == 0)
        out.emplace_back(tp, pp);
    }
  }
  return out;
}

std::string layout_name(const ParallelContext& ctx) {
  return "dp" + std::to_string(ctx.dp_size()) + " x pp" + std::to_string(ctx.pp_size()) + " x tp" +
         std::to_string(ctx.tp_size());
}

// Every element of every stored tensor is in exactly one piece.
void expect_each_piece_written_once(const Checkpoint& ckpt, const std::string& what) {
  for (const std::string& name : ckpt.tensor_names()) {
    const TensorInfo& info = ckpt.info(name);
    std::int64_t global = 1, stored = 0;
    for (std::int64_t d : info.global_shape) global *= d;
    for (const PieceInfo& p : info.pieces) {
      std::int64_t n = 1;
      for (std::int64_t d : p.shape) n *= d;
      stored += n;
    }
    EXPECT_EQ(stored, global) << what << ": " << name;  // pieces never overlap (manifest check)
  }
}

// Loads what `ckpt` holds into the layout of `ctx` (ZeRO or plain Adam) and
// checks parameters, buffers and optimizer state bitwise.
void expect_loads(const Checkpoint& ckpt, const ParallelContext& ctx, bool zero_reader,
                  const std::string& what) {
  auto model = make_local(ctx);
  for (auto& item : model->named_parameters()) item.value().detach().zero_();
  for (auto& item : model->named_buffers()) item.value().zero_();
  std::unique_ptr<parallel::ZeroRedundancyOptimizer> zero;
  std::unique_ptr<torch::optim::Optimizer> adam;
  if (zero_reader) {
    zero = std::make_unique<parallel::ZeroRedundancyOptimizer>(model, ctx, make_adam);
  } else {
    adam = make_adam(model->parameters());
  }
  load_module(ckpt, *model, model->layout);
  if (zero) {
    load_zero_optimizer(ckpt, *zero, model->layout);
  } else {
    load_optimizer(ckpt, *adam, *model, model->layout);
  }
  const std::string where = what + " -> " + layout_name(ctx) + (zero ? " zero" : " adam");
  for (const auto& item : model->named_parameters()) {
    EXPECT_TRUE(
        torch::equal(item.value(), expected_field(*model, item.key(), local_index(item.key()), 0)))
        << where << ": " << model->layout.global(item.key());
  }
  for (const auto& item : model->named_buffers()) {
    EXPECT_TRUE(
        torch::equal(item.value(), expected_field(*model, item.key(), local_index(item.key()), 0)))
        << where << ": " << model->layout.global(item.key());
  }
  auto check_state = [&](torch::optim::Optimizer& opt, const at::Tensor& param,
                         const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const std::string& name) {
    auto it = opt.state().find(dtrain::detail::optimizer_state_key(param));
    ASSERT_NE(it, opt.state().end()) << where << ": no state for " << name;
    const auto& s = static_cast<const torch::optim::AdamParamState&>(*it->second);
    EXPECT_EQ(s.step(), 3) << where << ": " << name;
    EXPECT_TRUE(torch::equal(s.exp_avg(), exp_avg)) << where << ": exp_avg of " << name;
    EXPECT_TRUE(torch::equal(s.exp_avg_sq(), exp_avg_sq)) << where << ": exp_avg_sq of " << name;
  };
  if (zero) {
    // The reload made the shard the loaded parameters.
    EXPECT_TRUE(torch::equal(zero->shard().detach(), zero_expected(*zero, *model, 0))) << where;
    check_state(zero->optimizer(), zero->shard(), zero_expected(*zero, *model, 1),
                zero_expected(*zero, *model, 2), "the shard");
  } else {
    for (const auto& item : model->named_parameters()) {
      const int index = local_index(item.key());
      check_state(*adam, item.value(), expected_field(*model, item.key(), index, 1),
                  expected_field(*model, item.key(), index, 2), item.key());
    }
  }
}

// Every layout of the world writes (with ZeRO and with plain Adam); every
// layout reads each (with ZeRO and with plain Adam). On 4 ranks this covers
// dp2 x tp2 read at dp4 x tp1 and dp1 x tp4, and two pipeline stages read
// by one.
TEST(LayoutCheckpointTest, AnyLayoutReadsWhatAnyLayoutWrote) {
  auto world = dtrain::testing::fresh_world("layout-any");
  const std::string dir = shared_dir(*world, "any");
  std::vector<ParallelContext> contexts;
  for (const auto& [tp, pp] : layouts(world->size())) contexts.emplace_back(world, tp, pp);
  std::int64_t step = 0;
  for (const ParallelContext& writer : contexts) {
    for (bool zero_writer : {true, false}) {
      auto model = make_local(writer);
      StateDict state;
      add_module(state, *model, model->layout);
      std::unique_ptr<parallel::ZeroRedundancyOptimizer> zero;
      std::unique_ptr<torch::optim::Optimizer> adam;
      if (zero_writer) {
        zero = std::make_unique<parallel::ZeroRedundancyOptimizer>(model, writer, make_adam);
        set_zero_state(*model, *zero);
        add_zero_optimizer(state, *zero, model->layout);
      } else {
        adam = make_adam(model->parameters());
        set_state(*model, *adam);
        add_optimizer(state, *adam, *model, model->layout);
      }
      CheckpointManager manager(sync_options(dir), writer);
      manager.save(++step, state);
      const Checkpoint ckpt = Checkpoint::open(manager.list().back().directory);
      const std::string what = layout_name(writer) + (zero_writer ? " zero" : " adam");
      EXPECT_EQ(ckpt.grid().tp, writer.tp_size()) << what;
      EXPECT_EQ(ckpt.grid().pp, writer.pp_size()) << what;
      expect_each_piece_written_once(ckpt, what);
      // Names are global: the same set whatever the layout.
      EXPECT_TRUE(ckpt.contains("model/layers.3.fc2.weight")) << what;
      EXPECT_TRUE(ckpt.contains("optim/layers.0.fc1.weight/exp_avg")) << what;
      for (const ParallelContext& reader : contexts) {
        for (bool zero_reader : {true, false}) expect_loads(ckpt, reader, zero_reader, what);
      }
      world->barrier()->wait();
    }
  }
}

// A rank that holds a piece it was meant to share with no one (a tensor
// "split" over tp without an offset) is refused before anything is written.
TEST(LayoutCheckpointTest, CopiesAlongANonReplicatedAxisAreRefused) {
  auto world = dtrain::testing::fresh_world("layout-refuse");
  if (world->size() < 2) GTEST_SKIP() << "needs two ranks";
  const ParallelContext ctx(world, world->size(), 1);
  const std::string dir = shared_dir(*world, "refuse");
  CheckpointManager manager(sync_options(dir), ctx);
  StateDict state;
  Placement p = Placement::replicated({4});
  p.replicated_over = {Axis::kData};
  state.add("model/w", torch::zeros({4}), p);
  EXPECT_THROW(manager.save(1, state), InvalidArgument);
  EXPECT_TRUE(manager.list().empty());
  // The next save, with the right placement, works.
  StateDict fixed;
  fixed.add("model/w", torch::zeros({4}), Placement::replicated({4}));
  manager.save(2, fixed);
  EXPECT_EQ(manager.list().size(), 1u);
  world->barrier()->wait();
}

// --- RNG streams -----------------------------------------------------------------

std::vector<parallel::RngStream> all_streams() {
  return {parallel::RngStream::kRank, parallel::RngStream::kTensorShared,
          parallel::RngStream::kTensorDistinct};
}

at::Tensor draw(parallel::RngStreams& rng, parallel::RngStream stream) {
  auto scope = rng.fork(stream);
  return torch::rand({16}, torch::kDouble);
}

// The streams' next draws after a save, stored with it by coordinate, are
// what a job with more dp ranks draws after loading (coordinates beyond the
// writer's grid take dp mod its dp size).
TEST(LayoutCheckpointTest, RngStreamsRestoreBitwiseAcrossADpChange) {
  auto world = dtrain::testing::fresh_world("layout-rng");
  const int n = world->size();
  const int tp = n == 4 ? 2 : 1;
  const std::string dir = shared_dir(*world, "rng");
  auto writers = world->split(world->rank() < tp ? 0 : -1, world->rank());
  if (writers) {
    const ParallelContext ctx(writers, tp, 1);  // dp 1
    torch::manual_seed(5);                      // the rank stream: the caller's seed
    parallel::RngStreams rng(ctx, 77);
    for (auto s : all_streams()) draw(rng, s);  // advance every stream a little
    StateDict state;
    add_rng_streams(state, rng);
    // The next draws, stored by coordinate for the readers to compare.
    for (auto s : all_streams()) {
      const at::Tensor next = draw(rng, s);
      state.add(std::string("expected/") + parallel::rng_stream_name(s), next.reshape({1, 1, 16}),
                Placement::block({1, tp, 16}, {0, ctx.tp_rank(), 0}, {1, 1, 16}));
    }
    // tensor_shared is the same on the ranks of a tp group; tensor_distinct is not.
    at::Tensor shared = at::empty({tp, 16}, at::kDouble);
    at::Tensor distinct = at::empty({tp, 16}, at::kDouble);
    ctx.tp()->all_gather(shared, draw(rng, parallel::RngStream::kTensorShared))->wait();
    ctx.tp()->all_gather(distinct, draw(rng, parallel::RngStream::kTensorDistinct))->wait();
    for (int r = 1; r < tp; ++r) {
      EXPECT_TRUE(torch::equal(shared[r], shared[0]));
      EXPECT_FALSE(torch::equal(distinct[r], distinct[0]));
    }
    CheckpointManager manager(sync_options(dir), ctx);
    manager.save(1, state);
    const Checkpoint ckpt = Checkpoint::open(manager.list().back().directory);
    // The shared stream is written once per tp group.
    EXPECT_EQ(ckpt.info("rng/tensor_shared/cpu").pieces.size(), 1u);
    EXPECT_EQ(ckpt.info("rng/tensor_distinct/cpu").pieces.size(), static_cast<std::size_t>(tp));
  }
  world->barrier()->wait();

  const ParallelContext ctx(world, tp, 1);  // dp n / tp
  torch::manual_seed(999);                  // overwritten by the load
  parallel::RngStreams rng(ctx, 12345);     // a different seed: overwritten too
  CheckpointManager manager(sync_options(dir), ctx);
  const Checkpoint ckpt = Checkpoint::open(manager.latest_valid()->directory);
  load_rng_streams(ckpt, rng);
  for (auto s : all_streams()) {
    const at::Tensor expected = ckpt.read(std::string("expected/") + parallel::rng_stream_name(s),
                                          {0, ctx.tp_rank(), 0}, {1, 1, 16})
                                    .reshape({16});
    EXPECT_TRUE(torch::equal(draw(rng, s), expected))
        << parallel::rng_stream_name(s) << " at dp " << ctx.dp_rank() << " tp " << ctx.tp_rank();
  }
  world->barrier()->wait();
}

TEST(LayoutCheckpointTest, ForksSwapStreamsAndLeaveTheRankStreamAlone) {
  auto world = dtrain::testing::fresh_world("layout-fork");
  const ParallelContext ctx = ParallelContext::data_parallel(world);
  parallel::RngStreams rng(ctx, 3);
  torch::manual_seed(42);
  const at::Tensor first = torch::rand({4});
  torch::manual_seed(42);
  {
    auto a = rng.fork(parallel::RngStream::kTensorDistinct);
    torch::rand({100});
    auto b = rng.fork(parallel::RngStream::kTensorShared);  // nested: another stream
    torch::rand({100});
    EXPECT_THROW(static_cast<void>(rng.fork(parallel::RngStream::kTensorShared)), InvalidArgument);
  }
  EXPECT_TRUE(torch::equal(torch::rand({4}), first));  // the rank stream did not move
  // A stream continues where its last fork stopped.
  parallel::RngStreams fresh(ctx, 3);
  at::Tensor both;
  {
    auto f = fresh.fork(parallel::RngStream::kTensorDistinct);
    torch::rand({100});
    both = torch::rand({4});
  }
  at::Tensor after;
  {
    auto f = rng.fork(parallel::RngStream::kTensorDistinct);
    after = torch::rand({4});
  }
  EXPECT_TRUE(torch::equal(after, both));
}

// --- format version 2 -----------------------------------------------------------

// A checkpoint as format version 2 stored a ZeRO job: replicated "model/"
// tensors, flat "zero/<field>" shards of the unpadded length, "rng/cpu" rows
// by world rank. Written on the first k ranks, read by all.
TEST(LayoutCheckpointTest, AVersion2CheckpointLoadsIntoADataParallelLayout) {
  auto world = dtrain::testing::fresh_world("layout-v2");
  const std::string dir = shared_dir(*world, "v2");
  const int writers_count = std::max(1, world->size() / 2);
  auto make_model = [] {
    torch::manual_seed(8);
    return torch::nn::Sequential(torch::nn::Linear(10, 17), torch::nn::Linear(17, 4));
  };
  at::Tensor expected_avg;  // the flat exp_avg the writers stored, on every rank
  std::int64_t total = 0;
  {
    auto net = make_model();
    for (const auto& p : net->parameters()) total += p.numel();
    expected_avg = torch::arange(total, torch::kFloat) * 0.25f;
  }
  auto writers = world->split(world->rank() < writers_count ? 0 : -1, world->rank());
  if (writers) {
    auto net = make_model();
    const std::int64_t shard = (total + writers->size() - 1) / writers->size();
    const std::int64_t offset = writers->rank() * shard;
    const std::int64_t length = std::max<std::int64_t>(0, std::min(shard, total - offset));
    StateDict state;  // exactly the tensors version 2 wrote, with the shorthands it used
    for (const auto& item : net->named_parameters())
      state.add_replicated("model/" + item.key(), item.value().detach());
    state.add_replicated("zero/step", torch::scalar_tensor(3, torch::kLong));
    for (const char* field : {"exp_avg", "exp_avg_sq"}) {
      if (length > 0)
        state.add_shard(std::string("zero/") + field,
                        expected_avg.narrow(0, offset, length).clone(), {total}, {offset});
    }
    torch::manual_seed(100 + writers->rank());
    state.add_per_rank("rng/cpu", at::detail::getDefaultCPUGenerator().get_state(), writers->rank(),
                       writers->size());
    CheckpointManager manager(sync_options(dir), writers);
    manager.save(3, state);
    if (writers->rank() == 0) {  // the manifest as version 2 wrote it
      const std::string path = manager.list().back().directory + "/manifest.json";
      nlohmann::json m = nlohmann::json::parse(std::ifstream(path));
      m["version"] = 2;
      m.erase("grid");
      std::ofstream(path, std::ios::trunc) << m.dump(1);
    }
    writers->barrier()->wait();
  }
  world->barrier()->wait();
  torch::manual_seed(100 + world->rank() % writers_count);
  const at::Tensor expected_draw = torch::rand({8});

  const ParallelContext ctx = ParallelContext::data_parallel(world);
  auto net = make_model();
  for (auto& p : net->parameters()) p.detach().zero_();
  parallel::ZeroRedundancyOptimizer zero(net.ptr(), ctx, make_adam);
  CheckpointManager manager(sync_options(dir), ctx);
  const Checkpoint ckpt = Checkpoint::open(manager.latest_valid()->directory);
  EXPECT_EQ(ckpt.grid().dp, writers_count);
  load_module(ckpt, *net);
  load_zero_optimizer(ckpt, zero);
  load_rng_state(ckpt, world->rank());
  EXPECT_TRUE(torch::equal(torch::rand({8}), expected_draw));
  auto reference = make_model();
  for (const auto& item : net->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), reference->named_parameters()[item.key()]))
        << item.key();
  }
  auto it = zero.optimizer().state().find(dtrain::detail::optimizer_state_key(zero.shard()));
  ASSERT_NE(it, zero.optimizer().state().end());
  const auto& s = static_cast<const torch::optim::AdamParamState&>(*it->second);
  EXPECT_EQ(s.step(), 3);
  const std::int64_t begin = std::min(zero.shard_offset(), total);
  const std::int64_t length = std::min(zero.shard_numel(), total - begin);
  EXPECT_TRUE(
      torch::equal(s.exp_avg().narrow(0, 0, length), expected_avg.narrow(0, begin, length)));
  world->barrier()->wait();
}

}  // namespace
}  // namespace dtrain::checkpoint
