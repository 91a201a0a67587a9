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
#
# DTRAIN_TORCH_ROOT bypasses that config for a LibTorch laid out as the
# official archive or a PyTorch wheel (include/, lib/): the config of a CUDA
# build re-runs CUDA and cuDNN detection that can fail on machines that
# train fine (scripts/gpu/check.sh falls back to this when it does).
set(DTRAIN_TORCH_ROOT "" CACHE PATH "Use the LibTorch under this directory without its CMake config")
if(DTRAIN_TORCH_ROOT)
  find_path(DTRAIN_TORCH_API_INCLUDE torch/torch.h
            PATHS "${DTRAIN_TORCH_ROOT}/include/torch/csrc/api/include" NO_DEFAULT_PATH)
  find_library(DTRAIN_TORCH_LIBRARY torch PATHS "${DTRAIN_TORCH_ROOT}/lib" NO_DEFAULT_PATH)
  find_library(DTRAIN_TORCH_CPU_LIBRARY torch_cpu PATHS "${DTRAIN_TORCH_ROOT}/lib" NO_DEFAULT_PATH)
  find_library(DTRAIN_C10_LIBRARY c10 PATHS "${DTRAIN_TORCH_ROOT}/lib" NO_DEFAULT_PATH)
  if(NOT DTRAIN_TORCH_API_INCLUDE OR NOT DTRAIN_TORCH_LIBRARY OR NOT DTRAIN_TORCH_CPU_LIBRARY
     OR NOT DTRAIN_C10_LIBRARY)
    message(FATAL_ERROR "DTRAIN_TORCH_ROOT=${DTRAIN_TORCH_ROOT} holds no LibTorch "
                        "(expected include/torch/csrc/api/include/torch/torch.h and "
                        "lib/libtorch.so, libtorch_cpu.so, libc10.so)")
  endif()
  set(TORCH_INCLUDE_DIRS "${DTRAIN_TORCH_ROOT}/include" "${DTRAIN_TORCH_API_INCLUDE}")
  set(TORCH_LIBRARIES ${DTRAIN_TORCH_LIBRARY} ${DTRAIN_TORCH_CPU_LIBRARY} ${DTRAIN_C10_LIBRARY})
  # A CUDA build registers its kernels from libtorch_cuda.so when it is
  # loaded: keep it linked although no symbol of it is used directly.
  find_library(DTRAIN_TORCH_CUDA_LIBRARY torch_cuda PATHS "${DTRAIN_TORCH_ROOT}/lib" NO_DEFAULT_PATH)
  find_library(DTRAIN_C10_CUDA_LIBRARY c10_cuda PATHS "${DTRAIN_TORCH_ROOT}/lib" NO_DEFAULT_PATH)
  if(DTRAIN_TORCH_CUDA_LIBRARY AND DTRAIN_C10_CUDA_LIBRARY)
    set(TORCH_CUDA_LIBRARIES ${DTRAIN_C10_CUDA_LIBRARY})
    list(APPEND TORCH_LIBRARIES "-Wl,--no-as-needed,${DTRAIN_TORCH_CUDA_LIBRARY},--as-needed"
         ${DTRAIN_C10_CUDA_LIBRARY})
  endif()
  # The C++ ABI LibTorch was built with: libc10's std::string symbols carry
  # "__cxx11" under the new one.
  execute_process(COMMAND nm -D --defined-only "${DTRAIN_C10_LIBRARY}"
                  OUTPUT_VARIABLE _dtrain_c10_symbols ERROR_QUIET)
  if(_dtrain_c10_symbols MATCHES "__cxx11")
    set(TORCH_CXX_FLAGS "-D_GLIBCXX_USE_CXX11_ABI=1")
  else()
    set(TORCH_CXX_FLAGS "-D_GLIBCXX_USE_CXX11_ABI=0")
  endif()
  message(STATUS "dtrain: LibTorch from ${DTRAIN_TORCH_ROOT} without its CMake config (${TORCH_CXX_FLAGS})")
else()
  find_package(Torch REQUIRED)
endif()
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

# Checkpoint file digests (XXH3-128), used header-only (XXH_INLINE_ALL): only
# libxxhash-dev's xxhash.h is needed, nothing is linked or exported.
find_path(XXHASH_INCLUDE_DIR xxhash.h)
if(NOT XXHASH_INCLUDE_DIR)
  message(FATAL_ERROR "dtrain: xxhash.h was not found; install libxxhash-dev (scripts/setup.sh)")
endif()
if(NOT TARGET dtrain_xxhash)
  add_library(dtrain_xxhash INTERFACE)
  target_include_directories(dtrain_xxhash SYSTEM INTERFACE ${XXHASH_INCLUDE_DIR})
endif()

# CUDA toolkit and NCCL: optional. Only detected here; the backend that uses
# them is its own target.
set(DTRAIN_HAVE_NCCL OFF)
if(NOT DTRAIN_WITH_NCCL STREQUAL "OFF")
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND)
    # NCCL_HOME first (an explicit choice); the nvidia-nccl wheels ship only
    # libnccl.so.2, without the unversioned name.
    # The library comes from the installation of the header found: a nccl.h
    # of one release with the libnccl of another corrupts memory
    # (ncclConfig_t differs), so the directory next to the header is
    # searched first, for every name (NAMES_PER_DIR).
    find_path(NCCL_INCLUDE_DIR nccl.h HINTS ENV NCCL_HOME ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include)
    get_filename_component(_dtrain_nccl_root "${NCCL_INCLUDE_DIR}" DIRECTORY)
    find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 NAMES_PER_DIR
                 HINTS "${_dtrain_nccl_root}" ENV NCCL_HOME ${CUDAToolkit_LIBRARY_DIR}
                 PATH_SUFFIXES lib lib64 lib/${CMAKE_LIBRARY_ARCHITECTURE})
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
