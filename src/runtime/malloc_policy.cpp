// The allocator setup Runtime applies before anything else (MallocPolicy).

#include <optional>
#include <string>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "dtrain/env.h"
#include "dtrain/runtime.h"

namespace dtrain {
namespace {

// glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX):
// mallopt refuses more.
constexpr std::size_t kMmapThreshold = std::size_t{32} << 20;
// A freed heap top is returned to the kernel only above this; a step's peak
// that fits under it is reused by the next step instead of faulted in again.
constexpr std::size_t kTrimThreshold = std::size_t{1} << 30;

}  // namespace

MallocPolicy plan_malloc_policy() {
  MallocPolicy policy;
  if (read_malloc_tuning_env() == false) {
    policy.reason = "DTRAIN_MALLOC_TUNING=0";
    return policy;
  }
  if (const std::optional<std::string> name = read_user_malloc_setting()) {
    policy.reason = *name + " is set: glibc malloc left as configured";
    return policy;
  }
#if defined(__GLIBC__)
  policy.tune = true;
  policy.mmap_threshold = kMmapThreshold;
  policy.trim_threshold = kTrimThreshold;
  policy.reason = "freed blocks up to 32 MiB stay in the process (DTRAIN_MALLOC_TUNING=0: off)";
#else
  policy.reason = "not glibc";
#endif
  return policy;
}

bool apply_malloc_policy(const MallocPolicy& policy) {
  if (!policy.tune) return true;
#if defined(__GLIBC__)
  // mallopt returns 1 on success; setting either also stops glibc from
  // moving both with the allocation history.
  return mallopt(M_MMAP_THRESHOLD, static_cast<int>(policy.mmap_threshold)) == 1 &&
         mallopt(M_TRIM_THRESHOLD, static_cast<int>(policy.trim_threshold)) == 1;
#else
  return false;
#endif
}

}  // namespace dtrain
