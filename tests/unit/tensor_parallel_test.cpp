// Tensor parallelism without ranks: the counting communicator's records,
// the vocabulary split, the layers on a group of one rank (plain dense
// layers that communicate nothing), and bad input rejected, naming the
// numbers, before anything is communicated.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/collectives/counting_communicator.h"
#include "dtrain/error.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "dtrain/parallel/tensor_regions.h"
#include "tests/support/fake_communicator.h"

namespace dtrain::parallel {
namespace {

using collectives::CountingCommunicator;
using collectives::OpKind;
using dtrain::testing::FakeCommunicator;

// `fn` throws InvalidArgument whose message contains every one of `parts`.
void expect_invalid(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no InvalidArgument; expected one mentioning '" << parts.front() << "'";
  } catch (const InvalidArgument& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos)
          << "'" << part << "' missing from: " << message;
    }
  }
}

TEST(CountingCommunicatorTest, RecordsEveryOpByKindAndBytes) {
  CountingCommunicator comm(std::make_shared<FakeCommunicator>(0, 1));
  const at::Tensor f = at::zeros({3, 4});            // 48 bytes
  const at::Tensor d = at::zeros({5}, at::kDouble);  // 40 bytes
  comm.all_reduce(f)->wait();
  comm.all_gather(at::zeros({3, 4}), f)->wait();
  comm.reduce_scatter(d, at::zeros({5}, at::kDouble))->wait();
  comm.broadcast(d)->wait();
  comm.batch_send_recv({collectives::P2POp::send(f, 0), collectives::P2POp::recv(f.clone(), 0)})
      ->wait();
  comm.barrier()->wait();
  auto child = comm.split(0, 0);
  const std::vector<collectives::OpRecord> records = comm.records();
  ASSERT_EQ(records.size(), 7u);
  const std::vector<std::pair<OpKind, std::int64_t>> expected = {
      {OpKind::kAllReduce, 48}, {OpKind::kAllGather, 48},     {OpKind::kReduceScatter, 40},
      {OpKind::kBroadcast, 40}, {OpKind::kBatchSendRecv, 96}, {OpKind::kBarrier, 0},
      {OpKind::kSplit, 0}};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(records[i].kind, expected[i].first) << i;
    EXPECT_EQ(records[i].bytes, expected[i].second) << collectives::to_string(records[i].kind);
  }
  EXPECT_EQ(comm.tally(OpKind::kAllReduce).calls, 1);
  EXPECT_EQ(comm.data_ops().calls, 5);
  EXPECT_EQ(comm.data_ops().bytes, 48 + 48 + 40 + 40 + 96);
  // On one rank only the batch's send sends anything.
  EXPECT_EQ(comm.data_ops().sent_bytes, 48);
  EXPECT_EQ(records[4].sent_bytes, 48);
  // The child counts its own ops.
  auto* counting_child = dynamic_cast<CountingCommunicator*>(child.get());
  ASSERT_NE(counting_child, nullptr);
  child->all_reduce(f)->wait();
  EXPECT_EQ(counting_child->tally(OpKind::kAllReduce).calls, 1);
  EXPECT_EQ(comm.tally(OpKind::kAllReduce).calls, 1);
  // The tree's totals: the parent's data ops and the child's.
  EXPECT_EQ(comm.tree_data_ops().calls, 6);
  EXPECT_EQ(comm.tree_data_ops().bytes, 48 + 48 + 40 + 40 + 96 + 48);
  EXPECT_EQ(counting_child->tree_data_ops().calls, 6);
  comm.reset();
  EXPECT_TRUE(comm.records().empty());
  EXPECT_EQ(comm.data_ops().calls, 0);
  EXPECT_EQ(comm.tree_data_ops().calls, 6);
  // Without records: the tallies only, inherited by a split.
  CountingCommunicator tallying(std::make_shared<FakeCommunicator>(0, 1), /*keep_records=*/false);
  tallying.all_reduce(f)->wait();
  tallying.split(0, 0)->all_reduce(d)->wait();
  EXPECT_TRUE(tallying.records().empty());
  EXPECT_EQ(tallying.tally(OpKind::kAllReduce).calls, 1);
  EXPECT_EQ(tallying.tree_data_ops().bytes, 48 + 40);
  // An op the inner communicator refuses leaves no record.
  CountingCommunicator refusing(std::make_shared<FakeCommunicator>(0, 2));
  EXPECT_THROW(refusing.all_reduce(f), Error);
  EXPECT_TRUE(refusing.records().empty());
}

TEST(VocabRangeTest, BlocksDifferByOneRowAtMostAndCoverTheVocabulary) {
  for (std::int64_t vocab : {4, 11, 16, 97}) {
    for (int parts : {1, 2, 3, 4}) {
      std::int64_t next = 0;
      for (int i = 0; i < parts; ++i) {
        const VocabRange r = vocab_range(vocab, i, parts);
        EXPECT_EQ(r.start, next) << vocab << " " << parts << " " << i;
        EXPECT_GE(r.size, r.padded - 1);
        EXPECT_LE(r.size, r.padded);
        EXPECT_EQ(r.padded, (vocab + parts - 1) / parts);
        next += r.size;
      }
      EXPECT_EQ(next, vocab);
    }
  }
  const VocabRange last = vocab_range(11, 3, 4);
  EXPECT_EQ(last.start, 9);
  EXPECT_EQ(last.size, 2);
  EXPECT_EQ(last.padded, 3);
  expect_invalid([] { vocab_range(3, 0, 4); }, {"vocabulary of 3", "over 4"});
}

TEST(TensorParallelLayersTest, OneRankLayersAreDenseAndCommunicateNothing) {
  auto comm = std::make_shared<CountingCommunicator>(std::make_shared<FakeCommunicator>(0, 1));
  ColumnParallelLinearOptions c;
  c.in_features = 5;
  c.out_features = 6;
  c.gather_output = true;
  c.sequence_parallel = true;
  ColumnParallelLinear fc1(c, comm);
  RowParallelLinearOptions r;
  r.in_features = 6;
  r.out_features = 5;
  r.input_is_parallel = false;
  r.sequence_parallel = true;
  RowParallelLinear fc2(r, comm);
  VocabParallelEmbeddingOptions e;
  e.num_embeddings = 7;
  e.embedding_dim = 5;
  VocabParallelEmbedding embed(e, comm);
  SequenceParallelLayerNormOptions n;
  n.normalized_size = 5;
  SequenceParallelLayerNorm norm(n, comm);

  const at::Tensor ids = at::arange(12, at::kLong).remainder(7).view({4, 3});
  const at::Tensor h = norm->forward(embed->forward(ids));
  const at::Tensor y = fc2->forward(at::relu(fc1->forward(h)));
  const at::Tensor logits = embed->logits(y);
  const at::Tensor loss = vocab_parallel_cross_entropy(logits, ids, 7, *comm).mean();
  loss.backward();
  EXPECT_TRUE(comm->records().empty());

  // The dense computation, from the same tensors.
  torch::NoGradGuard no_grad;
  const at::Tensor h_dense =
      at::layer_norm(at::embedding(embed->weight, ids), {5}, norm->weight, norm->bias);
  const at::Tensor y_dense =
      at::linear(at::relu(at::linear(h_dense, fc1->weight, fc1->bias)), fc2->weight, fc2->bias);
  EXPECT_TRUE(at::allclose(y, y_dense));
  const at::Tensor loss_dense =
      at::cross_entropy_loss(at::linear(y_dense, embed->weight).view({12, 7}), ids.view({12}));
  EXPECT_TRUE(at::allclose(loss, loss_dense));
  EXPECT_TRUE(fc1->weight.grad().defined());
  EXPECT_TRUE(embed->weight.grad().defined());
}

TEST(TensorParallelLayersTest, InitializationFollowsTheSeed) {
  auto comm = std::make_shared<FakeCommunicator>(0, 1);
  ColumnParallelLinearOptions o;
  o.in_features = 4;
  o.out_features = 4;
  o.init_seed = 3;
  ColumnParallelLinear a(o, comm);
  ColumnParallelLinear b(o, comm);
  o.init_seed = 4;
  ColumnParallelLinear c(o, comm);
  EXPECT_TRUE(a->weight.equal(b->weight));
  EXPECT_FALSE(a->weight.equal(c->weight));
  EXPECT_LE(a->weight.abs().max().item<double>(), 0.5);  // +-1/sqrt(4)
  o.init_std = 0.02;
  ColumnParallelLinear d(o, comm);
  EXPECT_TRUE(d->bias.eq(0).all().item<bool>());
  EXPECT_LT(d->weight.std().item<double>(), 0.05);
}

TEST(TensorParallelLayersTest, SizesTheTpSizeDoesNotDivideAreRejectedNamingTheNumbers) {
  auto three = std::make_shared<FakeCommunicator>(1, 3);
  ColumnParallelLinearOptions c;
  c.in_features = 4;
  c.out_features = 10;
  expect_invalid([&] { ColumnParallelLinear(c, three); },
                 {"ColumnParallelLinear", "tensor-parallel size 3", "out_features 10"});
  RowParallelLinearOptions r;
  r.in_features = 10;
  r.out_features = 4;
  expect_invalid([&] { RowParallelLinear(r, three); },
                 {"RowParallelLinear", "tensor-parallel size 3", "in_features 10"});
  VocabParallelEmbeddingOptions e;
  e.num_embeddings = 2;
  e.embedding_dim = 4;
  expect_invalid([&] { VocabParallelEmbedding(e, three); }, {"vocabulary of 2", "over 3"});
  expect_invalid([&] { ColumnParallelLinear(c, nullptr); }, {"communicator is null"});
}

TEST(TensorParallelLayersTest, ASequenceTheSpSizeDoesNotDivideIsRejectedBeforeCommunicating) {
  // The fake group of 2 throws dtrain::Error from any op: InvalidArgument
  // shows the check came first.
  auto two = std::make_shared<FakeCommunicator>(0, 2);
  const at::Tensor x = at::zeros({7, 2, 4});
  expect_invalid([&] { reduce_scatter_to_sequence_region(x, *two); },
                 {"dimension 0 of size 7", "not divisible by the group size 2"});
  expect_invalid([&] { scatter_to_sequence_region(x, *two); }, {"size 7", "group size 2"});
  expect_invalid(
      [&] {
        scatter_to_tp_region(at::zeros({2, 5}), *two);
      },
      {"dimension 1 of size 5", "group size 2"});
  RowParallelLinearOptions r;
  r.in_features = 4;
  r.out_features = 4;
  r.sequence_parallel = true;
  RowParallelLinear row(r, two);
  expect_invalid([&] { row->forward(at::zeros({7, 2, 2})); }, {"size 7", "group size 2"});
  VocabParallelEmbeddingOptions e;
  e.num_embeddings = 8;
  e.embedding_dim = 4;
  e.sequence_parallel = true;
  VocabParallelEmbedding embed(e, two);
  expect_invalid([&] { embed->forward(at::zeros({7, 2}, at::kLong)); }, {"size 7", "group size 2"});
  expect_invalid([&] { embed->forward(at::full({2, 2}, 8, at::kLong)); }, {"[0, 8)", "[8, 8]"});
  // The loss: logits of a width that is neither this rank's block nor its
  // padded block, and targets outside the vocabulary.
  expect_invalid(
      [&] {
        vocab_parallel_cross_entropy(at::zeros({3, 5}), at::zeros({3}, at::kLong), 8, *two);
      },
      {"holds 4 of the 8", "width 5"});
  expect_invalid(
      [&] {
        vocab_parallel_cross_entropy(at::zeros({3, 4}), at::full({3}, 9, at::kLong), 8, *two);
      },
      {"[0, 8)", "[9, 9]"});
}

}  // namespace
}  // namespace dtrain::parallel
