#include "dtrain/collectives/types.h"

#include "dtrain/error.h"

namespace dtrain::collectives {

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAvg:
      return "avg";
    case ReduceOp::kMin:
      return "min";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kProduct:
      return "product";
  }
  return "unknown";
}

const char* to_string(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::kAuto:
      return "auto";
    case Algorithm::kRing:
      return "ring";
    case Algorithm::kTree:
      return "tree";
    case Algorithm::kRhd:
      return "rhd";
    case Algorithm::kNative:
      return "native";
    case Algorithm::kShm:
      return "shm";
    case Algorithm::kHier:
      return "hier";
  }
  return "unknown";
}

Algorithm parse_algorithm(std::string_view name) {
  for (Algorithm a : {Algorithm::kAuto, Algorithm::kRing, Algorithm::kTree, Algorithm::kRhd,
                      Algorithm::kNative, Algorithm::kShm, Algorithm::kHier}) {
    if (name == to_string(a)) return a;
  }
  DTRAIN_THROW(InvalidArgument, "unknown all-reduce algorithm '", name,
               "'; choose one of auto, ring, tree, rhd, native, shm, hier");
}

void CommunicatorOptions::validate() const {
  DTRAIN_CHECK_ARG(!name.empty(), "CommunicatorOptions::name must not be empty");
  DTRAIN_CHECK_ARG(timeout.count() > 0, "CommunicatorOptions::timeout must be positive, got ",
                   timeout.count(), " ms");
  DTRAIN_CHECK_ARG(chunk_bytes >= 4096,
                   "CommunicatorOptions::chunk_bytes must be at least 4096, got ", chunk_bytes);
  DTRAIN_CHECK_ARG(shm_slot_bytes % 64 == 0,
                   "CommunicatorOptions::shm_slot_bytes must be a multiple of 64 (or 0), got ",
                   shm_slot_bytes);
}

}  // namespace dtrain::collectives
