#pragma once
// What the process holds in memory, read from the C library and the kernel.
// A bottom-layer module (like dtrain/env.h): every part of the library may
// use it, the pipeline engine and the planner's measurements included.

#include <cstddef>

namespace dtrain {

/// Bytes the C library's allocator has handed out and not taken back
/// (glibc's mallinfo2: heap blocks in use plus mmapped blocks; 0 with another
/// C library). CPU tensors live there, so the difference across a
/// computation is what it kept.
std::size_t heap_bytes_in_use();

/// The process's resident-set high-water mark in bytes (getrusage's
/// ru_maxrss): the most memory it has held at once so far.
std::size_t max_rss_bytes();

}  // namespace dtrain
