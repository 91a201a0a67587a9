#!/usr/bin/env bash
# Installs what dtrain needs from Debian 12's archive. Idempotent: when
# every package is already installed it changes nothing and asks no mirror.
#
#   scripts/setup.sh [--with-peers]
#
# --with-peers also installs PyTorch for Python (python3-torch, 1.13 like
# libtorch-dev), which only the comparison benchmarks need
# (benchmarks/run_ddp_comparison.sh, run_trainer_comparison.sh).
set -euo pipefail

with_peers=0
for arg in "$@"; do
  case $arg in
    --with-peers) with_peers=1 ;;
    *) echo "usage: $0 [--with-peers]" >&2; exit 2 ;;
  esac
done

packages=(
  build-essential cmake ninja-build pkg-config
  libtorch-dev            # LibTorch 1.13 (CPU)
  libopenblas0-openmp     # optimized BLAS behind LibTorch's generic libblas.so.3
  libopenmpi-dev openmpi-bin
  libhdf5-dev hdf5-tools
  libssl-dev zlib1g-dev   # shard digests (SHA-256), gzip'd IDX input
  libxxhash-dev           # checkpoint file digests (XXH3-128)
  dataset-fashion-mnist   # Fashion-MNIST IDX files for dtrain-data convert-fashion-mnist
  fortunes                # English texts (2.5 MB, /usr/share/games/fortunes; pulls in
                          # fortunes-min) for dtrain-data convert-text; not fortunes-off,
                          # the offensive set, nor the other languages' fortunes-*
  libcxxopts-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev
  python3 python3-h5py    # tests open checkpoints in h5py; the scripts below
  python3-matplotlib      # scripts/plot_metrics.py
  slurmctld slurmd slurm-client munge   # the Slurm tests run a local single-node Slurm
  iproute2                # `ip`: the namespace hosts of tests/cluster
)
if [ "$with_peers" = 1 ]; then
  packages+=(python3-torch)   # PyTorch DDP, the peer of the comparison benchmarks
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages are installed"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: run as root or install sudo" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"
