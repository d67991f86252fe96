#!/usr/bin/env bash
# Creates .venv and installs mr1fast with everything it needs, at the exact CPU pins of
# constraints-cpu.txt. Idempotent: a second run only checks. Usage: bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# torch first, pinned: an unpinned torch (or a package that asks for a newer one) pulls a
# CUDA build and several GB of nvidia packages on these machines.
.venv/bin/pip install -q --disable-pip-version-check -c constraints-cpu.txt torch
.venv/bin/pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[dev]"
