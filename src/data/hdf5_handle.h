#pragma once
// Small RAII wrappers over HDF5 C identifiers, and the one place where HDF5
// failures become dtrain::DataError. Private to src/data.
//
// HDF5 prints its error stack to stderr by default; ErrorScope switches that
// off for the calling thread (the thread-safe build keeps error state per
// thread) and check() turns a negative return into a DataError carrying the
// call, the file, the field and HDF5's own innermost messages.

#include <hdf5.h>

#include <string>
#include <utility>

#include "dtrain/error.h"

namespace dtrain::data::detail {

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

/// The messages on this thread's HDF5 error stack, "; "-separated.
std::string error_stack_text();

/// "<what> failed for <file>[ field '<field>']: <hdf5 msg>" (clears the stack).
std::string error_message(const std::string& what, const std::string& file,
                          const std::string& field = {});

/// Throws DataError(error_message(what, file, field)).
[[noreturn]] void throw_error(const std::string& what, const std::string& file,
                              const std::string& field = {});

/// Returns `status` or throws when it is negative.
template <typename T>
T check(T status, const char* what, const std::string& file, const std::string& field = {}) {
  if (status < 0) throw_error(what, file, field);
  return status;
}

/// Owns one hid_t; closes it with the matching H5?close.
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
    if (id_ >= 0 && closer_ != nullptr) closer_(id_);  // never throws
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

}  // namespace dtrain::data::detail
