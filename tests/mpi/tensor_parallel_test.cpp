// Tensor-parallel regions, layers, cross-entropy and dropout at tp 2 and 4
// against their dense equivalents: outputs, input gradients and weight
// gradients within 1e-12 relative in float64 and within PyTorch's default
// float32 tolerances (torch.testing) in float32; initialization bitwise
// equal to tp = 1; and the exact collectives each one issues, forward and
// backward, with and without sequence parallelism (CountingCommunicator).

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/checkpoint/checkpoint.h"
#include "dtrain/checkpoint/state.h"
#include "dtrain/collectives/counting_communicator.h"
#include "dtrain/error.h"
#include "dtrain/parallel/parallel_context.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "dtrain/parallel/tensor_regions.h"
#include "tests/mpi/mpi_test_env.h"

namespace dtrain::parallel {
namespace {

using collectives::CountingCommunicator;
using collectives::OpKind;
using Kinds = std::vector<OpKind>;

constexpr OpKind kAR = OpKind::kAllReduce;
constexpr OpKind kAG = OpKind::kAllGather;
constexpr OpKind kRS = OpKind::kReduceScatter;

// Sequence, batch: activations are [kSeq, kBatch, features].
constexpr std::int64_t kSeq = 8;
constexpr std::int64_t kBatch = 3;

// The tp sizes this world runs: 2 and 4 where they divide it.
std::vector<int> tp_sizes(int world) {
  std::vector<int> out;
  for (int tp : {2, 4}) {
    if (tp <= world && world % tp == 0) out.push_back(tp);
  }
  return out;
}

at::Tensor randn(std::vector<std::int64_t> shape, at::ScalarType dtype, std::uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

at::Tensor leaf(const at::Tensor& t) { return t.detach().clone().requires_grad_(true); }

std::string names(const Kinds& kinds) {
  std::ostringstream os;
  os << "{";
  for (std::size_t i = 0; i < kinds.size(); ++i) {
    os << (i ? ", " : "") << collectives::to_string(kinds[i]);
  }
  os << "}";
  return os.str();
}

Kinds kinds_of(const CountingCommunicator& comm) {
  Kinds out;
  for (const auto& r : comm.records()) out.push_back(r.kind);
  return out;
}

// Issued exactly `expected`, in that order; then forgets them.
void expect_ops(CountingCommunicator& comm, const Kinds& expected, const std::string& what) {
  EXPECT_EQ(names(kinds_of(comm)), names(expected)) << what;
  comm.reset();
}

// float64: max |actual - expected| <= 1e-12 max |expected|. float32: the
// default float32 tolerances of PyTorch's torch.testing.assert_close (rtol
// 1.3e-6, atol 1e-5). at::allclose's own defaults (rtol 1e-5, atol 1e-8)
// fail on elements that cancel to near zero: a sum of 16 products of order 1
// differs by ~1e-6 between summation orders, whatever its value.
void expect_close(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  ASSERT_TRUE(actual.defined()) << what;
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type()) << what;
  const double err = (actual - expected).abs().max().item<double>();
  if (expected.scalar_type() == at::kDouble) {
    const double scale = expected.abs().max().item<double>();
    EXPECT_LE(err, 1e-12 * scale) << what << ": max abs error " << err << " of max " << scale;
  } else {
    EXPECT_TRUE(at::allclose(actual, expected, 1.3e-6, 1e-5)) << what << ": max abs error " << err;
  }
}

std::string label(const char* what, int tp, at::ScalarType dtype, bool a, bool b) {
  std::ostringstream os;
  os << what << " tp " << tp << " " << c10::toString(dtype) << " (" << a << ", " << b << ")";
  return os.str();
}

// A world of its own, its tp-grid contexts, and a 1-rank communicator for
// the tp = 1 (dense) layers.
struct Fixture {
  explicit Fixture(const std::string& name) : world(dtrain::testing::fresh_world(name)) {
    solo = world->split(world->rank(), 0);
  }
  std::shared_ptr<collectives::Communicator> world;
  std::shared_ptr<collectives::Communicator> solo;
};

// The bytes each op sends from this rank, by the bus-bytes convention, on
// k real ranks; and the tree's totals over a split.
TEST(CountingCommunicatorTest, SentBytesFollowTheRingShares) {
  auto& world = testing::world();
  const std::int64_t k = world.size();
  CountingCommunicator comm(world.split(0, world.rank(), {"counting", std::nullopt}),
                            /*keep_records=*/false);
  comm.all_reduce(at::ones({6}))->wait();                          // 24 bytes
  comm.all_gather(at::empty({4 * k}), at::ones({4}))->wait();      // 16 k bytes
  comm.reduce_scatter(at::empty({4}), at::ones({4 * k}))->wait();  // 16 k bytes
  comm.broadcast(at::ones({2}, at::kDouble))->wait();              // 16 bytes
  const int next = static_cast<int>((world.rank() + 1) % k);
  const int previous = static_cast<int>((world.rank() + k - 1) % k);
  comm.batch_send_recv({collectives::P2POp::send(at::ones({3}), next),
                        collectives::P2POp::recv(at::empty({3}), previous)})
      ->wait();  // 12 + 12 bytes
  EXPECT_EQ(comm.tally(OpKind::kAllReduce).sent_bytes, 2 * (24 * (k - 1) / k));
  EXPECT_EQ(comm.tally(OpKind::kAllGather).sent_bytes, 16 * (k - 1));
  EXPECT_EQ(comm.tally(OpKind::kReduceScatter).sent_bytes, 16 * (k - 1));
  EXPECT_EQ(comm.tally(OpKind::kBroadcast).sent_bytes, k > 1 ? 16 : 0);
  EXPECT_EQ(comm.tally(OpKind::kBatchSendRecv).bytes, 24);
  EXPECT_EQ(comm.tally(OpKind::kBatchSendRecv).sent_bytes, 12);
  auto half = comm.split(world.rank() % 2, world.rank());
  half->all_reduce(at::ones({1}, at::kDouble))->wait();
  const std::int64_t half_size = half->size();
  EXPECT_EQ(comm.tree_data_ops().calls, 6);
  EXPECT_EQ(comm.tree_data_ops().sent_bytes,
            comm.data_ops().sent_bytes + 2 * (8 * (half_size - 1) / half_size));
}

TEST(TensorParallelTest, RegionsIssueTheirCollectivesAndInvertEachOther) {
  Fixture f("tp-regions");
  for (int tp : tp_sizes(f.world->size())) {
    ParallelContext ctx(f.world, tp);
    CountingCommunicator comm(ctx.tp());
    const int r = ctx.tp_rank();
    const at::Tensor x = randn({kSeq, kBatch, 4 * tp}, at::kDouble, 1);
    const std::string at_tp = " at tp " + std::to_string(tp);

    struct Case {
      const char* name;
      std::function<at::Tensor(const at::Tensor&)> fn;
      at::Tensor input;     // this rank's input
      at::Tensor expected;  // the forward's result
      Kinds forward, backward;
    };
    const at::Tensor last_slice = x.chunk(tp, -1)[r];
    const at::Tensor seq_slice = x.chunk(tp, 0)[r];
    const std::vector<Case> cases = {
        {"copy_to_tp_region",
         [&](const at::Tensor& t) { return copy_to_tp_region(t, comm); },
         x,
         x,
         {},
         {kAR}},
        {"reduce_from_tp_region",
         [&](const at::Tensor& t) { return reduce_from_tp_region(t, comm); },
         x,
         x * tp,
         {kAR},
         {}},
        {"scatter_to_tp_region",
         [&](const at::Tensor& t) { return scatter_to_tp_region(t, comm); },
         x,
         last_slice,
         {},
         {kAG}},
        {"gather_from_tp_region",
         [&](const at::Tensor& t) { return gather_from_tp_region(t, comm); },
         last_slice,
         x,
         {kAG},
         {}},
        {"gather_from_sequence_region",
         [&](const at::Tensor& t) { return gather_from_sequence_region(t, comm); },
         seq_slice,
         x,
         {kAG},
         {kRS}},
        {"reduce_scatter_to_sequence_region",
         [&](const at::Tensor& t) { return reduce_scatter_to_sequence_region(t, comm); },
         x,
         seq_slice * tp,
         {kRS},
         {kAG}},
        {"scatter_to_sequence_region",
         [&](const at::Tensor& t) { return scatter_to_sequence_region(t, comm); },
         x,
         seq_slice,
         {},
         {kAG}},
    };
    for (const Case& c : cases) {
      const at::Tensor in = leaf(c.input);
      comm.reset();
      const at::Tensor out = c.fn(in);
      expect_ops(comm, c.forward, std::string(c.name) + " forward" + at_tp);
      EXPECT_TRUE(out.equal(c.expected)) << c.name << at_tp;
      // The backward of each is the conjugate: with the gradient 1 + the
      // output, the input's gradient is what the conjugate function makes.
      const at::Tensor g = at::ones_like(out) + out.detach();
      out.backward(g);
      expect_ops(comm, c.backward, std::string(c.name) + " backward" + at_tp);
      at::Tensor expected_grad;
      const std::string n = c.name;
      if (n == "copy_to_tp_region") expected_grad = g * tp;
      if (n == "reduce_from_tp_region") expected_grad = g;
      if (n == "scatter_to_tp_region") expected_grad = at::ones_like(x) + x;
      if (n == "gather_from_tp_region") expected_grad = g.chunk(tp, -1)[r];
      if (n == "gather_from_sequence_region") expected_grad = g.chunk(tp, 0)[r] * tp;
      if (n == "reduce_scatter_to_sequence_region") {
        // Every rank's gradient is 1 + tp * its shard: gathered, 1 + tp * x.
        expected_grad = at::ones_like(x) + x * tp;
      }
      if (n == "scatter_to_sequence_region") expected_grad = at::ones_like(x) + x;
      expect_close(in.grad(), expected_grad, n + " gradient" + at_tp);
    }
  }
}

TEST(TensorParallelTest, ColumnParallelLinearMatchesDense) {
  Fixture f("tp-column");
  for (int tp : tp_sizes(f.world->size())) {
    ParallelContext ctx(f.world, tp);
    auto comm = std::make_shared<CountingCommunicator>(ctx.tp());
    const int r = ctx.tp_rank();
    for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      for (bool gather : {false, true}) {
        for (bool sp : {false, true}) {
          const std::string what = label("column", tp, dtype, gather, sp);
          ColumnParallelLinearOptions o;
          o.in_features = 8;
          o.out_features = 12;
          o.init_seed = 7;
          o.gather_output = gather;
          o.sequence_parallel = sp;
          ColumnParallelLinear layer(o, comm);
          ColumnParallelLinear dense(o, f.solo);
          const std::int64_t rows = o.out_features / tp;
          // Initialization: this rank's slice of the tp = 1 weight, bitwise.
          EXPECT_TRUE(layer->weight.equal(dense->weight.narrow(0, r * rows, rows))) << what;
          EXPECT_TRUE(layer->bias.equal(dense->bias.narrow(0, r * rows, rows))) << what;
          layer->to(dtype);
          const at::Tensor w = leaf(dense->weight.to(dtype));
          const at::Tensor b = leaf(dense->bias.to(dtype));

          const at::Tensor x_full = randn({kSeq, kBatch, o.in_features}, dtype, 11);
          const at::Tensor g_full = randn({kSeq, kBatch, o.out_features}, dtype, 12);
          const at::Tensor xd = leaf(x_full);
          const at::Tensor yd = at::linear(xd, w, b);
          (yd * g_full).sum().backward();

          const at::Tensor x = leaf(sp ? x_full.chunk(tp, 0)[r] : x_full);
          comm->reset();
          const at::Tensor y = layer->forward(x);
          Kinds forward;
          if (sp) forward.push_back(kAG);
          if (gather) forward.push_back(kAG);
          expect_ops(*comm, forward, what + " forward");
          expect_close(y, gather ? yd.detach() : yd.detach().narrow(-1, r * rows, rows),
                       what + " output");
          (y * (gather ? g_full : g_full.narrow(-1, r * rows, rows))).sum().backward();
          expect_ops(*comm, {sp ? kRS : kAR}, what + " backward");
          expect_close(x.grad(), sp ? xd.grad().chunk(tp, 0)[r] : xd.grad(), what + " dx");
          expect_close(layer->weight.grad(), w.grad().narrow(0, r * rows, rows), what + " dw");
          expect_close(layer->bias.grad(), b.grad().narrow(0, r * rows, rows), what + " db");
        }
      }
    }
  }
}

TEST(TensorParallelTest, RowParallelLinearMatchesDense) {
  Fixture f("tp-row");
  for (int tp : tp_sizes(f.world->size())) {
    ParallelContext ctx(f.world, tp);
    auto comm = std::make_shared<CountingCommunicator>(ctx.tp());
    const int r = ctx.tp_rank();
    for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      for (bool split_input : {true, false}) {
        for (bool sp : {false, true}) {
          const std::string what = label("row", tp, dtype, split_input, sp);
          RowParallelLinearOptions o;
          o.in_features = 12;
          o.out_features = 8;
          o.init_seed = 9;
          o.input_is_parallel = split_input;
          o.sequence_parallel = sp;
          RowParallelLinear layer(o, comm);
          RowParallelLinear dense(o, f.solo);
          const std::int64_t cols = o.in_features / tp;
          EXPECT_TRUE(layer->weight.equal(dense->weight.narrow(1, r * cols, cols))) << what;
          EXPECT_TRUE(layer->bias.equal(dense->bias)) << what;
          layer->to(dtype);
          const at::Tensor w = leaf(dense->weight.to(dtype));
          const at::Tensor b = leaf(dense->bias.to(dtype));

          const at::Tensor x_full = randn({kSeq, kBatch, o.in_features}, dtype, 21);
          const at::Tensor g_full = randn({kSeq, kBatch, o.out_features}, dtype, 22);
          const at::Tensor xd = leaf(x_full);
          const at::Tensor yd = at::linear(xd, w, b);
          (yd * g_full).sum().backward();

          const at::Tensor x = leaf(split_input ? x_full.narrow(-1, r * cols, cols) : x_full);
          comm->reset();
          const at::Tensor y = layer->forward(x);
          expect_ops(*comm, {sp ? kRS : kAR}, what + " forward");
          expect_close(y, sp ? yd.detach().chunk(tp, 0)[r] : yd.detach(), what + " output");
          (y * (sp ? g_full.chunk(tp, 0)[r] : g_full)).sum().backward();
          // Backward: the bias's gradient summed (sequence parallel only),
          // then the conjugate of the reduce-scatter, then of the slicing.
          Kinds backward;
          if (sp) backward = {kAR, kAG};
          if (!split_input) backward.push_back(kAG);
          expect_ops(*comm, backward, what + " backward");
          expect_close(x.grad(), split_input ? xd.grad().narrow(-1, r * cols, cols) : xd.grad(),
                       what + " dx");
          expect_close(layer->weight.grad(), w.grad().narrow(1, r * cols, cols), what + " dw");
          expect_close(layer->bias.grad(), b.grad(), what + " db");
        }
      }
    }
  }
}

TEST(TensorParallelTest, VocabParallelEmbeddingMatchesDenseIncludingAPaddedVocabulary) {
  Fixture f("tp-embedding");
  for (int tp : tp_sizes(f.world->size())) {
    ParallelContext ctx(f.world, tp);
    auto comm = std::make_shared<CountingCommunicator>(ctx.tp());
    const int r = ctx.tp_rank();
    for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      for (std::int64_t vocab : {16, 11}) {  // 11: no tp divides it
        for (bool sp : {false, true}) {
          const std::string what = label("embedding", tp, dtype, vocab == 11, sp);
          VocabParallelEmbeddingOptions o;
          o.num_embeddings = vocab;
          o.embedding_dim = 6;
          o.init_seed = 5;
          o.sequence_parallel = sp;
          VocabParallelEmbedding layer(o, comm);
          VocabParallelEmbedding dense(o, f.solo);
          const VocabRange range = layer->range();
          EXPECT_TRUE(layer->weight.equal(dense->weight.narrow(0, range.start, range.size)))
              << what;
          layer->to(dtype);
          const at::Tensor w = leaf(dense->weight.to(dtype));

          at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(31);
          const at::Tensor ids = at::randint(vocab, {kSeq, kBatch}, gen, at::kLong);
          const at::Tensor g_full = randn({kSeq, kBatch, o.embedding_dim}, dtype, 32);
          const at::Tensor yd = at::embedding(w, ids);
          (yd * g_full).sum().backward();

          comm->reset();
          const at::Tensor y = layer->forward(ids);
          expect_ops(*comm, {sp ? kRS : kAR}, what + " forward");
          expect_close(y, sp ? yd.detach().chunk(tp, 0)[r] : yd.detach(), what + " output");
          (y * (sp ? g_full.chunk(tp, 0)[r] : g_full)).sum().backward();
          expect_ops(*comm, sp ? Kinds{kAG} : Kinds{}, what + " backward");
          expect_close(layer->weight.grad(), w.grad().narrow(0, range.start, range.size),
                       what + " dw");

          // The tied output layer: this rank's columns of h E^T.
          layer->zero_grad();
          w.mutable_grad() = at::Tensor();
          const at::Tensor h_full = randn({kSeq, kBatch, o.embedding_dim}, dtype, 33);
          const at::Tensor gl_full = randn({kSeq, kBatch, vocab}, dtype, 34);
          const at::Tensor hd = leaf(h_full);
          const at::Tensor ld = at::linear(hd, w);
          (ld * gl_full).sum().backward();
          const at::Tensor h = leaf(sp ? h_full.chunk(tp, 0)[r] : h_full);
          const at::Tensor local = layer->logits(h);
          expect_ops(*comm, sp ? Kinds{kAG} : Kinds{}, what + " logits forward");
          expect_close(local, ld.detach().narrow(-1, range.start, range.size), what + " logits");
          (local * gl_full.narrow(-1, range.start, range.size)).sum().backward();
          expect_ops(*comm, {sp ? kRS : kAR}, what + " logits backward");
          expect_close(h.grad(), sp ? hd.grad().chunk(tp, 0)[r] : hd.grad(), what + " logits dh");
          expect_close(layer->weight.grad(), w.grad().narrow(0, range.start, range.size),
                       what + " logits dw");
          if (!sp) {
            const at::Tensor all = layer->gather_logits(local.detach());
            expect_ops(*comm, {kAG}, what + " gather_logits");
            expect_close(all, ld.detach(), what + " gathered logits");
          }
        }
      }
    }
  }
}

TEST(TensorParallelTest, VocabParallelCrossEntropyMatchesDenseIncludingPaddedColumns) {
  Fixture f("tp-cross-entropy");
  for (int tp : tp_sizes(f.world->size())) {
    ParallelContext ctx(f.world, tp);
    CountingCommunicator comm(ctx.tp());
    for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      for (std::int64_t vocab : {16, 11}) {
        for (bool padded : {false, true}) {
          const std::string what = label("cross-entropy", tp, dtype, vocab == 11, padded);
          const std::int64_t n = 10;
          const VocabRange range = vocab_range(vocab, ctx.tp_rank(), tp);
          const at::Tensor logits = randn({n, vocab}, dtype, 41) * 3;
          at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(42);
          const at::Tensor target = at::randint(vocab, {n}, gen, at::kLong);
          const at::Tensor weights = randn({n}, dtype, 43);
          const at::Tensor ld = leaf(logits);
          const at::Tensor expected =
              -at::log_softmax(ld, -1).gather(1, target.unsqueeze(1)).squeeze(1);
          (expected * weights).sum().backward();

          at::Tensor local = logits.narrow(1, range.start, range.size);
          if (padded && range.padded > range.size) {
            // Padding columns hold large values: they must not count.
            local = at::cat(
                {local, at::full({n, range.padded - range.size}, 50.0, local.options())}, 1);
          }
          local = leaf(local);
          comm.reset();
          const at::Tensor loss = vocab_parallel_cross_entropy(local, target, vocab, comm);
          const auto records = comm.records();
          expect_ops(comm, {kAR, kAR}, what + " forward");
          ASSERT_EQ(records.size(), 2u);
          const std::int64_t elt = at::elementSize(dtype);
          EXPECT_EQ(records[0].bytes, n * elt) << what;
          EXPECT_EQ(records[1].bytes, 2 * n * elt) << what;
          expect_close(loss, expected.detach(), what + " loss");
          (loss * weights).sum().backward();
          expect_ops(comm, {}, what + " backward");
          expect_close(local.grad().narrow(1, 0, range.size),
                       ld.grad().narrow(1, range.start, range.size), what + " grad");
          if (local.size(1) > range.size) {
            EXPECT_TRUE(local.grad()
                            .narrow(1, range.size, local.size(1) - range.size)
                            .eq(0)
                            .all()
                            .item<bool>())
                << what << ": padded columns got a gradient";
          }
        }
      }
    }
  }
}

// LayerNorm -> column -> GELU -> row with sequence parallelism against the
// same block without it: the same output (sharded) and gradients, and the
// same bytes communicated, in all-gathers and reduce-scatters instead of
// all-reduces.
TEST(TensorParallelTest, SequenceParallelBlockMatchesTheBlockWithoutIt) {
  Fixture f("tp-sp-block");
  for (int tp : tp_sizes(f.world->size())) {
    ParallelContext ctx(f.world, tp);
    const int r = ctx.tp_rank();
    const std::int64_t hidden = 8;
    struct Block {
      SequenceParallelLayerNorm norm{nullptr};
      ColumnParallelLinear fc1{nullptr};
      RowParallelLinear fc2{nullptr};
      std::shared_ptr<CountingCommunicator> comm;
    };
    auto make = [&](bool sp) {
      Block b;
      b.comm = std::make_shared<CountingCommunicator>(ctx.tp());
      SequenceParallelLayerNormOptions n;
      n.normalized_size = hidden;
      n.sequence_parallel = sp;
      b.norm = SequenceParallelLayerNorm(n, b.comm);
      ColumnParallelLinearOptions c;
      c.in_features = hidden;
      c.out_features = 4 * hidden;
      c.init_seed = 1;
      c.sequence_parallel = sp;
      b.fc1 = ColumnParallelLinear(c, b.comm);
      RowParallelLinearOptions w;
      w.in_features = 4 * hidden;
      w.out_features = hidden;
      w.init_seed = 2;
      w.sequence_parallel = sp;
      b.fc2 = RowParallelLinear(w, b.comm);
      for (auto& p : {b.norm->weight, b.norm->bias}) {
        torch::NoGradGuard no_grad;
        p.add_(randn({hidden}, at::kFloat, 3) * 0.1);  // not the trivial 1 and 0
      }
      for (torch::nn::Module* m :
           std::vector<torch::nn::Module*>{b.norm.get(), b.fc1.get(), b.fc2.get()}) {
        m->to(at::kDouble);
      }
      return b;
    };
    Block plain = make(false);
    Block sp = make(true);
    auto run = [&](Block& b, const at::Tensor& x) {
      return b.fc2->forward(at::gelu(b.fc1->forward(b.norm->forward(x))));
    };
    const at::Tensor x_full = randn({kSeq, kBatch, hidden}, at::kDouble, 51);
    const at::Tensor g_full = randn({kSeq, kBatch, hidden}, at::kDouble, 52);

    const at::Tensor xp = leaf(x_full);
    const at::Tensor yp = run(plain, xp);
    expect_ops(*plain.comm, {kAR}, "plain block forward");
    (yp * g_full).sum().backward();
    expect_ops(*plain.comm, {kAR}, "plain block backward");

    const at::Tensor xs = leaf(x_full.chunk(tp, 0)[r]);
    const at::Tensor ys = run(sp, xs);
    const auto fwd = sp.comm->records();
    expect_ops(*sp.comm, {kAG, kRS}, "sequence-parallel block forward");
    (ys * g_full.chunk(tp, 0)[r]).sum().backward();
    const auto bwd = sp.comm->records();
    // fc2's bias, fc2's reduce-scatter, fc1's all-gather, the LayerNorm.
    expect_ops(*sp.comm, {kAR, kAG, kRS, kAR}, "sequence-parallel block backward");
    const std::int64_t activation_bytes = kSeq * kBatch * hidden * 8;
    ASSERT_EQ(fwd.size(), 2u);
    ASSERT_EQ(bwd.size(), 4u);
    EXPECT_EQ(fwd[0].bytes, activation_bytes);
    EXPECT_EQ(fwd[1].bytes, activation_bytes);
    EXPECT_EQ(bwd[0].bytes, hidden * 8);
    EXPECT_EQ(bwd[1].bytes, activation_bytes);
    EXPECT_EQ(bwd[2].bytes, activation_bytes);
    EXPECT_EQ(bwd[3].bytes, 2 * hidden * 8);

    const std::string at_tp = " at tp " + std::to_string(tp);
    expect_close(ys, yp.detach().chunk(tp, 0)[r], "output" + at_tp);
    expect_close(xs.grad(), xp.grad().chunk(tp, 0)[r], "dx" + at_tp);
    expect_close(sp.norm->weight.grad(), plain.norm->weight.grad(), "norm dw" + at_tp);
    expect_close(sp.norm->bias.grad(), plain.norm->bias.grad(), "norm db" + at_tp);
    expect_close(sp.fc1->weight.grad(), plain.fc1->weight.grad(), "fc1 dw" + at_tp);
    expect_close(sp.fc2->weight.grad(), plain.fc2->weight.grad(), "fc2 dw" + at_tp);
    expect_close(sp.fc2->bias.grad(), plain.fc2->bias.grad(), "fc2 db" + at_tp);
  }
}

TEST(TensorParallelTest, DropoutMasksAreTheTp1MaskSliced) {
  Fixture f("tp-dropout");
  for (int tp : tp_sizes(f.world->size())) {
    ParallelContext ctx(f.world, tp);
    const int r = ctx.tp_rank();
    RngStreams rng(ctx, /*seed=*/77);
    const at::Tensor x = randn({kSeq, kBatch, 4 * tp}, at::kDouble, 61);
    for (std::int64_t dim : {0, 2}) {
      const at::Tensor before = rng.state(RngStream::kTensorShared);
      const at::Tensor whole = tensor_parallel_dropout(x, 0.3, true, rng);
      const at::Tensor after = rng.state(RngStream::kTensorShared);
      rng.set_state(RngStream::kTensorShared, before);
      const at::Tensor part = x.chunk(tp, dim)[r];
      const at::Tensor split =
          tensor_parallel_dropout(part, 0.3, true, rng, TensorSplit::over(*ctx.tp(), dim));
      EXPECT_TRUE(split.equal(whole.chunk(tp, dim)[r])) << "dim " << dim << " tp " << tp;
      // Both drew the same numbers: the stream is where the whole mask left it.
      EXPECT_TRUE(rng.state(RngStream::kTensorShared).equal(after));
      EXPECT_FALSE(after.equal(before));
      // A replicated region draws the same mask on every rank of the group.
      at::Tensor gathered = at::empty({tp, kSeq, kBatch, 4 * tp}, at::kDouble);
      ctx.tp()->all_gather(gathered, whole)->wait();
      for (int k = 0; k < tp; ++k) EXPECT_TRUE(gathered[k].equal(whole)) << "rank " << k;
      const double dropped = whole.eq(0).to(at::kDouble).mean().item<double>();
      EXPECT_GT(dropped, 0.1);
      EXPECT_LT(dropped, 0.5);
    }
    // Off in evaluation.
    EXPECT_TRUE(tensor_parallel_dropout(x, 0.3, false, rng).equal(x));
  }
}

// Column, row and (uneven) vocabulary blocks in one model.
struct Model : torch::nn::Module {
  explicit Model(const std::shared_ptr<collectives::Communicator>& comm, std::uint64_t seed = 0) {
    ColumnParallelLinearOptions c;
    c.in_features = 4;
    c.out_features = 8;
    c.init_seed = seed;
    fc1 = register_module("fc1", ColumnParallelLinear(c, comm));
    RowParallelLinearOptions w;
    w.in_features = 8;
    w.out_features = 4;
    w.init_seed = seed + 1;
    fc2 = register_module("fc2", RowParallelLinear(w, comm));
    VocabParallelEmbeddingOptions e;
    e.num_embeddings = 11;
    e.embedding_dim = 4;
    e.init_seed = seed + 2;
    embed = register_module("embed", VocabParallelEmbedding(e, comm));
  }
  ColumnParallelLinear fc1{nullptr};
  RowParallelLinear fc2{nullptr};
  VocabParallelEmbedding embed{nullptr};
};

TEST(TensorParallelTest, LayoutPlacementsTileTheGlobalTensors) {
  Fixture f("tp-layout");
  for (int tp : tp_sizes(f.world->size())) {
    ParallelContext ctx(f.world, tp);
    Model model(ctx.tp());
    const ModuleLayout layout = tensor_parallel_layout(model);
    std::vector<std::string> keys;
    for (const auto& [k, p] : layout.placements) keys.push_back(k);
    EXPECT_EQ(keys,
              (std::vector<std::string>{"embed.weight", "fc1.bias", "fc1.weight", "fc2.weight"}));
    for (const auto& item : model.named_parameters()) {
      const Placement p = layout.placement(item.key(), item.value());
      p.check(item.key(), item.value());  // throws if the tensor does not fit
      // The tp ranks' blocks cover the global tensor once: their element
      // counts add up, and their offsets along the split dimension differ.
      at::Tensor numel = at::full({1}, p.block_numel(), at::kLong);
      ctx.tp()->all_reduce(numel)->wait();
      std::int64_t global = 1;
      for (std::int64_t s : p.global_shape) global *= s;
      EXPECT_EQ(numel.item<std::int64_t>(), p.split_dim >= 0 ? global : global * tp) << item.key();
      if (item.key() == "fc2.bias") {
        EXPECT_EQ(p.split_dim, -1);
      }
      if (p.split_dim >= 0) {
        EXPECT_EQ(p.replicated_over, AxisSet({Axis::kData})) << item.key();
      }
    }
  }
}

// A model saved at one tp size loads at every other: each parameter gets
// its block of the global tensor, whichever ranks wrote it (the vocabulary
// of 11 rows is split unevenly at every tp size but 1).
TEST(TensorParallelTest, CheckpointsOfTpLayersLoadAtAnyTpSize) {
  Fixture f("tp-checkpoint");
  std::vector<int> sizes = {1};
  for (int tp : tp_sizes(f.world->size())) sizes.push_back(tp);
  const std::string dir = dtrain::testing::shared_temp_dir(*f.world, "dtrain-tp-ckpt");
  // The global value of each parameter: a function of its name only.
  auto global = [](const std::string& name, const std::vector<std::int64_t>& shape) {
    return randn(shape, at::kFloat, std::hash<std::string>{}(name) % 1000);
  };
  auto block = [](const at::Tensor& whole, const Placement& p) {
    at::Tensor b = whole;
    for (std::size_t d = 0; d < p.shape.size(); ++d) {
      b = b.narrow(static_cast<std::int64_t>(d), p.offset[d], p.shape[d]);
    }
    return b;
  };
  std::int64_t step = 0;
  for (int writer_tp : sizes) {
    ParallelContext writer(f.world, writer_tp);
    Model saved(writer.tp(), /*seed=*/100);
    const ModuleLayout layout = tensor_parallel_layout(saved);
    {
      torch::NoGradGuard no_grad;
      for (const auto& item : saved.named_parameters()) {
        const Placement p = layout.placement(item.key(), item.value());
        item.value().copy_(block(global(item.key(), p.global_shape), p));
      }
    }
    checkpoint::StateDict state;
    checkpoint::add_module(state, saved, layout);
    checkpoint::CheckpointOptions options;
    options.directory = dir;
    options.async = false;
    options.fsync = false;  // a throwaway directory
    options.keep_last = 100;
    checkpoint::CheckpointManager manager(options, writer);
    manager.save(++step, state);
    const checkpoint::Checkpoint ckpt =
        checkpoint::Checkpoint::open(manager.list().back().directory);
    for (int reader_tp : sizes) {
      ParallelContext reader(f.world, reader_tp);
      Model loaded(reader.tp(), /*seed=*/200);  // other initial values
      const ModuleLayout reader_layout = tensor_parallel_layout(loaded);
      checkpoint::load_module(ckpt, loaded, reader_layout);
      for (const auto& item : loaded.named_parameters()) {
        const Placement p = reader_layout.placement(item.key(), item.value());
        EXPECT_TRUE(item.value().equal(block(global(item.key(), p.global_shape), p)))
            << item.key() << " written at tp " << writer_tp << ", read at tp " << reader_tp;
      }
    }
  }
}

}  // namespace
}  // namespace dtrain::parallel
