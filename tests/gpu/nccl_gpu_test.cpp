// The NCCL backend on real GPUs, one GPU per rank, launched by ctest through
// mpiexec with the shared MPI test main. Every test skips itself (on every
// rank alike) when this node has fewer visible CUDA devices than ranks,
// which includes machines with the CUDA runtime but no driver.
//
// Tensors are views of cudaMalloc'd memory (cuda_tensor_view.h), so these
// tests also run with the CPU-only LibTorch; data moves with cudaMemcpy on
// the legacy default stream, which is the stream the backend orders against
// when LibTorch has no CUDA.

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "dtrain/collectives/nccl.h"
#include "dtrain/error.h"
#include "dtrain/runtime.h"
#include "tests/mpi/mpi_test_env.h"
#include "tests/nccl/cuda_tensor_view.h"

namespace dtrain::collectives {
namespace {

using dtrain::testing::world;

#define ASSERT_CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

bool enough_gpus() {
  return visible_cuda_device_count() >= std::max(1, detect_launch().local_size);
}

// Says once, in a line ctest's SKIP_REGULAR_EXPRESSION recognizes, that
// this machine cannot run the suite (every test then skips itself).
class GpuCheck : public ::testing::Environment {
 public:
  void SetUp() override {
    if (!enough_gpus()) {
      std::printf("dtrain-gpu-tests: not enough CUDA devices (%d visible); skipping\n",
                  visible_cuda_device_count());
    }
  }
};
const ::testing::Environment* const kGpuCheck = ::testing::AddGlobalTestEnvironment(new GpuCheck);

// One cudaMalloc'd buffer, freed at scope exit.
class DeviceMemory {
 public:
  explicit DeviceMemory(std::size_t bytes) {
    if (cudaMalloc(&data_, bytes == 0 ? 1 : bytes) != cudaSuccess) data_ = nullptr;
  }
  ~DeviceMemory() { cudaFree(data_); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  void* get() const { return data_; }

 private:
  void* data_ = nullptr;
};

template <typename T>
void upload(void* device, const std::vector<T>& host) {
  ASSERT_CUDA_OK(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
}

template <typename T>
std::vector<T> download(const void* device, std::size_t count) {
  std::vector<T> host(count);
  EXPECT_EQ(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost),
            cudaSuccess);
  return host;
}

class NcclGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!enough_gpus()) {
      GTEST_SKIP() << "needs one CUDA device per rank on this node; " << visible_cuda_device_count()
                   << " visible";
    }
    NcclOptions options;
    options.name = "gpu-test";
    options.timeout = std::chrono::seconds(60);
    comm_ = make_nccl_communicator(world(), options);
    device_ = detect_launch().local_rank;
    ASSERT_CUDA_OK(cudaSetDevice(device_));
  }

  at::Tensor view(const DeviceMemory& memory, std::int64_t count, at::ScalarType dtype) const {
    return testing::cuda_tensor_view(memory.get(), {count}, dtype, device_);
  }

  std::shared_ptr<Communicator> comm_;
  int device_ = 0;
};

TEST_F(NcclGpuTest, AllReduceSumsEveryDtype) {
  const int n = comm_->size();
  const int r = comm_->rank();
  constexpr std::int64_t kCount = 1000;
  {
    DeviceMemory memory(kCount * sizeof(float));
    upload(memory.get(), std::vector<float>(kCount, static_cast<float>(r + 1)));
    comm_->all_reduce(view(memory, kCount, at::kFloat))->wait();
    for (float v : download<float>(memory.get(), kCount)) ASSERT_EQ(v, n * (n + 1) / 2.0f);
  }
  {
    DeviceMemory memory(kCount * sizeof(double));
    upload(memory.get(), std::vector<double>(kCount, r + 0.5));
    AllReduceOptions average;
    average.op = ReduceOp::kAvg;
    comm_->all_reduce(view(memory, kCount, at::kDouble), average)->wait();
    for (double v : download<double>(memory.get(), kCount))
      ASSERT_DOUBLE_EQ(v, (n - 1) / 2.0 + 0.5);
  }
  {
    DeviceMemory memory(kCount * sizeof(std::int64_t));
    upload(memory.get(), std::vector<std::int64_t>(kCount, r));
    AllReduceOptions maximum;
    maximum.op = ReduceOp::kMax;
    comm_->all_reduce(view(memory, kCount, at::kLong), maximum)->wait();
    for (std::int64_t v : download<std::int64_t>(memory.get(), kCount)) ASSERT_EQ(v, n - 1);
  }
  {
    DeviceMemory memory(kCount * sizeof(std::int32_t));
    upload(memory.get(), std::vector<std::int32_t>(kCount, r + 2));
    AllReduceOptions minimum;
    minimum.op = ReduceOp::kMin;
    comm_->all_reduce(view(memory, kCount, at::kInt), minimum)->wait();
    for (std::int32_t v : download<std::int32_t>(memory.get(), kCount)) ASSERT_EQ(v, 2);
  }
  {
    DeviceMemory memory(kCount);
    upload(memory.get(), std::vector<std::uint8_t>(kCount, 1));
    comm_->all_reduce(view(memory, kCount, at::kByte))->wait();
    for (std::uint8_t v : download<std::uint8_t>(memory.get(), kCount)) ASSERT_EQ(v, n);
  }
  {
    // float16 / bfloat16: 1.0 is 0x3C00 / 0x3F80; the sum of n ones is exact.
    DeviceMemory half(kCount * 2);
    DeviceMemory bf16(kCount * 2);
    upload(half.get(), std::vector<std::uint16_t>(kCount, 0x3C00));
    upload(bf16.get(), std::vector<std::uint16_t>(kCount, 0x3F80));
    comm_->all_reduce(view(half, kCount, at::kHalf))->wait();
    comm_->all_reduce(view(bf16, kCount, at::kBFloat16))->wait();
    const auto h = download<std::uint16_t>(half.get(), kCount);
    const auto b = download<std::uint16_t>(bf16.get(), kCount);
    if (n == 1) {
      EXPECT_EQ(h[0], 0x3C00);
      EXPECT_EQ(b[0], 0x3F80);
    } else if (n == 2) {
      EXPECT_EQ(h[0], 0x4000);  // 2.0
      EXPECT_EQ(b[0], 0x4000);
    }
  }
}

TEST_F(NcclGpuTest, BroadcastAllGatherReduceScatter) {
  const int n = comm_->size();
  const int r = comm_->rank();
  constexpr std::int64_t kCount = 257;
  DeviceMemory one(kCount * sizeof(float));
  DeviceMemory all(kCount * n * sizeof(float));

  upload(one.get(), std::vector<float>(kCount, static_cast<float>(r == n - 1 ? 42 : r)));
  BroadcastOptions from_last;
  from_last.root = n - 1;
  comm_->broadcast(view(one, kCount, at::kFloat), from_last)->wait();
  for (float v : download<float>(one.get(), kCount)) ASSERT_EQ(v, 42.0f);

  upload(one.get(), std::vector<float>(kCount, static_cast<float>(r)));
  comm_->all_gather(view(all, kCount * n, at::kFloat), view(one, kCount, at::kFloat))->wait();
  const auto gathered = download<float>(all.get(), kCount * n);
  for (int i = 0; i < n; ++i) ASSERT_EQ(gathered[i * kCount], static_cast<float>(i));

  upload(all.get(), std::vector<float>(kCount * n, 1.0f));
  comm_->reduce_scatter(view(one, kCount, at::kFloat), view(all, kCount * n, at::kFloat))->wait();
  for (float v : download<float>(one.get(), kCount)) ASSERT_EQ(v, static_cast<float>(n));
}

TEST_F(NcclGpuTest, SendRecvAroundARingAndBarrier) {
  const int n = comm_->size();
  if (n < 2) GTEST_SKIP() << "needs two ranks";
  const int r = comm_->rank();
  DeviceMemory out(64 * sizeof(int));
  DeviceMemory in(64 * sizeof(int));
  upload(out.get(), std::vector<int>(64, r));
  // Even ranks send first, odd ranks receive first: NCCL point-to-point
  // blocks the stream until the peer matches.
  auto sent = [&] { return comm_->send(view(out, 64, at::kInt), (r + 1) % n, {}); };
  auto received = [&] { return comm_->recv(view(in, 64, at::kInt), (r + n - 1) % n, {}); };
  if (r % 2 == 0) {
    sent()->wait();
    received()->wait();
  } else {
    received()->wait();
    sent()->wait();
  }
  for (int v : download<int>(in.get(), 64)) ASSERT_EQ(v, (r + n - 1) % n);
  comm_->barrier({})->wait();
}

TEST_F(NcclGpuTest, SplitIntoOddAndEvenRanks) {
  const int r = comm_->rank();
  auto half = comm_->split(r % 2, r, {});
  ASSERT_NE(half, nullptr);
  DeviceMemory memory(sizeof(float));
  upload(memory.get(), std::vector<float>{1.0f});
  half->all_reduce(view(memory, 1, at::kFloat))->wait();
  EXPECT_EQ(download<float>(memory.get(), 1)[0], static_cast<float>(half->size()));
}

TEST_F(NcclGpuTest, BlockingWaitAndCpuTensorRejection) {
  NcclOptions options;
  options.name = "gpu-blocking";
  options.blocking_wait = true;
  auto blocking = make_nccl_communicator(world(), options);
  DeviceMemory memory(1024 * sizeof(float));
  upload(memory.get(), std::vector<float>(1024, 1.0f));
  auto work = blocking->all_reduce(view(memory, 1024, at::kFloat));
  work->wait();
  EXPECT_TRUE(work->is_completed());
  EXPECT_THROW(blocking->all_reduce(at::Tensor()), InvalidArgument);
}

}  // namespace
}  // namespace dtrain::collectives
