#!/usr/bin/env bash
# Prepares what the GPU check (scripts/gpu/check.sh) needs on a GPU machine
# that has CUDA, NCCL and a CUDA LibTorch but none of dtrain's other
# dependencies, and that reaches no package archive. Runs here, on the Debian
# machine: downloads the Debian packages of MPI, HDF5, GoogleTest, cxxopts,
# nlohmann-json, xxHash and OpenSSL's headers (apt-get download), with the shared
# libraries they need at run time, unpacks them into DIR (default
# .gpu-deps/, ignored by git), and adds the Fashion-MNIST files for the
# trainer. Copy or carry DIR with the checkout; check.sh finds it there.
#
#   scripts/gpu/prepare.sh [--out DIR] [--no-data] [--max-mib N]
#
# The run-time closure is read off this machine's installed libraries with
# ldd (so scripts/setup.sh runs first); glibc and the compiler's runtime are
# left out, since the GPU machine's own are newer. On the GPU machine
# check.sh always uses the carried Open MPI and HDF5 libraries (they must
# match their headers) and any other carried library only when the system
# has none of that name.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/.gpu-deps
data=1
max_mib=40
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --no-data) data=0; shift ;;
    --max-mib) max_mib=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "prepare.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

"$root/scripts/setup.sh"
arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
lib=/usr/lib/$arch

# Headers, link libraries and CMake/pkg-config files for the build (without
# their dependencies: the GPU machine has its own compiler and zlib).
build_packages=(libopenmpi-dev libhdf5-dev libgtest-dev libgmock-dev libcxxopts-dev
                nlohmann-json3-dev libxxhash-dev libssl-dev zlib1g-dev)
# What runs: mpirun/orted, the MPI and HDF5 libraries and Open MPI's
# components. Their shared libraries' packages are added by ldd below.
runtime_packages=(openmpi-bin openmpi-common libopenmpi3 libpmix2 libhdf5-103-1)
runtime_roots=("$lib"/libmpi.so.40 "$lib"/libopen-rte.so.40 "$lib"/libopen-pal.so.40
               "$lib"/libhdf5_serial.so.103 "$lib"/pmix2/lib/libpmix.so.2 /usr/bin/orterun
               /usr/bin/orted)
# Open MPI components for the transports the check uses (self, shared
# memory, TCP, ob1); the others (UCX, libfabric, verbs, PSM) are dropped.
drop_components='mca_(btl_openib|btl_uct|btl_usnic|btl_ofi|pml_ucx|pml_cm|mtl_|osc_ucx|spml_|atomic_ucx|coll_hcoll|coll_fca|sshmem_ucx|oob_ud|rml_ofi|common_ucx|common_ofi|common_verbs)'
never='^(libc6|libgcc-s1|libstdc\+\+6|gcc-[0-9]+-base)$'

for f in "${runtime_roots[@]}"; do
  [ -e "$f" ] || { echo "prepare.sh: $f is missing; is $(dpkg -S "$f" 2>/dev/null || echo its package) installed?" >&2; exit 1; }
done
mapfile -t needed < <(
  for f in "${runtime_roots[@]}" "$lib"/openmpi/lib/openmpi3/*.so; do
    case $(basename "$f") in *mca_*) [[ $(basename "$f") =~ $drop_components ]] && continue ;; esac
    ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}'
  done | sort -u)
mapfile -t resolved < <(for f in "${needed[@]}"; do readlink -f "$f"; done)
mapfile -t closure < <(
  { dpkg -S "${needed[@]}" "${resolved[@]}" 2>/dev/null || true; } |
    cut -d: -f1 | tr ',' '\n' | tr -d ' ' | sort -u | grep -Ev "$never")
packages=$(printf '%s\n' "${build_packages[@]}" "${runtime_packages[@]}" "${closure[@]}" | sort -u)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "prepare: downloading $(echo "$packages" | wc -l) packages"
# The newest version the archive serves (apt-cache madison lists only those:
# an installed version may no longer be downloadable).
declare -A newest
while IFS='|' read -r name version _; do
  name=${name// /} version=${version// /}
  [ -n "${newest[$name]:-}" ] || newest[$name]=$version
done < <(apt-cache madison $packages)
pinned=()
for p in $packages; do
  [ -n "${newest[$p]:-}" ] || { echo "prepare.sh: no archive serves $p; run apt-get update" >&2; exit 1; }
  pinned+=("$p=${newest[$p]}")
done
# apt's own cache holds the packages that setup.sh installed; fetch the rest.
fetch=()
for pv in "${pinned[@]}"; do
  p=${pv%%=*} v=${pv#*=}
  cached=$(ls /var/cache/apt/archives/"${p}_${v//:/%3a}"_*.deb 2>/dev/null | head -1 || true)
  if [ -n "$cached" ]; then cp "$cached" "$work/"; else fetch+=("$pv"); fi
done
[ ${#fetch[@]} -eq 0 ] || (cd "$work" && apt-get download -qq "${fetch[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
[ "$(ls "$work"/*.deb | wc -l)" -eq ${#pinned[@]} ] || { echo "prepare.sh: apt-get download did not fetch every package" >&2; exit 1; }

rm -rf "$out.new"
mkdir -p "$out.new"
r=$work/root
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$r"; done
printf '%s\n' "${pinned[@]}" > "$out.new/packages.txt"

# Leave out what the check never uses: documentation, Fortran, Java and
# OpenSHMEM bindings, static libraries but GoogleTest's, the dropped components.
rm -rf "$r"/usr/share/{doc,man,lintian,info,locale} "$r$lib"/fortran "$r$lib"/openmpi/lib/*.mod
find "$r" \( -name '*fortran*' -o -name '*mpifh*' -o -name '*usempi*' -o -name '*java*' \
  -o -name '*oshmem*' -o \( -name '*.a' ! -name 'libgtest*' ! -name 'libgmock*' \) -o -name '*_cpp.so*' -o -name '*.mod' \) -prune -exec rm -rf {} +
find "$r$lib"/openmpi/lib/openmpi3 -name '*.so' | grep -E "$drop_components" | xargs -r rm -f
# Absolute symbolic links would point into the machine that uses the folder.
find "$r" -type l | while read -r link; do
  target=$(readlink "$link")
  case $target in
    /*) ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$r$target")" "$link" ;;
  esac
done

# One compressed file: a third of the unpacked size, and no links to carry.
tar -C "$r" -cJf "$out.new/root.tar.xz" .

if [ "$data" = 1 ]; then
  src=$(dirname "$(dpkg -L dataset-fashion-mnist | grep -m1 'train-images-idx3-ubyte')")
  mkdir -p "$out.new/data/fashion-mnist"
  cp "$src"/*-ubyte.gz "$out.new/data/fashion-mnist/"
fi

mib=$(( $(du -sb "$out.new" | cut -f1) >> 20 ))
if [ "$mib" -gt "$max_mib" ]; then
  echo "prepare.sh: $out.new holds $mib MiB, more than --max-mib $max_mib" >&2
  exit 1
fi
rm -rf "$out"
mv "$out.new" "$out"
echo "prepare: $out ($mib MiB, $(wc -l < "$out/packages.txt") packages; list in packages.txt)"
