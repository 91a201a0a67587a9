# Sourced by the benchmark scripts that run PyTorch as the peer
# (run_ddp_comparison.sh, run_trainer_comparison.sh).
#
#   require_pytorch NAME PYTHON
#
# Returns when PYTHON imports torch and torch.distributed; otherwise says
# how to install PyTorch and exits 1, before anything is built or run.
require_pytorch() {
  local name=$1 python=$2
  if "$python" -c "import torch, torch.distributed" > /dev/null 2>&1; then
    return 0
  fi
  {
    echo "$name: PyTorch is not installed for $python; this comparison runs it as the peer."
    echo "  Install Debian's PyTorch 1.13 (the same version as libtorch-dev):"
    echo "    scripts/setup.sh --with-peers     (or: sudo apt-get install -y python3-torch)"
    echo "  or point PYTHON at an interpreter that has torch."
  } >&2
  exit 1
}
