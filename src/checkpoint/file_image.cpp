// FileImage (the reused buffer HDF5 builds a checkpoint file in) and
// write_image_file (O_DIRECT writes with the digest computed alongside).

#include "src/checkpoint/file_image.h"

#include <fcntl.h>
#include <hdf5.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <future>

#include "dtrain/error.h"
#include "src/checkpoint/checksums.h"
#include "src/data/hdf5_handle.h"

namespace dtrain::checkpoint::detail {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// O_DIRECT needs the buffer, the file offset and the length aligned to the
// device's logical block; a page covers every common one.
constexpr std::size_t kDirectAlignment = 4096;
// One write() call; large enough that the device sees big requests.
constexpr std::size_t kWriteBlock = std::size_t{8} << 20;

std::size_t round_up(std::size_t value, std::size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// HDF5's core driver allocates, grows and frees its file through these. The
// file always lives in the FileImage: growing keeps the same memory while it
// is large enough, and "freeing" it at close keeps it for the next save.
void* image_realloc(void* ptr, std::size_t size, H5FD_file_image_op_t, void* udata) {
  auto* image = static_cast<FileImage*>(udata);
  if (ptr != nullptr && ptr != image->data()) return nullptr;  // not ours: refuse
  try {
    image->reserve(size);
  } catch (const std::exception&) {
    return nullptr;  // HDF5 reports an allocation failure
  }
  return image->data();
}

void* image_malloc(std::size_t size, H5FD_file_image_op_t op, void* udata) {
  return image_realloc(nullptr, size, op, udata);
}

void* image_memcpy(void* dest, const void* src, std::size_t size, H5FD_file_image_op_t, void*) {
  return std::memcpy(dest, src, size);
}

herr_t image_free(void*, H5FD_file_image_op_t, void*) { return 0; }
void* udata_copy(void* udata) { return udata; }
herr_t udata_free(void*) { return 0; }

struct FileDescriptor {
  int fd = -1;
  ~FileDescriptor() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

FileImage::~FileImage() {
  if (data_ != nullptr) ::munmap(data_, capacity_);
}

void FileImage::attach(std::int64_t fapl, const std::string& path) {
  H5FD_file_image_callbacks_t callbacks{};
  callbacks.image_malloc = image_malloc;
  callbacks.image_memcpy = image_memcpy;
  callbacks.image_realloc = image_realloc;
  callbacks.image_free = image_free;
  callbacks.udata_copy = udata_copy;
  callbacks.udata_free = udata_free;
  callbacks.udata = this;
  if (H5Pset_file_image_callbacks(static_cast<hid_t>(fapl), &callbacks) < 0) {
    throw CheckpointError(data::detail::error_message("H5Pset_file_image_callbacks", path));
  }
}

void FileImage::reserve(std::size_t bytes) {
  if (bytes <= capacity_) return;
  // Grow by half again at least, so a file that grows a little each save
  // does not map fresh memory every time.
  const std::size_t capacity =
      round_up(std::max(bytes, capacity_ + capacity_ / 2), std::size_t{2} << 20);
  void* memory =
      ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  DTRAIN_CHECK_T(CheckpointError, memory != MAP_FAILED, "cannot allocate ", capacity,
                 " bytes for a checkpoint file image: ", std::strerror(errno));
  if (data_ != nullptr) {
    std::memcpy(memory, data_, capacity_);
    ::munmap(data_, capacity_);
  }
  data_ = static_cast<char*>(memory);
  capacity_ = capacity;
}

ImageWriteResult write_image_file(const std::string& path, FileImage& image, std::size_t size,
                                  const ImageWriteOptions& options) {
  ImageWriteResult result;
  const auto write_start = Clock::now();
  // The digest of exactly the bytes written, on a second thread: it reads
  // the image while the device (O_DIRECT) or the kernel copies it.
  const char* bytes = image.data();
  auto digest = std::async(std::launch::async, [bytes, size] { return xxh3_128_hex(bytes, size); });

  FileDescriptor file;
  const int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC;
  bool direct = options.direct_io;
  if (direct) {
    file.fd = ::open(path.c_str(), flags | O_DIRECT, 0644);
    if (file.fd < 0 && errno == EINVAL) {
      // The file system refuses O_DIRECT (Linux creates the file first).
      ::unlink(path.c_str());
      direct = false;
    }
  }
  if (!direct) file.fd = ::open(path.c_str(), flags, 0644);
  DTRAIN_CHECK_T(CheckpointError, file.fd >= 0, "cannot create checkpoint file ", path, ": ",
                 std::strerror(errno));

  // O_DIRECT writes whole blocks: the tail is padded (with zeros, inside the
  // buffer) and the file truncated to `size` afterwards.
  std::size_t end = size;
  if (direct) {
    end = round_up(size, kDirectAlignment);
    // Capacities are multiples of 2 MiB, so the padding fits (and the buffer
    // the digest thread reads never moves).
    DTRAIN_CHECK_T(CheckpointError, end <= image.capacity(), "checkpoint file image of ",
                   image.capacity(), " bytes cannot hold ", end);
    std::memset(image.data() + size, 0, end - size);
  }
  std::size_t done = 0;
  int err = 0;
  while (done < end) {
    const std::size_t n = std::min(end - done, kWriteBlock);
    const ssize_t w = ::pwrite(file.fd, image.data() + done, n, static_cast<off_t>(done));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EINVAL && direct) {
      // Taken at open but refused for this request (an alignment the file
      // system wants larger): go on with ordinary writes.
      direct = false;
      end = size;
      if (::fcntl(file.fd, F_SETFL, ::fcntl(file.fd, F_GETFL) & ~O_DIRECT) != 0) {
        err = errno;
        break;
      }
      continue;
    }
    if (w <= 0) {
      err = w < 0 ? errno : ENOSPC;
      break;
    }
    done += static_cast<std::size_t>(w);
  }
  if (err == 0 && direct && end != size && ::ftruncate(file.fd, static_cast<off_t>(size)) != 0) {
    err = errno;
  }
  const double written = seconds_since(write_start);
  const auto fsync_start = Clock::now();
  if (err == 0 && options.sync && ::fsync(file.fd) != 0) err = errno;
  result.fsync_seconds = seconds_since(fsync_start);
  const int fd = file.fd;
  file.fd = -1;
  if (::close(fd) != 0 && err == 0) err = errno;
  const auto digest_wait = Clock::now();
  result.digest = digest.get();
  result.write_seconds = written + seconds_since(digest_wait);  // a digest still running counts
  if (err != 0) {
    ::unlink(path.c_str());
    DTRAIN_THROW(CheckpointError, "writing checkpoint file ", path, " failed after ",
                 std::min(done, size), " of ", size, " bytes: ", std::strerror(err));
  }
  result.direct_io = direct;
  return result;
}

}  // namespace dtrain::checkpoint::detail
