// RngStreams: tensor-parallel RNG streams swapped in and out of LibTorch's
// default generator.

#include "dtrain/parallel/rng.h"

#include <mutex>
#include <utility>

#include "dtrain/error.h"
#include "src/common/random.h"

namespace dtrain::parallel {

namespace {

at::Generator device_default(at::Device device) {
  return at::globalContext().defaultGenerator(device);
}

at::Tensor read_state(at::Generator gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void write_state(at::Generator gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

}  // namespace

const char* rng_stream_name(RngStream stream) {
  switch (stream) {
    case RngStream::kRank:
      return "rank";
    case RngStream::kTensorShared:
      return "tensor_shared";
    case RngStream::kTensorDistinct:
      return "tensor_distinct";
  }
  return "?";
}

AxisSet RngStreams::shared_over(RngStream stream) {
  return stream == RngStream::kTensorShared ? AxisSet({Axis::kTensor}) : AxisSet::none();
}

RngStreams::RngStreams(const ParallelContext& ctx, std::uint64_t seed, at::Device device)
    : shape_(ctx.shape()), coord_(ctx.coord()), device_(device) {
  // A fresh generator of the device's type for each stream: a clone of the
  // default one, reseeded (the default generator itself is not touched).
  auto seeded = [&](RngStream stream, std::uint64_t key) {
    at::Generator gen = device_default(device_).clone();
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_current_seed(key);
    }
    states_[stream] = read_state(gen);
    forked_[stream] = false;
  };
  const auto dp = static_cast<std::uint64_t>(coord_.dp);
  const auto pp = static_cast<std::uint64_t>(coord_.pp);
  const auto tp = static_cast<std::uint64_t>(coord_.tp);
  // (dp, pp) packed in one word; the tp rank (+1, so that tp 0 differs from
  // the shared stream) in the last.
  const std::uint64_t group = (dp << 32) ^ pp;
  seeded(RngStream::kTensorShared, detail::mix(seed ^ 0x7E45A1EDULL, group, 0));
  seeded(RngStream::kTensorDistinct, detail::mix(seed ^ 0xD157C7ULL, group, tp + 1));
  forked_[RngStream::kRank] = false;
}

RngStreams::Fork::Fork(RngStreams* owner, RngStream stream) : owner_(owner), stream_(stream) {
  if (stream_ == RngStream::kRank) return;
  bool& forked = owner_->forked_[stream_];
  DTRAIN_CHECK_ARG(!forked, "RNG stream '", rng_stream_name(stream_),
                   "' is already forked; end the outer fork first");
  at::Generator gen = device_default(owner_->device_);
  saved_ = read_state(gen);
  write_state(gen, owner_->states_.at(stream_));
  forked = true;
}

RngStreams::Fork::Fork(Fork&& other) noexcept
    : owner_(std::exchange(other.owner_, nullptr)),
      stream_(other.stream_),
      saved_(std::move(other.saved_)) {}

RngStreams::Fork::~Fork() {
  if (owner_ == nullptr || stream_ == RngStream::kRank) return;
  try {
    at::Generator gen = device_default(owner_->device_);
    owner_->states_[stream_] = read_state(gen);
    write_state(gen, saved_);
  } catch (...) {  // destructors never throw; the states are valid generator states
  }
  owner_->forked_[stream_] = false;
}

RngStreams::Fork RngStreams::fork(RngStream stream) { return Fork(this, stream); }

at::Tensor RngStreams::state(RngStream stream) const {
  if (stream == RngStream::kRank) return read_state(device_default(device_));
  DTRAIN_CHECK_ARG(!forked_.at(stream), "RNG stream '", rng_stream_name(stream),
                   "' is forked; read its state after the fork ends");
  return states_.at(stream).clone();
}

void RngStreams::set_state(RngStream stream, const at::Tensor& state) {
  if (stream == RngStream::kRank) {
    try {
      write_state(device_default(device_), state);
    } catch (const c10::Error& e) {
      DTRAIN_THROW(InvalidArgument,
                   "cannot restore RNG stream 'rank': ", e.what_without_backtrace());
    }
    return;
  }
  DTRAIN_CHECK_ARG(!forked_.at(stream), "RNG stream '", rng_stream_name(stream),
                   "' is forked; set its state after the fork ends");
  // Check the state on a scratch generator first: the stream keeps its old
  // state if the new one does not fit.
  at::Generator scratch = device_default(device_).clone();
  try {
    write_state(scratch, state);
  } catch (const c10::Error& e) {
    DTRAIN_THROW(InvalidArgument, "cannot restore RNG stream '", rng_stream_name(stream),
                 "': ", e.what_without_backtrace());
  }
  states_[stream] = read_state(scratch);
}

}  // namespace dtrain::parallel
