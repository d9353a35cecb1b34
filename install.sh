#!/usr/bin/env bash
# Create .venv and install ptls-meles with its test tools.
# Where a torch 2.13.0 build is available (a CPU build lies on disk on the project's
# machines) it is pinned via constraints.txt, so pip does not pull a multi-GB CUDA
# build; elsewhere the normal torch range of pyproject.toml applies.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]' 2>/tmp/ptls-meles-install.log; then
  echo "installed (torch pinned by constraints.txt)"
else
  echo "torch==2.13.0 not available here; installing with the default torch range"
  .venv/bin/python -m pip install -q -e '.[test]'
fi
