// Creating NCCL communicators: options, device choice, the unique-id
// exchange over a CPU communicator, NCCL's initialization under a timeout.
//
// Sequence on every rank of the bootstrap communicator:
//   1. local checks: options, a GPU for this rank, NCCL_ALGO; rank 0 also
//      creates the ncclUniqueId.
//   2. all_reduce(max) of a "this rank failed" flag over the bootstrap, so
//      that a rank without a GPU makes every rank fail at once with a
//      message, instead of leaving the others to time out in step 3.
//   3. broadcast of the unique id (sizeof(ncclUniqueId) bytes) from rank 0.
//   4. ncclCommInitRankConfig, non-blocking, polled until it settles or the
//      timeout passes (then ncclCommAbort and TimeoutError).

#include <ATen/ops/empty.h>

#include <cstring>
#include <optional>
#include <string>

#include "dtrain/collectives/nccl.h"
#include "dtrain/env.h"
#include "dtrain/error.h"
#include "src/collectives/nccl/nccl_communicator.h"

namespace dtrain::collectives {

void NcclOptions::validate() const {
  DTRAIN_CHECK_ARG(!name.empty(), "NcclOptions::name must not be empty");
  DTRAIN_CHECK_ARG(timeout.count() > 0, "NcclOptions::timeout must be positive, got ",
                   timeout.count(), " ms");
  DTRAIN_CHECK_ARG(device >= -1,
                   "NcclOptions::device must be a CUDA device index, or -1 for the "
                   "local rank; got ",
                   device);
  DTRAIN_CHECK_ARG(algorithm == Algorithm::kAuto || algorithm == Algorithm::kRing ||
                       algorithm == Algorithm::kTree,
                   "NcclOptions::algorithm must be auto, ring or tree; '", to_string(algorithm),
                   "' is an algorithm of the CPU (MPI) backend");
}

int visible_cuda_device_count() noexcept {
  try {
    return detail::make_real_cuda_nccl_api()->device_count();
  } catch (...) {
    return 0;
  }
}

namespace detail {
namespace {

using Clock = std::chrono::steady_clock;

// NCCL_ALGO's per-collective syntax ("allreduce:ring") appeared in 2.24.
constexpr int kNcclAlgoSyntaxVersion = 22400;

// Step 1 without the unique id: which device this rank uses.
int choose_device(CudaNcclApi& api, const NcclOptions& options, const LaunchInfo& launch,
                  int rank) {
  int count = 0;
  std::string why;
  try {
    count = api.device_count();
  } catch (const CommError& e) {
    why = e.what();
  }
  DTRAIN_CHECK_ARG(count > 0, "make_nccl_communicator: no CUDA device visible to rank ", rank,
                   why.empty() ? std::string() : " (" + why + ")",
                   "; the NCCL backend needs one GPU per process. On a machine without GPUs "
                   "use --device cpu (the MPI backend, Runtime::world()); otherwise check the "
                   "driver and CUDA_VISIBLE_DEVICES");
  if (options.device >= 0) {
    DTRAIN_CHECK_ARG(options.device < count, "make_nccl_communicator: NcclOptions::device is ",
                     options.device, " but rank ", rank, " sees only ", count,
                     " CUDA device(s) (0..", count - 1, "); check CUDA_VISIBLE_DEVICES");
    return options.device;
  }
  DTRAIN_CHECK_ARG(launch.local_rank < count, "make_nccl_communicator: rank ", rank,
                   " is local rank ", launch.local_rank, " on its node, which has only ", count,
                   " visible CUDA device(s), and NcclOptions::device = -1 gives each local rank "
                   "its own GPU. Launch at most ",
                   count,
                   " processes per node (mpirun --map-by ppr:N:node, srun "
                   "--ntasks-per-node=N) or set NcclOptions::device");
  return launch.local_rank;
}

void check_algorithm_setting(CudaNcclApi& api, const NcclOptions& options) {
  if (options.algorithm == Algorithm::kAuto) return;
  const std::optional<std::string> env = read_nccl_algo();
  DTRAIN_CHECK_ARG(!env, "make_nccl_communicator: NcclOptions::algorithm is '",
                   to_string(options.algorithm), "' but NCCL_ALGO='", env.value_or(""),
                   "' is set in the environment; choose one (unset NCCL_ALGO, or use "
                   "algorithm auto to let NCCL_ALGO decide)");
  const int version = api.nccl_version();
  DTRAIN_CHECK_ARG(version >= kNcclAlgoSyntaxVersion,
                   "make_nccl_communicator: NcclOptions::"
                   "algorithm '",
                   to_string(options.algorithm), "' needs NCCL >= 2.24, found ", version,
                   "; use algorithm auto");
}

// The libnccl.so.2 this process loaded must be the release of the nccl.h it
// was compiled against: structures such as ncclConfig_t change between
// releases, and NCCL writes into them (a second NCCL on the library path,
// e.g. a system one beside a PyTorch wheel's, otherwise corrupts memory).
void check_nccl_library(CudaNcclApi& api) {
  const int loaded = api.nccl_version();
  const int compiled = api.nccl_header_version();
  const auto release = [](int code) { return code / 100; };  // major * 100 + minor
  DTRAIN_CHECK_ARG(release(loaded) == release(compiled),
                   "make_nccl_communicator: this program was compiled against NCCL ",
                   compiled / 10000, ".", compiled / 100 % 100, ".", compiled % 100,
                   " (nccl.h) but loaded libnccl ", loaded / 10000, ".", loaded / 100 % 100, ".",
                   loaded % 100,
                   "; build and run with one NCCL (NCCL_HOME at configure time, the library "
                   "path at run time)");
}

// Step 2: true if any rank failed its local checks.
bool any_rank_failed(Communicator& bootstrap, bool this_rank_failed, Timeout timeout) {
  at::Tensor flag = at::empty({1}, at::kInt);
  *flag.data_ptr<int>() = this_rank_failed ? 1 : 0;
  AllReduceOptions reduce;
  reduce.op = ReduceOp::kMax;
  reduce.timeout = timeout;
  bootstrap.all_reduce(flag, reduce)->wait();
  return *flag.data_ptr<int>() != 0;
}

// Step 3: rank 0's id, on every rank.
NcclUniqueId share_unique_id(Communicator& bootstrap, const NcclUniqueId& mine, Timeout timeout) {
  at::Tensor bytes = at::empty({static_cast<std::int64_t>(sizeof(NcclUniqueId))}, at::kByte);
  std::memcpy(bytes.data_ptr(), mine.bytes.data(), sizeof(NcclUniqueId));
  BroadcastOptions options;
  options.root = 0;
  options.timeout = timeout;
  bootstrap.broadcast(bytes, options)->wait();
  NcclUniqueId id;
  std::memcpy(id.bytes.data(), bytes.data_ptr(), sizeof(NcclUniqueId));
  return id;
}

}  // namespace

const char* ScopedNcclAlgo::value(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::kRing:
      return "allreduce:ring";
    case Algorithm::kTree:
      return "allreduce:tree";
    default:
      return nullptr;
  }
}

ScopedNcclAlgo::ScopedNcclAlgo(Algorithm algorithm) {
  const char* setting = value(algorithm);
  if (setting == nullptr) return;
  // At creation check_algorithm_setting() made sure NCCL_ALGO was unset; a
  // split restores whatever the program may have set since.
  setting_.emplace("NCCL_ALGO", setting);
}

std::shared_ptr<Communicator> create_nccl_communicator(Communicator& bootstrap, NcclOptions options,
                                                       NcclBackendHooks hooks) {
  options.validate();
  DTRAIN_CHECK_ARG(hooks.api && hooks.streams, "create_nccl_communicator: missing hooks");
  CudaNcclApi& api = *hooks.api;
  const int rank = bootstrap.rank();
  const int size = bootstrap.size();

  // 1. Local checks (and rank 0's unique id).
  int device = -1;
  NcclUniqueId id;
  std::exception_ptr local_error;
  try {
    device = choose_device(api, options, hooks.launch, rank);
    check_nccl_library(api);
    check_algorithm_setting(api, options);
    if (rank == 0) {
      DeviceGuard guard(api, device);
      id = api.get_unique_id();
    }
  } catch (const Error&) {
    local_error = std::current_exception();
  }
  // 2. Every rank learns whether all are ready.
  const bool someone_failed = any_rank_failed(bootstrap, local_error != nullptr, options.timeout);
  if (local_error) std::rethrow_exception(local_error);
  DTRAIN_CHECK_T(CommError, !someone_failed, "make_nccl_communicator('", options.name,
                 "'): another rank of '", bootstrap.name(),
                 "' could not set up its GPU (see that rank's error); no NCCL communicator was "
                 "created");
  // 3. The unique id.
  id = share_unique_id(bootstrap, id, options.timeout);

  // 4. NCCL's initialization, non-blocking so that it has a timeout.
  DeviceGuard guard(api, device);
  NcclComm comm = nullptr;
  try {
    ScopedNcclAlgo algo(options.algorithm);
    NcclCommConfig config;
    config.name = options.name;
    comm = api.comm_init_rank(size, id, rank, config);
    if (!wait_settled(api, comm, Clock::now() + options.timeout)) {
      DTRAIN_THROW(TimeoutError, "make_nccl_communicator: NCCL initialization of communicator '",
                   options.name, "' (rank ", rank, " of ", size, ", cuda:", device,
                   ") did not complete within ", options.timeout.count(),
                   " ms (a rank did not join, or the network between nodes is blocked; "
                   "NCCL_DEBUG=INFO shows where it stopped); the NCCL communicator was aborted");
    }
  } catch (...) {
    if (comm != nullptr) {
      try {
        api.comm_abort(comm);
      } catch (...) {
        // Report the first error.
      }
    }
    throw;
  }
  return std::make_shared<NcclCommunicator>(comm, rank, size, device, std::move(options),
                                            std::move(hooks));
}

}  // namespace detail

std::shared_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, NcclOptions options) {
  if (std::optional<Timeout> timeout = read_env_overrides().timeout) options.timeout = *timeout;
  detail::NcclBackendHooks hooks;
  hooks.api = detail::make_real_cuda_nccl_api();
  hooks.streams = detail::make_torch_current_stream_provider();
  hooks.launch = detect_launch();
  return detail::create_nccl_communicator(bootstrap, std::move(options), std::move(hooks));
}

}  // namespace dtrain::collectives
