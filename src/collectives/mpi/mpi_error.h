#pragma once
// The one place where MPI status codes become dtrain errors. Every MPI call
// in the backend goes through DTRAIN_MPI_CHECK; communicators are created
// with MPI_ERRORS_RETURN so that failures come back as codes, not aborts.

#include <mpi.h>

#include <string>

namespace dtrain::collectives::detail {

/// MPI's own text for an error code.
std::string mpi_error_string(int code);

/// Throws CommError "<call> failed: <MPI's message>" (with `context` if given).
[[noreturn]] void throw_mpi_error(int code, const char* call, const std::string& context = {});

}  // namespace dtrain::collectives::detail

#define DTRAIN_MPI_CHECK(call)                                               \
  do {                                                                       \
    const int dtrain_mpi_rc_ = (call);                                       \
    if (dtrain_mpi_rc_ != MPI_SUCCESS) {                                     \
      ::dtrain::collectives::detail::throw_mpi_error(dtrain_mpi_rc_, #call); \
    }                                                                        \
  } while (false)
