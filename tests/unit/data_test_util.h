#pragma once
// Helpers shared by the data tests: scratch directories and small data sets
// whose values are a known function of the sample index.

#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "dtrain/data/dataset.h"

namespace dtrain::data::testing {

/// A fresh directory under $TMPDIR, removed with the object.
class ScratchDir {
 public:
  ScratchDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "dtrain-data-test-XXXXXX").string();
    path_ = mkdtemp(pattern.data()) ? pattern : std::string();
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

/// Pixel e of sample i in make_pattern_dataset.
inline std::uint8_t pattern_pixel(std::int64_t i, std::int64_t e) {
  return static_cast<std::uint8_t>((i * 131 + e * 7) % 251);
}
inline std::int64_t pattern_label(std::int64_t i) { return i * 3 + 1; }

/// `samples` images uint8 `shape` and labels int64 with pattern values,
/// `samples_per_shard` per shard, written in uneven add() calls.
inline Manifest make_pattern_dataset(const std::string& dir, std::int64_t samples,
                                     std::int64_t samples_per_shard,
                                     std::vector<std::int64_t> shape = {1, 4, 4}) {
  DatasetSpec spec;
  spec.name = "pattern";
  spec.fields = {{"images", DType::kUInt8, shape}, {"labels", DType::kInt64, {}}};
  spec.samples_per_shard = samples_per_shard;
  const std::int64_t per = spec.fields[0].elements_per_sample();
  DatasetWriter writer(dir, spec);
  std::int64_t first = 0;
  for (std::int64_t step = 1; first < samples; ++step) {
    const std::int64_t n = std::min<std::int64_t>(step * 7 % 23 + 1, samples - first);
    std::vector<std::uint8_t> pixels(static_cast<std::size_t>(n * per));
    std::vector<std::int64_t> labels(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) {
      labels[i] = pattern_label(first + i);
      for (std::int64_t e = 0; e < per; ++e) pixels[i * per + e] = pattern_pixel(first + i, e);
    }
    writer.add({pixels.data(), labels.data()}, n);
    first += n;
  }
  return writer.finish();
}

// Token i of a test stream: a value of `vocab` ids that is a known function
// of i.
inline std::int64_t stream_token(std::int64_t i, std::int64_t vocab) {
  return (i * 7 + i / 5) % vocab;
}

// A token data set of `tokens` tokens, `per_shard` per shard, with a char
// vocabulary of `vocab` ids (uint8 up to 256, int32 above).
inline void make_token_dataset(const std::string& dir, std::int64_t tokens, std::int64_t per_shard,
                               std::int64_t vocab = 50) {
  Vocabulary v;
  v.level = TokenLevel::kChar;
  for (std::int64_t c = 0; c < vocab; ++c) v.code_points.push_back(32 + c);
  DatasetSpec spec;
  spec.name = "stream";
  spec.fields = {{"tokens", vocab <= 256 ? DType::kUInt8 : DType::kInt32, {}}};
  spec.vocabulary = v;
  spec.samples_per_shard = per_shard;
  DatasetWriter writer(dir, spec);
  std::vector<std::uint8_t> narrow;
  std::vector<std::int32_t> wide;
  for (std::int64_t i = 0; i < tokens; ++i) {
    narrow.push_back(static_cast<std::uint8_t>(stream_token(i, vocab)));
    wide.push_back(static_cast<std::int32_t>(stream_token(i, vocab)));
  }
  writer.add({vocab <= 256 ? static_cast<const void*>(narrow.data()) : wide.data()}, tokens);
  writer.finish();
}

}  // namespace dtrain::data::testing
