// The only place dtrain reads (or sets) environment variables; see
// dtrain/env.h for the table and docs/configuration.md for the defaults.

#include "dtrain/env.h"

#include <climits>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "dtrain/error.h"

namespace dtrain {
namespace {

// The one call of getenv: nullptr when unset.
const char* raw_value(const char* name) { return std::getenv(name); }

// nullptr when unset or empty.
const char* value_of(const char* name) {
  const char* raw = raw_value(name);
  return raw == nullptr || *raw == '\0' ? nullptr : raw;
}

std::optional<long long> read_integer(const char* name, long long min_value) {
  const char* raw = value_of(name);
  if (raw == nullptr) return std::nullopt;
  char* end = nullptr;
  const long long value = std::strtoll(raw, &end, 10);
  DTRAIN_CHECK_ARG(end != raw && *end == '\0' && value >= min_value, "environment variable ", name,
                   "='", raw, "' is not an integer >= ", min_value);
  return value;
}

// "a:b:c" -> {"a", "b", "c"}.
std::vector<std::string> split_fields(const std::string& text) {
  std::vector<std::string> fields;
  std::size_t start = 0;
  while (true) {
    const std::size_t colon = text.find(':', start);
    fields.push_back(text.substr(start, colon - start));
    if (colon == std::string::npos) return fields;
    start = colon + 1;
  }
}

// A whole-string integer >= 0, or nullopt.
std::optional<long long> parse_count(const std::string& text) {
  if (text.empty()) return std::nullopt;
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (*end != '\0' || value < 0) return std::nullopt;
  return value;
}

// Launchers' integers: a missing or malformed one is `fallback` (the
// launch info is for placement and logs, never fatal).
int env_int(const char* name, int fallback) {
  const char* raw = value_of(name);
  if (raw == nullptr) return fallback;
  char* end = nullptr;
  const long value = std::strtol(raw, &end, 10);
  return (end != raw && *end == '\0' && value >= 0 && value <= INT_MAX) ? static_cast<int>(value)
                                                                        : fallback;
}

bool has_env(const char* name) { return raw_value(name) != nullptr; }

}  // namespace

void EnvOverrides::apply(collectives::CommunicatorOptions& options) const {
  if (allreduce_algorithm) options.allreduce_algorithm = *allreduce_algorithm;
  if (timeout) options.timeout = *timeout;
  if (chunk_bytes) options.chunk_bytes = *chunk_bytes;
  if (inline_max_bytes) options.inline_max_bytes = *inline_max_bytes;
  if (shm_slot_bytes) options.shm_slot_bytes = *shm_slot_bytes;
}

EnvOverrides read_env_overrides() {
  EnvOverrides env;
  if (const char* algo = value_of("DTRAIN_ALLREDUCE_ALGO")) {
    try {
      env.allreduce_algorithm = collectives::parse_algorithm(algo);
    } catch (const InvalidArgument& e) {
      DTRAIN_THROW(InvalidArgument, "environment variable DTRAIN_ALLREDUCE_ALGO: ", e.what());
    }
  }
  if (auto ms = read_integer("DTRAIN_TIMEOUT_MS", 1)) env.timeout = collectives::Timeout(*ms);
  if (auto bytes = read_integer("DTRAIN_CHUNK_BYTES", 4096)) {
    env.chunk_bytes = static_cast<std::size_t>(*bytes);
  }
  if (auto bytes = read_integer("DTRAIN_INLINE_MAX_BYTES", 0)) {
    env.inline_max_bytes = static_cast<std::size_t>(*bytes);
  }
  if (auto bytes = read_integer("DTRAIN_SHM_SLOT_BYTES", 0)) {
    env.shm_slot_bytes = static_cast<std::size_t>(*bytes);
  }
  return env;
}

std::optional<bool> read_malloc_tuning_env() {
  const char* raw = value_of("DTRAIN_MALLOC_TUNING");
  if (raw == nullptr) return std::nullopt;
  const std::string value(raw);
  DTRAIN_CHECK_ARG(value == "0" || value == "1", "environment variable DTRAIN_MALLOC_TUNING='",
                   value, "' is not 0 or 1");
  return value == "1";
}

HeartbeatEnv read_heartbeat_env() {
  HeartbeatEnv env;
  if (auto ms = read_integer("DTRAIN_HEARTBEAT_MS", 0)) {
    env.interval = std::chrono::milliseconds(*ms);
  }
  if (auto ms = read_integer("DTRAIN_HEARTBEAT_TIMEOUT_MS", 1)) {
    env.timeout = std::chrono::milliseconds(*ms);
  }
  return env;
}

std::optional<std::string> read_user_malloc_setting() {
  // Set at all (even empty) counts: glibc reads them as they are.
  for (const char* name : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                           "MALLOC_MMAP_MAX_"}) {
    if (has_env(name)) return std::string(name);
  }
  const char* tunables = raw_value("GLIBC_TUNABLES");
  if (tunables != nullptr && std::strstr(tunables, "glibc.malloc.") != nullptr) {
    return std::string("GLIBC_TUNABLES");
  }
  return std::nullopt;
}

int read_restart_count() {
  const long long count = read_integer("DTRAIN_RESTART_COUNT", 0).value_or(0);
  DTRAIN_CHECK_ARG(count <= INT_MAX, "environment variable DTRAIN_RESTART_COUNT='", count,
                   "' is too large");
  return static_cast<int>(count);
}

FaultInjectionEnv read_fault_injection_env() {
  FaultInjectionEnv env;
  if (const char* raw = value_of("DTRAIN_FAULT_CHECKPOINT")) {
    const std::vector<std::string> f = split_fields(raw);
    const bool sized = f.size() == 3 || f.size() == 4;
    const auto step = sized ? parse_count(f[1]) : std::nullopt;
    const auto rank = sized ? parse_count(f[2]) : std::nullopt;
    const bool stall = f.size() == 4 && f[3] == "stall";
    DTRAIN_CHECK_ARG(step && rank && *rank <= INT_MAX && !f[0].empty() && (f.size() == 3 || stall),
                     "environment variable DTRAIN_FAULT_CHECKPOINT='", raw,
                     "' is not <phase>:<step>:<rank> or <phase>:<step>:<rank>:stall (e.g. "
                     "after_write:8:1)");
    env.checkpoint = CheckpointFaultSpec{f[0], *step, static_cast<int>(*rank), stall};
  }
  if (const char* raw = value_of("DTRAIN_FAULT_KILL")) {
    const std::vector<std::string> f = split_fields(raw);
    const bool sized = f.size() == 2 || f.size() == 3;
    const auto rank = sized ? parse_count(f[0]) : std::nullopt;
    const auto step = sized ? parse_count(f[1]) : std::nullopt;
    const bool always = f.size() == 3 && f[2] == "always";
    DTRAIN_CHECK_ARG(rank && step && *rank <= INT_MAX && (f.size() == 2 || always),
                     "environment variable DTRAIN_FAULT_KILL='", raw,
                     "' is not <rank>:<step> or <rank>:<step>:always (e.g. 1:6)");
    env.kill = KillFaultSpec{static_cast<int>(*rank), *step, always};
  }
  if (auto kib = read_integer("DTRAIN_FAULT_FILE_LIMIT_KIB", 1)) {
    env.file_limit_kib = static_cast<std::uint64_t>(*kib);
  }
  return env;
}

std::optional<std::string> read_nccl_algo() {
  const char* raw = value_of("NCCL_ALGO");
  if (raw == nullptr) return std::nullopt;
  return std::string(raw);
}

bool set_env_default(const char* name, const char* value) {
  if (has_env(name)) return false;
  return ::setenv(name, value, /*overwrite=*/0) == 0;
}

ScopedEnvSetting::ScopedEnvSetting(const char* name, const std::string& value) : name_(name) {
  if (const char* previous = raw_value(name)) previous_ = previous;
  active_ = ::setenv(name, value.c_str(), /*overwrite=*/1) == 0;
}

ScopedEnvSetting::~ScopedEnvSetting() {
  if (!active_) return;
  if (previous_) {
    ::setenv(name_.c_str(), previous_->c_str(), 1);
  } else {
    ::unsetenv(name_.c_str());
  }
}

LaunchInfo detect_launch() {
  LaunchInfo info;
  if (has_env("OMPI_COMM_WORLD_RANK")) {
    info.launcher = "openmpi";
    info.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    info.size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    info.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    info.local_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1);
  } else if (has_env("PMIX_RANK") || has_env("PMI_RANK")) {
    info.launcher = "pmi";
    info.rank = env_int("PMIX_RANK", env_int("PMI_RANK", 0));
    info.size = env_int("PMI_SIZE", env_int("SLURM_NTASKS", 1));
    info.local_rank = env_int("MPI_LOCALRANKID", env_int("SLURM_LOCALID", 0));
    info.local_size = env_int("MPI_LOCALNRANKS", env_int("SLURM_NTASKS_PER_NODE", 1));
  } else if (has_env("SLURM_PROCID")) {
    info.launcher = "slurm";
    info.rank = env_int("SLURM_PROCID", 0);
    info.size = env_int("SLURM_NTASKS", 1);
    info.local_rank = env_int("SLURM_LOCALID", 0);
    info.local_size = env_int("SLURM_NTASKS_PER_NODE", 1);
  }
  if (info.size < 1) info.size = 1;
  if (info.local_size < 1) info.local_size = 1;
  return info;
}

}  // namespace dtrain
