# All find_package calls of the project, in one place.
find_package(Threads REQUIRED)
find_package(MPI REQUIRED COMPONENTS CXX)
# The environment of every test and benchmark run that starts mpiexec: run as
# root (CI, containers), and more ranks than cores. Open MPI 4.1 reads the
# OMPI_MCA_ variable, Open MPI 5 (PRRTE) the PRTE_MCA_ one; each ignores the
# other's.
set(DTRAIN_MPI_ENV
  OMPI_ALLOW_RUN_AS_ROOT=1
  OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  OMPI_MCA_rmaps_base_oversubscribe=1
  PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe)

# LibTorch's config adds -D_GLIBCXX_USE_CXX11_ABI and its libraries; it does
# not define an imported target with usage requirements, so we make one.
find_package(Torch REQUIRED)
if(NOT TARGET dtrain_torch)
  add_library(dtrain_torch INTERFACE)
  target_include_directories(dtrain_torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
  target_link_libraries(dtrain_torch INTERFACE ${TORCH_LIBRARIES})
  separate_arguments(_dtrain_torch_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
  target_compile_options(dtrain_torch INTERFACE ${_dtrain_torch_flags})
endif()

# HDF5 (serial, thread-safe build) for the data sets and checkpoints.
find_package(HDF5 COMPONENTS C)
set(DTRAIN_HAVE_HDF5 ${HDF5_FOUND})

# Shard digests (SHA-256 through OpenSSL's EVP) and gzip'd IDX input (zlib).
find_package(OpenSSL REQUIRED)
find_package(ZLIB REQUIRED)

# CUDA toolkit and NCCL: optional. Only detected here; the backend that uses
# them is its own target.
set(DTRAIN_HAVE_NCCL OFF)
if(NOT DTRAIN_WITH_NCCL STREQUAL "OFF")
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND)
    find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} ENV NCCL_HOME PATH_SUFFIXES include)
    find_library(NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} ENV NCCL_HOME PATH_SUFFIXES lib lib64)
  endif()
  if(CUDAToolkit_FOUND AND NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
    set(DTRAIN_FOUND_NCCL ON)
    set(DTRAIN_HAVE_NCCL ON)  # dtrain/config.h: the NCCL backend is part of this build
    message(STATUS "dtrain: found CUDA ${CUDAToolkit_VERSION} and NCCL (${NCCL_LIBRARY})")
  elseif(DTRAIN_WITH_NCCL STREQUAL "ON")
    message(FATAL_ERROR "DTRAIN_WITH_NCCL=ON but CUDA toolkit or NCCL was not found")
  else()
    message(STATUS "dtrain: CUDA/NCCL not found; building the CPU (MPI) backend only")
  endif()
endif()

if(DTRAIN_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

# Command-line parsing and JSON for tools, examples and benchmarks.
find_package(cxxopts REQUIRED)
find_package(nlohmann_json 3 REQUIRED)
