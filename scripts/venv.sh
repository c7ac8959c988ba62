#!/usr/bin/env bash
# Create or reuse .venv and install the project with every extra. Idempotent:
# reinstalls only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "installing dependencies into .venv (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch 2.14.1/torchvision 0.29.1: the pair known to install on the project's machines.
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || \
    .venv/bin/python -m pip install -q "torch>=2.3,<3" "torchvision>=0.18,<1"
  .venv/bin/python -m pip install -q -e ".[all]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
