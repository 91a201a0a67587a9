#pragma once
// Errors raised by dtrain. Every error the library throws derives from
// dtrain::Error, so `catch (const dtrain::Error&)` catches them all; the
// subclasses let callers react to a kind of failure (for example abort the
// job on a CommError, or fix their input on an InvalidArgument).

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace dtrain {

/// Root of every exception dtrain throws.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// The caller passed something wrong (a shape, a dtype, an option, a path).
/// Raised before any work starts; the library's state is unchanged.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A collective or point-to-point operation failed (a peer disagreed on the
/// message size, the transport reported an error, the communicator had
/// already failed). The communicator that raised it is marked failed.
class CommError : public Error {
 public:
  using Error::Error;
};

/// A blocking call did not finish within its timeout. For collectives the
/// message names the op, its element count, the communicator and the ranks
/// not heard from; the communicator is marked failed.
class TimeoutError : public CommError {
 public:
  using CommError::CommError;
};

/// Writing, verifying or loading a checkpoint failed.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

/// A data set or data file is missing, malformed or inconsistent.
class DataError : public Error {
 public:
  using Error::Error;
};

namespace detail {
/// Concatenates the stream representations of `args`.
template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

}  // namespace dtrain

/// Throws `ExceptionType` with the concatenated message when `cond` is false.
#define DTRAIN_CHECK_T(ExceptionType, cond, ...)                   \
  do {                                                             \
    if (!(cond)) {                                                 \
      throw ExceptionType(::dtrain::detail::str_cat(__VA_ARGS__)); \
    }                                                              \
  } while (false)

/// Internal invariant: throws dtrain::Error.
#define DTRAIN_CHECK(cond, ...) DTRAIN_CHECK_T(::dtrain::Error, cond, __VA_ARGS__)
/// A caller's mistake: throws dtrain::InvalidArgument.
#define DTRAIN_CHECK_ARG(cond, ...) DTRAIN_CHECK_T(::dtrain::InvalidArgument, cond, __VA_ARGS__)
/// Throws `ExceptionType` unconditionally.
#define DTRAIN_THROW(ExceptionType, ...) throw ExceptionType(::dtrain::detail::str_cat(__VA_ARGS__))
