// Manifest (de)serialization, dtypes, specs and file digests.

#include <cstdio>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dtrain/data/dataset.h"
#include "dtrain/error.h"
#include "src/io/digest.h"

namespace dtrain::data {

namespace {
struct DTypeInfo {
  DType dtype;
  const char* name;
  std::size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::kUInt8, "uint8", 1},     {DType::kInt8, "int8", 1},   {DType::kInt16, "int16", 2},
    {DType::kInt32, "int32", 4},     {DType::kInt64, "int64", 8}, {DType::kFloat32, "float32", 4},
    {DType::kFloat64, "float64", 8},
};
}  // namespace

const char* dtype_name(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.name;
  }
  return "?";
}

DType parse_dtype(const std::string& name) {
  for (const auto& d : kDTypes) {
    if (name == d.name) return d.dtype;
  }
  DTRAIN_THROW(InvalidArgument, "unknown dtype '", name,
               "' (uint8, int8, int16, int32, int64, float32, float64)");
}

std::size_t dtype_size(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.size;
  }
  return 0;
}

const char* token_level_name(TokenLevel level) {
  return level == TokenLevel::kByte ? "byte" : "char";
}

TokenLevel parse_token_level(const std::string& name) {
  if (name == "byte") return TokenLevel::kByte;
  if (name == "char") return TokenLevel::kChar;
  DTRAIN_THROW(InvalidArgument, "unknown token level '", name, "' (char or byte)");
}

std::int64_t Vocabulary::size() const {
  return level == TokenLevel::kByte ? 256 : static_cast<std::int64_t>(code_points.size());
}

std::int64_t FieldSpec::elements_per_sample() const {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

void DatasetSpec::validate() const {
  DTRAIN_CHECK_ARG(!fields.empty(), "data set '", name, "' has no fields");
  DTRAIN_CHECK_ARG(samples_per_shard > 0, "samples_per_shard must be > 0, got ", samples_per_shard);
  std::set<std::string> names;
  for (const FieldSpec& f : fields) {
    DTRAIN_CHECK_ARG(!f.name.empty() && f.name.find('/') == std::string::npos, "field name '",
                     f.name, "' must be non-empty and contain no '/'");
    DTRAIN_CHECK_ARG(names.insert(f.name).second, "duplicate field name '", f.name, "'");
    for (std::int64_t d : f.shape) {
      DTRAIN_CHECK_ARG(d > 0, "field '", f.name, "' has a non-positive dimension ", d);
    }
  }
}

std::int64_t chunk_samples_for(const FieldSpec& field, std::int64_t samples_per_shard) {
  constexpr std::int64_t kTargetChunkBytes = 256 * 1024;
  const auto sample_bytes = static_cast<std::int64_t>(field.bytes_per_sample());
  std::int64_t n = kTargetChunkBytes / (sample_bytes > 0 ? sample_bytes : 1);
  if (n < 1) n = 1;
  if (n > samples_per_shard) n = samples_per_shard;
  return n;
}

std::string Manifest::to_json() const {
  nlohmann::json doc;
  doc["format_version"] = format_version;
  doc["name"] = name;
  doc["total_samples"] = total_samples;
  doc["fields"] = nlohmann::json::array();
  for (const FieldSpec& f : fields) {
    nlohmann::json field{{"name", f.name}, {"dtype", dtype_name(f.dtype)}, {"shape", f.shape}};
    const auto range = value_ranges.find(f.name);
    if (range != value_ranges.end()) {
      field["min"] = range->second.min;
      field["max"] = range->second.max;
    }
    doc["fields"].push_back(field);
  }
  doc["shards"] = nlohmann::json::array();
  for (const ShardInfo& s : shards) {
    doc["shards"].push_back(
        {{"file", s.file}, {"samples", s.samples}, {"bytes", s.bytes}, {"sha256", s.sha256}});
  }
  if (!class_names.empty()) doc["class_names"] = class_names;
  if (vocabulary) {
    nlohmann::json v{{"level", token_level_name(vocabulary->level)}, {"size", vocabulary->size()}};
    if (vocabulary->level == TokenLevel::kChar) v["code_points"] = vocabulary->code_points;
    doc["vocabulary"] = v;
  }
  return doc.dump(2) + "\n";
}

Manifest Manifest::from_json(const std::string& text, const std::string& source) {
  Manifest m;
  try {
    const nlohmann::json doc = nlohmann::json::parse(text);
    m.format_version = doc.at("format_version").get<int>();
    DTRAIN_CHECK_T(DataError, m.format_version == kFormatVersion, source, ": format_version ",
                   m.format_version, " is not supported (this build reads ", kFormatVersion, ")");
    m.name = doc.value("name", std::string());
    m.total_samples = doc.at("total_samples").get<std::int64_t>();
    for (const auto& f : doc.at("fields")) {
      FieldSpec field;
      field.name = f.at("name").get<std::string>();
      try {
        field.dtype = parse_dtype(f.at("dtype").get<std::string>());
      } catch (const InvalidArgument& e) {
        DTRAIN_THROW(DataError, source, ": field '", field.name, "': ", e.what());
      }
      field.shape = f.at("shape").get<std::vector<std::int64_t>>();
      for (std::int64_t d : field.shape) {
        DTRAIN_CHECK_T(DataError, d > 0, source, ": field '", field.name,
                       "' has a non-positive dimension ", d);
      }
      if (f.contains("min") || f.contains("max")) {
        const ValueRange range{f.at("min").get<std::int64_t>(), f.at("max").get<std::int64_t>()};
        DTRAIN_CHECK_T(DataError, range.min <= range.max, source, ": field '", field.name,
                       "' has min ", range.min, " > max ", range.max);
        m.value_ranges[field.name] = range;
      }
      m.fields.push_back(field);
    }
    for (const auto& s : doc.at("shards")) {
      ShardInfo shard;
      shard.file = s.at("file").get<std::string>();
      shard.samples = s.at("samples").get<std::int64_t>();
      shard.bytes = s.at("bytes").get<std::int64_t>();
      shard.sha256 = s.at("sha256").get<std::string>();
      DTRAIN_CHECK_T(DataError, shard.samples > 0, source, ": shard ", shard.file, " has ",
                     shard.samples, " samples (must be > 0)");
      m.shards.push_back(shard);
    }
    if (doc.contains("class_names")) {
      m.class_names = doc.at("class_names").get<std::vector<std::string>>();
    }
    if (doc.contains("vocabulary")) {
      const auto& v = doc.at("vocabulary");
      Vocabulary vocabulary;
      try {
        vocabulary.level = parse_token_level(v.at("level").get<std::string>());
      } catch (const InvalidArgument& e) {
        DTRAIN_THROW(DataError, source, ": vocabulary: ", e.what());
      }
      if (vocabulary.level == TokenLevel::kChar) {
        vocabulary.code_points = v.at("code_points").get<std::vector<std::int64_t>>();
        for (std::size_t i = 0; i < vocabulary.code_points.size(); ++i) {
          const std::int64_t c = vocabulary.code_points[i];
          DTRAIN_CHECK_T(DataError,
                         c >= 0 && c <= 0x10FFFF && !(c >= 0xD800 && c <= 0xDFFF) &&
                             (i == 0 || c > vocabulary.code_points[i - 1]),
                         source, ": vocabulary code point ", c, " (id ", i,
                         ") is no Unicode character or is out of ascending order");
        }
      }
      DTRAIN_CHECK_T(DataError,
                     vocabulary.size() > 0 && v.at("size").get<std::int64_t>() == vocabulary.size(),
                     source, ": vocabulary size ", v.at("size").dump(), " does not match its ",
                     vocabulary.size(), " ids");
      m.vocabulary = std::move(vocabulary);
    }
  } catch (const nlohmann::json::exception& e) {
    DTRAIN_THROW(DataError, source, ": malformed manifest: ", e.what());
  }
  DTRAIN_CHECK_T(DataError, !m.fields.empty(), source, ": the manifest lists no fields");
  DTRAIN_CHECK_T(DataError, !m.shards.empty() && m.total_samples > 0, source,
                 ": the data set is empty (no shards or total_samples = 0)");
  std::int64_t sum = 0;
  for (const ShardInfo& s : m.shards) sum += s.samples;
  DTRAIN_CHECK_T(DataError, sum == m.total_samples, source, ": total_samples is ", m.total_samples,
                 " but the shards hold ", sum, " samples");
  return m;
}

std::string sha256_file(const std::string& path) {
  return io::digest_file<DataError>(io::Digest::kSha256, path);
}

std::string sha256_bytes(const void* data, std::size_t size) {
  return io::digest_bytes(io::Digest::kSha256, data, size);
}

}  // namespace dtrain::data
