#!/usr/bin/env bash
# The accelerator suite in one command (benchmarks/device_suite.py says what it runs).
#
#   bash benchmarks/device_suite.sh            # a bare NVIDIA GPU machine with only this repository:
#                                              # makes .venv-suite (jax[cuda13] + requirements-test.txt), then
#                                              # runs the suite (about 8 minutes) into benchmarks/results/
#   bash benchmarks/device_suite.sh --dry-run  # any machine, python3 (or $PYTHON) with requirements-test.txt:
#                                              # every part with tiny sizes, results in a temporary folder
#
# PYTHON=/path/to/python skips the install and uses that interpreter; JAX_CUDA=cuda12 picks the CUDA 12 wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --dry-run "* || -n "${PYTHON:-}" ]]; then
  PYTHON="${PYTHON:-python3}"
else
  start=$(date +%s)
  python3 -m venv .venv-suite
  .venv-suite/bin/python -m pip install --quiet --upgrade pip
  .venv-suite/bin/python -m pip install --quiet "jax[${JAX_CUDA:-cuda13}]" -r requirements-test.txt
  echo "installed in $(( $(date +%s) - start ))s: $(.venv-suite/bin/python -c 'import jax, torch; print("jax", jax.__version__, jax.devices()[0].device_kind, "| torch", torch.__version__, torch.cuda.is_available())')"
  PYTHON=.venv-suite/bin/python
fi
"$PYTHON" -c "import jax, torch, diffusers" 2>/dev/null || {
  echo "device_suite.sh: $PYTHON cannot import jax, torch and diffusers; set PYTHON to an environment's python" \
       "with requirements-test.txt installed" >&2
  exit 2
}
exec "$PYTHON" benchmarks/device_suite.py "$@"
