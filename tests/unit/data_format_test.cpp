// The on-disk format: writer/reader round trip, IDX conversion, plain-array
// compatibility (h5dump) and every bad-input case failing at open time.

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <zlib.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/data/convert.h"
#include "dtrain/data/dataset.h"
#include "dtrain/error.h"
#include "tests/support/expect_error.h"
#include "tests/unit/data_test_util.h"

namespace dtrain::data {
namespace {

namespace fs = std::filesystem;
using testing::make_pattern_dataset;
using testing::ScratchDir;

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::trunc) << text;
}

// Expects Dataset::open(dir) to throw DataError mentioning every `needles`.
void expect_open_error(const std::string& dir, const std::vector<std::string>& needles,
                       OpenOptions options = {}) {
  try {
    Dataset::open(dir, options);
    ADD_FAILURE() << "opening " << dir << " did not throw";
  } catch (const DataError& e) {
    for (const auto& n : needles) {
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos)
          << "message lacks '" << n << "': " << e.what();
    }
  }
}

using dtrain::testing::expect_error;

TEST(DataFormat, RoundTripAcrossShards) {
  ScratchDir dir;
  const Manifest written = make_pattern_dataset(dir.path(), 103, 25);
  ASSERT_EQ(written.shards.size(), 5u);
  EXPECT_EQ(written.shards.back().samples, 3);
  EXPECT_FALSE(fs::exists(dir / "manifest.json.tmp"));
  auto ds = Dataset::open(dir.path());
  EXPECT_EQ(ds->size(), 103);
  EXPECT_EQ(ds->shard_offsets(), (std::vector<std::int64_t>{0, 25, 50, 75, 100, 103}));
  EXPECT_EQ(ds->shard_of(24), 0);
  EXPECT_EQ(ds->shard_of(25), 1);
  EXPECT_EQ(ds->shard_of(102), 4);
  const int images = ds->field_index("images");
  const int labels = ds->field_index("labels");
  for (std::int64_t start : {0, 25, 60, 100}) {
    const std::int64_t n =
        std::min<std::int64_t>(ds->shard_offsets()[ds->shard_of(start) + 1] - start, 10);
    std::vector<std::uint8_t> px(static_cast<std::size_t>(n * 16));
    std::vector<std::int64_t> lab(static_cast<std::size_t>(n));
    ds->read(images, start, n, px.data());
    ds->read(labels, start, n, lab.data());
    for (std::int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(lab[i], testing::pattern_label(start + i));
      for (int e = 0; e < 16; ++e) EXPECT_EQ(px[i * 16 + e], testing::pattern_pixel(start + i, e));
    }
  }
  std::vector<std::uint8_t> buf(16 * 10);
  EXPECT_THROW(ds->read(images, 20, 10, buf.data()), InvalidArgument);  // crosses a shard
  EXPECT_THROW(ds->field_index("nope"), InvalidArgument);
  const Manifest again = Manifest::from_json(written.to_json(), "x");
  EXPECT_EQ(again.to_json(), written.to_json());
}

// A conversion run twice gives byte-identical shards and manifests (HDF5
// records an object's modification time unless told not to; its clock has
// whole seconds, hence the pause).
TEST(DataFormat, TheSameSamplesWrittenTwiceGiveTheSameBytes) {
  ScratchDir dir;
  const Manifest first = make_pattern_dataset(dir / "a", 60, 25);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  const Manifest second = make_pattern_dataset(dir / "b", 60, 25);
  EXPECT_EQ(first.to_json(), second.to_json());
  ASSERT_EQ(first.shards.size(), 3u);
  for (const auto& shard : first.shards) {
    EXPECT_EQ(read_text(dir / ("a/" + shard.file)), read_text(dir / ("b/" + shard.file)))
        << shard.file;
  }
}

TEST(DataFormat, ChunkSizeIsAboutQuarterMebibyte) {
  EXPECT_EQ(chunk_samples_for({"x", DType::kUInt8, {1, 28, 28}}, 100000), 334);
  EXPECT_EQ(chunk_samples_for({"x", DType::kInt64, {}}, 100000), 32768);
  EXPECT_EQ(chunk_samples_for({"x", DType::kInt64, {}}, 100), 100);
  EXPECT_EQ(chunk_samples_for({"x", DType::kFloat32, {3, 512, 512}}, 100), 1);
}

TEST(DataFormat, WriterRejectsBadSpecsAndEmptyDataSets) {
  ScratchDir dir;
  DatasetSpec spec;
  spec.fields = {{"a", DType::kUInt8, {0}}};
  EXPECT_THROW(DatasetWriter(dir / "x", spec), InvalidArgument);
  spec.fields = {{"a", DType::kUInt8, {2}}, {"a", DType::kUInt8, {2}}};
  EXPECT_THROW(DatasetWriter(dir / "x", spec), InvalidArgument);
  spec.fields = {{"a", DType::kUInt8, {2}}};
  {
    DatasetWriter empty(dir / "empty", spec);
    EXPECT_THROW(empty.finish(), InvalidArgument);
  }
  make_pattern_dataset(dir / "full", 10, 10);
  EXPECT_THROW(DatasetWriter(dir / "full", spec), InvalidArgument);  // already a data set
}

TEST(DataFormat, UnfinishedWriterLeavesNoDataSet) {
  ScratchDir dir;
  DatasetSpec spec;
  spec.fields = {{"a", DType::kInt32, {}}};
  {
    DatasetWriter w(dir.path(), spec);
    const std::int32_t v[3] = {1, 2, 3};
    w.add({v}, 3);
  }
  expect_open_error(dir.path(), {"no manifest.json", dir.path()});
}

TEST(DataFormat, BadInputsFailAtOpenNamingFileAndField) {
  ScratchDir dir;
  auto fresh = [&](const std::string& name) {
    const std::string d = dir / name;
    make_pattern_dataset(d, 40, 20);
    return d;
  };
  expect_open_error(dir / "does-not-exist", {"does not exist"});
  {  // missing manifest
    const std::string d = fresh("no-manifest");
    fs::remove(d + "/manifest.json");
    expect_open_error(d, {"no manifest.json"});
  }
  {  // missing shard
    const std::string d = fresh("missing-shard");
    fs::remove(d + "/shard-00001.h5");
    expect_open_error(d, {"shard-00001.h5", "missing"});
  }
  {  // truncated shard
    const std::string d = fresh("truncated");
    fs::resize_file(d + "/shard-00000.h5", fs::file_size(d + "/shard-00000.h5") - 100);
    expect_open_error(d, {"shard-00000.h5", "truncated"});
  }
  {  // corrupt shard, same size: digest mismatch; without digests HDF5 fails to open it
    const std::string d = fresh("corrupt");
    {
      std::fstream f(d + "/shard-00001.h5", std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(0);
      f.write("garbage!", 8);  // destroys the HDF5 signature
    }
    expect_open_error(d, {"shard-00001.h5", "SHA-256"});
    expect_open_error(d, {"shard-00001.h5", "H5Fopen"}, OpenOptions{false});
  }
  {  // manifest counts disagree with the shards
    const std::string d = fresh("counts");
    Manifest m = Manifest::from_json(read_text(d + "/manifest.json"), "m");
    m.shards[0].samples = 19;
    m.shards[1].samples = 21;
    write_text(d + "/manifest.json", m.to_json());
    expect_open_error(d, {"shard-00000.h5", "field 'images'", "[20, 1, 4, 4]", "[19, 1, 4, 4]"});
  }
  {  // total_samples disagrees with the shard list
    const std::string d = fresh("total");
    Manifest m = Manifest::from_json(read_text(d + "/manifest.json"), "m");
    m.total_samples = 41;
    write_text(d + "/manifest.json", m.to_json());
    expect_open_error(d, {"manifest.json", "total_samples is 41"});
  }
  {  // wrong per-sample shape
    const std::string d = fresh("shape");
    Manifest m = Manifest::from_json(read_text(d + "/manifest.json"), "m");
    m.fields[0].shape = {1, 16};
    write_text(d + "/manifest.json", m.to_json());
    expect_open_error(d, {"shard-00000.h5", "field 'images'", "shape"});
  }
  {  // wrong dtype
    const std::string d = fresh("dtype");
    Manifest m = Manifest::from_json(read_text(d + "/manifest.json"), "m");
    m.fields[1].dtype = DType::kFloat64;
    write_text(d + "/manifest.json", m.to_json());
    expect_open_error(d, {"shard-00000.h5", "field 'labels'", "float64"});
  }
  {  // a field the shards do not hold
    const std::string d = fresh("field");
    Manifest m = Manifest::from_json(read_text(d + "/manifest.json"), "m");
    m.fields.push_back({"masks", DType::kUInt8, {4}});
    write_text(d + "/manifest.json", m.to_json());
    expect_open_error(d, {"shard-00000.h5", "field 'masks'"});
  }
  {  // empty data set, unknown dtype, malformed JSON
    const std::string d = fresh("empty");
    write_text(d + "/manifest.json", R"({"format_version":1,"total_samples":0,"shards":[],)"
                                     R"("fields":[{"name":"a","dtype":"uint8","shape":[]}]})");
    expect_open_error(d, {"empty"});
    write_text(d + "/manifest.json", R"({"format_version":1,"total_samples":0,"shards":[],)"
                                     R"("fields":[{"name":"a","dtype":"complex","shape":[]}]})");
    expect_open_error(d, {"field 'a'", "complex"});
    write_text(d + "/manifest.json", "{not json");
    expect_open_error(d, {"manifest.json", "malformed"});
  }
}

// The writer records each integer field's range; labels are checked against
// the class count from it, or, in a data set written before the range was
// recorded, by reading them once.
TEST(DataFormat, LabelRangeIsRecordedAndChecked) {
  ScratchDir dir;
  const std::string d = dir / "pattern";
  make_pattern_dataset(d, 40, 15);  // labels 3i + 1: 1 .. 118
  const std::string text = read_text(d + "/manifest.json");
  EXPECT_NE(text.find("\"min\": 1"), std::string::npos) << text;
  EXPECT_NE(text.find("\"max\": 118"), std::string::npos) << text;
  const Manifest m = Manifest::from_json(text, "m");
  ASSERT_EQ(m.value_ranges.count("labels"), 1u);
  EXPECT_EQ(m.value_ranges.at("labels").min, 1);
  EXPECT_EQ(m.value_ranges.at("labels").max, 118);
  EXPECT_EQ(m.value_ranges.at("images").min, 0);

  // An older data set: no ranges in its manifest. It still opens; the range
  // is found by reading the labels.
  const std::string old = dir / "old";
  make_pattern_dataset(old, 40, 15);
  Manifest stripped = Manifest::from_json(read_text(old + "/manifest.json"), "m");
  stripped.value_ranges.clear();
  write_text(old + "/manifest.json", stripped.to_json());
  EXPECT_EQ(read_text(old + "/manifest.json").find("\"min\""), std::string::npos);

  for (const std::string& path : {d, old}) {
    SCOPED_TRACE(path);
    auto ds = Dataset::open(path);
    const ValueRange range = ds->value_range(ds->field_index("labels"));
    EXPECT_EQ(range.min, 1);
    EXPECT_EQ(range.max, 118);
    check_class_labels(*ds, "labels", 119);
    expect_error<DataError>([&] { check_class_labels(*ds, "labels", 10); },
                            {"label field 'labels'", path, "from 1 to 118", "[0, 10)"});
  }

  // Float labels are no class labels, whatever their values.
  DatasetSpec spec;
  spec.fields = {{"images", DType::kUInt8, {2}}, {"labels", DType::kFloat32, {}}};
  spec.class_names = {"a", "b"};
  {
    DatasetWriter writer(dir / "float", spec);
    const std::uint8_t px[4] = {1, 2, 3, 4};
    const float labels[2] = {0, 1};
    writer.add({px, labels}, 2);
    EXPECT_EQ(writer.finish().value_ranges.count("labels"), 0u);
  }
  auto floats = Dataset::open(dir / "float");
  expect_error<DataError>([&] { check_class_labels(*floats, "labels", 2); },
                          {"label field 'labels'", "float32", "integer"});
  EXPECT_THROW(floats->value_range(1), InvalidArgument);
  // A min above max is a malformed manifest.
  std::string swapped = read_text(d + "/manifest.json");
  swapped.replace(swapped.find("\"min\": 1"), 8, "\"min\": 999");
  write_text(d + "/manifest.json", swapped);
  expect_open_error(d, {"manifest.json", "min 999 > max 118"});
}

// Writes a gzip'd IDX file: magic, big-endian dims, uint8 data.
void write_idx_gz(const std::string& path, const std::vector<std::uint32_t>& dims,
                  const std::vector<std::uint8_t>& data) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  const unsigned char magic[4] = {0, 0, 0x08, static_cast<unsigned char>(dims.size())};
  gzwrite(f, magic, 4);
  for (std::uint32_t d : dims) {
    const unsigned char b[4] = {static_cast<unsigned char>(d >> 24),
                                static_cast<unsigned char>(d >> 16),
                                static_cast<unsigned char>(d >> 8), static_cast<unsigned char>(d)};
    gzwrite(f, b, 4);
  }
  gzwrite(f, data.data(), static_cast<unsigned>(data.size()));
  gzclose(f);
}

TEST(DataFormat, ConvertsIdxFiles) {
  ScratchDir dir;
  const std::uint32_t n = 13, rows = 5, cols = 3;
  std::vector<std::uint8_t> pixels(n * rows * cols), labels(n);
  for (std::size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<std::uint8_t>(i * 17);
  for (std::uint32_t i = 0; i < n; ++i) labels[i] = static_cast<std::uint8_t>(i % 10);
  write_idx_gz(dir / "img.gz", {n, rows, cols}, pixels);
  write_idx_gz(dir / "lab.gz", {n}, labels);
  convert_idx(dir / "img.gz", dir / "lab.gz", dir / "out", "tiny", 4, fashion_mnist_class_names());
  auto ds = Dataset::open(dir / "out");
  EXPECT_EQ(ds->size(), 13);
  EXPECT_EQ(ds->manifest().shards.size(), 4u);
  EXPECT_EQ(ds->manifest().class_names.size(), 10u);
  EXPECT_EQ(ds->manifest().fields[0].shape, (std::vector<std::int64_t>{1, 5, 3}));
  std::vector<std::uint8_t> px(rows * cols);
  std::int64_t label = 0;
  for (std::int64_t i = 0; i < 13; ++i) {
    ds->read(0, i, 1, px.data());
    ds->read(1, i, 1, &label);
    EXPECT_EQ(label, i % 10);
    for (std::uint32_t e = 0; e < rows * cols; ++e) EXPECT_EQ(px[e], pixels[i * rows * cols + e]);
  }
  // Mismatched counts and a wrong magic are named errors.
  write_idx_gz(dir / "lab12.gz", {12}, std::vector<std::uint8_t>(12));
  EXPECT_THROW(convert_idx(dir / "img.gz", dir / "lab12.gz", dir / "o2", "x", 1), DataError);
  try {
    convert_idx(dir / "lab.gz", dir / "lab.gz", dir / "o3", "x", 1);
    ADD_FAILURE();
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("lab.gz"), std::string::npos) << e.what();
  }
}

// A source directory of the four Fashion-MNIST files, tiny: 13 training and
// 7 test images of 5x3 pixels.
struct FashionSource {
  std::vector<std::uint8_t> train_pixels, train_labels, test_pixels, test_labels;

  FashionSource() {
    for (std::size_t i = 0; i < 13 * 15; ++i) train_pixels.push_back(static_cast<std::uint8_t>(i));
    for (std::size_t i = 0; i < 13; ++i) train_labels.push_back(static_cast<std::uint8_t>(i % 10));
    for (std::size_t i = 0; i < 7 * 15; ++i)
      test_pixels.push_back(static_cast<std::uint8_t>(3 * i));
    for (std::size_t i = 0; i < 7; ++i) test_labels.push_back(static_cast<std::uint8_t>(9 - i));
  }
  void write(const std::string& dir) const {
    fs::create_directories(dir);
    write_idx_gz(dir + "/train-images-idx3-ubyte.gz", {13, 5, 3}, train_pixels);
    write_idx_gz(dir + "/train-labels-idx1-ubyte.gz", {13}, train_labels);
    write_idx_gz(dir + "/t10k-images-idx3-ubyte.gz", {7, 5, 3}, test_pixels);
    write_idx_gz(dir + "/t10k-labels-idx1-ubyte.gz", {7}, test_labels);
  }
};

void expect_converted(const std::string& out, const FashionSource& src) {
  auto train = Dataset::open(out + "/train");
  auto test = Dataset::open(out + "/test");
  ASSERT_EQ(train->size(), 13);
  ASSERT_EQ(test->size(), 7);
  std::vector<std::uint8_t> px(15);
  std::int64_t label = 0;
  test->read(0, 6, 1, px.data());
  test->read(1, 6, 1, &label);
  EXPECT_EQ(label, src.test_labels[6]);
  EXPECT_TRUE(std::equal(px.begin(), px.end(), src.test_pixels.begin() + 6 * 15));
  EXPECT_FALSE(fs::exists(out + "/.convert.tmp"));
}

// A failed conversion publishes neither split, and a rerun with good files
// works; a gzip CRC error is reported as such.
TEST(DataFormat, FashionMnistConversionPublishesBothSplitsOrNeither) {
  ScratchDir dir;
  const FashionSource src;
  const std::string good = dir / "good";
  src.write(good);
  struct Damage {
    const char* name;
    std::function<void(const std::string&)> apply;  // on a copy of the source
    std::vector<std::string> message;
  };
  const std::vector<Damage> damages = {
      {"missing",
       [](const std::string& d) { fs::remove(d + "/t10k-images-idx3-ubyte.gz"); },
       {"t10k-images-idx3-ubyte.gz", "does not exist"}},
      {"short-labels",  // a complete gzip stream, 6 labels where 7 are declared
       [&](const std::string& d) {
         write_idx_gz(
             d + "/t10k-labels-idx1-ubyte.gz", {7},
             std::vector<std::uint8_t>(src.test_labels.begin(), src.test_labels.end() - 1));
       },
       {"t10k-labels-idx1-ubyte.gz", "truncated"}},
      {"cut-gzip",  // the gzip file itself cut short
       [](const std::string& d) {
         const std::string f = d + "/t10k-images-idx3-ubyte.gz";
         fs::resize_file(f, fs::file_size(f) / 2);
       },
       {"t10k-images-idx3-ubyte.gz", "truncated"}},
      {"crc",  // the CRC-32 in the gzip trailer no longer matches
       [](const std::string& d) {
         const std::string f = d + "/t10k-labels-idx1-ubyte.gz";
         std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
         io.seekg(-8, std::ios::end);
         char c = 0;
         io.read(&c, 1);
         io.seekp(-8, std::ios::end);
         c = static_cast<char>(c ^ 0x5a);
         io.write(&c, 1);
       },
       {"t10k-labels-idx1-ubyte.gz", "gzip checksum"}},
  };
  for (const Damage& damage : damages) {
    SCOPED_TRACE(damage.name);
    const std::string bad = dir / (std::string("bad-") + damage.name);
    src.write(bad);
    damage.apply(bad);
    const std::string out = dir / (std::string("out-") + damage.name);
    expect_error<DataError>([&] { convert_fashion_mnist(bad, out, 2); }, damage.message);
    EXPECT_FALSE(fs::exists(out + "/train")) << "the train split was published";
    EXPECT_FALSE(fs::exists(out + "/test"));
    EXPECT_FALSE(fs::exists(out + "/.convert.tmp"));
    convert_fashion_mnist(good, out, 2);  // the rerun with good files
    expect_converted(out, src);
  }
  // Both splits there: nothing to do, a clear error.
  expect_error<InvalidArgument>([&] { convert_fashion_mnist(good, dir / "out-crc", 2); },
                                {"already holds both splits"});
}

// A train split published alone (by an earlier conversion that stopped
// between its two renames, or failed on the test split) is kept when it
// holds the same samples, and is an error when it differs.
TEST(DataFormat, FashionMnistConversionCompletesAHalfPublishedOutput) {
  ScratchDir dir;
  const FashionSource src;
  const std::string good = dir / "good";
  src.write(good);
  const std::string out = dir / "out";
  convert_idx(good + "/train-images-idx3-ubyte.gz", good + "/train-labels-idx1-ubyte.gz",
              out + "/train", "fashion-mnist-train", 3, fashion_mnist_class_names());
  const std::string before = read_text(out + "/train/manifest.json");
  convert_fashion_mnist(good, out, 2);
  expect_converted(out, src);
  EXPECT_EQ(read_text(out + "/train/manifest.json"), before) << "the train split was rewritten";

  const std::string other = dir / "other";
  convert_idx(good + "/t10k-images-idx3-ubyte.gz", good + "/t10k-labels-idx1-ubyte.gz",
              other + "/train", "not-the-train-split", 1, fashion_mnist_class_names());
  expect_error<InvalidArgument>([&] { convert_fashion_mnist(good, other, 2); },
                                {other + "/train", "differs"});
  EXPECT_FALSE(fs::exists(other + "/test"));
  // Leftovers of an unfinished writer are no data set: replaced.
  const std::string leftovers = dir / "leftovers";
  fs::create_directories(leftovers + "/test");
  write_text(leftovers + "/test/shard-00000.h5", "partial");
  convert_fashion_mnist(good, leftovers, 1);
  expect_converted(leftovers, src);
  // Anything else is not touched.
  const std::string foreign = dir / "foreign";
  fs::create_directories(foreign + "/test");
  write_text(foreign + "/test/notes.txt", "mine");
  expect_error<InvalidArgument>([&] { convert_fashion_mnist(good, foreign, 1); },
                                {foreign + "/test", "holds no data set"});
  EXPECT_EQ(read_text(foreign + "/test/notes.txt"), "mine");
  EXPECT_FALSE(fs::exists(foreign + "/train"));
}

TEST(DataFormat, ShardOpensAsPlainArrayInH5dump) {
  if (std::system("command -v h5dump >/dev/null 2>&1") != 0) GTEST_SKIP() << "no h5dump";
  ScratchDir dir;
  make_pattern_dataset(dir.path(), 6, 10, {2, 2});
  const std::string out = dir / "dump.txt";
  ASSERT_EQ(std::system(("h5dump -d /labels " + dir.path() + "/shard-00000.h5 > " + out).c_str()),
            0);
  const std::string text = read_text(out);
  EXPECT_NE(text.find("H5T_STD_I64LE"), std::string::npos) << text;
  EXPECT_NE(text.find("( 6 )"), std::string::npos) << text;
  EXPECT_NE(text.find("1, 4, 7, 10, 13, 16"), std::string::npos) << text;
  ASSERT_EQ(std::system(("h5dump -H " + dir.path() + "/shard-00000.h5 > " + out).c_str()), 0);
  EXPECT_NE(read_text(out).find("( 6, 2, 2 )"), std::string::npos) << read_text(out);
}

// The dtrain-data tool end to end: generate, inspect, verify (exit 0), then
// verify again after corrupting a shard (exit 1).
TEST(DataFormat, ToolGenerateInspectVerify) {
  ScratchDir dir;
  const std::string tool = DTRAIN_DATA_TOOL;
  const std::string out = dir / "syn";
  auto run = [&](const std::string& args) {
    const int rc = std::system((tool + " " + args + " > " + (dir / "log.txt") + " 2>&1").c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  };
  ASSERT_EQ(run("generate --out " + out + " --samples 50 --shape 3,4,4 --classes 3 --shards 2"), 0);
  EXPECT_EQ(run("inspect " + out), 0);
  EXPECT_NE(read_text(dir / "log.txt").find("50 in 2 shard(s)"), std::string::npos)
      << read_text(dir / "log.txt");
  EXPECT_EQ(run("verify " + out), 0);
  auto ds = Dataset::open(out);
  std::vector<std::uint8_t> px(48);
  std::int64_t label = 0;
  ds->read(0, 30, 1, px.data());
  ds->read(1, 30, 1, &label);
  EXPECT_EQ(px[5], synthetic_pixel(0, 30, 5));
  EXPECT_EQ(label, synthetic_label(0, 30, 3));
  {
    std::fstream f(out + "/shard-00001.h5", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-10, std::ios::end);
    f.write("xxxx", 4);
  }
  EXPECT_EQ(run("verify " + out), 1);
  EXPECT_NE(read_text(dir / "log.txt").find("shard-00001.h5 is corrupt"), std::string::npos)
      << read_text(dir / "log.txt");
  EXPECT_EQ(run("frobnicate"), 2);
  // Usage errors exit 2 and name the option.
  auto log_has = [&](const std::string& text) {
    return read_text(dir / "log.txt").find(text) != std::string::npos;
  };
  EXPECT_EQ(run("generate --out " + (dir / "s2") + " --shape 3,x,4"), 2);
  EXPECT_TRUE(log_has("--shape '3,x,4' must be comma-separated positive integers"))
      << read_text(dir / "log.txt");
  EXPECT_EQ(run("generate --out " + (dir / "s3") + " --samples lots"), 2);
  EXPECT_TRUE(log_has("--samples: cannot parse 'lots'")) << read_text(dir / "log.txt");
  EXPECT_EQ(run("inspect " + out + " " + out), 2);
  EXPECT_TRUE(log_has("unexpected argument")) << read_text(dir / "log.txt");
  // An option of another command is an error, not silently ignored.
  EXPECT_EQ(run("convert-fashion-mnist --out " + (dir / "s4") + " --samples 100"), 2);
  EXPECT_TRUE(log_has("Option") && log_has("samples") && log_has("does not exist"))
      << read_text(dir / "log.txt");
  EXPECT_EQ(run("generate " + (dir / "s5")), 2);
  EXPECT_TRUE(log_has("unexpected argument")) << read_text(dir / "log.txt");
  EXPECT_FALSE(fs::exists(dir / "s2"));
  EXPECT_FALSE(fs::exists(dir / "s3"));
  EXPECT_FALSE(fs::exists(dir / "s4"));
  EXPECT_FALSE(fs::exists(dir / "s5"));
}

// convert-fashion-mnist from the command line: a corrupt file is a named
// error (exit 1) that publishes nothing; the rerun with good files works.
TEST(DataFormat, ToolConvertsAfterAFailedConversion) {
  ScratchDir dir;
  const FashionSource src;
  src.write(dir / "good");
  src.write(dir / "bad");
  {  // a flipped bit in the gzip trailer's CRC-32
    std::fstream io(dir / "bad/train-labels-idx1-ubyte.gz",
                    std::ios::in | std::ios::out | std::ios::binary);
    io.seekg(-6, std::ios::end);
    char c = 0;
    io.read(&c, 1);
    io.seekp(-6, std::ios::end);
    c = static_cast<char>(c ^ 1);
    io.write(&c, 1);
  }
  const std::string tool = DTRAIN_DATA_TOOL;
  const std::string out = dir / "data";
  auto convert = [&](const std::string& source) {
    const int rc = std::system((tool + " convert-fashion-mnist --source " + source + " --out " +
                                out + " --shards 2 > " + (dir / "log.txt") + " 2>&1")
                                   .c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  };
  EXPECT_EQ(convert(dir / "bad"), 1);
  const std::string log = read_text(dir / "log.txt");
  EXPECT_NE(log.find("train-labels-idx1-ubyte.gz failed its gzip checksum"), std::string::npos)
      << log;
  EXPECT_EQ(log.find("magic number"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(out + "/train"));
  EXPECT_FALSE(fs::exists(out + "/test"));
  EXPECT_EQ(convert(dir / "good"), 0) << read_text(dir / "log.txt");
  expect_converted(out, src);
}

}  // namespace
}  // namespace dtrain::data
