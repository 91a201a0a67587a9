#!/usr/bin/env bash
# The GPU check: one command that turns a few minutes on a GPU machine into
# facts. Run from the repository root on the GPU machine, after
# scripts/gpu/prepare.sh made .gpu-deps/ on a Debian machine (or on a
# machine that has MPI, HDF5, GoogleTest, cxxopts and nlohmann-json
# installed, without it). Each step is logged and reported as passed, failed
# or skipped with its reason; a skipped step is never counted as passed, and
# the exit status is 0 only when no step failed.
#
#   scripts/gpu/check.sh [--results DIR] [--deps DIR|none] [--seconds N] [--ranks N]
#                        [--build DIR] [--dry-run | --dry-run-build]
#
#   --results DIR  log, JSON summary and per-step logs (default ./gpu-results)
#   --deps DIR     what prepare.sh made (default .gpu-deps when present;
#                  none: use the system's MPI, HDF5, ... and data sets)
#   --seconds N    training time of each of the four runs (default 60)
#   --ranks N      processes, one GPU each (default: the number of GPUs)
#   --build DIR    build directory (default build-gpu)
#   --only LIST    run only these device steps (comma-separated names or
#                  prefixes: ctest-gpu, allreduce, data, resnet50, resnet20);
#                  the others are reported as skipped
#   --dry-run      on a CPU machine: unpack the dependencies, check that MPI
#                  and HDF5 from them compile and run, configure against the
#                  installed LibTorch (both through its CMake config and
#                  through DTRAIN_TORCH_ROOT), and print every device step's
#                  command without running it
#   --dry-run-build  the same, and build the check's targets too (slow on a
#                  small machine; a rehearsal of the device's build)
#
# Steps: environment, deps, mpi, hdf5, configure, build, ctest-gpu,
# allreduce, data, then for ResNet-50 on synthetic 224x224 images and
# ResNet-20 on Fashion-MNIST (raw uint8 batches normalized on the GPU): the
# trainer (dtrain-resnet --device cuda) and the same model in the machine's
# PyTorch, the same time each; images/s side by side at the end.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
results=$PWD/gpu-results
deps=auto
seconds=60
ranks=auto
build=$root/build-gpu
dry_run=0
dry_run_build=0
only=
usage() { sed -n '2,34p' "$0"; }
while [ $# -gt 0 ]; do
  case $1 in
    --results) results=$2; shift 2 ;;
    --deps) deps=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --dry-run-build) dry_run=1; dry_run_build=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $seconds =~ ^[0-9]+$ ]] && [ "$seconds" -ge 10 ] ||
  { echo "check.sh: --seconds must be an integer >= 10, got '$seconds'" >&2; exit 2; }
[[ $ranks == auto || $ranks =~ ^[1-9][0-9]*$ ]] ||
  { echo "check.sh: --ranks must be a positive integer, got '$ranks'" >&2; exit 2; }
if [ "$deps" = auto ]; then
  deps=none
  [ -d "$root/.gpu-deps" ] && deps=$root/.gpu-deps
fi
if [ "$deps" != none ] && [ ! -f "$deps/root.tar.xz" ]; then
  echo "check.sh: --deps $deps holds no root.tar.xz (run scripts/gpu/prepare.sh)" >&2
  exit 2
fi
mkdir -p "$results/logs" "$build"
results=$(cd "$results" && pwd)
build=$(cd "$build" && pwd)
: > "$results/steps.jsonl"
exec > >(tee "$results/check.log") 2>&1
python=${PYTHON:-python3}
# The CUDA toolkit's own place, where nvcc is not on PATH (LibTorch's CMake
# config looks for nvcc); old CMake files of carried packages under CMake 4.
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
export CMAKE_POLICY_VERSION_MINIMUM=${CMAKE_POLICY_VERSION_MINIMUM:-3.5}
arch=x86_64-linux-gnu
check_start=$(date +%s)

# --- step bookkeeping -------------------------------------------------------
# step NAME COMMAND...: runs COMMAND with its output in logs/NAME.log, records
# passed/failed with the time taken. skip NAME REASON records a skip.
declare -A status
record() {  # NAME STATUS SECONDS DETAIL
  status[$1]=$2
  "$python" -c 'import json,sys; print(json.dumps(dict(name=sys.argv[1], status=sys.argv[2], seconds=float(sys.argv[3]), detail=sys.argv[4])))' \
    "$1" "$2" "$3" "$4" >> "$results/steps.jsonl"
  printf '%-22s %-8s %6.1f s  %s\n' "$1" "$2" "$3" "$4"
}
step() {
  local name=$1; shift
  local t0 rc
  t0=$(date +%s.%N)
  echo "== $name: $*" >> "$results/logs/$name.log"
  "$@" >> "$results/logs/$name.log" 2>&1
  rc=$?
  local dt
  dt=$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN {print a - b}')
  if [ $rc -eq 0 ]; then
    record "$name" passed "$dt" "${detail:-}"
  else
    record "$name" failed "$dt" "exit $rc; last lines: $(tail -n 3 "$results/logs/$name.log" | tr '\n' ' ' | cut -c1-300)"
  fi
  detail=
  return $rc
}
skip() { record "$1" skipped 0 "$2"; }
planned() {  # NAME COMMAND...: a device step in --dry-run: printed, not run
  local more=
  if declare -F "$2" >/dev/null; then
    declare -f "$2" > "$results/logs/$1.log"
    more=" (function: logs/$1.log)"
  fi
  record "$1" planned 0 "$(printf '%q ' "${@:2}")$more"
}
ok() { [ "${status[$1]:-}" = passed ]; }

echo "dtrain GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) ($( [ $dry_run = 1 ] && echo dry run || echo on the device ))"
commit=${DTRAIN_GPU_COMMIT:-$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)}
echo "commit $commit, results in $results"

# --- environment ------------------------------------------------------------
environment() (
  set +e
  echo "os: $(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-unknown}")  kernel $(uname -r)  cpus $(nproc)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1
  nvcc --version 2>&1 | tail -n 2
  cmake --version | head -n 1; ninja --version; ${CXX:-c++} --version | head -n 1
  "$python" - <<'EOF'
import importlib, json
info = {}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(),
                gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                cxx11_abi=bool(torch._C._GLIBCXX_USE_CXX11_ABI),
                cmake_prefix_path=torch.utils.cmake_prefix_path)
    if info["gpus"]:
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["cudnn"] = torch.backends.cudnn.version()
except Exception as e:  # noqa: BLE001
    info["torch_error"] = repr(e)
try:
    nccl = importlib.import_module("nvidia.nccl")
    info["nccl_home"] = list(nccl.__path__)[0]
except Exception as e:  # noqa: BLE001
    info["nccl_wheel"] = repr(e)
print(json.dumps(info))
EOF
)
step environment environment
envjson=$(tail -n 1 "$results/logs/environment.log")
pyget() { "$python" -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2], ""); print(v if v is not None else "")' "$envjson" "$1" 2>/dev/null; }
gpus=$(pyget gpus); gpus=${gpus:-0}
if [ "$gpus" = 0 ] && command -v nvidia-smi >/dev/null; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$ranks" = auto ]; then ranks=$(( gpus > 0 ? gpus : 1 )); fi
echo "GPUs visible: $gpus; ranks: $ranks"
if [ $dry_run = 0 ] && [ "$gpus" -lt "$ranks" ]; then
  echo "check.sh: --ranks $ranks needs $ranks GPUs (one per rank; NCCL refuses two ranks on one GPU), $gpus visible" >&2
  exit 2
fi
if [ "$ranks" -lt 2 ]; then
  skip multi-gpu "1 rank: NCCL between GPUs, the 2-rank gpu tests and DDP across GPUs need 2 or more GPUs (--ranks N)"
fi

# --- dependencies -------------------------------------------------------------
# The carried Debian files are unpacked under the build directory. A library
# is taken from them when the system has none of that name, and always for
# Open MPI and HDF5 (and what only they use), which must match their headers.
D=$build/deps
setup_deps() (
  set -e
  rm -rf "$D" && mkdir -p "$D/runtime-lib"
  # Python's tarfile where tar has no xz.
  tar -C "$D" -xJf "$deps/root.tar.xz" 2>/dev/null ||
    "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$deps/root.tar.xz" "$D"
  # The system's own OpenSSL and zlib headers win: they must match the
  # libraries linked from the system.
  if [ -f /usr/include/openssl/evp.h ]; then
    rm -rf "$D/usr/include/openssl" "$D/usr/include/$arch/openssl"
  fi
  [ -f /usr/include/zlib.h ] && rm -f "$D/usr/include/zlib.h" "$D/usr/include/zconf.h"
  local so name
  for so in "$D/usr/lib/$arch"/lib*.so.* "$D/usr/lib/$arch/pmix2/lib"/lib*.so.*; do
    [ -f "$so" ] || continue
    name=$(basename "$so")
    case $name in
      libmpi*|libopen-*|libmca_*|libpmix*|libhwloc*|libevent*|libhdf5*|libaec*|libsz*|libmunge*) ;;
      *) ldconfig -p | grep -q "^[[:space:]]*${name%%.so.*}.so.${name#*.so.}" && continue
         ldconfig -p | grep -q "^[[:space:]]*$(echo "$name" | sed -E 's/(\.so\.[0-9]+).*/\1/') " && continue ;;
    esac
    ln -sf "$so" "$D/runtime-lib/$(echo "$name" | sed -E 's/(\.so\.[0-9]+).*/\1/')"
  done
  echo "carried libraries used: $(ls "$D/runtime-lib" | tr '\n' ' ')"
)
if [ "$deps" != none ]; then
  if step deps setup_deps; then
    export OPAL_PREFIX=$D/usr
    export OPAL_LIBDIR=$D/usr/lib/$arch/openmpi/lib
    export OPAL_SYSCONFDIR=$D/etc/openmpi
    export OPAL_PKGDATADIR=$D/usr/share/openmpi
    export OMPI_MCA_mca_base_component_path=$D/usr/lib/$arch/openmpi/lib/openmpi3
    export PMIX_INSTALL_PREFIX=$D/usr/lib/$arch/pmix2
    export PMIX_MCA_mca_base_component_path=$D/usr/lib/$arch/pmix2/lib/pmix
    export PATH=$D/usr/bin:$PATH
    export LD_LIBRARY_PATH=$D/runtime-lib:$D/usr/lib/$arch/openmpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    mpi_home=$D/usr/lib/$arch/openmpi
    hdf5_root=$D/usr/lib/$arch/hdf5/serial
    mpiexec=$D/usr/bin/orterun
    fmnist_source=$deps/data/fashion-mnist
  fi
else
  skip deps "--deps none: the system's MPI, HDF5, GoogleTest, cxxopts and nlohmann-json"
  mpi_home=
  hdf5_root=
  mpiexec=$(command -v mpiexec || command -v mpirun || echo mpiexec)
  fmnist_source=$(dirname "$(dpkg -L dataset-fashion-mnist 2>/dev/null | grep -m1 'train-images-idx3-ubyte' || echo /usr/share/datasets/fashion-mnist/x)")
fi
# Shared memory and TCP only: the machine's fabric libraries are not carried.
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp OMPI_MCA_mca_base_component_show_load_errors=0
# The carried PMIx finds no compression plugin's zlib and says so at every start.
export PMIX_MCA_pcompress_base_silence_warning=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# One node: without ssh, Open MPI's rsh launcher refuses to start even locally.
command -v ssh >/dev/null || command -v rsh >/dev/null || export OMPI_MCA_plm=isolated
mpirun_n() { "$mpiexec" -n "$1" --bind-to none "${@:2}"; }
# The same environment for running the built programs by hand.
{
  env | grep -E '^(OPAL_|OMPI_|PMIX_|LD_LIBRARY_PATH=|PATH=)' | sed -E "s/^([^=]*)=(.*)$/export \1='\2'/"
  echo "export DTRAIN_GPU_MPIEXEC='$mpiexec'"
} > "$build/env.sh"

# --- MPI and HDF5 alone: a program each, compiled and run ---------------------
mpi_smoke() (
  set -e
  inc=() lib=()
  if [ -n "$mpi_home" ]; then inc=(-I"$mpi_home/include"); lib=(-L"$mpi_home/lib"); fi
  cat > "$build/mpi_smoke.c" <<'EOF'
#include <mpi.h>
#include <stdio.h>
int main(int argc, char** argv) {
  int provided = 0, rank = 0, size = 0, sum = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) printf("mpi: %d ranks, sum of ranks %d, thread level %d\n", size, sum, provided);
  MPI_Finalize();
  return sum == size * (size - 1) / 2 && provided == MPI_THREAD_MULTIPLE ? 0 : 1;
}
EOF
  if [ -n "$mpi_home" ]; then
    ${CC:-cc} "${inc[@]}" "$build/mpi_smoke.c" -o "$build/mpi_smoke" "${lib[@]}" -lmpi
  else
    mpicc "$build/mpi_smoke.c" -o "$build/mpi_smoke"
  fi
  "$build/mpi_smoke"
  mpirun_n 2 "$build/mpi_smoke"
)
hdf5_smoke() (
  set -e
  inc=() lib=()
  if [ -n "$hdf5_root" ]; then inc=(-I"$hdf5_root/include"); lib=(-L"$hdf5_root/lib"); else
    inc=(-I/usr/include/hdf5/serial); lib=(-L/usr/lib/$arch/hdf5/serial); fi
  cat > "$build/hdf5_smoke.c" <<'EOF'
#include <hdf5.h>
#include <stdio.h>
int main(void) {
  unsigned major, minor, release;
  H5get_libversion(&major, &minor, &release);
  hid_t f = H5Fcreate("hdf5_smoke.h5", H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  printf("hdf5: %u.%u.%u, file %s\n", major, minor, release, f >= 0 ? "written" : "NOT written");
  return f >= 0 && H5Fclose(f) >= 0 ? 0 : 1;
}
EOF
  ${CC:-cc} "${inc[@]}" "$build/hdf5_smoke.c" -o "$build/hdf5_smoke" "${lib[@]}" -lhdf5
  (cd "$build" && ./hdf5_smoke)
)
if [ "$deps" = none ] || ok deps; then
  step mpi mpi_smoke
  step hdf5 hdf5_smoke
else
  skip mpi "deps failed"; skip hdf5 "deps failed"
fi

# --- configure ----------------------------------------------------------------
torch_cmake=$(pyget cmake_prefix_path)
torch_root=
[ -n "$torch_cmake" ] && torch_root=$(cd "$torch_cmake/../.." 2>/dev/null && pwd)
nccl_home=$(pyget nccl_home)
[ -n "$nccl_home" ] && export NCCL_HOME=$nccl_home
if [ $dry_run = 1 ]; then
  # Debian's LibTorch has no single root: lay one out as the wheels do.
  torch_root=$build/torch-root
  mkdir -p "$torch_root/lib" "$torch_root/include"
  for h in ATen c10 caffe2 torch; do ln -sfn "/usr/include/$h" "$torch_root/include/$h"; done
  for l in torch torch_cpu c10; do ln -sf "$(ls /usr/lib/$arch/lib$l.so | head -1)" "$torch_root/lib/lib$l.so"; done
fi
cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DDTRAIN_WITH_NCCL=ON -DDTRAIN_BUILD_TESTS=ON
            -DDTRAIN_BUILD_BENCHMARKS=ON -DDTRAIN_WERROR=OFF)
prefix=$torch_cmake
if [ -n "$mpi_home" ]; then
  cmake_args+=(-DMPI_CXX_SKIP_MPICXX=ON -DMPI_C_COMPILER="$D/usr/bin/mpicc.openmpi"
               -DMPI_CXX_COMPILER="$D/usr/bin/mpicxx.openmpi" -DMPIEXEC_EXECUTABLE="$mpiexec"
               -DHDF5_ROOT="$hdf5_root" -DHDF5_C_COMPILER_EXECUTABLE=
               -DGTest_DIR="$D/usr/lib/$arch/cmake/GTest"
               -Dcxxopts_DIR="$D/usr/lib/$arch/cmake/cxxopts"
               -Dnlohmann_json_DIR="$D/usr/share/cmake/nlohmann_json"
               -DXXHASH_INCLUDE_DIR="$D/usr/include")
  # OpenSSL's and zlib's headers from the carried files only when the system has none.
  if [ ! -f /usr/include/openssl/evp.h ]; then
    cmake_args+=(-DOPENSSL_ROOT_DIR="$D/usr" -DOPENSSL_INCLUDE_DIR="$D/usr/include")
    export CXXFLAGS="${CXXFLAGS:-} -idirafter $D/usr/include/$arch"
  fi
  [ -f /usr/include/zlib.h ] || cmake_args+=(-DZLIB_INCLUDE_DIR="$D/usr/include")
fi
configure_with_config() { cmake -S "$root" -B "$build/tree" "${cmake_args[@]}" ${prefix:+-DCMAKE_PREFIX_PATH="$prefix"}; }
configure_with_root() {
  cmake -S "$root" -B "$1" "${cmake_args[@]}" -DDTRAIN_TORCH_ROOT="$torch_root"
}
# Every dependency must come from where this script pointed: a stray system
# copy would hide a missing carried one.
check_cache() {
  [ -n "$mpi_home" ] || return 0
  local bad
  bad=$(grep -E '^(MPI_CXX_HEADER_DIR|MPI_mpi_LIBRARY|HDF5_C_INCLUDE_DIR|HDF5_C_LIBRARY_hdf5|GTest_DIR|cxxopts_DIR|nlohmann_json_DIR|XXHASH_INCLUDE_DIR):' "$1/CMakeCache.txt" | grep -v "=$D" || true)
  [ -z "$bad" ] || { echo "not from the carried dependencies: $bad"; return 1; }
  # Header-only dependencies are named by directory: the header must be there.
  [ -f "$D/usr/include/xxhash.h" ] || { echo "xxhash.h is not among the carried files (scripts/gpu/prepare.sh)"; return 1; }
}
configure() {
  if configure_with_config && check_cache "$build/tree"; then
    echo "configured through LibTorch's CMake config"
    return 0
  fi
  echo "LibTorch's CMake config failed; trying DTRAIN_TORCH_ROOT=$torch_root"
  rm -rf "$build/tree"
  [ -n "$torch_root" ] && configure_with_root "$build/tree" && check_cache "$build/tree"
}
if [ "$deps" = none ] || ok deps; then
  step configure configure
  [ $dry_run = 0 ] || step configure-torch-root configure_with_root "$build/tree-torch-root"
else
  skip configure "deps failed"
fi

# --- build --------------------------------------------------------------------
targets=(dtrain-resnet dtrain-data allreduce_perf dtrain_nccl_gpu_tests dtrain_nccl_unit_tests)
if [ $dry_run = 1 ] && [ $dry_run_build = 0 ]; then
  planned build cmake --build "$build/tree" --target "${targets[@]}"
elif ok configure; then
  detail="targets: ${targets[*]}"
  step build cmake --build "$build/tree" --parallel "$(nproc)" --target "${targets[@]}" -- -k 0
  warnings=$(grep -c 'warning:' "$results/logs/build.log" || true)
  echo "build warnings: $warnings (log: logs/build.log)"
else
  skip build "configure failed"
fi
bin=$build/tree

# --- device steps ---------------------------------------------------------------
# device_step NAME NEEDS COMMAND...: run, or plan in --dry-run, or skip. NEEDS
# lists steps that must have passed and files (absolute paths) that must
# exist: a target that failed to build skips only the steps that use it.
device_step() {
  local name=$1 needs=$2; shift 2
  if [ $dry_run = 1 ]; then planned "$name" "$@"; return 0; fi
  local n
  if [ -n "$only" ]; then
    local wanted=0
    for n in ${only//,/ }; do [[ $name == "$n"* ]] && wanted=1; done
    [ $wanted = 1 ] || { skip "$name" "not in --only $only"; return 1; }
  fi
  for n in $needs; do
    case $n in
      /*) [ -e "$n" ] || { skip "$name" "$(basename "$n") was not built"; return 1; } ;;
      *) ok "$n" || { skip "$name" "step $n did not pass"; return 1; } ;;
    esac
  done
  step "$name" "$@"
}
ctest_gpu() {
  ctest --test-dir "$bin" -L gpu -R dtrain_nccl --output-on-failure --output-junit "$results/ctest-gpu.xml"
  local rc=$?
  ctest --test-dir "$bin" -R dtrain_nccl_unit_tests --output-on-failure || rc=1
  # Skipped entries (more ranks than GPUs) are listed, never counted as passed.
  "$python" - "$results/ctest-gpu.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    state = case.get("status") or ("failed" if case.find("failure") is not None else "run")
    print(f"ctest {case.get('name')}: {state}")
EOF
  return $rc
}
device_step ctest-gpu "$bin/tests/gpu/dtrain_nccl_gpu_tests" ctest_gpu

detail="busbw of NCCL's ring, tree and auto, $ranks rank(s)"
device_step allreduce "$bin/benchmarks/allreduce_perf" mpirun_n "$ranks" "$bin/benchmarks/allreduce_perf" --device cuda \
  -b 8 -e 256M -f 4 -w 5 -n 20 --json "$results/allreduce.json"

data_dir=$build/data
make_data() (
  set -e
  rm -rf "$data_dir" && mkdir -p "$data_dir"
  "$bin/src/data/dtrain-data" convert-fashion-mnist --source "$fmnist_source" \
    --out "$data_dir/fashion-mnist" --shards 4
  "$bin/src/data/dtrain-data" generate --out "$data_dir/synthetic-224" --samples 2048 \
    --shape 3,224,224 --classes 1000 --shards 4 --seed 1
)
device_step data "$bin/src/data/dtrain-data" make_data

# train NAME MODEL DATA BATCH_PER_RANK: the trainer, then PyTorch, the same time each.
train_dtrain() {
  local name=$1 model=$2 data=$3 batch=$4
  rm -rf "$build/runs/$name"
  mpirun_n "$ranks" "$bin/examples/resnet/dtrain-resnet" --device cuda --model "$model" \
    --train-data "$data" --test-data none --checkpoint-dir none --out "$build/runs/$name" \
    --global-batch $((batch * ranks)) --steps 100000000 --max-minutes "$(awk -v s="$seconds" 'BEGIN {print s / 60}')" \
    --lr 0.1 --warmup-epochs 0 --schedule constant --augment=false --loader-workers 4 --threads 4 \
    --resume=false --progress lines --log-every 100 || return $?
  "$python" - "$build/runs/$name/metrics/metrics-rank00000.jsonl" "$batch" "$ranks" \
    "$results/$name-dtrain.json" "$model" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r for r in rows if r.get("kind") == "train"]
warm = 20
if len(steps) <= warm + 1:
    sys.exit(f"only {len(steps)} steps: too few to time after {warm} warm-up steps")
first, last = steps[warm], steps[-1]
images = (last["step"] - first["step"]) * int(sys.argv[2]) * int(sys.argv[3])
ips = images / (last["time"] - first["time"])
out = dict(framework="dtrain", model=sys.argv[5], ranks=int(sys.argv[3]),
           batch_per_rank=int(sys.argv[2]), steps=len(steps), timed_steps=last["step"] - first["step"],
           seconds=last["time"] - first["time"], images_per_s=ips, last_loss=last["loss"])
json.dump(out, open(sys.argv[4], "w"), indent=2)
print(f"dtrain {sys.argv[5]}: {ips:.1f} images/s over {out['timed_steps']} steps (loss {last['loss']:.3f})")
EOF
}
train_torch() {
  local name=$1 model=$2 data=$3 batch=$4
  local cmd=("$python" "$root/benchmarks/pytorch_gpu_peer.py" --model "$model" --data "$data"
             --batch-per-rank "$batch" --seconds "$seconds" --json "$results/$name-pytorch.json")
  if [ "$ranks" = 1 ]; then "${cmd[@]}"; else mpirun_n "$ranks" -x MASTER_ADDR=127.0.0.1 "${cmd[@]}"; fi
}
for run in "resnet50-synthetic resnet50 $data_dir/synthetic-224 128" \
           "resnet20-fashion-mnist resnet20 $data_dir/fashion-mnist/train 512"; do
  read -r name model data batch <<< "$run"
  detail="$model, $ranks rank(s) x batch $batch, ${seconds} s"
  device_step "$name-dtrain" "data $bin/examples/resnet/dtrain-resnet" train_dtrain "$name" "$model" "$data" "$batch"
  detail="$model, $ranks rank(s) x batch $batch, ${seconds} s"
  device_step "$name-pytorch" "data" train_torch "$name" "$model" "$data" "$batch"
done

# --- summary --------------------------------------------------------------------
"$python" - "$results" "$envjson" "$dry_run" "$(( $(date +%s) - check_start ))" "$commit" <<'EOF'
import glob, json, os, sys
results, env, dry_run, wall = sys.argv[1], json.loads(sys.argv[2] or "{}"), sys.argv[3] == "1", int(sys.argv[4])
env["commit"] = sys.argv[5]
steps = [json.loads(l) for l in open(os.path.join(results, "steps.jsonl"))]
runs = {}
for path in glob.glob(os.path.join(results, "*-dtrain.json")) + glob.glob(os.path.join(results, "*-pytorch.json")):
    name, framework = os.path.basename(path)[:-5].rsplit("-", 1)
    runs.setdefault(name, {})[framework] = json.load(open(path))
table = []
for name, r in sorted(runs.items()):
    d, t = r.get("dtrain", {}).get("images_per_s"), r.get("pytorch", {}).get("images_per_s")
    table.append(dict(run=name, dtrain=d, pytorch=t, ratio=(d / t) if d and t else None))
counts = {s: sum(1 for x in steps if x["status"] == s) for s in ("passed", "failed", "skipped", "planned")}
summary = dict(dry_run=dry_run, wall_seconds=wall, environment=env, steps=steps, throughput=table,
               counts=counts)
json.dump(summary, open(os.path.join(results, "summary.json"), "w"), indent=2)
print()
print(f"{'step':<30} {'status':<8} {'seconds':>8}")
for s in steps:
    print(f"{s['name']:<30} {s['status']:<8} {s['seconds']:>8.1f}")
if table:
    print()
    print(f"{'images/s':<28} {'dtrain':>10} {'PyTorch':>10} {'dtrain/PyTorch':>15}")
    for row in table:
        f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
        print(f"{row['run']:<28} {f(row['dtrain']):>10} {f(row['pytorch']):>10} {f(row['ratio'], 2):>15}")
print(f"\n{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
      + (f", {counts['planned']} planned (dry run)" if dry_run else "") + f"; {wall} s in all")
EOF
failed=$(grep -c '"status": "failed"' "$results/steps.jsonl" || true)
[ "$failed" = 0 ]
