#!/usr/bin/env bash
# Create .venv (if needed) with the CPU build of torch and fastlora installed editable with its test extras.
# A repeated run is a quick no-op: a stamp of the inputs (this script, pyproject.toml, setup.py, csrc/, the
# checkout's path, the venv's python and FASTLORA_BUILD_EXT) skips pip when none changed since the last
# successful run and the built extension is still there. FASTLORA_SETUP_FORCE=1 reinstalls regardless.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.fastlora-setup-stamp
stamp() {
    {
        cat scripts/setup.sh pyproject.toml setup.py
        find csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
        echo "$PWD ${FASTLORA_BUILD_EXT:-1}"
        .venv/bin/python -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}
if [ -z "${FASTLORA_SETUP_FORCE:-}" ] && [ -x .venv/bin/python ] && [ -f "$STAMP" ] \
        && compgen -G "fastlora/_C*.so" >/dev/null && [ "$(stamp)" = "$(cat "$STAMP")" ]; then
    echo "setup: .venv is up to date (nothing changed since the last setup; FASTLORA_SETUP_FORCE=1 reinstalls)"
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
rm -f "$STAMP"
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
# The C++ extension builds against the torch just installed (it reads tensors natively): without build isolation,
# whose environment would fetch another torch, so the build tools go in first (ninja: its sources compile in parallel).
.venv/bin/python -m pip install -q "setuptools>=68" wheel "scipy-openblas32>=0.3.27" ninja
# FASTLORA_BUILD_EXT=1: a failed C++ extension build is an error here, not a silently missing backend.
PATH="$PWD/.venv/bin:$PATH" FASTLORA_BUILD_EXT=${FASTLORA_BUILD_EXT:-1} \
    .venv/bin/python -m pip install -q --no-build-isolation -e ".[test,examples]"
if ! command -v java >/dev/null 2>&1; then
    echo "setup: java not found; METEOR, ROUGE-L and CIDEr (examples/e2e/evaluate.py) need it: apt-get install default-jre-headless" >&2
fi
.venv/bin/python -m fastlora
stamp > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
