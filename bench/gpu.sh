#!/usr/bin/env bash
# Everything the project measures on a CUDA GPU, in one command, for a session lent one (the
# device tool's machine: torch, triton, transformers, pytest and pytest-benchmark, no package
# registry; liger-kernel and trl only if carried as wheels, see ../shared/ENV.md):
#   1. the CUDA tests; 2. the kernel suite's GPU set (2B and 7B shapes, cuBLAS floor);
#   3. the packed forwards' host data path (native vs Python vs get_rope_index) and the
#      reference + update passes of each layout on the 2B-sized model (bench/layouts.py);
#   4. the end-to-end step on a random-weight model with Qwen2-VL-2B's dimensions (bf16), on
#      the prompt-heavy setup (448x448 images: 256 image tokens, completions of 32-128
#      tokens): the three layouts (mr1fast = shared prefix with FlexAttention, packed, padded),
#      mr1fast@1 (torchrun on the one GPU, the FSDP2 + NCCL path) and TRL when importable;
#   5. BENCHMARKS.md regenerated.
# Results land in bench/results/<GPU name>/; with $OUT set (the device tool) they are copied
# there too. Not yet run on a GPU: no session of this project has been lent one so far.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# mr1fast itself (with its mr1fast.kernels package mapping), nothing from a registry.
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e .
$PY -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs a CUDA GPU'"
status=0
$PY -m pytest tests -m cuda -q -rs --durations=10 || status=1
$PY -m pytest bench --benchmark-only --save-results -q || status=1
$PY bench/packing.py --save-results || status=1
$PY bench/layouts.py --models qwen2-vl-2b --dtype bf16 --save-results || status=1
trainers=mr1fast,mr1fast-packed,mr1fast-padded,mr1fast@1
if $PY -c "import trl" 2>/dev/null; then trainers=$trainers,trl; fi
$PY bench/step.py --models qwen2-vl-2b --image-size 448 --tokens 32:128 --trainers "$trainers" \
    --dtype bf16 --steps 2 --save-results || status=1
$PY bench/report.py
if [ -n "${OUT:-}" ]; then
    dev=$($PY -c "import sys; sys.path.insert(0, 'bench'); import results; \
print(results.device_dir())")
    mkdir -p "$OUT/results"
    cp "$dev"/*.json "$dev"/*.png "$OUT/results/" 2>/dev/null || true
    cp BENCHMARKS.md "$OUT/"
fi
exit $status
