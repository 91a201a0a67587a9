// loader_perf: throughput of dtrain::data::DataLoader against a plain
// sequential HDF5 read of the same shards (what a user would otherwise do:
// H5Dread of each whole dataset), in the same run.
//
//   loader_perf                          # two generated data sets, 1-4 workers
//   loader_perf --dir /data/fmnist/train --workers 1,2,4 --json out.json
//   loader_perf --dir /data/fmnist/train --workers 1,2,4 --warmup-epochs 1
//
// Rows: `raw` reads every shard's images and labels whole, in file order.
// `global` is global-shuffled epochs through the loader with N decode
// workers (uint8 -> normalized float32), `+aug` adds random crop (pad 4) and
// flip, `shard-local` uses the I/O-friendly shuffle, `no-cache` turns the
// reader's chunk cache off (one HDF5 hyperslab read per run of contiguous
// samples: nearly one per sample under a global shuffle), `raw-out` and
// `raw-out+aug` deliver the stored dtype (ImageOutput::kRaw, normalized
// later on the device) without and with crop + flip. The fixed-worker rows
// use the largest --workers value. The first epoch fills the chunk cache
// (HDF5 reads into fresh memory); later ones read from it. `raw` is the best
// of 3 repeats, i.e. warm; --warmup-epochs 1 gives the loaders the same
// footing (the timed epochs then start with a full cache and reads counts
// only the timed epochs). MB/s counts the stored bytes delivered. reader%
// is the share of wall time the single reader thread spent preparing
// batches (HDF5 reads and cache lookups): near 100% means the HDF5
// lock/reader bounds the loader, well below means decode or hand-off does.
// Each batch is consumed by reading one byte of its images.

#include <hdf5.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "benchmarks/harness.h"
#include "dtrain/data/convert.h"
#include "dtrain/data/loader.h"
#include "dtrain/error.h"

namespace {

using namespace dtrain::data;
using Clock = std::chrono::steady_clock;

struct Row {
  std::string dataset;
  std::string mode;
  int workers = 0;
  double seconds = 0;
  double samples_per_s = 0;
  double mb_per_s = 0;
  double ratio_to_raw = 0;
  double reader_busy = 0;
  std::int64_t hyperslab_reads = 0;
};

std::vector<int> parse_ints(const std::string& text) {
  std::vector<int> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) out.push_back(std::stoi(item));
  }
  return out;
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Plain HDF5: every field of every shard read whole, in file order.
double raw_read_seconds(const Dataset& ds, int repeats) {
  const Manifest& m = ds.manifest();
  std::vector<unsigned char> buffer;
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto start = Clock::now();
    for (const ShardInfo& shard : m.shards) {
      const std::string path = ds.dir() + "/" + shard.file;
      const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
      if (file < 0) throw dtrain::DataError("H5Fopen failed for " + path);
      for (const FieldSpec& f : m.fields) {
        const hid_t dset = H5Dopen2(file, f.name.c_str(), H5P_DEFAULT);
        const hid_t type = H5Dget_type(dset);
        buffer.resize(static_cast<std::size_t>(shard.samples) * f.bytes_per_sample());
        const herr_t rc = H5Dread(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buffer.data());
        H5Tclose(type);
        H5Dclose(dset);
        if (rc < 0) throw dtrain::DataError("H5Dread failed for " + path + " " + f.name);
      }
      H5Fclose(file);
    }
    best = std::min(best, seconds_since(start));
  }
  return best;
}

Row run_loader(const std::shared_ptr<Dataset>& ds, const std::string& mode, int workers,
               std::int64_t batch, int epochs, int warmup_epochs) {
  LoaderOptions o;
  o.sampler.global_batch_size = batch;
  o.sampler.seed = 1;
  o.sampler.shuffle = mode == "shard-local" ? ShuffleMode::kShardLocal : ShuffleMode::kGlobal;
  o.mean = {0.5};
  o.std = {0.25};
  o.workers = workers;
  o.prefetch_depth = 2 * workers + 2;
  if (mode == "no-cache") o.cache_bytes = 0;
  if (mode == "raw-out" || mode == "raw-out+aug") o.output = ImageOutput::kRaw;
  if (mode == "+aug" || mode == "raw-out+aug") {
    o.augment.crop_padding = 4;
    o.augment.horizontal_flip = true;
  }
  DataLoader loader(ds, o, 0, 1);
  const std::int64_t steps = loader.batches_per_epoch() * epochs;
  std::int64_t samples = 0;
  unsigned sink = 0;
  // Reads one byte of each batch's images, so that no batch goes unused.
  const auto touch = [&sink](const Batch& b) {
    if (b.images.nbytes() > 0) sink += *static_cast<const unsigned char*>(b.images.data_ptr());
  };
  for (std::int64_t s = 0; s < loader.batches_per_epoch() * warmup_epochs; ++s) {
    touch(loader.next());
  }
  const LoaderStats before = loader.stats();
  const auto start = Clock::now();
  for (std::int64_t s = 0; s < steps; ++s) {
    const Batch b = loader.next();
    samples += b.labels.size(0);
    touch(b);
  }
  Row row;
  row.mode = mode;
  row.workers = workers;
  row.seconds = seconds_since(start);
  std::size_t sample_bytes = 0;
  for (const auto& f : ds->manifest().fields) sample_bytes += f.bytes_per_sample();
  row.samples_per_s = static_cast<double>(samples) / row.seconds;
  row.mb_per_s = row.samples_per_s * static_cast<double>(sample_bytes) / 1e6;
  const LoaderStats stats = loader.stats();
  row.reader_busy = (stats.read_seconds - before.read_seconds) / row.seconds;
  row.hyperslab_reads = stats.hyperslab_reads - before.hyperslab_reads;
  if (sink == 1u << 31) std::fprintf(stderr, "loader_perf: %u\n", sink);  // keeps `sink` live
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("loader_perf", "DataLoader throughput vs a raw sequential HDF5 read");
  cli.add_options()("dir", "existing data set(s), comma-separated (default: generate two)",
                    cxxopts::value<std::string>()->default_value(""))(
      "workers", "decode worker counts", cxxopts::value<std::string>()->default_value("1,2,3,4"))(
      "batch", "global batch size", cxxopts::value<std::int64_t>()->default_value("256"))(
      "epochs", "epochs per loader measurement", cxxopts::value<int>()->default_value("2"))(
      "warmup-epochs",
      "epochs each loader runs before the timed ones (0: the timing includes filling the chunk "
      "cache)",
      cxxopts::value<int>()->default_value("0"))(
      "scratch", "where generated data sets go",
      cxxopts::value<std::string>()->default_value(std::filesystem::temp_directory_path()))(
      "json", "also write the results to this JSON file",
      cxxopts::value<std::string>()->default_value(""))("h,help", "print this help");
  std::vector<std::string> dirs;
  std::vector<int> worker_counts;
  std::int64_t batch = 0;
  int epochs = 1;
  int warmup_epochs = 0;
  std::string json_path;
  std::unique_ptr<std::filesystem::path> generated;
  try {
    auto parsed = dtrain::cli::parse(cli, argc, argv);
    if (parsed.count("help")) {
      std::cout << cli.help() << std::endl;
      return 0;
    }
    worker_counts = parse_ints(parsed["workers"].as<std::string>());
    if (worker_counts.empty()) throw std::invalid_argument("--workers needs at least one count");
    batch = parsed["batch"].as<std::int64_t>();
    epochs = parsed["epochs"].as<int>();
    warmup_epochs = parsed["warmup-epochs"].as<int>();
    json_path = parsed["json"].as<std::string>();
    std::stringstream in(parsed["dir"].as<std::string>());
    for (std::string d; std::getline(in, d, ',');) {
      if (!d.empty()) dirs.push_back(d);
    }
    if (dirs.empty()) {
      generated = std::make_unique<std::filesystem::path>(
          std::filesystem::path(parsed["scratch"].as<std::string>()) /
          ("dtrain-loader-perf-" + std::to_string(::getpid())));
      SyntheticSpec mnist{60000, {1, 28, 28}, 10, 4, 1};
      SyntheticSpec cifar{50000, {3, 32, 32}, 10, 5, 2};
      dirs = {(*generated / "60000x1x28x28").string(), (*generated / "50000x3x32x32").string()};
      std::fprintf(stderr, "loader_perf: generating %s and %s\n", dirs[0].c_str(), dirs[1].c_str());
      generate_synthetic(dirs[0], mnist);
      generate_synthetic(dirs[1], cifar);
    }
  } catch (const std::exception& e) {
    std::cerr << "loader_perf: " << e.what() << "\n";
    return 2;
  }
  at::set_num_threads(1);

  std::vector<Row> rows;
  int status = 0;
  try {
    for (const std::string& dir : dirs) {
      auto ds = Dataset::open(dir, {false});
      const std::string name = std::filesystem::path(dir).filename().string();
      std::size_t sample_bytes = 0;
      for (const auto& f : ds->manifest().fields) sample_bytes += f.bytes_per_sample();
      Row raw;
      raw.dataset = name;
      raw.mode = "raw";
      raw.seconds = raw_read_seconds(*ds, 3);
      raw.samples_per_s = static_cast<double>(ds->size()) / raw.seconds;
      raw.mb_per_s = raw.samples_per_s * static_cast<double>(sample_bytes) / 1e6;
      raw.ratio_to_raw = 1.0;
      rows.push_back(raw);
      auto add = [&](const std::string& mode, int workers) {
        Row r = run_loader(ds, mode, workers, batch, epochs, warmup_epochs);
        r.dataset = name;
        r.ratio_to_raw = r.samples_per_s / raw.samples_per_s;
        rows.push_back(r);
      };
      const int most = *std::max_element(worker_counts.begin(), worker_counts.end());
      for (int w : worker_counts) add("global", w);
      add("+aug", most);
      add("shard-local", most);
      add("no-cache", most);
      add("raw-out", most);
      add("raw-out+aug", most);
    }
  } catch (const std::exception& e) {
    std::cerr << "loader_perf: " << e.what() << "\n";
    status = 1;
  }
  if (generated) {
    std::error_code ec;
    std::filesystem::remove_all(*generated, ec);
  }

  std::printf(
      "# dtrain loader_perf: global batch %lld, %d epoch(s) after %d warm-up epoch(s), %u hardware "
      "threads\n",
      static_cast<long long>(batch), epochs, warmup_epochs, std::thread::hardware_concurrency());
  std::printf("%-16s %-12s %7s %10s %12s %10s %9s %8s %10s\n", "dataset", "mode", "workers",
              "time(s)", "samples/s", "MB/s", "x raw", "reader%", "reads");
  for (const Row& r : rows) {
    std::printf("%-16s %-12s %7d %10.3f %12.0f %10.1f %9.3f %7.0f%% %10lld\n", r.dataset.c_str(),
                r.mode.c_str(), r.workers, r.seconds, r.samples_per_s, r.mb_per_s, r.ratio_to_raw,
                r.reader_busy * 100, static_cast<long long>(r.hyperslab_reads));
  }
  nlohmann::json doc;
  doc["benchmark"] = "loader_perf";
  doc["global_batch"] = batch;
  doc["epochs"] = epochs;
  doc["warmup_epochs"] = warmup_epochs;
  for (const Row& r : rows) {
    doc["results"].push_back({{"dataset", r.dataset},
                              {"mode", r.mode},
                              {"workers", r.workers},
                              {"seconds", r.seconds},
                              {"samples_per_s", r.samples_per_s},
                              {"mb_per_s", r.mb_per_s},
                              {"ratio_to_raw", r.ratio_to_raw},
                              {"reader_busy", r.reader_busy},
                              {"hyperslab_reads", r.hyperslab_reads}});
  }
  dtrain::bench::write_json(json_path, doc);
  return status;
}
