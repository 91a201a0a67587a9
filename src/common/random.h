#pragma once
// Counter-based randomness (the data pipeline, RNG stream seeds), identical
// on every platform (no <random> distributions, whose results are
// implementation-defined). Private to dtrain.

#include <cstdint>

namespace dtrain::detail {

/// SplitMix64's finalizer: a bijective 64-bit mix.
inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

/// Hash of three words (seed, epoch, stream/sample index).
inline std::uint64_t mix(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  return mix64(mix64(mix64(a ^ 0x9E3779B97F4A7C15ULL) ^ b) + c);
}

/// SplitMix64 generator with an unbiased bounded integer.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    state_ += 0x9E3779B97F4A7C15ULL;
    return mix64(state_);
  }
  /// Uniform in [0, bound), bound > 0: rejects the top partial range so that
  /// every residue is equally likely.
  std::uint64_t bounded(std::uint64_t bound) {
    const std::uint64_t threshold = (0 - bound) % bound;  // 2^64 mod bound
    for (;;) {
      const std::uint64_t r = next();
      if (r >= threshold) return r % bound;
    }
  }
  /// Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  std::uint64_t state_;
};

}  // namespace dtrain::detail
