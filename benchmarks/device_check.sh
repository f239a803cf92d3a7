#!/usr/bin/env bash
# One command on one accelerator (≤ 8 minutes on an H100): train-step MFU of DiT-B/2 and DiT-XL/2,
# the per-token overhead, sampling NFE/s, the FID Inception's images/s, memory and compile time
# against batch size and scan_layers, and the 'cpu' kernels against the standard path; writes
# results/device_check_<device>.json and prints a table (benchmarks/device_check.py).
#
#   bash benchmarks/device_check.sh              # from the repository root
#   bash benchmarks/device_check.sh --tiny       # toy sizes, e.g. on a CPU
# Extra arguments go to benchmarks/device_check.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# The script skips parts not started within --budget_s (420 s); the hard limit is 8 minutes
# (DEVICE_CHECK_TIMEOUT_S; the CPU test raises it).
exec timeout --signal=INT --kill-after=20 "${DEVICE_CHECK_TIMEOUT_S:-480}" "$PYTHON" \
  benchmarks/device_check.py "$@"
