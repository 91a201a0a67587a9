#pragma once
// A Communicator for unit tests that need no ranks. Of size 1 it is a
// loopback: every op completes at once with what one rank would get
// (all_reduce leaves the tensor, all_gather and reduce_scatter copy the
// input into the output). Of a larger size it pretends to be one rank of
// that many and throws dtrain::Error from every op: tests of argument checks
// use it to show that the check fires before anything is communicated.

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"

namespace dtrain::testing {

class FakeCommunicator final : public collectives::Communicator {
 public:
  FakeCommunicator(int rank, int size) : rank_(rank), size_(size) { options_.name = name_; }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const collectives::CommunicatorOptions& options() const override { return options_; }

  std::shared_ptr<collectives::Work> all_reduce(const at::Tensor&,
                                                const collectives::AllReduceOptions&) override {
    return done("all_reduce");
  }
  std::shared_ptr<collectives::Work> broadcast(const at::Tensor&,
                                               const collectives::BroadcastOptions&) override {
    return done("broadcast");
  }
  std::shared_ptr<collectives::Work> all_gather(const at::Tensor& output, const at::Tensor& input,
                                                const collectives::AllGatherOptions&) override {
    auto work = done("all_gather");
    output.view_as(input).copy_(input);
    return work;
  }
  std::shared_ptr<collectives::Work> reduce_scatter(
      const at::Tensor& output, const at::Tensor& input,
      const collectives::ReduceScatterOptions&) override {
    auto work = done("reduce_scatter");
    output.copy_(input.view_as(output));
    return work;
  }
  std::shared_ptr<collectives::Work> send(const at::Tensor&, int,
                                          const collectives::PointToPointOptions&) override {
    return done("send");
  }
  std::shared_ptr<collectives::Work> recv(const at::Tensor&, int,
                                          const collectives::PointToPointOptions&) override {
    return done("recv");
  }
  std::shared_ptr<collectives::Work> batch_send_recv(
      const std::vector<collectives::P2POp>&, const collectives::BatchSendRecvOptions&) override {
    return done("batch_send_recv");
  }
  std::shared_ptr<collectives::Work> barrier(const collectives::BarrierOptions&) override {
    return done("barrier");
  }
  std::shared_ptr<collectives::Communicator> split(int color, int,
                                                   const collectives::SplitOptions&) override {
    done("split");
    return color < 0 ? nullptr : std::make_shared<FakeCommunicator>(0, 1);
  }
  bool failed() const override { return false; }

 private:
  std::shared_ptr<collectives::Work> done(const char* op) {
    DTRAIN_CHECK(size_ == 1, "FakeCommunicator: ", op, " on a fake group of ", size_,
                 " ranks, which has no peers");
    auto work = std::make_shared<collectives::Work>(op);
    work->complete();
    return work;
  }

  int rank_;
  int size_;
  std::string name_ = "fake";
  collectives::CommunicatorOptions options_;
};

}  // namespace dtrain::testing
