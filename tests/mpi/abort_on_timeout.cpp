// Fault program for abort_on_timeout.sh: the last rank never joins an
// all_reduce (it sleeps far longer than the test allows); the others get a
// TimeoutError and end the job with Runtime::abort_job, as a trainer would.

#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "dtrain/collectives/communicator.h"
#include "dtrain/error.h"
#include "dtrain/runtime.h"

int main(int argc, char** argv) {
  dtrain::Runtime runtime(&argc, &argv);
  dtrain::collectives::CommunicatorOptions options;
  options.name = "abort-test";
  options.timeout = std::chrono::milliseconds(2000);
  auto comm = runtime.world(options);
  if (comm->rank() == comm->size() - 1) {
    std::this_thread::sleep_for(std::chrono::minutes(10));  // a hung rank
    return 0;
  }
  at::Tensor t = at::ones({16});
  try {
    comm->all_reduce(t)->wait();
  } catch (const dtrain::TimeoutError& e) {
    dtrain::Runtime::abort_job(3, e.what());
  }
  std::fprintf(stderr, "all_reduce unexpectedly succeeded\n");
  return 0;
}
