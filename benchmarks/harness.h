#pragma once
// Shared harness of the benchmarks: the same flags everywhere (size sweep,
// warm-up, iterations, JSON output), size parsing and formatting, and the
// bandwidth definitions of nccl-tests' doc/PERFORMANCE.md:
//   algbw = bytes / time
//   busbw = algbw * 2(n-1)/n   for all-reduce (what each link carries)
//   busbw = algbw * (n-1)/n    for reduce-scatter and all-gather, whose
//                              bytes are the whole (n-rank) buffer

#include <cxxopts.hpp>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "src/cli/cli.h"  // dtrain::cli::parse: the flag conventions of every dtrain command

namespace dtrain::bench {

/// Parses "8", "64K", "16M", "1G" (powers of 1024) into bytes.
inline std::size_t parse_size(const std::string& text) {
  if (text.empty()) throw std::invalid_argument("empty size");
  std::size_t pos = 0;
  const double value = std::stod(text, &pos);
  std::size_t scale = 1;
  if (pos < text.size()) {
    switch (text[pos]) {
      case 'K':
      case 'k':
        scale = std::size_t{1} << 10;
        break;
      case 'M':
      case 'm':
        scale = std::size_t{1} << 20;
        break;
      case 'G':
      case 'g':
        scale = std::size_t{1} << 30;
        break;
      default:
        throw std::invalid_argument("bad size suffix in '" + text + "' (use K, M or G)");
    }
    if (pos + 1 != text.size())
      throw std::invalid_argument("trailing characters in '" + text + "'");
  }
  if (value < 0) throw std::invalid_argument("negative size '" + text + "'");
  return static_cast<std::size_t>(value * static_cast<double>(scale));
}

/// "64 KiB"-style, for table headers and logs.
inline std::string format_bytes(std::size_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 3) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), v == static_cast<std::size_t>(v) ? "%.0f %s" : "%.1f %s", v,
                units[u]);
  return buf;
}

/// The flags every benchmark takes.
struct SweepOptions {
  std::size_t min_bytes = 8;
  std::size_t max_bytes = std::size_t{128} << 20;
  double factor = 2.0;
  int warmup_iters = 5;
  int iters = 20;
  bool check = true;
  std::string json_path;

  /// Sizes from min to max, multiplied by `factor` each step.
  std::vector<std::size_t> sizes() const {
    std::vector<std::size_t> out;
    for (double s = static_cast<double>(min_bytes); s <= static_cast<double>(max_bytes) * 1.0001;
         s *= factor) {
      out.push_back(static_cast<std::size_t>(s));
      if (factor <= 1.0) break;
    }
    return out;
  }

  static void add_to(cxxopts::Options& options) {
    options.add_options("sweep")("b,minbytes", "smallest message size (K/M/G suffixes)",
                                 cxxopts::value<std::string>()->default_value("8"))(
        "e,maxbytes", "largest message size", cxxopts::value<std::string>()->default_value("128M"))(
        "f,stepfactor", "size multiplication factor between sizes",
        cxxopts::value<double>()->default_value("2"))(
        "w,warmup_iters", "warm-up iterations per size", cxxopts::value<int>()->default_value("5"))(
        "n,iters", "timed iterations per size", cxxopts::value<int>()->default_value("20"))(
        "c,check", "check results (1) or not (0)", cxxopts::value<int>()->default_value("1"))(
        "json", "also write the results to this JSON file",
        cxxopts::value<std::string>()->default_value(""))("h,help", "print this help");
  }

  static SweepOptions from(const cxxopts::ParseResult& parsed) {
    SweepOptions o;
    o.min_bytes = parse_size(parsed["minbytes"].as<std::string>());
    o.max_bytes = parse_size(parsed["maxbytes"].as<std::string>());
    o.factor = parsed["stepfactor"].as<double>();
    o.warmup_iters = parsed["warmup_iters"].as<int>();
    o.iters = parsed["iters"].as<int>();
    o.check = parsed["check"].as<int>() != 0;
    o.json_path = parsed["json"].as<std::string>();
    if (o.min_bytes > o.max_bytes) throw std::invalid_argument("-b is larger than -e");
    if (o.factor <= 1.0) throw std::invalid_argument("-f must be > 1");
    if (o.iters < 1 || o.warmup_iters < 0) throw std::invalid_argument("-n must be >= 1, -w >= 0");
    return o;
  }
};

inline double algbw_gbs(std::size_t bytes, double seconds) {
  return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0.0;
}

inline double allreduce_busbw_gbs(std::size_t bytes, double seconds, int ranks) {
  return algbw_gbs(bytes, seconds) * (ranks > 1 ? 2.0 * (ranks - 1) / ranks : 1.0);
}

inline double scatter_gather_busbw_gbs(std::size_t bytes, double seconds, int ranks) {
  return algbw_gbs(bytes, seconds) * (ranks > 1 ? static_cast<double>(ranks - 1) / ranks : 1.0);
}

inline void write_json(const std::string& path, const nlohmann::json& doc) {
  if (path.empty()) return;
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write JSON results to '" + path + "'");
  out << doc.dump(2) << "\n";
}

}  // namespace dtrain::bench
