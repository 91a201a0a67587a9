// The checkpoint file format, one process: our Fletcher32 against HDF5's own,
// the XXH3-128 file digest, piece files written with and without O_DIRECT
// (byte-identical, every chunk checked by HDF5 on read, a flipped byte
// caught), several pieces of one tensor in one file, and manifests of format
// versions 1 (SHA-256), 2 (XXH3-128) and 3 (datasets per piece, the grid).

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dtrain/data/dataset.h"
#include "dtrain/error.h"
#include "src/checkpoint/checksums.h"
#include "src/checkpoint/file_image.h"
#include "src/checkpoint/format.h"
#include "tests/unit/data_test_util.h"

// HDF5's own Fletcher32 (exported by libhdf5, not declared in its public
// headers): the reference our chunk checksums must equal bit for bit.
extern "C" std::uint32_t H5_checksum_fletcher32(const void* data, std::size_t length);

namespace dtrain::checkpoint::detail {
namespace {

namespace fs = std::filesystem;
using data::testing::ScratchDir;

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(CheckpointChecksums, Fletcher32EqualsHdf5s) {
  std::mt19937_64 rng(11);
  // Lengths around the vector block (32 bytes) and the row block (8 KiB),
  // odd ones, and whole chunks; contents that hit the edge cases of the
  // modulo-65535 sums (all 0, all 0xff, a sum that is a multiple of 65535).
  std::vector<std::size_t> lengths = {0,
                                      1,
                                      2,
                                      3,
                                      31,
                                      32,
                                      33,
                                      63,
                                      64,
                                      65,
                                      1023,
                                      8191,
                                      8192,
                                      8193,
                                      16385,
                                      65535,
                                      65536,
                                      65537,
                                      (1 << 20) - 1,
                                      1 << 20};
  for (int i = 0; i < 200; ++i) lengths.push_back(rng() % 40000);
  for (std::size_t length : lengths) {
    for (int pattern = 0; pattern < 5; ++pattern) {
      std::vector<std::uint8_t> bytes(length);
      for (std::size_t i = 0; i < length; ++i) {
        switch (pattern) {
          case 0:
            bytes[i] = 0;
            break;
          case 1:
            bytes[i] = 0xff;
            break;
          case 2:
            bytes[i] = rng() % 7 == 0 ? static_cast<std::uint8_t>(rng()) : 0;
            break;
          case 3:
            bytes[i] = static_cast<std::uint8_t>(rng());
            break;
          default:
            bytes[i] = i < 2 ? 0xff : 0;
            break;  // one word 0xffff: sum1 = 65535
        }
      }
      const std::uint32_t expected = H5_checksum_fletcher32(bytes.data(), length);
      ASSERT_EQ(fletcher32(bytes.data(), length), expected)
          << "length " << length << " pattern " << pattern;
      std::vector<std::uint8_t> copy(length + 1, 0x5a);
      ASSERT_EQ(copy_with_fletcher32(copy.data(), bytes.data(), length), expected);
      ASSERT_TRUE(std::equal(bytes.begin(), bytes.end(), copy.begin())) << "length " << length;
      ASSERT_EQ(copy[length], 0x5a) << "wrote past the end, length " << length;
    }
  }
}

TEST(CheckpointChecksums, Xxh3FileDigestIsTheCanonicalXxh128) {
  // XXH3-128 of no bytes, the published test vector (canonical order).
  EXPECT_EQ(xxh3_128_hex("", 0), "99aa06d3014798d86001c324468d497f");
  ScratchDir dir;
  std::string bytes((std::size_t{9} << 20) + 77, '\0');  // over two read blocks
  std::mt19937 rng(5);
  for (char& c : bytes) c = static_cast<char>(rng());
  const std::string path = dir / "f.bin";
  std::ofstream(path, std::ios::binary) << bytes;
  EXPECT_EQ(digest_file(path, kDigestXxh3), xxh3_128_hex(bytes.data(), bytes.size()));
  EXPECT_EQ(digest_file(path, kDigestSha256), data::sha256_file(path));
  bytes[4 << 20] ^= 1;
  EXPECT_NE(digest_file(path, kDigestXxh3), xxh3_128_hex(bytes.data(), bytes.size()));
  EXPECT_THROW(digest_file(path, "md5"), CheckpointError);
  EXPECT_THROW(digest_file(dir / "missing.bin", kDigestXxh3), CheckpointError);
}

// Pieces whose chunks cover the edge cases: padded edge chunks, an odd number
// of bytes, all-zero chunks, several dimensions cut at each place, 0-d and
// empty tensors.
std::vector<PieceToWrite> sample_pieces() {
  torch::manual_seed(4);
  const std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"a/big", torch::randn({600, 1000})},                   // 2.4 MB: padded edge chunk
      {"a/rows", torch::randn({3, 1000, 512})},               // split at dimension 1
      {"a/wide", torch::randn({2, 300000})},                  // split at the last one
      {"b/odd", torch::randint(0, 255, {7}, torch::kByte)},   // 7 bytes: an odd length
      {"b/zeros", torch::zeros({300000})},                    // all-zero chunks
      {"b/half", torch::randn({1025}).to(torch::kBFloat16)},  //
      {"b/long", torch::arange(100003, torch::kLong)},        //
      {"c/scalar", torch::scalar_tensor(42, torch::kLong)},   // 0-d
      {"c/empty", torch::zeros({0, 3})},                      // no data
  };
  std::vector<PieceToWrite> pieces;
  for (const auto& [name, tensor] : tensors) {
    PieceToWrite p;
    p.record.name = name;
    p.record.dtype = tensor.scalar_type();
    p.record.global_shape = tensor.sizes().vec();
    p.record.offset.assign(tensor.dim(), 0);
    p.record.shape = tensor.sizes().vec();
    p.data = tensor;
    pieces.push_back(std::move(p));
  }
  return pieces;
}

at::Tensor read_whole(hid_t file, const std::string& path, const PieceToWrite& piece) {
  at::Tensor out = at::empty(piece.record.shape, at::TensorOptions().dtype(piece.record.dtype));
  std::vector<std::int64_t> start(piece.record.shape.size(), 0);
  const std::string& dataset =
      piece.record.dataset.empty() ? piece.record.name : piece.record.dataset;
  read_piece(file, path, piece.record.name, dataset, start, piece.record.shape, out);
  return out;
}

TEST(CheckpointFile, DirectAndBufferedWritesGiveTheSameCheckedFile) {
  ScratchDir dir;
  const auto pieces = sample_pieces();
  FileImage image;
  std::vector<std::string> paths;
  for (bool direct : {true, false}) {
    ImageWriteOptions options;
    options.direct_io = direct;
    const std::string path = dir / (direct ? "direct.h5" : "buffered.h5");
    FileWriteTimes times;
    const FileInfo info = write_piece_file(path, 3, 0, 1, pieces, options, image, &times);
    EXPECT_EQ(info.bytes, fs::file_size(path));
    EXPECT_EQ(info.digest_algorithm, kDigestXxh3);
    EXPECT_EQ(info.digest, digest_file(path, kDigestXxh3));
    if (!direct) {
      EXPECT_FALSE(times.direct_io);
    }
    paths.push_back(path);
  }
  EXPECT_EQ(read_bytes(paths[0]), read_bytes(paths[1]));

  // HDF5 checks every chunk's Fletcher32 as it reads it back.
  const io::Handle file = open_piece_file(paths[0]);
  for (const PieceToWrite& piece : pieces) {
    const at::Tensor back = read_whole(file.get(), paths[0], piece);
    EXPECT_TRUE(torch::equal(back, piece.data)) << piece.record.name;
  }
}

// ZeRO's share of a parameter is several blocks of one tensor in one file:
// the first under the tensor's name, the others aside, each readable.
TEST(CheckpointFile, SeveralPiecesOfOneTensorInOneFile) {
  ScratchDir dir;
  const at::Tensor w = torch::arange(24, torch::kFloat).reshape({4, 6});
  std::vector<PieceToWrite> pieces;
  const std::vector<std::pair<std::int64_t, std::int64_t>> rows = {{0, 1}, {1, 2}, {3, 1}};
  int k = 0;
  for (const auto& [row, count] : rows) {
    PieceToWrite p;
    p.record.name = "optim/w/exp_avg";
    if (k > 0) p.record.dataset = extra_piece_dataset(k);
    ++k;
    p.record.dtype = at::kFloat;
    p.record.global_shape = {4, 6};
    p.record.offset = {row, 0};
    p.record.shape = {count, 6};
    p.data = w.narrow(0, row, count).contiguous();
    pieces.push_back(std::move(p));
  }
  FileImage image;
  const std::string path = dir / "f.h5";
  write_piece_file(path, 1, 0, 1, pieces, {}, image);
  const io::Handle file = open_piece_file(path);
  for (const PieceToWrite& piece : pieces) {
    EXPECT_TRUE(torch::equal(read_whole(file.get(), path, piece), piece.data))
        << piece.record.dataset;
  }
  EXPECT_EQ(extra_piece_dataset(2), ".pieces/2");
}

TEST(CheckpointFile, AFlippedByteInAChunkFailsTheRead) {
  ScratchDir dir;
  const auto pieces = sample_pieces();
  FileImage image;
  const std::string path = dir / "f.h5";
  const FileInfo info = write_piece_file(path, 3, 0, 1, pieces, {}, image);
  // Flip a byte inside a chunk of "b/long": find its elements in the file.
  const std::string bytes = read_bytes(path);
  const at::Tensor known = torch::arange(50000, 50004, torch::kLong);
  const std::size_t at = bytes.find(std::string(static_cast<const char*>(known.data_ptr()), 32));
  ASSERT_NE(at, std::string::npos);
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(at + 3));
    const char c = static_cast<char>(bytes[at + 3] ^ 0x10);
    f.write(&c, 1);
  }
  EXPECT_NE(digest_file(path, kDigestXxh3), info.digest);
  const io::Handle file = open_piece_file(path);
  int failed = 0;
  for (const PieceToWrite& piece : pieces) {
    try {
      read_whole(file.get(), path, piece);
    } catch (const CheckpointError& e) {
      ++failed;
      EXPECT_NE(std::string(e.what()).find("f.h5"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(failed, 1);  // b/long, and only it
}

TEST(CheckpointFile, AFailedWriteRemovesThePartialFile) {
  ScratchDir dir;
  FileImage image;
  const std::string path = dir / "missing-dir/f.h5";
  EXPECT_THROW(write_piece_file(path, 1, 0, 1, sample_pieces(), {}, image), CheckpointError);
  EXPECT_FALSE(fs::exists(path));
}

TEST(CheckpointFile, AFileSizeLimitWhileChunksAreWrittenIsACleanError) {
  ScratchDir dir;
  FileImage image;
  const std::string path = dir / "f.h5";
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  rlimit small = old;
  small.rlim_cur = 4 << 20;  // hit by the chunks written while the file is built
  ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string what;
  try {
    write_piece_file(path, 1, 0, 1, sample_pieces(), {}, image);
  } catch (const CheckpointError& e) {
    what = e.what();
  }
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
  EXPECT_NE(what.find("f.h5"), std::string::npos) << what;
  EXPECT_NE(what.find("File too large"), std::string::npos) << what;
  EXPECT_FALSE(fs::exists(path));
}

Manifest one_file_manifest() {
  FileRecord record;
  record.info.file = "rank-00000.h5";
  record.info.bytes = 10;
  record.info.digest_algorithm = kDigestXxh3;
  record.info.digest = std::string(32, 'a');
  PieceRecord piece;
  piece.name = "w";
  piece.global_shape = {4};
  piece.offset = {0};
  piece.shape = {4};
  record.pieces.push_back(piece);
  piece.dataset = extra_piece_dataset(1);  // a second piece of "w" in the same file
  piece.name = "v";
  record.pieces.push_back(piece);
  return make_manifest(7, {{"k", "v"}}, {record}, {1, 1, 1});
}

TEST(CheckpointManifest, Version3RecordsDatasetsAndTheGridAndOlderVersionsAreStillRead) {
  const std::string text = serialize(one_file_manifest());
  const auto j = nlohmann::json::parse(text);
  EXPECT_EQ(j.at("version").get<int>(), 3);
  EXPECT_EQ(j.at("files")[0].at("xxh3_128").get<std::string>(), std::string(32, 'a'));
  EXPECT_FALSE(j.at("files")[0].contains("sha256"));
  EXPECT_EQ(j.at("grid").at("dp").get<int>(), 1);
  // A piece stored under its tensor's name records no dataset.
  EXPECT_FALSE(j.at("tensors").at("w").at("pieces")[0].contains("dataset"));
  EXPECT_EQ(j.at("tensors").at("v").at("pieces")[0].at("dataset").get<std::string>(), ".pieces/1");
  const Manifest m = parse_manifest(text, "m.json");
  EXPECT_EQ(m.version, 3);
  EXPECT_EQ(m.files[0].digest_algorithm, kDigestXxh3);
  EXPECT_EQ(m.tensors.at("w").pieces[0].dataset, "w");
  EXPECT_EQ(m.tensors.at("v").pieces[0].dataset, ".pieces/1");

  // A version-2 manifest, as earlier builds wrote it: no grid, no datasets.
  auto v2 = j;
  v2["version"] = 2;
  v2.erase("grid");
  v2["tensors"]["v"]["pieces"][0].erase("dataset");
  const Manifest m2 = parse_manifest(v2.dump(), "v2.json");
  EXPECT_EQ(m2.version, 2);
  EXPECT_EQ(m2.grid.dp, 1);
  EXPECT_EQ(m2.tensors.at("v").pieces[0].dataset, "v");
  // A grid that does not hold world_size ranks is malformed.
  auto bad_grid = j;
  bad_grid["grid"]["tp"] = 2;
  EXPECT_THROW(parse_manifest(bad_grid.dump(), "bad.json"), CheckpointError);

  // A version-1 manifest, as earlier builds wrote it.
  auto old = j;
  old["version"] = 1;
  old["files"][0].erase("xxh3_128");
  old["files"][0]["sha256"] = std::string(64, 'b');
  const Manifest v1 = parse_manifest(old.dump(), "old.json");
  EXPECT_EQ(v1.version, 1);
  EXPECT_EQ(v1.files[0].digest_algorithm, kDigestSha256);
  EXPECT_EQ(v1.files[0].digest, std::string(64, 'b'));
  // Version 1 without its SHA-256 is malformed, not silently unchecked.
  old["files"][0].erase("sha256");
  EXPECT_THROW(parse_manifest(old.dump(), "old.json"), CheckpointError);

  auto newer = j;
  newer["version"] = 4;
  try {
    parse_manifest(newer.dump(), "new.json");
    ADD_FAILURE() << "a version-4 manifest was accepted";
  } catch (const CheckpointError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("format version 4 is not supported"), std::string::npos) << what;
    EXPECT_NE(what.find("newer dtrain"), std::string::npos) << what;
  }
}

}  // namespace
}  // namespace dtrain::checkpoint::detail
