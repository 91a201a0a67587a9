// The only place dtrain reads DTRAIN_* environment variables.

#include "dtrain/env.h"

#include <cstdlib>
#include <string>

#include "dtrain/error.h"

namespace dtrain {
namespace {

std::optional<long long> read_integer(const char* name, long long min_value) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return std::nullopt;
  char* end = nullptr;
  const long long value = std::strtoll(raw, &end, 10);
  DTRAIN_CHECK_ARG(end != raw && *end == '\0' && value >= min_value, "environment variable ", name,
                   "='", raw, "' is not an integer >= ", min_value);
  return value;
}

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
  if (const char* algo = std::getenv("DTRAIN_ALLREDUCE_ALGO"); algo != nullptr && *algo != '\0') {
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
  const char* raw = std::getenv("DTRAIN_MALLOC_TUNING");
  if (raw == nullptr || *raw == '\0') return std::nullopt;
  const std::string value(raw);
  DTRAIN_CHECK_ARG(value == "0" || value == "1", "environment variable DTRAIN_MALLOC_TUNING='",
                   value, "' is not 0 or 1");
  return value == "1";
}

HeartbeatEnv read_heartbeat_env() {
  HeartbeatEnv env;
  if (auto ms = read_integer("DTRAIN_HEARTBEAT_MS", 0))
    env.interval = std::chrono::milliseconds(*ms);
  if (auto ms = read_integer("DTRAIN_HEARTBEAT_TIMEOUT_MS", 1)) {
    env.timeout = std::chrono::milliseconds(*ms);
  }
  return env;
}

}  // namespace dtrain
