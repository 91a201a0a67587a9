#pragma once
// File and byte digests: SHA-256 (data-set manifests, checkpoints of format
// version 1) and XXH3-128 (checkpoints since format version 2), as lower-case
// hex. Private to dtrain.

#include <cstddef>
#include <string>

namespace dtrain::io {

enum class Digest {
  kSha256,   ///< 64 hex digits
  kXxh3128,  ///< XXH3, 128 bits: 32 hex digits, canonical (big-endian) byte order
};

/// The digest of `size` bytes.
std::string digest_bytes(Digest digest, const void* data, std::size_t size);

/// The digest of the file at `path`. Throws Exception naming the file when it
/// cannot be opened or read (instantiated for DataError and CheckpointError).
template <typename Exception>
std::string digest_file(Digest digest, const std::string& path);

}  // namespace dtrain::io
