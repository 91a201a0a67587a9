// allreduce_perf: bandwidth and latency of dtrain's collective algorithms
// against the MPI library's own call, in the same process and run
// (nccl-tests style). --op picks the collective:
//
//   mpirun -n 2 allreduce_perf -b 8 -e 128M -f 2 --algo ring,tree,rhd,native,shm,auto
//   mpirun -n 2 allreduce_perf --op reduce_scatter -b 1K -e 64M -f 4   (ring,shm,auto,mpi)
//   mpirun -n 2 allreduce_perf --op all_gather -b 1K -e 64M -f 4
//
// For each size, every algorithm runs in turn (warm-up, then `iters` ops
// issued back to back and waited for together, as nccl-tests does); time is
// the slowest rank's. `mpi` is the blocking MPI call made directly on the
// caller's thread (MPI_Allreduce, MPI_Reduce_scatter_block, MPI_Allgather):
// the peer a user would otherwise pick. `native` (all-reduce only) is the
// same MPI library's MPI_Iallreduce run through dtrain's progress thread.
// The size of a reduce-scatter or all-gather is the whole n-rank buffer
// (the input of a reduce-scatter, the output of an all-gather), as in
// nccl-tests, and busbw = algbw * (n-1)/n for them.

#include <mpi.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "benchmarks/harness.h"
#include "dtrain/collectives/communicator.h"
#include "dtrain/config.h"
#if DTRAIN_HAVE_NCCL
#include "dtrain/collectives/nccl.h"
#endif
#include "dtrain/error.h"
#include "dtrain/runtime.h"

namespace {

using dtrain::collectives::Algorithm;
using dtrain::collectives::Communicator;
using Clock = std::chrono::steady_clock;

struct Row {
  std::string algo;
  std::size_t bytes = 0;
  std::size_t count = 0;
  double time_us = 0;
  double algbw = 0;
  double busbw = 0;
  long wrong = 0;
  std::string ran;  // for auto: the algorithm it picked (from the op's description)
};

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "float") return at::kFloat;
  if (name == "float64" || name == "double") return at::kDouble;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16" || name == "half") return at::kHalf;
  if (name == "int32") return at::kInt;
  if (name == "int64") return at::kLong;
  if (name == "uint8") return at::kByte;
  throw dtrain::InvalidArgument("unknown --dtype '" + name +
                                "' (float32, float64, bfloat16, float16, int32, int64, uint8)");
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// "all_reduce(ring, sum, ...)" -> "ring".
std::string algorithm_of(const std::string& description) {
  const auto open = description.find('(');
  const auto comma = description.find(',', open);
  if (open == std::string::npos || comma == std::string::npos) return "?";
  return description.substr(open + 1, comma - open - 1);
}

// "4 ranks on 2 hosts (h1: 2, h2: 2)": where the ranks run, in rank order.
std::string placement(int size) {
  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int len = 0;
  MPI_Get_processor_name(name, &len);
  std::vector<char> all(static_cast<std::size_t>(size) * MPI_MAX_PROCESSOR_NAME);
  MPI_Allgather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all.data(), MPI_MAX_PROCESSOR_NAME,
                MPI_CHAR, MPI_COMM_WORLD);
  std::vector<std::pair<std::string, int>> hosts;
  for (int r = 0; r < size; ++r) {
    const std::string host(&all[static_cast<std::size_t>(r) * MPI_MAX_PROCESSOR_NAME]);
    auto it =
        std::find_if(hosts.begin(), hosts.end(), [&](const auto& h) { return h.first == host; });
    if (it == hosts.end()) {
      hosts.emplace_back(host, 1);
    } else {
      ++it->second;
    }
  }
  std::ostringstream out;
  out << size << " ranks on " << hosts.size() << (hosts.size() == 1 ? " host (" : " hosts (");
  for (std::size_t i = 0; i < hosts.size(); ++i) {
    out << (i ? ", " : "") << hosts[i].first << ": " << hosts[i].second;
  }
  out << ")";
  return out.str();
}

double max_over_ranks(double value) {
  double out = value;
  MPI_Allreduce(&value, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

enum class Op { kAllReduce, kReduceScatter, kAllGather };

Op parse_op(const std::string& name) {
  if (name == "all_reduce") return Op::kAllReduce;
  if (name == "reduce_scatter") return Op::kReduceScatter;
  if (name == "all_gather") return Op::kAllGather;
  throw dtrain::InvalidArgument("unknown --op '" + name +
                                "' (all_reduce, reduce_scatter, all_gather)");
}

const char* mpi_call(Op op) {
  switch (op) {
    case Op::kAllReduce:
      return "MPI_Allreduce";
    case Op::kReduceScatter:
      return "MPI_Reduce_scatter_block";
    case Op::kAllGather:
      return "MPI_Allgather";
  }
  return "";
}

// The buffers of one op: `input` and `output` are the same tensor for an
// all-reduce (in place); for the others `input` / `output` hold one rank's
// block or all n blocks, as the collective takes them.
struct Buffers {
  at::Tensor input;
  at::Tensor output;
};

// One op on `buffers`, by `algo` ("mpi" = the MPI call made directly), on
// the communicator registered for that algorithm.
class Runner {
 public:
  Runner(Op op, MPI_Comm raw, MPI_Datatype type) : op_(op), raw_(raw), type_(type) {}

  void add(const std::string& algo, Communicator& comm) { comms_[algo] = &comm; }

  // Issues `iters` ops back to back and waits for all of them. Returns the
  // last op's description, e.g. "all_reduce(ring, sum, 8 x float32) on
  // communicator 'bench'" ("" for mpi).
  std::string run(const std::string& algo, const Buffers& buffers, int iters) {
    if (algo == "mpi") {
      for (int i = 0; i < iters; ++i) run_mpi(buffers);
      return "";
    }
    const auto algorithm = dtrain::collectives::parse_algorithm(algo);
    std::shared_ptr<dtrain::collectives::Work> last;
    Communicator& comm = *comms_.at(algo);
    for (int i = 0; i < iters; ++i) {
      switch (op_) {
        case Op::kAllReduce: {
          dtrain::collectives::AllReduceOptions options;
          options.algorithm = algorithm;
          last = comm.all_reduce(buffers.output, options);
          break;
        }
        case Op::kReduceScatter: {
          dtrain::collectives::ReduceScatterOptions options;
          options.algorithm = algorithm;
          last = comm.reduce_scatter(buffers.output, buffers.input, options);
          break;
        }
        case Op::kAllGather: {
          dtrain::collectives::AllGatherOptions options;
          options.algorithm = algorithm;
          last = comm.all_gather(buffers.output, buffers.input, options);
          break;
        }
      }
    }
    if (!last) return "";
    last->wait();  // ops complete in issue order
    return last->description();
  }

 private:
  void run_mpi(const Buffers& b) {
    switch (op_) {
      case Op::kAllReduce:
        MPI_Allreduce(MPI_IN_PLACE, b.output.data_ptr(), static_cast<int>(b.output.numel()), type_,
                      MPI_SUM, raw_);
        break;
      case Op::kReduceScatter:
        MPI_Reduce_scatter_block(b.input.data_ptr(), b.output.data_ptr(),
                                 static_cast<int>(b.output.numel()), type_, MPI_SUM, raw_);
        break;
      case Op::kAllGather:
        MPI_Allgather(b.input.data_ptr(), static_cast<int>(b.input.numel()), type_,
                      b.output.data_ptr(), static_cast<int>(b.input.numel()), type_, raw_);
        break;
    }
  }

  Op op_;
  std::map<std::string, Communicator*> comms_;
  MPI_Comm raw_;
  MPI_Datatype type_;
};

// --device cuda needs the NCCL backend, a GPU, and a LibTorch that can
// allocate CUDA tensors; each missing piece gets its own message.
void check_device(const std::string& device, Op op, const std::vector<std::string>& algos) {
  if (device == "cpu") return;
  if (device != "cuda")
    throw dtrain::InvalidArgument("--device must be cpu or cuda, got '" + device + "'");
#if DTRAIN_HAVE_NCCL
  if (dtrain::collectives::visible_cuda_device_count() == 0) {
    throw dtrain::InvalidArgument("--device cuda: no CUDA device visible; use --device cpu");
  }
  if (!at::hasCUDA()) {
    throw dtrain::InvalidArgument(
        "--device cuda: this LibTorch cannot allocate CUDA tensors (Debian's libtorch is "
        "CPU-only); build dtrain against a CUDA-enabled LibTorch, see docs/gpu.md");
  }
  for (const std::string& algo : algos) {
    if (op != Op::kAllReduce && algo != "auto") {
      throw dtrain::InvalidArgument(
          "--device cuda: NCCL chooses how to run reduce_scatter and all_gather; pass --algo "
          "auto");
    }
    if (algo != "ring" && algo != "tree" && algo != "auto") {
      throw dtrain::InvalidArgument("--device cuda runs NCCL's ring, tree and auto; '" + algo +
                                    "' is a CPU algorithm (pass --algo ring,tree,auto)");
    }
  }
#else
  (void)op;
  (void)algos;
  throw dtrain::InvalidArgument(
      "--device cuda: this build of dtrain has no NCCL backend (CUDA toolkit and NCCL were not "
      "found when it was configured)");
#endif
}

MPI_Datatype mpi_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return MPI_FLOAT;
    case at::kDouble:
      return MPI_DOUBLE;
    case at::kInt:
      return MPI_INT32_T;
    case at::kLong:
      return MPI_INT64_T;
    case at::kByte:
      return MPI_UINT8_T;
    default:
      return MPI_DATATYPE_NULL;
  }
}

}  // namespace

int main(int argc, char** argv) {
  dtrain::Runtime runtime(&argc, &argv);
  cxxopts::Options cli("allreduce_perf",
                       "Collective bandwidth of dtrain's algorithms vs the MPI library's call");
  dtrain::bench::SweepOptions::add_to(cli);
  cli.add_options("collective")("op", "all_reduce, reduce_scatter or all_gather",
                                cxxopts::value<std::string>()->default_value("all_reduce"))(
      "algo",
      "comma-separated algorithms: ring,tree,rhd,native,shm,auto and mpi (the MPI call made "
      "directly); reduce_scatter and all_gather run ring,shm,auto,mpi (the default for them)",
      cxxopts::value<std::string>()->default_value("ring,tree,rhd,native,shm,auto,mpi"))(
      "d,dtype", "element type", cxxopts::value<std::string>()->default_value("float32"))(
      "device",
      "cpu (MPI backend) or cuda (NCCL backend: algorithms ring, tree, auto; needs a GPU per "
      "rank and a CUDA-enabled LibTorch)",
      cxxopts::value<std::string>()->default_value("cpu"))(
      "threads", "intra-op threads of LibTorch", cxxopts::value<int>()->default_value("1"));
  dtrain::bench::SweepOptions sweep;
  std::vector<std::string> algos;
  at::ScalarType dtype;
  std::string device;
  Op op = Op::kAllReduce;
  try {
    auto parsed = dtrain::cli::parse(cli, argc, argv);
    if (parsed.count("help")) {
      if (runtime.rank() == 0) std::cout << cli.help() << std::endl;
      return 0;
    }
    sweep = dtrain::bench::SweepOptions::from(parsed);
    op = parse_op(parsed["op"].as<std::string>());
    algos = split_list(parsed["algo"].as<std::string>());
    if (op != Op::kAllReduce && parsed.count("algo") == 0) algos = {"ring", "shm", "auto", "mpi"};
    for (const auto& a : algos) {
      if (a == "mpi") continue;
      const auto algorithm = dtrain::collectives::parse_algorithm(a);
      if (op != Op::kAllReduce && algorithm != Algorithm::kRing && algorithm != Algorithm::kShm &&
          algorithm != Algorithm::kAuto) {
        throw dtrain::InvalidArgument("--algo " + a + ": " + parsed["op"].as<std::string>() +
                                      " runs ring, shm, auto and mpi");
      }
    }
    dtype = parse_dtype(parsed["dtype"].as<std::string>());
    device = parsed["device"].as<std::string>();
    if (device == "cuda" && parsed.count("algo") == 0) {
      algos = op == Op::kAllReduce ? std::vector<std::string>{"ring", "tree", "auto"}
                                   : std::vector<std::string>{"auto"};
    }
    check_device(device, op, algos);
    at::set_num_threads(parsed["threads"].as<int>());
  } catch (const std::exception& e) {
    if (runtime.rank() == 0) std::cerr << "allreduce_perf: " << e.what() << "\n";
    return 2;
  }
  const bool has_mpi = std::find(algos.begin(), algos.end(), "mpi") != algos.end();
  if (has_mpi && mpi_type(dtype) == MPI_DATATYPE_NULL) {
    if (runtime.rank() == 0)
      std::cerr << "allreduce_perf: 'mpi' has no built-in type for this dtype\n";
    return 2;
  }

  dtrain::collectives::CommunicatorOptions comm_options;
  comm_options.name = "bench";
  comm_options.timeout = std::chrono::minutes(2);
  auto comm = runtime.world(comm_options);
  MPI_Comm raw;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw);
  Runner runner(op, raw, mpi_type(dtype));
  std::vector<std::shared_ptr<Communicator>> gpu_comms;
  at::TensorOptions tensor_options = at::TensorOptions().dtype(dtype);
  if (device == "cuda") {
#if DTRAIN_HAVE_NCCL
    // NCCL fixes its algorithm when a communicator is created: one each.
    for (const std::string& algo : algos) {
      dtrain::collectives::NcclOptions nccl;
      nccl.name = "bench-" + algo;
      nccl.algorithm = dtrain::collectives::parse_algorithm(algo);
      nccl.blocking_wait = true;  // timings need the host to wait for the GPU
      gpu_comms.push_back(dtrain::collectives::make_nccl_communicator(*comm, nccl));
      runner.add(algo, *gpu_comms.back());
    }
    tensor_options = tensor_options.device(at::kCUDA);
#endif
  } else {
    for (const std::string& algo : algos) runner.add(algo, *comm);
  }
  const int n = comm->size();
  const int rank = comm->rank();
  const std::size_t es = c10::elementSize(dtype);

  // Elements per rank (reduce_scatter, all_gather) or in all (all_reduce)
  // of a message of `bytes` bytes; at least one.
  auto block_of = [&](std::size_t bytes) {
    return std::max<std::size_t>(1, bytes / es / (op == Op::kAllReduce ? 1 : n));
  };
  // One input and one output buffer for all sizes, touched once, so page
  // faults stay out of the timings; and the same for the checks.
  const std::size_t max_block = block_of(sweep.max_bytes);
  const std::size_t max_total = op == Op::kAllReduce ? max_block : max_block * n;
  auto make_buffers = [&]() {
    Buffers all;
    all.output =
        at::zeros({static_cast<std::int64_t>(op == Op::kReduceScatter ? max_block : max_total)},
                  tensor_options);
    all.input =
        op == Op::kAllReduce
            ? all.output
            : at::zeros(
                  {static_cast<std::int64_t>(op == Op::kReduceScatter ? max_total : max_block)},
                  tensor_options);
    return all;
  };
  auto narrow = [&](const Buffers& all, std::size_t block) {
    const auto b = static_cast<std::int64_t>(block);
    const std::int64_t total = op == Op::kAllReduce ? b : b * n;
    Buffers out;
    out.output = all.output.narrow(0, 0, op == Op::kReduceScatter ? b : total);
    out.input = op == Op::kAllReduce ? out.output
                                     : all.input.narrow(0, 0, op == Op::kReduceScatter ? total : b);
    return out;
  };
  const Buffers buffer = make_buffers();
  const Buffers check_buffer = make_buffers();

  const std::string where = placement(n);
  std::vector<Row> rows;
  for (std::size_t bytes : sweep.sizes()) {
    const std::size_t block = block_of(bytes);
    const std::size_t total = op == Op::kAllReduce ? block : block * n;
    const Buffers buffers = narrow(buffer, block);
    for (const std::string& algo : algos) {
      Row row;
      row.algo = algo;
      row.count = total;
      row.bytes = total * es;
      if (sweep.check) {
        // Element i (of all n blocks) of rank r is (r + 1) * ((i % 3) + 1):
        // exact in every dtype.
        const Buffers t = narrow(check_buffer, block);
        const auto total_i = static_cast<std::int64_t>(total);
        const auto block_i = static_cast<std::int64_t>(block);
        at::Tensor pattern = at::arange(total_i, at::kInt).remainder_(3).add_(1);
        at::Tensor got;
        at::Tensor want;
        switch (op) {
          case Op::kAllReduce:
            t.output.copy_(pattern * (rank + 1));
            runner.run(algo, t, 1);
            got = t.output;
            want = pattern * (n * (n + 1) / 2);
            break;
          case Op::kReduceScatter:
            t.input.copy_(pattern * (rank + 1));
            runner.run(algo, t, 1);
            got = t.output;
            want = pattern.narrow(0, rank * block_i, block_i) * (n * (n + 1) / 2);
            break;
          case Op::kAllGather:
            t.input.copy_(pattern.narrow(0, rank * block_i, block_i) * (rank + 1));
            runner.run(algo, t, 1);
            got = t.output;
            want = pattern * at::arange(1, n + 1, at::kInt).repeat_interleave(block_i);
            break;
        }
        row.wrong = (got.cpu() != want.to(dtype)).sum().item<std::int64_t>();
        MPI_Allreduce(MPI_IN_PLACE, &row.wrong, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
      }
      // Sums of zeros stay finite however many iterations run.
      buffers.input.zero_();
      buffers.output.zero_();
      runner.run(algo, buffers, sweep.warmup_iters);
      MPI_Barrier(MPI_COMM_WORLD);
      const auto start = Clock::now();
      const std::string description = runner.run(algo, buffers, sweep.iters);
      if (algo == "auto" && !description.empty()) row.ran = algorithm_of(description);
      const double seconds =
          max_over_ranks(std::chrono::duration<double>(Clock::now() - start).count()) / sweep.iters;
      row.time_us = seconds * 1e6;
      row.algbw = dtrain::bench::algbw_gbs(row.bytes, seconds);
      row.busbw = op == Op::kAllReduce
                      ? dtrain::bench::allreduce_busbw_gbs(row.bytes, seconds, n)
                      : dtrain::bench::scatter_gather_busbw_gbs(row.bytes, seconds, n);
      rows.push_back(row);
    }
  }

  const std::string op_name = op == Op::kAllReduce       ? "all_reduce"
                              : op == Op::kReduceScatter ? "reduce_scatter"
                                                         : "all_gather";
  if (runtime.rank() == 0) {
    std::printf("# dtrain allreduce_perf: %s, %s, %s%s, warm-up %d, iterations %d\n",
                op_name.c_str(), where.c_str(), c10::toString(dtype),
                op == Op::kAllGather ? "" : " sum", sweep.warmup_iters, sweep.iters);
    std::printf("# mpi = %s called directly%s; size = %s; busbw = algbw * %s\n#\n", mpi_call(op),
                op == Op::kAllReduce ? "; native = MPI_Iallreduce through dtrain" : "",
                op == Op::kAllReduce ? "the message" : "all ranks' data (n blocks)",
                op == Op::kAllReduce ? "2(n-1)/n" : "(n-1)/n");
    std::map<std::string, double> busbw_sum;
    std::map<std::string, int> busbw_n;
    for (const std::string& algo : algos) {
      std::printf("# algorithm: %s\n", algo.c_str());
      std::printf("%12s %12s %12s %10s %10s %8s\n", "size(B)", "count", "time(us)", "algbw(GB/s)",
                  "busbw(GB/s)", "#wrong");
      for (const Row& r : rows) {
        if (r.algo != algo) continue;
        std::printf("%12zu %12zu %12.1f %10.3f %10.3f %8ld\n", r.bytes, r.count, r.time_us, r.algbw,
                    r.busbw, r.wrong);
        busbw_sum[algo] += r.busbw;
        ++busbw_n[algo];
      }
      std::printf("# %s: avg busbw %.3f GB/s\n#\n", algo.c_str(),
                  busbw_n[algo] ? busbw_sum[algo] / busbw_n[algo] : 0.0);
    }
    // Side by side: busbw of every algorithm per size, and its speed ratio to the MPI call.
    std::printf("# side by side: busbw GB/s (ratio to mpi)\n%12s", "size");
    for (const std::string& algo : algos) std::printf(" %18s", algo.c_str());
    std::printf("\n");
    for (std::size_t i = 0; i < rows.size(); i += algos.size()) {
      std::printf("%12s", dtrain::bench::format_bytes(rows[i].bytes).c_str());
      double mpi_time = 0;
      for (std::size_t k = 0; k < algos.size(); ++k) {
        if (rows[i + k].algo == "mpi") mpi_time = rows[i + k].time_us;
      }
      for (std::size_t k = 0; k < algos.size(); ++k) {
        const Row& r = rows[i + k];
        if (mpi_time > 0) {
          std::printf(" %10.3f (%5.2fx)", r.busbw, mpi_time / r.time_us);
        } else {
          std::printf(" %18.3f", r.busbw);
        }
      }
      std::printf("\n");
    }
    bool any_auto = false;
    for (const Row& r : rows) {
      if (r.ran.empty()) continue;
      std::printf(any_auto ? ", %s %s" : "# auto ran: %s %s",
                  dtrain::bench::format_bytes(r.bytes).c_str(), r.ran.c_str());
      any_auto = true;
    }
    if (any_auto) std::printf("\n");
    long total_wrong = 0;
    for (const Row& r : rows) total_wrong += r.wrong;
    std::printf("# out of bounds values: %ld %s\n", total_wrong, total_wrong ? "FAILED" : "OK");

    nlohmann::json doc;
    doc["benchmark"] = "allreduce_perf";
    doc["op"] = op_name;
    doc["ranks"] = n;
    doc["placement"] = where;
    doc["dtype"] = c10::toString(dtype);
    doc["warmup_iters"] = sweep.warmup_iters;
    doc["iters"] = sweep.iters;
    for (const Row& r : rows) {
      doc["results"].push_back({{"algo", r.algo},
                                {"bytes", r.bytes},
                                {"count", r.count},
                                {"time_us", r.time_us},
                                {"algbw_gbs", r.algbw},
                                {"busbw_gbs", r.busbw},
                                {"wrong", r.wrong},
                                {"ran", r.ran}});
    }
    dtrain::bench::write_json(sweep.json_path, doc);
  }
  long total_wrong = 0;
  for (const Row& r : rows) total_wrong += r.wrong;
  comm.reset();
  MPI_Comm_free(&raw);
  return total_wrong == 0 ? 0 : 1;
}
