// FileImage (the reused buffer HDF5 builds a checkpoint file in) and
// ImageFileWriter (O_DIRECT writes while the file is built, the digest
// computed alongside).

#include "src/checkpoint/file_image.h"

#include <fcntl.h>
#include <hdf5.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>
#include <thread>

#include "dtrain/error.h"
#include "src/checkpoint/checksums.h"
#include "src/io/hdf5.h"

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

std::size_t round_down(std::size_t value) { return value / kDirectAlignment * kDirectAlignment; }

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
    throw CheckpointError(io::error_message("H5Pset_file_image_callbacks", path));
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
    if (before_move_) before_move_();
    std::memcpy(memory, data_, capacity_);
    ::munmap(data_, capacity_);
  }
  data_ = static_cast<char*>(memory);
  capacity_ = capacity;
}

// The writer's state, shared with its background thread.
struct ImageFileWriter::State {
  struct Range {
    std::size_t begin = 0;
    std::size_t end = 0;
  };

  std::string path;
  FileImage* image = nullptr;
  ImageWriteOptions options;
  int fd = -1;
  std::atomic<bool> direct{false};
  bool finished = false;

  // The current run of adjacent final ranges, and how far it is queued.
  Range run;
  std::size_t queued_to = 0;

  std::mutex mutex;
  std::condition_variable work;  // queue not empty, or stop
  std::condition_variable idle;  // queue empty and nothing being written
  std::deque<Range> queue;
  std::vector<Range> written;  // aligned, disjoint
  bool busy = false;
  bool stop = false;
  int error = 0;  // errno of the first failed write
  std::size_t written_bytes = 0;
  std::thread thread;

  // Writes [begin, end) of the image at the same offset; 0 or an errno.
  int write_range(std::size_t begin, std::size_t end) {
    std::size_t done = begin;
    while (done < end) {
      const std::size_t n = std::min(end - done, kWriteBlock);
      const ssize_t w = ::pwrite(fd, image->data() + done, n, static_cast<off_t>(done));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && errno == EINVAL && direct) {
        // Taken at open but refused for this request (an alignment the file
        // system wants larger): go on through the page cache.
        if (::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_DIRECT) != 0) return errno;
        direct = false;
        continue;
      }
      if (w <= 0) return w < 0 ? errno : ENOSPC;
      done += static_cast<std::size_t>(w);
      std::lock_guard<std::mutex> lock(mutex);
      written_bytes += static_cast<std::size_t>(w);
    }
    return 0;
  }

  void run_thread() {
    std::unique_lock<std::mutex> lock(mutex);
    while (true) {
      work.wait(lock, [this] { return stop || !queue.empty(); });
      if (queue.empty()) return;  // stop
      const Range r = queue.front();
      queue.pop_front();
      if (error == 0) {
        busy = true;
        lock.unlock();
        const int err = write_range(r.begin, r.end);
        lock.lock();
        busy = false;
        if (err != 0) {
          error = err;
        } else {
          written.push_back(r);
        }
      }
      if (queue.empty()) idle.notify_all();
    }
  }

  void enqueue(std::size_t begin, std::size_t end) {
    if (begin >= end) return;
    std::lock_guard<std::mutex> lock(mutex);
    queue.push_back({begin, end});
    work.notify_one();
  }

  // Waits until the thread has written everything queued.
  void drain() {
    std::unique_lock<std::mutex> lock(mutex);
    idle.wait(lock, [this] { return queue.empty() && !busy; });
  }

  void stop_thread() {
    if (!thread.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
      work.notify_one();
    }
    thread.join();
  }

  // `size`: the file's, or 0 while it is still being built.
  [[noreturn]] void fail(int err, std::size_t size) {
    const std::size_t done = size > 0 ? std::min(written_bytes, size) : written_bytes;
    DTRAIN_THROW(CheckpointError, "writing checkpoint file ", path, " failed after ", done,
                 size > 0 ? " of " + std::to_string(size) : std::string(),
                 " bytes: ", std::strerror(err));
  }
};

ImageFileWriter::ImageFileWriter(std::string path, FileImage& image,
                                 const ImageWriteOptions& options)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.path = std::move(path);
  s.image = &image;
  s.options = options;
  const int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC;
  bool direct = options.direct_io;
  if (direct) {
    s.fd = ::open(s.path.c_str(), flags | O_DIRECT, 0644);
    if (s.fd < 0 && errno == EINVAL) {
      // The file system refuses O_DIRECT (Linux creates the file first).
      ::unlink(s.path.c_str());
      direct = false;
    }
  }
  if (!direct) s.fd = ::open(s.path.c_str(), flags, 0644);
  DTRAIN_CHECK_T(CheckpointError, s.fd >= 0, "cannot create checkpoint file ", s.path, ": ",
                 std::strerror(errno));
  s.direct = direct;
  s.thread = std::thread([&s] { s.run_thread(); });
  // The thread reads the image: it must be idle before the image moves.
  image.set_before_move([&s] { s.drain(); });
}

ImageFileWriter::~ImageFileWriter() {
  State& s = *state_;
  s.image->set_before_move(nullptr);
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.queue.clear();
  }
  s.stop_thread();
  if (s.fd >= 0) ::close(s.fd);
  if (!s.finished) ::unlink(s.path.c_str());
}

void ImageFileWriter::final_range(std::size_t begin, std::size_t end) {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.error != 0) s.fail(s.error, 0);  // stop building a file that cannot be written
  }
  // Only whole aligned blocks inside a run of final bytes are written now;
  // a run's edges share their blocks with bytes that may still change.
  if (begin != s.run.end) {
    s.enqueue(s.queued_to, round_down(s.run.end));  // the rest of the previous run
    s.run = {begin, end};
    s.queued_to = round_up(begin, kDirectAlignment);
  } else {
    s.run.end = end;
  }
  const std::size_t ready = round_down(s.run.end);
  if (ready >= s.queued_to + kWriteBlock) {
    s.enqueue(s.queued_to, ready);
    s.queued_to = ready;
  }
}

ImageWriteResult ImageFileWriter::finish(std::size_t size) {
  State& s = *state_;
  ImageWriteResult result;
  const auto write_start = Clock::now();
  FileImage& image = *s.image;
  // The digest of the whole file, now final, alongside the remaining writes.
  const char* bytes = image.data();
  auto digest = std::async(std::launch::async, [bytes, size] { return xxh3_128_hex(bytes, size); });

  // Whole blocks up to the end: the tail is padded with zeros (inside the
  // image: capacities are multiples of 2 MiB) and the file truncated after.
  const std::size_t end = round_up(size, kDirectAlignment);
  DTRAIN_CHECK_T(CheckpointError, end <= image.capacity(), "checkpoint file image of ",
                 image.capacity(), " bytes cannot hold ", end);
  std::memset(image.data() + size, 0, end - size);
  s.enqueue(s.queued_to, round_down(s.run.end));
  s.drain();
  s.stop_thread();
  int err = s.error;
  if (err == 0) {
    // Everything the thread did not write: metadata, the runs' edges.
    std::vector<State::Range> written = s.written;
    std::sort(written.begin(), written.end(),
              [](const State::Range& a, const State::Range& b) { return a.begin < b.begin; });
    std::size_t at = 0;
    for (const State::Range& r : written) {
      if (err == 0 && r.begin > at) err = s.write_range(at, r.begin);
      at = std::max(at, r.end);
    }
    if (err == 0 && at < end) err = s.write_range(at, end);
  }
  if (err == 0 && end != size && ::ftruncate(s.fd, static_cast<off_t>(size)) != 0) err = errno;
  result.write_seconds = seconds_since(write_start);
  const auto fsync_start = Clock::now();
  if (err == 0 && s.options.sync && ::fsync(s.fd) != 0) err = errno;
  result.fsync_seconds = seconds_since(fsync_start);
  const int fd = s.fd;
  s.fd = -1;
  if (::close(fd) != 0 && err == 0) err = errno;
  const auto digest_wait = Clock::now();
  result.digest = digest.get();
  result.write_seconds += seconds_since(digest_wait);  // a digest still running counts
  image.set_before_move(nullptr);
  if (err != 0) s.fail(err, size);  // the destructor removes the file
  s.finished = true;
  result.direct_io = s.direct;
  return result;
}

}  // namespace dtrain::checkpoint::detail
