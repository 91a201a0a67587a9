#pragma once
// A checkpoint file built in memory and written out: the buffer HDF5's core
// driver builds it in, kept from one save to the next, and the writer that
// puts it on disk with its digest computed alongside. Private to
// src/checkpoint.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dtrain::checkpoint::detail {

/// A page-aligned buffer that holds one rank's file while it is built and
/// written. HDF5's core driver allocates the file through it (attach()), so
/// the file lands in memory that stays mapped from one save to the next:
/// fresh pages fault in slowly (about 0.3 GB/s on the VMs this project runs
/// on), reused ones at memory speed. Not thread-safe; one per manager.
class FileImage {
 public:
  FileImage() = default;
  ~FileImage();
  FileImage(const FileImage&) = delete;
  FileImage& operator=(const FileImage&) = delete;

  /// Makes the core driver of the file access property list `fapl` build its
  /// file in this buffer (HDF5 file image callbacks). The buffer must outlive
  /// the file opened with `fapl`; one file at a time.
  void attach(std::int64_t fapl, const std::string& path);
  /// Grows the buffer to at least `bytes`, keeping its contents.
  void reserve(std::size_t bytes);

  char* data() { return data_; }
  std::size_t capacity() const { return capacity_; }
  /// Scratch space for one chunk and its checksum, also reused.
  std::vector<char>& chunk_buffer() { return chunk_; }

 private:
  char* data_ = nullptr;
  std::size_t capacity_ = 0;
  std::vector<char> chunk_;
};

/// How write_image_file() puts a file on disk.
struct ImageWriteOptions {
  bool sync = true;       ///< fsync the file before returning
  bool direct_io = true;  ///< O_DIRECT where the file system takes it
};

/// What write_image_file() did, and how long each part took.
struct ImageWriteResult {
  std::string digest;        ///< XXH3-128 of the bytes written (hex)
  bool direct_io = false;    ///< whether O_DIRECT was used
  double write_seconds = 0;  ///< write() calls (the digest runs alongside)
  double fsync_seconds = 0;  ///< fsync
};

/// Writes the first `size` bytes of `image` to a new file at `path` (it must
/// not exist) and digests them (XXH3-128) on a second thread while the
/// writes run. With direct_io the file is written with O_DIRECT, bypassing
/// the page cache (whole aligned blocks, then truncated to `size`); a file
/// system that refuses O_DIRECT gets ordinary writes. A failed write or
/// fsync (a full disk, a file-size limit) removes the partial file and
/// throws CheckpointError naming the file, the bytes written and the reason.
ImageWriteResult write_image_file(const std::string& path, FileImage& image, std::size_t size,
                                  const ImageWriteOptions& options);

}  // namespace dtrain::checkpoint::detail
