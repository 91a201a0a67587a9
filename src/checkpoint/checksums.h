#pragma once
// The checksums of the checkpoint format: HDF5's Fletcher32 of every chunk,
// and the digest of every file that the manifest records. Private to
// src/checkpoint.

#include <cstddef>
#include <cstdint>
#include <string>

namespace dtrain::checkpoint::detail {

/// The manifest's name of a file digest: "xxh3_128" (XXH3, 128 bits; written
/// since format version 2) or "sha256" (format version 1, still read).
constexpr const char* kDigestXxh3 = "xxh3_128";
constexpr const char* kDigestSha256 = "sha256";

/// The checksum that HDF5's Fletcher32 filter appends to a chunk of `length`
/// bytes, bit for bit (HDF5's H5_checksum_fletcher32: big-endian 16-bit words,
/// sums modulo 65535 with end-around carry, an odd last byte as the high byte
/// of a word). Computed 16 words at a time, several times faster than HDF5's
/// own loop. The filter stores it after the chunk, little-endian.
std::uint32_t fletcher32(const void* data, std::size_t length);
/// fletcher32() of `source`, copying it to `destination` in the same pass.
std::uint32_t copy_with_fletcher32(void* destination, const void* source, std::size_t length);

/// XXH3-128 of `length` bytes as 32 lower-case hex digits (the canonical,
/// big-endian byte order).
std::string xxh3_128_hex(const void* data, std::size_t length);

/// The digest `algorithm` (kDigestXxh3 or kDigestSha256) of the file at
/// `path`. CheckpointError naming the file if it cannot be read, or naming
/// the algorithm if it is unknown.
std::string digest_file(const std::string& path, const std::string& algorithm);

}  // namespace dtrain::checkpoint::detail
