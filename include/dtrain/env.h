#pragma once
// The DTRAIN_* environment variables, read in this one place.
//
// | variable              | meaning                                        |
// |-----------------------|------------------------------------------------|
// | DTRAIN_ALLREDUCE_ALGO | default all-reduce algorithm: auto, ring, tree, rhd, native, shm |
// | DTRAIN_TIMEOUT_MS     | default op timeout of new communicators, in ms |
// | DTRAIN_CHUNK_BYTES    | pipelining chunk of the ring/tree algorithms   |
// | DTRAIN_INLINE_MAX_BYTES | largest collective run on the caller's thread when idle (0: never) |
// | DTRAIN_SHM_SLOT_BYTES | shared-memory slot of the shm all-reduce (0: no shared memory) |
// | DTRAIN_MALLOC_TUNING  | 1 (default): Runtime fixes glibc malloc's thresholds; 0: leaves them |
// | DTRAIN_HEARTBEAT_MS   | interval of the heartbeat between ranks, in ms (0: off) |
// | DTRAIN_HEARTBEAT_TIMEOUT_MS | silence after which the heartbeat declares a rank lost |
//
// Values that do not parse throw InvalidArgument naming the variable.

#include <chrono>
#include <cstddef>
#include <optional>

#include "dtrain/collectives/types.h"

namespace dtrain {

struct EnvOverrides {
  std::optional<collectives::Algorithm> allreduce_algorithm;
  std::optional<collectives::Timeout> timeout;
  std::optional<std::size_t> chunk_bytes;
  std::optional<std::size_t> inline_max_bytes;
  std::optional<std::size_t> shm_slot_bytes;

  /// Writes the overrides that are set into `options`.
  void apply(collectives::CommunicatorOptions& options) const;
};

/// Reads every DTRAIN_* variable of the communicators. Throws
/// InvalidArgument on a malformed value.
EnvOverrides read_env_overrides();

/// DTRAIN_MALLOC_TUNING: 0 or 1, nullopt when unset. Throws InvalidArgument
/// on any other value.
std::optional<bool> read_malloc_tuning_env();

struct HeartbeatEnv {
  std::optional<std::chrono::milliseconds> interval;  ///< DTRAIN_HEARTBEAT_MS
  std::optional<std::chrono::milliseconds> timeout;   ///< DTRAIN_HEARTBEAT_TIMEOUT_MS
};

/// Reads DTRAIN_HEARTBEAT_MS and DTRAIN_HEARTBEAT_TIMEOUT_MS (integers >= 0
/// and >= 1). Throws InvalidArgument on a malformed value.
HeartbeatEnv read_heartbeat_env();

}  // namespace dtrain
