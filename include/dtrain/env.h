#pragma once
// The process environment, read (and, where dtrain must set something for
// a library it starts, written) in this one place. docs/configuration.md
// lists every variable with its default.
//
// dtrain's own variables:
//
// | variable                | meaning                                        |
// |-------------------------|------------------------------------------------|
// | DTRAIN_ALLREDUCE_ALGO   | default all-reduce algorithm: auto, ring, tree, rhd, native, shm |
// | DTRAIN_TIMEOUT_MS       | default op timeout of new communicators, in ms |
// | DTRAIN_CHUNK_BYTES      | pipelining chunk of the ring/tree algorithms   |
// | DTRAIN_INLINE_MAX_BYTES | largest collective run on the caller's thread when idle (0: never) |
// | DTRAIN_SHM_SLOT_BYTES   | shared-memory slot of the shm all-reduce (0: no shared memory) |
// | DTRAIN_MALLOC_TUNING    | 1 (default): Runtime tunes glibc malloc; 0: leaves it as it is |
// | DTRAIN_RESTART_COUNT    | which attempt of a supervised job this is (dtrain-launch sets it) |
// | DTRAIN_HEARTBEAT_MS     | interval of the heartbeat between ranks, in ms (0: off) |
// | DTRAIN_HEARTBEAT_TIMEOUT_MS | silence after which the heartbeat declares a rank lost |
// | DTRAIN_FAULT_CHECKPOINT | tests: <phase>:<step>:<rank>[:stall] dies (or stalls) during a
// checkpoint save | | DTRAIN_FAULT_KILL       | tests: <rank>:<step>[:always] dies after a training
// step | | DTRAIN_FAULT_FILE_LIMIT_KIB | tests: the trainer's file-size limit, in KiB |
//
// Other programs' variables read here: the launchers' (detect_launch),
// glibc malloc's (read_user_malloc_setting), NCCL_ALGO (read_nccl_algo).
//
// The DTRAIN_FAULT_* variables are only a way for a test run from outside
// (tests/fault) to reach a program's fault seams; the library itself takes
// faults through options (CheckpointOptions::fault_hook), never from here.
//
// DTRAIN_* values that do not parse throw InvalidArgument naming the
// variable.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

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
/// The first of glibc malloc's own settings the user made, by variable name
/// (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_,
/// MALLOC_MMAP_MAX_, or GLIBC_TUNABLES when it holds a glibc.malloc.*
/// tunable); nullopt if none. Never throws.
std::optional<std::string> read_user_malloc_setting();

/// DTRAIN_RESTART_COUNT: 0 for a job's first attempt (also when unset), 1
/// for the first restart, ... Throws InvalidArgument when it is not an
/// integer >= 0.
int read_restart_count();

/// DTRAIN_FAULT_CHECKPOINT=<phase>:<step>:<rank>[:stall]: rank <rank> dies
/// at <phase> (a checkpoint::SavePhase name, checked by the program that
/// applies it) of the save of checkpoint <step>; with `stall`, it stops
/// there instead until it is killed from outside (a test then kills its
/// whole host).
struct CheckpointFaultSpec {
  std::string phase;
  std::int64_t step = 0;
  int rank = 0;
  bool stall = false;
};

/// DTRAIN_FAULT_KILL=<rank>:<step>[:always]: rank <rank> SIGKILLs itself
/// after training step <step>; on a job's first attempt only, unless
/// `always`.
struct KillFaultSpec {
  int rank = 0;
  std::int64_t step = 0;
  bool every_attempt = false;
};

/// The faults a test asks a program for (all unset normally).
struct FaultInjectionEnv {
  std::optional<CheckpointFaultSpec> checkpoint;  ///< DTRAIN_FAULT_CHECKPOINT
  std::optional<KillFaultSpec> kill;              ///< DTRAIN_FAULT_KILL
  /// DTRAIN_FAULT_FILE_LIMIT_KIB: a file-size limit (RLIMIT_FSIZE), in KiB.
  std::optional<std::uint64_t> file_limit_kib;
};

/// Reads the DTRAIN_FAULT_* variables. Throws InvalidArgument naming the
/// variable and its expected form on a malformed value.
FaultInjectionEnv read_fault_injection_env();

/// NCCL_ALGO as the user set it; nullopt when unset or empty. Never throws.
std::optional<std::string> read_nccl_algo();

/// Sets `name` to `value` unless it is already set, for a setting dtrain
/// wants from a library it initializes (an MPI parameter, say) while
/// leaving the user's own choice alone. Returns whether it set it.
bool set_env_default(const char* name, const char* value);

/// Sets a variable for the lifetime of this object and then restores its
/// previous value (or unsets it): for a library that reads its settings
/// from the environment while it is being initialized. Not thread-safe:
/// the process environment is shared.
class ScopedEnvSetting {
 public:
  ScopedEnvSetting(const char* name, const std::string& value);
  ~ScopedEnvSetting();
  ScopedEnvSetting(const ScopedEnvSetting&) = delete;
  ScopedEnvSetting& operator=(const ScopedEnvSetting&) = delete;

 private:
  std::string name_;
  std::optional<std::string> previous_;
  bool active_ = false;
};

/// Where this process sits in the job, as the launcher's environment says
/// (OMPI_COMM_WORLD_*, PMI_*/PMIX_*, SLURM_*). Readable before MPI is up,
/// for logging; the communicators' rank()/size() are authoritative.
struct LaunchInfo {
  int rank = 0;
  int size = 1;
  int local_rank = 0;  ///< Rank among the processes on this node.
  int local_size = 1;
  /// "openmpi", "pmi", "slurm" or "none" (started without a launcher).
  std::string launcher = "none";
};

/// Reads LaunchInfo from the environment. Pure; never throws.
LaunchInfo detect_launch();

}  // namespace dtrain
