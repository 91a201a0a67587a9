#pragma once
// A checkpoint file built in memory and written out: the buffer HDF5's core
// driver builds it in, kept from one save to the next, and the writer that
// puts it on disk with its digest computed alongside. Private to
// src/checkpoint.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
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
  /// Grows the buffer to at least `bytes`, keeping its contents. A buffer
  /// that must move first calls the before-move hook.
  void reserve(std::size_t bytes);
  /// Called before the buffer moves to a larger one (an ImageFileWriter
  /// waits there until it no longer reads the buffer). Empty: none.
  void set_before_move(std::function<void()> hook) { before_move_ = std::move(hook); }

  char* data() { return data_; }
  std::size_t capacity() const { return capacity_; }
  /// Scratch space for one chunk and its checksum, also reused.
  std::vector<char>& chunk_buffer() { return chunk_; }

 private:
  char* data_ = nullptr;
  std::size_t capacity_ = 0;
  std::vector<char> chunk_;
  std::function<void()> before_move_;
};

/// How an ImageFileWriter puts a file on disk.
struct ImageWriteOptions {
  bool sync = true;       ///< fsync the file before finish() returns
  bool direct_io = true;  ///< O_DIRECT where the file system takes it
};

/// What an ImageFileWriter did, and how long its last steps took.
struct ImageWriteResult {
  std::string digest;        ///< XXH3-128 of the file (hex)
  bool direct_io = false;    ///< whether O_DIRECT was used throughout
  double write_seconds = 0;  ///< finish(): the writes left once the file was built
  double fsync_seconds = 0;  ///< fsync
};

/// Writes a FileImage to a new file while HDF5 is still building it. Parts
/// that already hold their final bytes (the chunks: HDF5 never touches a
/// chunk again once written) are reported with final_range() and written by
/// a background thread as they come, in whole aligned blocks, while the
/// encoding goes on; finish() writes the rest (HDF5's metadata, which it
/// rewrites until the file is closed, and the edges of the ranges), with the
/// file's XXH3-128 computed alongside on another thread, then fsyncs.
///
/// With direct_io the file is written with O_DIRECT, bypassing the page
/// cache: whole 4 KiB blocks from the (page-aligned) image, the last one
/// padded with zeros, and the file truncated to its size at the end; where
/// the file system refuses O_DIRECT the writes go through the page cache.
/// A failed write or fsync (a full disk, a file-size limit) is a
/// CheckpointError naming the file, the bytes written and the reason, from
/// final_range() or finish(); a writer destroyed without a successful
/// finish() removes its partial file. One thread calls the methods.
class ImageFileWriter {
 public:
  /// Creates `path` (it must not exist); CheckpointError if it cannot.
  ImageFileWriter(std::string path, FileImage& image, const ImageWriteOptions& options);
  ~ImageFileWriter();
  ImageFileWriter(const ImageFileWriter&) = delete;
  ImageFileWriter& operator=(const ImageFileWriter&) = delete;

  /// Bytes [begin, end) of the image are final.
  void final_range(std::size_t begin, std::size_t end);
  /// The image is complete and `size` bytes long: writes what is left,
  /// digests the file, fsyncs (options.sync) and closes it.
  ImageWriteResult finish(std::size_t size);

  struct State;

 private:
  std::unique_ptr<State> state_;
};

}  // namespace dtrain::checkpoint::detail
