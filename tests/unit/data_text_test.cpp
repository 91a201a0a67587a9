// Text data sets: records and the held-out split, UTF-8 and the vocabulary,
// convert_text (round trip to the exact text, all or nothing, bad input),
// the dtrain-data convert-text command, h5py, and the TokenLoader's windows
// (targets shifted by one, sampler order, resume, dp ranks, bad input).

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/data/text.h"
#include "dtrain/data/token_loader.h"
#include "dtrain/error.h"
#include "tests/support/expect_error.h"
#include "tests/unit/data_test_util.h"

namespace dtrain::data {
namespace {

namespace fs = std::filesystem;
using testing::make_token_dataset;
using testing::ScratchDir;
using testing::stream_token;

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
}

using dtrain::testing::expect_error;

// Every token of a token data set, in order.
std::vector<std::int64_t> all_tokens(const std::string& dir) {
  auto ds = Dataset::open(dir);
  const FieldSpec& f = ds->manifest().fields[ds->field_index("tokens")];
  std::vector<std::int64_t> out;
  for (std::int64_t i = 0; i < ds->size(); ++i) {
    std::int64_t v = 0;
    if (f.dtype == DType::kUInt8) {
      std::uint8_t b = 0;
      ds->read(0, i, 1, &b);
      v = b;
    } else {
      std::int32_t w = 0;
      ds->read(0, i, 1, &w);
      v = w;
    }
    out.push_back(v);
  }
  return out;
}

// A fortunes-like source: three text files in name order (with a
// multi-byte character and a file that does not end in a separator), and
// what must be left out: a strfile index, a *.u8 link and an off/
// subdirectory.
struct TextSource {
  std::vector<std::pair<std::string, std::string>> files{
      {"alpha", "A stitch in time.\n%\nSaves nine.\n%\nCaf\xc3\xa9 au lait\n%\n"},
      {"beta", "One\n%\nTwo\n%\nThree\n%\nFour\n%\nFive\n%\nSix\n%\n"},
      {"gamma", "Seven\n%\nEight \xe2\x82\xac\n%\nNine\n%\nTen, no separator at the end"},
  };
  void write(const std::string& dir) const {
    fs::create_directories(dir + "/off");
    for (const auto& [name, text] : files) write_text(dir + "/" + name, text);
    write_text(dir + "/alpha.dat", std::string("\x00\x00\x00\x02index", 10));
    fs::create_symlink("alpha", dir + "/alpha.u8");
    write_text(dir + "/off/rude", "Left out.\n%\n");
  }
  std::vector<std::string> records() const {
    std::vector<std::string> out;
    for (const auto& f : files) {
      for (const auto& r : split_records(f.second)) out.push_back(r);
    }
    return out;
  }
  // The train (0) or held-out (1) text at `fraction`.
  std::string text(int split, double fraction) const {
    std::string out;
    const auto recs = records();
    for (std::size_t i = 0; i < recs.size(); ++i) {
      if (is_held_out(static_cast<std::int64_t>(i), fraction) == (split == 1)) out += recs[i];
    }
    return out;
  }
};

TEST(TextData, RecordsConcatenateToTheTextAndEndAtSeparators) {
  const std::string text = "a\n%\nb 100%\nc\n%\n%\n%last";
  const auto records = split_records(text);
  ASSERT_EQ(records.size(), 4u);
  EXPECT_EQ(records[0], "a\n%\n");
  EXPECT_EQ(records[1], "b 100%\nc\n%\n");  // a '%' inside a line is text
  EXPECT_EQ(records[2], "%\n");
  EXPECT_EQ(records[3], "%last");  // not a separator line: the text's tail
  std::string joined;
  for (const auto& r : records) joined += r;
  EXPECT_EQ(joined, text);
  EXPECT_EQ(split_records("x\n%").back(), "x\n%");
  EXPECT_TRUE(split_records("").empty());
}

TEST(TextData, HeldOutRecordsAreEvenlySpacedAtTheFraction) {
  std::vector<std::int64_t> held;
  for (std::int64_t i = 0; i < 40; ++i) {
    if (is_held_out(i, 0.1)) held.push_back(i);
  }
  EXPECT_EQ(held, (std::vector<std::int64_t>{9, 19, 29, 39}));
  for (double f : {0.05, 0.1, 0.25, 1.0 / 3}) {
    for (std::int64_t n : {1, 7, 100, 15221}) {
      std::int64_t count = 0;
      for (std::int64_t i = 0; i < n; ++i) count += is_held_out(i, f) ? 1 : 0;
      EXPECT_EQ(count, static_cast<std::int64_t>(std::floor(static_cast<double>(n) * f)))
          << n << " records at " << f;
    }
  }
}

TEST(TextData, VocabularyEncodesAndDecodesExactly) {
  const std::string text = "ab\xc3\xa9\n\xe2\x82\xac\xf0\x9f\x98\x80 ba";  // é, €, an emoji
  const Vocabulary chars = build_vocabulary(TokenLevel::kChar, text);
  EXPECT_EQ(chars.code_points,
            (std::vector<std::int64_t>{'\n', ' ', 'a', 'b', 0xE9, 0x20AC, 0x1F600}));
  EXPECT_EQ(chars.size(), 7);
  const auto ids = encode_text(chars, text);
  EXPECT_EQ(ids, (std::vector<std::int64_t>{2, 3, 4, 0, 5, 6, 1, 3, 2}));
  EXPECT_EQ(decode_tokens(chars, ids), text);
  const Vocabulary bytes = build_vocabulary(TokenLevel::kByte, text);
  EXPECT_EQ(bytes.size(), 256);
  const auto byte_ids = encode_text(bytes, text);
  EXPECT_EQ(byte_ids.size(), text.size());
  EXPECT_EQ(byte_ids[2], 0xC3);
  EXPECT_EQ(decode_tokens(bytes, byte_ids), text);
  // Bad input: invalid UTF-8 (a lone continuation byte, an overlong form, a
  // cut sequence), a character outside the vocabulary, an id outside it.
  expect_error<DataError>([&] { build_vocabulary(TokenLevel::kChar, "ok\x80", "f"); },
                          {"f is not valid UTF-8 at byte offset 2", "0x80", "--level byte"});
  expect_error<DataError>([&] { build_vocabulary(TokenLevel::kChar, "\xc0\xaf"); },
                          {"byte offset 0"});
  expect_error<DataError>([&] { build_vocabulary(TokenLevel::kChar, "a\xe2\x82"); },
                          {"byte offset 1"});
  expect_error<DataError>([&] { encode_text(chars, "abc", "g"); },
                          {"g holds the character U+63 at byte offset 2", "lacks"});
  expect_error<InvalidArgument>(
      [&] {
        decode_tokens(chars, {0, 7});
      },
      {"token id 7 (position 1)", "vocabulary of 7 ids"});
}

TEST(TextData, SourceFilesAreTheTextsOnly) {
  ScratchDir dir;
  const TextSource src;
  src.write(dir / "src");
  EXPECT_EQ(text_source_files(dir / "src"),
            (std::vector<std::string>{dir / "src/alpha", dir / "src/beta", dir / "src/gamma"}));
  EXPECT_EQ(text_source_files(dir / "src/beta"), (std::vector<std::string>{dir / "src/beta"}));
  expect_error<DataError>([&] { text_source_files(dir / "nowhere"); },
                          {"nowhere' does not exist", "apt-get install fortunes"});
  fs::create_directories(dir / "empty/sub");
  expect_error<DataError>([&] { text_source_files(dir / "empty"); }, {"holds no text file"});
}

// Both levels: the splits decode to exactly the records they should hold,
// in order; the vocabulary is in the manifest; sizes add up.
TEST(TextData, ConversionRoundTripsToTheExactText) {
  ScratchDir dir;
  const TextSource src;
  src.write(dir / "src");
  for (TokenLevel level : {TokenLevel::kChar, TokenLevel::kByte}) {
    const std::string out = dir / (level == TokenLevel::kChar ? "chars" : "bytes");
    TextConvertOptions o;
    o.level = level;
    o.val_fraction = 0.25;
    o.shards = 3;
    const TextConversion done = convert_text(dir / "src", out, o);
    EXPECT_EQ(done.files.size(), 3u);
    EXPECT_EQ(done.records, 13);  // 3 + 6 + 4
    EXPECT_EQ(done.val_records, 3);
    for (int split : {0, 1}) {
      const std::string path = out + (split == 0 ? "/train" : "/val");
      auto ds = Dataset::open(path);
      const Manifest& m = ds->manifest();
      EXPECT_EQ(m.name, split == 0 ? "fortunes-train" : "fortunes-val");
      ASSERT_TRUE(m.vocabulary.has_value());
      EXPECT_EQ(m.vocabulary->level, level);
      EXPECT_EQ(m.shards.size(), 3u);
      ASSERT_EQ(m.fields.size(), 1u);
      EXPECT_EQ(m.fields[0].dtype, DType::kUInt8);
      EXPECT_TRUE(m.fields[0].shape.empty());
      const std::string want = src.text(split, 0.25);
      EXPECT_EQ(decode_tokens(*m.vocabulary, all_tokens(path)), want) << path;
      if (level == TokenLevel::kByte) {
        EXPECT_EQ(ds->size(), static_cast<std::int64_t>(want.size()));
      }
    }
    if (level == TokenLevel::kChar) {
      // Every character of both splits, é and € (held out or not) included.
      std::string all;
      for (const auto& f : src.files) all += f.second;
      EXPECT_EQ(Dataset::open(out + "/train")->manifest().vocabulary->code_points,
                build_vocabulary(TokenLevel::kChar, all).code_points);
    }
  }
  // The manifest's vocabulary survives JSON both ways.
  const std::string text = read_text(dir / "chars/val/manifest.json");
  EXPECT_NE(text.find("\"level\": \"char\""), std::string::npos) << text;
  const Manifest m = Manifest::from_json(text, "m");
  EXPECT_EQ(Manifest::from_json(m.to_json(), "m").vocabulary->code_points,
            m.vocabulary->code_points);
}

TEST(TextData, ConversionRejectsBadInputAndPublishesNothing) {
  ScratchDir dir;
  const TextSource src;
  src.write(dir / "src");
  const std::string out = dir / "out";
  auto convert = [&](const std::string& source, TextConvertOptions o = {}) {
    return convert_text(source, out, o);
  };
  auto nothing_published = [&] {
    EXPECT_FALSE(fs::exists(out + "/train"));
    EXPECT_FALSE(fs::exists(out + "/val"));
    EXPECT_FALSE(fs::exists(out + "/.convert.tmp"));
  };
  expect_error<DataError>([&] { convert(dir / "missing"); }, {"missing' does not exist"});
  nothing_published();
  fs::create_directories(dir / "blank");
  write_text(dir / "blank/a", "");
  write_text(dir / "blank/b", "");
  expect_error<DataError>([&] { convert(dir / "blank"); }, {"hold no text (every one is empty)"});
  nothing_published();
  fs::create_directories(dir / "latin1");
  write_text(dir / "latin1/a", "fine\n%\n");
  write_text(dir / "latin1/b", "one\n%\ncaf\xe9\n%\n");
  expect_error<DataError>([&] { convert(dir / "latin1"); },
                          {"latin1/b is not valid UTF-8 at byte offset 9"});
  nothing_published();
  TextConvertOptions o;
  for (double f : {0.0, 1.0, -0.5}) {
    o.val_fraction = f;
    expect_error<InvalidArgument>([&] { convert(dir / "src", o); }, {"--val-fraction"});
  }
  o = {};
  o.shards = 0;
  expect_error<InvalidArgument>([&] { convert(dir / "src", o); }, {"--shards must be > 0"});
  o.shards = 1;
  o.val_fraction = 0.05;  // 13 records hold no held-out one
  expect_error<InvalidArgument>([&] { convert(dir / "src", o); },
                                {"the val split would hold no text", "13 records"});
  o.val_fraction = 0.25;
  o.shards = 1000;
  expect_error<InvalidArgument>([&] { convert(dir / "src", o); }, {"fewer than --shards 1000"});
  nothing_published();
  // Byte level takes any bytes; the failed runs left nothing in the way.
  o = {};
  o.level = TokenLevel::kByte;
  o.val_fraction = 0.5;
  convert(dir / "latin1", o);
  EXPECT_EQ(
      decode_tokens(*Dataset::open(out + "/val")->manifest().vocabulary, all_tokens(out + "/val")),
      "one\n%\n");
  expect_error<InvalidArgument>([&] { convert(dir / "latin1", o); }, {"already holds both splits"});
}

// An earlier run stopped between its two renames: the rerun keeps the
// published split when it holds the same tokens and refuses a different one.
TEST(TextData, ConversionCompletesAHalfPublishedOutput) {
  ScratchDir dir;
  const TextSource src;
  src.write(dir / "src");
  TextConvertOptions o;
  o.val_fraction = 0.25;
  const std::string out = dir / "out";
  convert_text(dir / "src", out, o);
  const std::string train_sum = read_text(out + "/train/manifest.json");
  fs::remove_all(out + "/val");
  convert_text(dir / "src", out, o);
  EXPECT_EQ(read_text(out + "/train/manifest.json"), train_sum);
  EXPECT_EQ(
      decode_tokens(*Dataset::open(out + "/val")->manifest().vocabulary, all_tokens(out + "/val")),
      src.text(1, 0.25));
  fs::remove_all(out + "/val");
  o.val_fraction = 0.5;  // another split: the published train differs
  expect_error<InvalidArgument>([&] { convert_text(dir / "src", out, o); },
                                {"out/train' already holds a data set that differs"});
  EXPECT_FALSE(fs::exists(out + "/val"));
}

int run_tool(const std::string& args, const std::string& log) {
  const int rc =
      std::system((std::string(DTRAIN_DATA_TOOL) + " " + args + " > " + log + " 2>&1").c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

TEST(TextData, ToolConvertsTextWithClearErrors) {
  ScratchDir dir;
  const TextSource src;
  src.write(dir / "src");
  const std::string log = dir / "log.txt";
  const std::string out = dir / "out";
  EXPECT_EQ(
      run_tool("convert-text --source " + (dir / "src") + " --out " + out + " --level smoke", log),
      2);
  EXPECT_NE(read_text(log).find("--level 'smoke' must be char or byte"), std::string::npos)
      << read_text(log);
  EXPECT_EQ(
      run_tool("convert-text --source " + (dir / "src") + " --out " + out + " --val-fraction 1.5",
               log),
      2);
  EXPECT_NE(read_text(log).find("--val-fraction must lie in (0, 1), got 1.5"), std::string::npos)
      << read_text(log);
  EXPECT_EQ(run_tool("convert-text --source " + (dir / "none") + " --out " + out, log), 1);
  EXPECT_NE(read_text(log).find("does not exist"), std::string::npos) << read_text(log);
  EXPECT_FALSE(fs::exists(out + "/train"));
  EXPECT_EQ(run_tool("convert-text --source " + (dir / "src") + " --out " + out +
                         " --val-fraction 0.25 --shards 2 --level byte",
                     log),
            0)
      << read_text(log);
  EXPECT_NE(read_text(log).find("3 file(s)"), std::string::npos) << read_text(log);
  EXPECT_NE(read_text(log).find("13 records, 3 held out"), std::string::npos) << read_text(log);
  EXPECT_EQ(run_tool("inspect " + out + "/val", log), 0);
  EXPECT_NE(read_text(log).find("vocabulary byte level, 256 ids"), std::string::npos)
      << read_text(log);
  EXPECT_EQ(run_tool("verify " + out + "/train", log), 0) << read_text(log);
}

// Plain arrays for h5py, with the manifest's vocabulary mapping the ids back
// to the text; an image data set's shard the same way.
TEST(TextData, ShardsOpenInH5py) {
  if (std::system("/usr/bin/python3 -c 'import h5py' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "no python3-h5py";
  }
  ScratchDir dir;
  const TextSource src;
  src.write(dir / "src");
  TextConvertOptions o;
  o.val_fraction = 0.25;
  o.shards = 2;
  convert_text(dir / "src", dir / "text", o);
  testing::make_pattern_dataset(dir / "images", 6, 10, {2, 2});
  const std::string script = dir / "check.py";
  write_text(script,
             "import h5py, json, os, sys\n"
             "d = sys.argv[1]\n"
             "m = json.load(open(os.path.join(d, 'manifest.json')))\n"
             "ids = []\n"
             "for s in m['shards']:\n"
             "    with h5py.File(os.path.join(d, s['file']), 'r') as f:\n"
             "        assert f['tokens'].dtype == 'uint8' and f['tokens'].ndim == 1\n"
             "        ids += f['tokens'][:].tolist()\n"
             "v = m['vocabulary']\n"
             "text = ''.join(chr(v['code_points'][i]) for i in ids)\n"
             "open(sys.argv[2], 'w', encoding='utf-8').write(text)\n"
             "with h5py.File(os.path.join(sys.argv[3], 'shard-00000.h5'), 'r') as f:\n"
             "    assert f['images'].shape == (6, 2, 2), f['images'].shape\n"
             "    assert f['labels'][:].tolist() == [1, 4, 7, 10, 13, 16]\n");
  const std::string decoded = dir / "decoded.txt";
  ASSERT_EQ(std::system(("/usr/bin/python3 " + script + " " + (dir / "text/train") + " " + decoded +
                         " " + (dir / "images"))
                            .c_str()),
            0);
  EXPECT_EQ(read_text(decoded), src.text(0, 0.25));
}

// ---------------------------------------------------------------------------
// TokenLoader
// ---------------------------------------------------------------------------

// Every row of `b` is its window of the stream, targets one token later.
void expect_windows(const TokenBatch& b, std::int64_t context, std::int64_t stride,
                    std::int64_t vocab) {
  const auto n = b.indices.size(0);
  ASSERT_EQ(b.inputs.sizes(), (at::IntArrayRef{n, context}));
  ASSERT_EQ(b.targets.sizes(), (at::IntArrayRef{n, context}));
  ASSERT_EQ(b.inputs.scalar_type(), at::kLong);
  ASSERT_EQ(b.targets.scalar_type(), at::kLong);
  const auto* in = b.inputs.data_ptr<std::int64_t>();
  const auto* tg = b.targets.data_ptr<std::int64_t>();
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t first = b.indices[i].item<std::int64_t>() * stride;
    for (std::int64_t t = 0; t < context; ++t) {
      ASSERT_EQ(in[i * context + t], stream_token(first + t, vocab))
          << "window " << i << " t " << t;
      ASSERT_EQ(tg[i * context + t], stream_token(first + t + 1, vocab));
    }
  }
}

TEST(TokenLoader, WindowsAndTargetsShiftedByOneInSamplerOrder) {
  ScratchDir dir;
  make_token_dataset(dir.path(), 1000, 230);  // windows cross the shard boundaries
  auto ds = Dataset::open(dir.path());
  for (std::int64_t stride : {0, 5, 16}) {
    for (std::size_t cache : {std::size_t{64} << 20, std::size_t{0}}) {
      TokenLoaderOptions o;
      o.context = 16;
      o.window_stride = stride;
      o.cache_bytes = cache;
      o.sampler.global_batch_size = 8;
      o.sampler.seed = 5;
      o.sampler.shuffle = stride == 5 ? ShuffleMode::kShardLocal : ShuffleMode::kGlobal;
      o.workers = 2;
      TokenLoader loader(ds, o, 0, 1);
      const std::int64_t step = stride > 0 ? stride : 16;
      EXPECT_EQ(loader.windows(), (1000 - 17) / step + 1);
      std::vector<std::int64_t> sizes;  // the sampler's shards: windows by first token
      for (std::int64_t s = 0; s < 5; ++s) {
        std::int64_t count = 0;
        for (std::int64_t w = 0; w < loader.windows(); ++w) count += (w * step) / 230 == s;
        sizes.push_back(count);
      }
      GlobalSampler reference(sizes, o.sampler, 0, 1);
      for (std::int64_t k = 0; k < loader.batches_per_epoch() + 2; ++k) {  // into epoch 1
        const TokenBatch b = loader.next();
        const std::vector<std::int64_t> want = reference.next();
        ASSERT_EQ(b.indices.size(0), static_cast<std::int64_t>(want.size()));
        for (std::size_t i = 0; i < want.size(); ++i) {
          EXPECT_EQ(b.indices[static_cast<std::int64_t>(i)].item<std::int64_t>(), want[i]);
        }
        expect_windows(b, 16, step, 50);
        EXPECT_EQ(loader.state(), reference.state());
      }
    }
  }
}

// Chunks of 262,144 uint8 tokens and int32 tokens (65,536 per chunk):
// windows that cross a chunk boundary inside a shard come out whole.
TEST(TokenLoader, WindowsAcrossChunkBoundaries) {
  for (std::int64_t vocab : {200, 300}) {
    ScratchDir dir;
    const std::int64_t tokens = vocab <= 256 ? 600000 : 140000;
    make_token_dataset(dir.path(), tokens, tokens, vocab);
    auto ds = Dataset::open(dir.path());
    const std::int64_t chunk = ds->chunk_samples(0, 0);
    TokenLoaderOptions o;
    o.context = 64;
    o.sampler.global_batch_size = 4;
    o.sampler.shuffle = ShuffleMode::kNone;
    o.start.consumed_samples = (chunk / 64 - 2) / 4 * 4;  // a few windows before the boundary
    TokenLoader loader(ds, o, 0, 1);
    bool crossed = false;
    for (int k = 0; k < 4; ++k) {
      const TokenBatch b = loader.next();
      expect_windows(b, 64, 64, vocab);
      for (std::int64_t i = 0; i < b.indices.size(0); ++i) {
        const std::int64_t first = b.indices[i].item<std::int64_t>() * 64;
        crossed = crossed || (first / chunk != (first + 64) / chunk);
      }
    }
    EXPECT_TRUE(crossed) << "no window crossed a chunk of " << chunk;
  }
}

TEST(TokenLoader, ResumeAndWorkerCountGiveTheSameStream) {
  ScratchDir dir;
  make_token_dataset(dir.path(), 3000, 700);
  auto ds = Dataset::open(dir.path());
  TokenLoaderOptions o;
  o.context = 32;
  o.sampler.global_batch_size = 6;
  o.sampler.seed = 9;
  std::vector<at::Tensor> stream;
  std::vector<SamplerState> states;
  {
    TokenLoader loader(ds, o, 0, 1);
    ASSERT_EQ(loader.batches_per_epoch(), 15);  // 93 windows
    for (int k = 0; k < 20; ++k) {
      states.push_back(loader.state());
      stream.push_back(loader.next().inputs.clone());
    }
  }
  for (int at_step : {0, 4, 15, 17}) {
    TokenLoaderOptions resumed = o;
    resumed.start = SamplerState::parse(states[at_step].serialize());
    resumed.workers = 3;
    resumed.cache_bytes = at_step % 2 ? 0 : resumed.cache_bytes;
    TokenLoader loader(ds, resumed, 0, 1);
    for (int k = at_step; k < std::min(at_step + 3, 20); ++k) {
      EXPECT_TRUE(at::equal(loader.next().inputs, stream[k])) << "resumed at " << at_step;
    }
  }
  TokenLoaderOptions other = o;
  other.sampler.seed = 10;
  TokenLoader loader(ds, other, 0, 1);
  EXPECT_FALSE(at::equal(loader.next().inputs, stream[0]));  // the seed matters
}

// The dp ranks' windows of each step are disjoint and together the global
// batch, in rank order.
TEST(TokenLoader, DataRanksReadDisjointPartsOfEachGlobalBatch) {
  ScratchDir dir;
  make_token_dataset(dir.path(), 2000, 500);
  auto ds = Dataset::open(dir.path());
  TokenLoaderOptions o;
  o.context = 20;
  o.sampler.global_batch_size = 12;
  o.sampler.seed = 3;
  for (int world : {2, 3, 4}) {
    std::vector<std::unique_ptr<TokenLoader>> ranks;
    for (int r = 0; r < world; ++r) ranks.push_back(std::make_unique<TokenLoader>(ds, o, r, world));
    TokenLoader reference(ds, o, 0, 1);
    std::set<std::int64_t> epoch;
    for (std::int64_t k = 0; k < reference.batches_per_epoch(); ++k) {
      const at::Tensor want = reference.next().indices;
      std::vector<at::Tensor> parts;
      for (auto& r : ranks) {
        const TokenBatch b = r->next();
        EXPECT_EQ(b.indices.size(0), 12 / world);
        expect_windows(b, 20, 20, 50);
        parts.push_back(b.indices);
      }
      EXPECT_TRUE(at::equal(at::cat(parts), want)) << "world " << world << " step " << k;
      for (const auto& p : parts) {
        for (std::int64_t i = 0; i < p.size(0); ++i) {
          EXPECT_TRUE(epoch.insert(p[i].item<std::int64_t>()).second) << "window read twice";
        }
      }
    }
  }
}

TEST(TokenLoader, RejectsBadInput) {
  ScratchDir dir;
  make_token_dataset(dir / "tokens", 100, 100);
  auto ds = Dataset::open(dir / "tokens");
  TokenLoaderOptions o;
  o.sampler.global_batch_size = 2;
  o.context = 100;  // needs 101 tokens
  expect_error<InvalidArgument>([&] { TokenLoader(ds, o, 0, 1); },
                                {"holds 100 tokens", "context + 1 = 101"});
  o.context = 0;
  expect_error<InvalidArgument>([&] { TokenLoader(ds, o, 0, 1); }, {"context must be > 0"});
  o.context = 8;
  o.window_stride = -1;
  expect_error<InvalidArgument>([&] { TokenLoader(ds, o, 0, 1); }, {"window_stride"});
  o.window_stride = 0;
  o.sampler.global_batch_size = 3;
  expect_error<InvalidArgument>([&] { TokenLoader(ds, o, 0, 2); }, {"global batch size 3"});
  o.sampler.global_batch_size = 2;
  o.token_field = "text";
  expect_error<InvalidArgument>([&] { TokenLoader(ds, o, 0, 1); }, {"text"});
  // An image data set is no token stream.
  testing::make_pattern_dataset(dir / "images", 10, 10);
  o.token_field = "images";
  expect_error<DataError>([&] { TokenLoader(Dataset::open(dir / "images"), o, 0, 1); },
                          {"token field 'images'", "one integer per sample"});
  // Ids beyond the vocabulary (a manifest edited to a smaller one).
  const std::string manifest = read_text(dir / "tokens/manifest.json");
  const std::size_t at = manifest.find("\"size\": 50");
  ASSERT_NE(at, std::string::npos) << manifest;
  Manifest m = Manifest::from_json(manifest, "m");
  m.vocabulary->code_points.resize(10);
  write_text(dir / "tokens/manifest.json", m.to_json());
  o.token_field = "tokens";
  expect_error<DataError>([&] { TokenLoader(Dataset::open(dir / "tokens"), o, 0, 1); },
                          {"holds ids from 0 to 48", "vocabulary of 10 ids"});
}

}  // namespace
}  // namespace dtrain::data
