// dtrain-data: make, inspect and verify sharded HDF5 data sets.
//
//   dtrain-data convert-fashion-mnist --source /usr/share/datasets/fashion-mnist --out DIR
//       [--shards 4]
//   dtrain-data convert-text --source /usr/share/games/fortunes --out DIR [--level char|byte]
//       [--val-fraction 0.1] [--shards 4] [--name fortunes]
//   dtrain-data generate --out DIR --samples 60000 --shape 1,28,28 --classes 10 --shards 4
//       [--seed 1]
//   dtrain-data inspect DIR
//   dtrain-data verify DIR
//
// Exit status: 0 success (verify: every check passed); 1 a bad or unreadable
// data set or input file (verify: a check failed); 2 a usage error or other
// bad input found before anything was written (an unknown option, a value
// that does not parse, an output directory that already holds a data set).

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/data/convert.h"
#include "dtrain/data/dataset.h"
#include "dtrain/data/text.h"
#include "dtrain/error.h"
#include "src/cli/cli.h"

namespace {

using namespace dtrain::data;

std::vector<std::int64_t> parse_shape(const std::string& text) {
  std::vector<std::int64_t> shape;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    std::size_t pos = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &pos);
    } catch (const std::exception&) {
      pos = 0;
    }
    if (pos != item.size() || item.empty() || v <= 0) {
      throw dtrain::cli::UsageError("--shape '" + text +
                                    "' must be comma-separated positive integers, e.g. 3,32,32");
    }
    shape.push_back(v);
  }
  return shape;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + std::to_string(shape[i]);
  return out + "]";
}

void print_summary(const Manifest& m, const std::string& dir) {
  std::int64_t bytes = 0;
  for (const auto& s : m.shards) bytes += s.bytes;
  std::printf("data set   %s (%s)\nformat     %d\nsamples    %lld in %zu shard(s), %.1f MiB\n",
              m.name.c_str(), dir.c_str(), m.format_version,
              static_cast<long long>(m.total_samples), m.shards.size(),
              static_cast<double>(bytes) / (1 << 20));
  for (const auto& f : m.fields) {
    std::printf("field      %-10s %-8s %s  (chunk %lld samples)\n", f.name.c_str(),
                dtype_name(f.dtype), shape_text(f.shape).c_str(),
                static_cast<long long>(chunk_samples_for(f, m.shards.front().samples)));
  }
  if (m.vocabulary) {
    std::printf("vocabulary %s level, %lld ids\n", token_level_name(m.vocabulary->level),
                static_cast<long long>(m.vocabulary->size()));
  }
  if (!m.class_names.empty()) {
    std::printf("classes    %zu:", m.class_names.size());
    for (const auto& c : m.class_names) std::printf(" '%s'", c.c_str());
    std::printf("\n");
  }
  for (const auto& s : m.shards) {
    std::printf("shard      %s  %lld samples  %lld bytes  sha256 %.16s...\n", s.file.c_str(),
                static_cast<long long>(s.samples), static_cast<long long>(s.bytes),
                s.sha256.c_str());
  }
}

int usage(const char* error) {
  if (error) std::cerr << "dtrain-data: " << error << "\n";
  std::cerr << "usage: dtrain-data <command> [options]\n"
               "  convert-fashion-mnist --source DIR --out DIR [--shards N]\n"
               "  convert-text [--source DIR|FILE] --out DIR [--level char|byte] "
               "[--val-fraction F] [--shards N] [--name NAME]\n"
               "  generate --out DIR --samples N [--shape 3,32,32] [--classes K] [--shards N] "
               "[--seed S]\n"
               "  inspect DIR\n"
               "  verify DIR\n";
  return dtrain::cli::kExitUsage;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage(nullptr);
  const std::string command = argv[1];
  if (command == "-h" || command == "--help") {
    usage(nullptr);
    return 0;
  }
  // Each command takes only its own options, so that one meant for another
  // command (`convert-fashion-mnist --samples 100`) is an error, not ignored.
  const bool text = command == "convert-text";
  const bool mnist = command == "convert-fashion-mnist";
  const bool generate = command == "generate";
  const bool reads_dir = command == "inspect" || command == "verify";
  if (!text && !mnist && !generate && !reads_dir) {
    return usage(("unknown command '" + command + "'").c_str());
  }
  cxxopts::Options cli("dtrain-data " + command, "sharded HDF5 data sets");
  auto add = cli.add_options();
  if (text || mnist) {
    add("source",
        text ? "directory of the text files (or one file)" : "directory of the gzip'd IDX files",
        cxxopts::value<std::string>()->default_value(text ? kFortunesDir
                                                          : "/usr/share/datasets/fashion-mnist"));
  }
  if (text) {
    add("level", "tokens: char (Unicode characters) or byte",
        cxxopts::value<std::string>()->default_value("char"));
    add("val-fraction", "share of the records held out for validation",
        cxxopts::value<double>()->default_value("0.1"));
    add("name", "data set name prefix (NAME-train, NAME-val)",
        cxxopts::value<std::string>()->default_value("fortunes"));
  }
  if (!reads_dir) {
    add("out", "output data set directory", cxxopts::value<std::string>()->default_value(""));
    add("shards", text ? "number of shard files (per split)" : "number of shard files",
        cxxopts::value<int>()->default_value(text ? "4" : "1"));
  }
  if (generate) {
    add("samples", "synthetic samples", cxxopts::value<std::int64_t>()->default_value("1000"));
    add("shape", "per-sample image shape", cxxopts::value<std::string>()->default_value("3,32,32"));
    add("classes", "number of classes", cxxopts::value<int>()->default_value("10"));
    add("seed", "synthetic data seed", cxxopts::value<std::uint64_t>()->default_value("0"));
  }
  add("dir", "data set directory", cxxopts::value<std::string>()->default_value(""));
  add("h,help", "print this help");
  cli.parse_positional({"dir"});
  try {
    const auto parsed = dtrain::cli::parse(cli, argc - 1, argv + 1);
    if (parsed.count("help")) {
      std::cout << cli.help() << std::endl;
      return 0;
    }
    const std::string out = reads_dir ? std::string() : parsed["out"].as<std::string>();
    const std::string dir = parsed["dir"].as<std::string>();
    if (!reads_dir && !dir.empty()) {
      throw dtrain::cli::UsageError("unexpected argument '" + dir + "' (" + command +
                                    " takes options only; see --help)");
    }
    if (command == "convert-fashion-mnist") {
      if (out.empty()) return usage("--out is required");
      convert_fashion_mnist(parsed["source"].as<std::string>(), out, parsed["shards"].as<int>());
      print_summary(Dataset::open(out + "/train", {false})->manifest(), out + "/train");
      print_summary(Dataset::open(out + "/test", {false})->manifest(), out + "/test");
      return 0;
    }
    if (command == "convert-text") {
      if (out.empty()) return usage("--out is required");
      TextConvertOptions options;
      const std::string level = parsed["level"].as<std::string>();
      if (level != "char" && level != "byte") {
        throw dtrain::cli::UsageError("--level '" + level + "' must be char or byte");
      }
      options.level = parse_token_level(level);
      options.val_fraction = parsed["val-fraction"].as<double>();
      options.shards = parsed["shards"].as<int>();
      options.name = parsed["name"].as<std::string>();
      const TextConversion done = convert_text(parsed["source"].as<std::string>(), out, options);
      std::printf("text       %zu file(s) of %s, %lld records, %lld held out\n", done.files.size(),
                  parsed["source"].as<std::string>().c_str(), static_cast<long long>(done.records),
                  static_cast<long long>(done.val_records));
      print_summary(Dataset::open(out + "/train", {false})->manifest(), out + "/train");
      print_summary(Dataset::open(out + "/val", {false})->manifest(), out + "/val");
      return 0;
    }
    if (command == "generate") {
      if (out.empty()) return usage("--out is required");
      SyntheticSpec spec;
      spec.samples = parsed["samples"].as<std::int64_t>();
      spec.shape = parse_shape(parsed["shape"].as<std::string>());
      spec.classes = parsed["classes"].as<int>();
      spec.shards = parsed["shards"].as<int>();
      spec.seed = parsed["seed"].as<std::uint64_t>();
      print_summary(generate_synthetic(out, spec), out);
      return 0;
    }
    if (command == "inspect") {
      if (dir.empty()) return usage("inspect needs a directory");
      // The manifest only, so that a data set with broken shards can be inspected.
      std::ifstream in(dir + "/manifest.json");
      if (!in) throw dtrain::DataError("no manifest.json in '" + dir + "'");
      std::stringstream text;
      text << in.rdbuf();
      print_summary(Manifest::from_json(text.str(), dir + "/manifest.json"), dir);
      return 0;
    }
    if (command == "verify") {
      if (dir.empty()) return usage("verify needs a directory");
      // Open with digests: checks manifest, sizes, SHA-256, dtypes and shapes.
      try {
        const auto ds = Dataset::open(dir, {true});
        std::printf("OK: %s: %lld samples in %zu shard(s), every digest, dtype and shape matches\n",
                    dir.c_str(), static_cast<long long>(ds->size()), ds->manifest().shards.size());
        return 0;
      } catch (const dtrain::Error& e) {
        std::printf("FAILED: %s\n", e.what());
        return 1;
      }
    }
    return usage(("unknown command '" + command + "'").c_str());
  } catch (const dtrain::cli::UsageError& e) {
    return usage(e.what());
  } catch (const dtrain::InvalidArgument& e) {
    std::cerr << "dtrain-data " << command << ": " << e.what() << "\n";
    return dtrain::cli::kExitUsage;
  } catch (const std::exception& e) {
    std::cerr << "dtrain-data " << command << ": " << e.what() << "\n";
    return 1;
  }
}
