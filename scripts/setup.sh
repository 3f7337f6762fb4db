#!/usr/bin/env bash
# Creates .venv with the project and its test stack. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The CPU build of torch first (a plain `torch` requirement would pull a multi-GB CUDA build).
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip show torch >/dev/null 2>&1 || .venv/bin/python -m pip install -q "torch==2.13.0" \
  || .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install -q -e ".[dev]"
# System packages for the browser and screen-capture tests (Debian); skipped when present or not root.
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v Xvfb >/dev/null || need+=(xvfb)
command -v xsetroot >/dev/null || need+=(x11-xserver-utils)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
fi
