// Builds against an installed dtrain and runs a one-rank all-reduce.
#include <ATen/ATen.h>

#include <cstdio>

#include "dtrain/collectives/communicator.h"
#include "dtrain/config.h"
#include "dtrain/runtime.h"

int main(int argc, char** argv) {
  dtrain::Runtime runtime(&argc, &argv);
  auto world = runtime.world();
  at::Tensor t = at::full({4}, 2.0f);
  world->all_reduce(t)->wait();
  std::printf("dtrain %s: all_reduce over %d rank(s) gave %.1f\n", DTRAIN_VERSION, world->size(),
              t[0].item<float>());
  return t[0].item<float>() == 2.0f * static_cast<float>(world->size()) ? 0 : 1;
}
