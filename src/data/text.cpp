// Text files -> token data sets: source files, records, the held-out split,
// UTF-8 and the vocabulary, and the all-or-nothing conversion.

#include "dtrain/data/text.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/error.h"
#include "src/data/publish.h"

namespace dtrain::data {

namespace fs = std::filesystem;

namespace {

constexpr const char* kTokenField = "tokens";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DTRAIN_CHECK_T(DataError, in.good(), "cannot open text file ", path, ": ", std::strerror(errno));
  std::stringstream text;
  text << in.rdbuf();
  DTRAIN_CHECK_T(DataError, !in.bad(), "cannot read text file ", path);
  return text.str();
}

// Decodes the UTF-8 character at text[at], strictly (no overlong forms, no
// surrogates, nothing above U+10FFFF); sets `length` to its bytes. Returns
// -1 for an invalid sequence.
std::int64_t next_code_point(const std::string& text, std::size_t at, std::size_t& length) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char b0 = byte(at);
  length = 1;
  if (b0 < 0x80) return b0;
  std::int64_t c = 0;
  std::int64_t min = 0;
  if ((b0 & 0xE0) == 0xC0) {
    length = 2, c = b0 & 0x1F, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    length = 3, c = b0 & 0x0F, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    length = 4, c = b0 & 0x07, min = 0x10000;
  } else {
    return -1;
  }
  if (at + length > text.size()) return -1;
  for (std::size_t k = 1; k < length; ++k) {
    if ((byte(at + k) & 0xC0) != 0x80) return -1;
    c = c << 6 | (byte(at + k) & 0x3F);
  }
  if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return -1;
  return c;
}

void append_utf8(std::int64_t c, std::string& out) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | c >> 6);
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | c >> 12);
    out += static_cast<char>(0x80 | (c >> 6 & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | c >> 18);
    out += static_cast<char>(0x80 | (c >> 12 & 0x3F));
    out += static_cast<char>(0x80 | (c >> 6 & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// Calls fn(code_point) for every character of `text`; DataError naming
// `source` and the offset of the first invalid byte.
template <typename Fn>
void for_each_code_point(const std::string& text, const std::string& source, Fn fn) {
  for (std::size_t at = 0; at < text.size();) {
    std::size_t length = 1;
    const std::int64_t c = next_code_point(text, at, length);
    DTRAIN_CHECK_T(DataError, c >= 0, source, " is not valid UTF-8 at byte offset ", at,
                   " (byte 0x", std::hex, static_cast<int>(static_cast<unsigned char>(text[at])),
                   std::dec, "): convert it to UTF-8 or use --level byte");
    fn(c, at);
    at += length;
  }
}

DType token_dtype(const Vocabulary& vocabulary) {
  return vocabulary.size() <= 256 ? DType::kUInt8 : DType::kInt32;
}

// One split's tokens as a data set in `dir`.
void write_tokens(const std::string& dir, const std::string& name, const Vocabulary& vocabulary,
                  const std::vector<std::int64_t>& tokens, int shards) {
  const auto n = static_cast<std::int64_t>(tokens.size());
  DatasetSpec spec;
  spec.name = name;
  spec.fields = {{kTokenField, token_dtype(vocabulary), {}}};
  spec.vocabulary = vocabulary;
  spec.samples_per_shard = (n + shards - 1) / shards;
  DatasetWriter writer(dir, spec);
  if (spec.fields[0].dtype == DType::kUInt8) {
    const std::vector<std::uint8_t> narrow(tokens.begin(), tokens.end());
    writer.add({narrow.data()}, n);
  } else {
    const std::vector<std::int32_t> narrow(tokens.begin(), tokens.end());
    writer.add({narrow.data()}, n);
  }
  writer.finish();
}

// The tokens of the "tokens" field of a data set, widened.
std::vector<std::int64_t> read_tokens(Dataset& ds) {
  const int field = ds.field_index(kTokenField);
  const FieldSpec& f = ds.manifest().fields[field];
  std::vector<std::int64_t> out;
  const auto& offsets = ds.shard_offsets();
  std::vector<unsigned char> buffer;
  for (std::size_t shard = 0; shard + 1 < offsets.size(); ++shard) {
    const std::int64_t n = offsets[shard + 1] - offsets[shard];
    buffer.resize(static_cast<std::size_t>(n) * f.bytes_per_sample());
    ds.read(field, offsets[shard], n, buffer.data());
    for (std::int64_t i = 0; i < n; ++i) {
      if (f.dtype == DType::kUInt8) {
        out.push_back(buffer[static_cast<std::size_t>(i)]);
      } else {
        std::int32_t v = 0;
        std::memcpy(&v, buffer.data() + i * 4, 4);
        out.push_back(v);
      }
    }
  }
  return out;
}

// True if `dir` holds a data set (every digest verified) with exactly the
// tokens and vocabulary write_tokens would write; the shard layout may differ.
bool holds_tokens(const std::string& dir, const Vocabulary& vocabulary,
                  const std::vector<std::int64_t>& tokens) {
  const auto ds = Dataset::open(dir, {true});
  const Manifest& m = ds->manifest();
  if (!m.vocabulary || m.vocabulary->level != vocabulary.level ||
      m.vocabulary->code_points != vocabulary.code_points || m.fields.size() != 1 ||
      m.fields[0].name != kTokenField || m.fields[0].dtype != token_dtype(vocabulary) ||
      !m.fields[0].shape.empty()) {
    return false;
  }
  return read_tokens(*ds) == tokens;
}

}  // namespace

std::vector<std::string> text_source_files(const std::string& source) {
  std::error_code ec;
  const fs::file_status status = fs::status(source, ec);
  DTRAIN_CHECK_T(DataError, fs::exists(status), "text source '", source,
                 "' does not exist (for the fortunes: apt-get install fortunes, or run "
                 "scripts/setup.sh)");
  if (fs::is_regular_file(status)) return {source};
  DTRAIN_CHECK_T(DataError, fs::is_directory(status), "text source '", source,
                 "' is neither a file nor a directory");
  std::vector<std::string> files;
  for (const auto& entry : fs::directory_iterator(source, ec)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_symlink() || !entry.is_regular_file() || name.empty() || name[0] == '.' ||
        ends_with(name, ".dat")) {
      continue;
    }
    files.push_back(entry.path().string());
  }
  DTRAIN_CHECK_T(DataError, !ec, "cannot list text source '", source, "': ", ec.message());
  DTRAIN_CHECK_T(DataError, !files.empty(), "text source '", source,
                 "' holds no text file (only subdirectories, links or *.dat indexes)");
  std::sort(files.begin(), files.end());
  return files;
}

std::vector<std::string> split_records(const std::string& text) {
  std::vector<std::string> records;
  std::size_t begin = 0;
  for (std::size_t at = 0; at < text.size(); at = text.find('\n', at) + 1) {
    // `at` starts a line; a line "%\n" (or "%" at the very end) ends a record.
    if (text[at] == '%' && (at + 1 == text.size() || text[at + 1] == '\n')) {
      const std::size_t end = std::min(at + 2, text.size());
      records.push_back(text.substr(begin, end - begin));
      begin = end;
    }
    if (text.find('\n', at) == std::string::npos) break;
  }
  if (begin < text.size()) records.push_back(text.substr(begin));
  return records;
}

bool is_held_out(std::int64_t record, double val_fraction) {
  return std::floor(static_cast<double>(record + 1) * val_fraction) >
         std::floor(static_cast<double>(record) * val_fraction);
}

Vocabulary build_vocabulary(TokenLevel level, const std::string& text, const std::string& source) {
  Vocabulary v;
  v.level = level;
  if (level == TokenLevel::kByte) return v;
  std::vector<bool> seen;
  for_each_code_point(text, source, [&](std::int64_t c, std::size_t) {
    if (static_cast<std::size_t>(c) >= seen.size()) seen.resize(static_cast<std::size_t>(c) + 1);
    seen[static_cast<std::size_t>(c)] = true;
  });
  for (std::size_t c = 0; c < seen.size(); ++c) {
    if (seen[c]) v.code_points.push_back(static_cast<std::int64_t>(c));
  }
  return v;
}

std::vector<std::int64_t> encode_text(const Vocabulary& vocabulary, const std::string& text,
                                      const std::string& source) {
  std::vector<std::int64_t> ids;
  ids.reserve(text.size());
  if (vocabulary.level == TokenLevel::kByte) {
    for (char c : text) ids.push_back(static_cast<unsigned char>(c));
    return ids;
  }
  const auto& cps = vocabulary.code_points;
  for_each_code_point(text, source, [&](std::int64_t c, std::size_t at) {
    const auto it = std::lower_bound(cps.begin(), cps.end(), c);
    DTRAIN_CHECK_T(DataError, it != cps.end() && *it == c, source, " holds the character U+",
                   std::hex, c, std::dec, " at byte offset ", at, " that the vocabulary lacks (",
                   cps.size(), " characters)");
    ids.push_back(it - cps.begin());
  });
  return ids;
}

std::string decode_tokens(const Vocabulary& vocabulary, const std::int64_t* ids,
                          std::size_t count) {
  std::string text;
  text.reserve(count);
  const std::int64_t size = vocabulary.size();
  for (std::size_t i = 0; i < count; ++i) {
    DTRAIN_CHECK_ARG(ids[i] >= 0 && ids[i] < size, "token id ", ids[i], " (position ", i,
                     ") is outside the vocabulary of ", size, " ids");
    if (vocabulary.level == TokenLevel::kByte) {
      text += static_cast<char>(static_cast<unsigned char>(ids[i]));
    } else {
      append_utf8(vocabulary.code_points[static_cast<std::size_t>(ids[i])], text);
    }
  }
  return text;
}

std::string decode_tokens(const Vocabulary& vocabulary, const std::vector<std::int64_t>& ids) {
  return decode_tokens(vocabulary, ids.data(), ids.size());
}

void TextConvertOptions::validate() const {
  DTRAIN_CHECK_ARG(level == TokenLevel::kByte || level == TokenLevel::kChar,
                   "the token level must be char or byte");
  DTRAIN_CHECK_ARG(val_fraction > 0 && val_fraction < 1, "--val-fraction must lie in (0, 1), got ",
                   val_fraction);
  DTRAIN_CHECK_ARG(shards > 0, "--shards must be > 0, got ", shards);
  DTRAIN_CHECK_ARG(!name.empty(), "the data set name must not be empty");
}

TextConversion convert_text(const std::string& source, const std::string& out_dir,
                            const TextConvertOptions& options) {
  options.validate();
  const char* const split_names[] = {"train", "val"};
  detail::SplitPublisher publisher(out_dir, {split_names[0], split_names[1]});

  // 1. Read every file and split its records between the two texts.
  TextConversion result;
  result.files = text_source_files(source);
  std::string texts[2];  // train, val
  std::string all;
  for (const std::string& file : result.files) {
    const std::string text = read_file(file);
    // Checked per file, so that an error names the file and its offset.
    if (options.level == TokenLevel::kChar) for_each_code_point(text, file, [](auto, auto) {});
    for (const std::string& record : split_records(text)) {
      const bool held_out = is_held_out(result.records, options.val_fraction);
      texts[held_out ? 1 : 0] += record;
      result.val_records += held_out ? 1 : 0;
      ++result.records;
    }
    all += text;
  }
  DTRAIN_CHECK_T(DataError, !all.empty(), "the text files of '", source,
                 "' hold no text (every one is empty)");
  for (int i = 0; i < 2; ++i) {
    DTRAIN_CHECK_ARG(!texts[i].empty(), "the ", split_names[i],
                     " split would hold no text: ", result.records, " records at --val-fraction ",
                     options.val_fraction, " give ",
                     i == 0 ? result.records - result.val_records : result.val_records, " ",
                     split_names[i], " records with text; choose another --val-fraction");
  }
  result.vocabulary = build_vocabulary(options.level, all, source);
  std::vector<std::int64_t> tokens[2];
  for (int i = 0; i < 2; ++i) {
    tokens[i] = encode_text(result.vocabulary, texts[i], split_names[i]);
    DTRAIN_CHECK_ARG(static_cast<std::int64_t>(tokens[i].size()) >= options.shards, "the ",
                     split_names[i], " split holds ", tokens[i].size(),
                     " tokens, fewer than --shards ", options.shards,
                     " (a shard would be empty); choose fewer shards");
  }

  // 2. A split already in place stays if it holds the same tokens; the
  // others are written into the staging directory and then published.
  for (std::size_t i = 0; i < 2; ++i) {
    DTRAIN_CHECK_ARG(!publisher.published(i) ||
                         holds_tokens(publisher.final_dir(i), result.vocabulary, tokens[i]),
                     "'", publisher.final_dir(i),
                     "' already holds a data set that differs from this conversion of ", source,
                     "; remove it or choose another --out");
  }
  for (std::size_t i = 0; i < 2; ++i) {
    if (publisher.published(i)) continue;
    write_tokens(publisher.staging_dir(i), options.name + "-" + split_names[i], result.vocabulary,
                 tokens[i], options.shards);
  }
  publisher.publish();
  return result;
}

void check_token_field(Dataset& dataset, const std::string& field) {
  const FieldSpec& f = dataset.manifest().fields[dataset.field_index(field)];
  DTRAIN_CHECK_T(DataError,
                 f.shape.empty() && f.dtype != DType::kFloat32 && f.dtype != DType::kFloat64,
                 "token field '", field, "' of ", dataset.dir(), " is ", dtype_name(f.dtype),
                 " with per-sample shape of ", f.shape.size(),
                 " dimension(s); tokens must be one integer per sample (shape []): convert the "
                 "text with dtrain-data convert-text");
  const auto& vocabulary = dataset.manifest().vocabulary;
  if (!vocabulary) return;
  const ValueRange range = dataset.value_range(dataset.field_index(field));
  DTRAIN_CHECK_T(DataError, range.min >= 0 && range.max < vocabulary->size(), "token field '",
                 field, "' of ", dataset.dir(), " holds ids from ", range.min, " to ", range.max,
                 ", outside its vocabulary of ", vocabulary->size(), " ids",
                 ": write the data set again");
}

}  // namespace dtrain::data
