// SHA-256 (OpenSSL) and XXH3-128 (xxHash) of bytes and files.

#include "src/io/digest.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#define XXH_INLINE_ALL  // header-only: nothing to link, the fastest code paths inlined
#include <xxhash.h>

#include "dtrain/error.h"

static_assert(XXH_VERSION_NUMBER >= 800, "XXH3 needs xxHash 0.8 or newer (libxxhash-dev)");

namespace dtrain::io {

namespace {

std::string hex(const unsigned char* bytes, std::size_t length) {
  static const char* kHex = "0123456789abcdef";
  std::string out;
  out.reserve(2 * length);
  for (std::size_t i = 0; i < length; ++i) {
    out += kHex[bytes[i] >> 4];
    out += kHex[bytes[i] & 15];
  }
  return out;
}

std::string hex(const XXH128_hash_t& hash) {
  XXH128_canonical_t canonical;
  XXH128_canonicalFromHash(&canonical, hash);
  return hex(canonical.digest, sizeof(canonical.digest));
}

// One streaming digest: SHA-256 through OpenSSL's EVP, XXH3-128 through
// xxHash's state.
class Digester {
 public:
  explicit Digester(Digest digest) : digest_(digest), sha_(nullptr, EVP_MD_CTX_free) {
    if (digest_ == Digest::kSha256) {
      sha_.reset(EVP_MD_CTX_new());
      DTRAIN_CHECK(sha_ && EVP_DigestInit_ex(sha_.get(), EVP_sha256(), nullptr) == 1,
                   "OpenSSL SHA-256 initialisation failed");
    } else {
      XXH3_INITSTATE(&xxh3_);
      XXH3_128bits_reset(&xxh3_);
    }
  }
  void update(const void* data, std::size_t size) {
    if (digest_ == Digest::kSha256) {
      DTRAIN_CHECK(EVP_DigestUpdate(sha_.get(), data, size) == 1, "OpenSSL SHA-256 failed");
    } else {
      XXH3_128bits_update(&xxh3_, data, size);
    }
  }
  std::string hex_digest() {
    if (digest_ == Digest::kXxh3128) return hex(XXH3_128bits_digest(&xxh3_));
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    DTRAIN_CHECK(EVP_DigestFinal_ex(sha_.get(), out, &length) == 1, "OpenSSL SHA-256 failed");
    return hex(out, length);
  }

 private:
  Digest digest_;
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> sha_;
  XXH3_state_t xxh3_;
};

}  // namespace

std::string digest_bytes(Digest digest, const void* data, std::size_t size) {
  if (digest == Digest::kXxh3128) return hex(XXH3_128bits(data, size));
  Digester d(digest);
  d.update(data, size);
  return d.hex_digest();
}

template <typename Exception>
std::string digest_file(Digest digest, const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DTRAIN_CHECK_T(Exception, fd >= 0, "cannot open ", path,
                 " to compute its digest: ", std::strerror(errno));
  const std::unique_ptr<int, void (*)(int*)> closer(new int(fd), [](int* f) {
    ::close(*f);
    delete f;
  });
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  Digester d(digest);
  std::vector<char> buffer(std::size_t{4} << 20);
  while (true) {
    const ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    DTRAIN_CHECK_T(Exception, n >= 0, "read error while digesting ", path, ": ",
                   std::strerror(errno));
    if (n == 0) break;
    d.update(buffer.data(), static_cast<std::size_t>(n));
  }
  return d.hex_digest();
}

template std::string digest_file<DataError>(Digest, const std::string&);
template std::string digest_file<CheckpointError>(Digest, const std::string&);

}  // namespace dtrain::io
