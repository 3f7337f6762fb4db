#!/usr/bin/env bash
# The project's GPU check in one command (see benchmarks/gpu_check.py for what it measures):
#
#   bash benchmarks/gpu_check.sh [--smoke] [gpu_check.py options]
#
# Under 8 minutes on one H100/H200; prints one Markdown table and writes gpu_check.{md,json,log} under $OUT when
# set, else under benchmarks/. --smoke runs tiny configs on the CPU instead, to check the code paths anywhere.
#
# Which Python: $PYTHON if set, else .venv/bin/python, else python3, the first whose torch sees a CUDA GPU (with
# --smoke: the first that has torch at all). Only when none does and .venv is missing does it run
# scripts/setup.sh, which needs the package index. The GPU machines lent here have no network and no room for a
# carried .venv (a carried tree is at most 64 MiB), but their python3 holds a CUDA torch, transformers,
# accelerate, peft and safetensors; bitsandbytes is the one package missing there. Carry it as a wheel in .whl/
# (ignored by git), made on this machine once:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
#
# and run with carry [".whl"]: this script installs .whl/*.whl into a temporary folder when the chosen Python
# cannot import bitsandbytes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

smoke=0
for arg in "$@"; do [ "$arg" = --smoke ] && smoke=1; done

has_torch() { "$1" -c 'import torch' >/dev/null 2>&1; }
usable() {  # has torch, and (unless --smoke) a CUDA device
  if [ $smoke = 1 ]; then has_torch "$1"
  else "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; fi
}

candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
[ -x .venv/bin/python ] && candidates+=(.venv/bin/python)
command -v python3 >/dev/null && candidates+=(python3)
PY=
any_torch=0
for c in "${candidates[@]}"; do
  has_torch "$c" && any_torch=1
  if usable "$c"; then PY=$c; break; fi
done
# setup.sh only where nothing is installed at all: a torch without CUDA would not get one from it.
if [ -z "$PY" ] && [ $any_torch = 0 ] && [ ! -e .venv ]; then
  echo "gpu_check: no Python with torch and no .venv: running scripts/setup.sh (needs the package index)"
  bash scripts/setup.sh && usable .venv/bin/python && PY=.venv/bin/python
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no torch that sees a CUDA GPU (tried: ${candidates[*]:-no Python}); without a GPU use --smoke" >&2
  exit 2
fi

if ! "$PY" -c 'import bitsandbytes' >/dev/null 2>&1; then
  if compgen -G '.whl/*.whl' >/dev/null; then
    site=${TMPDIR:-/tmp}/dsvl-gpu-check-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
      && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: $PY has no bitsandbytes and .whl/ holds no wheels: 8-bit, 4-bit and training rows will fail" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
exec "$PY" benchmarks/gpu_check.py "$@"
