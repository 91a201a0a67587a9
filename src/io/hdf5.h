#pragma once
// The one HDF5 error boundary of dtrain, and RAII for HDF5 identifiers.
// Private to dtrain (data sets and checkpoints).
//
// HDF5 prints its error stack to stderr by default; ErrorScope switches that
// off for the calling thread (the thread-safe build keeps error state per
// thread) and a Check turns a negative return into the caller's error type
// (DataError for data sets, CheckpointError for checkpoints) carrying the
// call, the file, the object and HDF5's own innermost messages:
//
//   constexpr io::Check<CheckpointError> check;
//   io::ErrorScope quiet;
//   io::Handle file(check(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), "H5Fopen", path),
//                   H5Fclose);

#include <hdf5.h>

#include <string>
#include <utility>

#include "dtrain/error.h"

namespace dtrain::io {

/// Silences HDF5's automatic error printing on this thread while alive.
class ErrorScope {
 public:
  ErrorScope();
  ~ErrorScope();
  ErrorScope(const ErrorScope&) = delete;
  ErrorScope& operator=(const ErrorScope&) = delete;

 private:
  H5E_auto2_t old_func_ = nullptr;
  void* old_data_ = nullptr;
};

/// The innermost messages on this thread's HDF5 error stack, "; "-separated
/// (clears the stack).
std::string error_stack_text();

/// "<what> failed for <file>[ field '<object>']: <HDF5's messages>" (clears
/// the stack).
std::string error_message(const std::string& what, const std::string& file,
                          const std::string& object = {});

/// Throws Exception(error_message(what, file, object)).
template <typename Exception>
[[noreturn]] void fail(const std::string& what, const std::string& file,
                       const std::string& object = {}) {
  throw Exception(error_message(what, file, object));
}

/// check(status, what, file[, object]): `status`, or Exception when it is
/// negative (HDF5's failure convention for ids, herr_t and sizes).
template <typename Exception>
struct Check {
  template <typename T>
  T operator()(T status, const char* what, const std::string& file,
               const std::string& object = {}) const {
    if (status < 0) fail<Exception>(what, file, object);
    return status;
  }
};

/// Owns one hid_t; closes it with the matching H5?close. Never throws.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~Handle() { reset(); }
  Handle(Handle&& other) noexcept
      : id_(std::exchange(other.id_, H5I_INVALID_HID)), closer_(other.closer_) {}
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = std::exchange(other.id_, H5I_INVALID_HID);
      closer_ = other.closer_;
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  hid_t get() const noexcept { return id_; }
  bool valid() const noexcept { return id_ >= 0; }
  void reset() noexcept {
    if (id_ >= 0 && closer_ != nullptr) closer_(id_);
    id_ = H5I_INVALID_HID;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

inline Handle file_handle(hid_t id) { return Handle(id, H5Fclose); }
inline Handle dataset_handle(hid_t id) { return Handle(id, H5Dclose); }
inline Handle space_handle(hid_t id) { return Handle(id, H5Sclose); }
inline Handle plist_handle(hid_t id) { return Handle(id, H5Pclose); }
inline Handle type_handle(hid_t id) { return Handle(id, H5Tclose); }
inline Handle attribute_handle(hid_t id) { return Handle(id, H5Aclose); }

}  // namespace dtrain::io
