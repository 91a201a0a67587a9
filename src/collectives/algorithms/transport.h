#pragma once
// The point-to-point interface the collective algorithms are written
// against. A backend (MPI today, an in-process fake in the unit tests)
// implements it; the algorithms never see MPI.
//
// A Transport is used by one op at a time, from one thread (the
// communicator's progress thread). Before an op the backend sets the op's
// deadline and tag; every message of the op carries that tag, so messages of
// different ops never match each other even if ranks disagree on the op
// order. Messages between one pair of ranks are matched in the order posted.

#include <cstddef>

namespace dtrain::collectives::detail {

class Transport {
 public:
  using Request = std::size_t;

  virtual ~Transport() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  /// Starts sending `bytes` bytes at `data` to `peer`. `data` must not be
  /// modified until the request completes.
  virtual Request isend(const void* data, std::size_t bytes, int peer) = 0;
  /// Starts receiving exactly `bytes` bytes from `peer` into `data`.
  virtual Request irecv(void* data, std::size_t bytes, int peer) = 0;
  /// Blocks until `request` completes. Throws TimeoutError when the op's
  /// deadline passes, CommError on a transport error or when a received
  /// message does not have exactly the posted size.
  virtual void wait(Request request) = 0;
  /// Waits for every request posted since the last wait_all and releases them.
  virtual void wait_all() = 0;

  /// Convenience: exchange with two peers and wait for both.
  void sendrecv(const void* send_data, std::size_t send_bytes, int dst, void* recv_data,
                std::size_t recv_bytes, int src) {
    Request r = irecv(recv_data, recv_bytes, src);
    Request s = isend(send_data, send_bytes, dst);
    wait(r);
    wait(s);
  }
};

}  // namespace dtrain::collectives::detail
