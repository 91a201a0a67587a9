// Fletcher32 of HDF5 chunks; the digests of checkpoint files (src/io/digest).

#include "src/checkpoint/checksums.h"

#include <algorithm>
#include <cstring>

#include "dtrain/error.h"
#include "src/io/digest.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the vector code reads words little-endian");

namespace dtrain::checkpoint::detail {

namespace {

// Fletcher32 as HDF5 defines it, over n 16-bit words w_k (big-endian), with
// all arithmetic modulo 65535:
//   sum1 = w_0 + ... + w_(n-1)
//   sum2 = n w_0 + (n-1) w_1 + ... + 1 w_(n-1)     (the sum of the running sum1)
// HDF5 folds the carries back in (x -> (x & 0xffff) + (x >> 16)), which keeps
// every sum congruent modulo 65535 and never turns a non-zero sum into 0, so
// its result for each half is 0 when every word is 0 and otherwise the residue
// in 1..65535 (65535 where the residue is 0).
//
// The running sum2 is a serial dependency; to use vector lanes, the words go
// round-robin into kLanes lanes (word k = m * kLanes + j: row m, lane j), each
// lane keeping its own sums over its M rows,
//   a_j = sum_m w_(m,j)          b_j = sum_m (M - m) w_(m,j),
// and a block of B = kLanes * M words then adds
//   sum2 += B sum1 + kLanes * sum_j b_j - sum_j j a_j,   sum1 += sum_j a_j.
// Worked example, 2 lanes, 4 words w0..w3 (rows (w0, w1), (w2, w3)): lane 0
// has a = w0 + w2, b = 2 w0 + w2; lane 1 has a = w1 + w3, b = 2 w1 + w3; so
// 2 (b_0 + b_1) - (0 a_0 + 1 a_1) = 4 w0 + 3 w1 + 2 w2 + w3, as it should be.
// With kRows = 256 rows a lane's b stays below 2^32 (256 * 257 / 2 * 65535).
constexpr std::size_t kLanes = 16;
constexpr std::size_t kRows = 256;
constexpr std::uint64_t kModulus = 65535;

// GCC/Clang vector extensions of 16 bytes (SSE2 on any x86-64, NEON on
// arm64), each lane sum in its own variable so that all stay in registers.
typedef std::uint16_t Words __attribute__((vector_size(16)));
typedef std::uint32_t Sums __attribute__((vector_size(16)));

// The low and high four words of `w`, as 32-bit lanes: each word next to a
// zero word is, read little-endian, the word widened (one unpack instruction).
inline Sums widened(Words interleaved) {
  Sums out;
  std::memcpy(&out, &interleaved, sizeof(out));
  return out;
}
inline Sums low_words(Words w) {
  const Words zero = {};
  return widened(__builtin_shufflevector(w, zero, 0, 8, 1, 9, 2, 10, 3, 11));
}
inline Sums high_words(Words w) {
  const Words zero = {};
  return widened(__builtin_shufflevector(w, zero, 4, 12, 5, 13, 6, 14, 7, 15));
}
inline Words byte_swapped(Words w) { return static_cast<Words>((w << 8) | (w >> 8)); }

struct FletcherSums {
  std::uint64_t sum1 = 0;  // modulo 65535
  std::uint64_t sum2 = 0;  // modulo 65535
  bool nonzero = false;    // a word was not 0

  // `rows` (<= kRows) rows of kLanes words; copied to `copy` too if kCopy.
  template <bool kCopy>
  void add_rows(const std::uint8_t* p, std::size_t rows, std::uint8_t* copy) {
    static_assert(kLanes == 16, "one row is two vectors of 8 words");
    Sums a0 = {}, a1 = {}, a2 = {}, a3 = {};  // lanes 0-3, 4-7, 8-11, 12-15
    Sums b0 = {}, b1 = {}, b2 = {}, b3 = {};
    for (std::size_t m = 0; m < rows; ++m) {
      Words first, second;
      std::memcpy(&first, p + 32 * m, 16);
      std::memcpy(&second, p + 32 * m + 16, 16);
      if (kCopy) {
        std::memcpy(copy + 32 * m, &first, 16);
        std::memcpy(copy + 32 * m + 16, &second, 16);
      }
      first = byte_swapped(first);  // big-endian words
      second = byte_swapped(second);
      a0 += low_words(first);
      a1 += high_words(first);
      a2 += low_words(second);
      a3 += high_words(second);
      b0 += a0;
      b1 += a1;
      b2 += a2;
      b3 += a3;
    }
    const Sums a[4] = {a0, a1, a2, a3};
    const Sums b[4] = {b0, b1, b2, b3};
    std::uint64_t sum_a = 0, sum_b = 0, lane_weighted_a = 0;
    for (std::size_t j = 0; j < kLanes; ++j) {
      sum_a += a[j / 4][j % 4];
      sum_b += b[j / 4][j % 4];
      lane_weighted_a += j * std::uint64_t{a[j / 4][j % 4]};
    }
    const std::uint64_t words = rows * kLanes;
    // kLanes * sum_b >= lane_weighted_a, since b_j >= a_j and j < kLanes.
    sum2 = (sum2 + words % kModulus * sum1 + kLanes * sum_b - lane_weighted_a) % kModulus;
    sum1 = (sum1 + sum_a) % kModulus;
    nonzero = nonzero || sum_a != 0;
  }

  void add_word(std::uint32_t word) {
    sum1 = (sum1 + word) % kModulus;
    sum2 = (sum2 + sum1) % kModulus;
    nonzero = nonzero || word != 0;
  }

  std::uint32_t value() const {
    if (!nonzero) return 0;
    const auto half = [](std::uint64_t residue) {
      return static_cast<std::uint32_t>(residue == 0 ? kModulus : residue);
    };
    return (half(sum2) << 16) | half(sum1);
  }
};

template <bool kCopy>
std::uint32_t fletcher32(const void* data, std::size_t length, void* copy_to) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  auto* copy = static_cast<std::uint8_t*>(copy_to);
  FletcherSums sums;
  std::size_t words = length / 2;
  while (words >= kLanes) {
    const std::size_t rows = std::min(words / kLanes, kRows);
    sums.add_rows<kCopy>(p, rows, copy);
    p += rows * kLanes * 2;
    if (kCopy) copy += rows * kLanes * 2;
    words -= rows * kLanes;
  }
  if (kCopy) std::memcpy(copy, p, 2 * words + length % 2);
  for (; words > 0; --words, p += 2) sums.add_word((std::uint32_t{p[0]} << 8) | p[1]);
  if (length % 2 != 0) sums.add_word(std::uint32_t{p[0]} << 8);
  return sums.value();
}

}  // namespace

std::uint32_t fletcher32(const void* data, std::size_t length) {
  return fletcher32<false>(data, length, nullptr);
}

std::uint32_t copy_with_fletcher32(void* destination, const void* source, std::size_t length) {
  return fletcher32<true>(source, length, destination);
}

std::string xxh3_128_hex(const void* data, std::size_t length) {
  return io::digest_bytes(io::Digest::kXxh3128, data, length);
}

std::string digest_file(const std::string& path, const std::string& algorithm) {
  if (algorithm == kDigestSha256)
    return io::digest_file<CheckpointError>(io::Digest::kSha256, path);
  DTRAIN_CHECK_T(CheckpointError, algorithm == kDigestXxh3, "cannot check ", path,
                 ": unknown digest '", algorithm, "' (this build knows ", kDigestXxh3, " and ",
                 kDigestSha256, ")");
  return io::digest_file<CheckpointError>(io::Digest::kXxh3128, path);
}

}  // namespace dtrain::checkpoint::detail
