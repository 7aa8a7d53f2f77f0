#!/usr/bin/env bash
# Create .venv (if needed) with the CPU build of torch and fastlora installed editable with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
# FASTLORA_BUILD_EXT=1: a failed C++ extension build is an error here, not a silently missing backend.
FASTLORA_BUILD_EXT=${FASTLORA_BUILD_EXT:-1} .venv/bin/python -m pip install -q -e ".[test,examples]"
if ! command -v java >/dev/null 2>&1; then
    echo "setup: java not found; METEOR, ROUGE-L and CIDEr (examples/e2e/evaluate.py) need it: apt-get install default-jre-headless" >&2
fi
.venv/bin/python -m fastlora
