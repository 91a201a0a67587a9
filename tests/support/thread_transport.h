#pragma once
// An in-process Transport for unit tests: N threads play N ranks and
// exchange messages through shared queues. Lets the collective algorithms be
// tested over many world sizes and counts without MPI.

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "dtrain/error.h"
#include "src/collectives/algorithms/transport.h"

namespace dtrain::testing {

class Fabric {
 public:
  explicit Fabric(int size) : size_(size) {}
  int size() const { return size_; }

  void push(int src, int dst, const void* data, std::size_t bytes) {
    std::vector<char> message(bytes);
    if (bytes > 0) std::memcpy(message.data(), data, bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queues_[{src, dst}].push_back(std::move(message));
    }
    cv_.notify_all();
  }

  // Waits for message number `index` from src to dst.
  bool take(int src, int dst, std::size_t index, void* data, std::size_t bytes,
            std::chrono::steady_clock::time_point deadline, std::size_t* received) {
    std::unique_lock<std::mutex> lock(mutex_);
    auto& queue = queues_[{src, dst}];
    if (!cv_.wait_until(lock, deadline, [&] { return queue.size() > index; })) return false;
    const std::vector<char>& message = queue[index];
    *received = message.size();
    if (message.size() == bytes && bytes > 0) std::memcpy(data, message.data(), bytes);
    return true;
  }

 private:
  int size_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::pair<int, int>, std::vector<std::vector<char>>> queues_;
};

class ThreadTransport final : public collectives::detail::Transport {
 public:
  ThreadTransport(Fabric& fabric, int rank,
                  std::chrono::milliseconds timeout = std::chrono::seconds(20))
      : fabric_(fabric), rank_(rank), timeout_(timeout), recv_count_(fabric.size(), 0) {}

  int rank() const override { return rank_; }
  int size() const override { return fabric_.size(); }

  Request isend(const void* data, std::size_t bytes, int peer) override {
    check_peer(peer);
    fabric_.push(rank_, peer, data, bytes);  // eager: complete at once
    requests_.push_back(Pending{nullptr, bytes, peer, 0, true});
    return requests_.size() - 1;
  }

  Request irecv(void* data, std::size_t bytes, int peer) override {
    check_peer(peer);
    requests_.push_back(Pending{data, bytes, peer, recv_count_[peer]++, false});
    return requests_.size() - 1;
  }

  void wait(Request request) override {
    Pending& p = requests_.at(request);
    if (p.done) return;
    std::size_t received = 0;
    if (!fabric_.take(p.peer, rank_, p.index, p.data, p.bytes,
                      std::chrono::steady_clock::now() + timeout_, &received)) {
      DTRAIN_THROW(TimeoutError, "rank ", rank_, ": no message from rank ", p.peer);
    }
    DTRAIN_CHECK_T(CommError, received == p.bytes, "rank ", rank_, ": received ", received,
                   " bytes from rank ", p.peer, ", expected ", p.bytes);
    p.done = true;
  }

  void wait_all() override {
    for (Request r = 0; r < requests_.size(); ++r) wait(r);
    requests_.clear();
  }

  std::size_t messages_sent() const { return sent_; }

 private:
  struct Pending {
    void* data;
    std::size_t bytes;
    int peer;
    std::size_t index;
    bool done;
  };
  void check_peer(int peer) {
    DTRAIN_CHECK(peer >= 0 && peer < fabric_.size() && peer != rank_, "rank ", rank_,
                 " addressed invalid peer ", peer);
    ++sent_;
  }

  Fabric& fabric_;
  int rank_;
  std::chrono::milliseconds timeout_;
  std::vector<std::size_t> recv_count_;
  std::vector<Pending> requests_;
  std::size_t sent_ = 0;
};

}  // namespace dtrain::testing
