#!/usr/bin/env bash
# LoRA vs QLoRA on a random-init Llama-2-7B-shaped model (bench/gpu_bench.py): peak CUDA memory,
# tokens/s and MFU, sequence 1024; results JSON with date and device in bench/results/.
#
#   bench/gpu.sh --fetch-wheels   HERE, first: the wheels the GPU machine lacks, into .whl/ (git-ignored
#                                 through .git/info/exclude); that machine reaches no package registry
#   bench/gpu.sh                  ON THE GPU MACHINE, from the repo root (carry .whl): a few minutes on an
#                                 H200 (not yet run there: no GPU was lent when this was written)
#   bench/gpu.sh --smoke          anywhere, CPU too: a tiny shape, 2 steps, checks the whole script
#
# Extra arguments go to gpu_bench.py (e.g. --batch 8 --steps 20). The environment: the machine's own
# python3, which holds a CUDA torch, transformers and peft, plus what it lacks (bitsandbytes, pydantic
# for loraflow's planner) installed into a folder of its own ($GPU_SITE) from .whl/, else from the
# package index when one is reachable. --smoke on a machine with the project's .venv uses that.
set -euo pipefail
cd "$(dirname "$0")/.."

# What gpu_bench.py imports beyond the machine's image, pinned to what the project's .venv runs.
NEEDS=(bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
GPU_SITE=${GPU_SITE:-/tmp/loraflow-gpu-site}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # The GPU machine's python3 is 3.12 on x86-64 (/work/.library/device/KINDS.md).
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${NEEDS[@]}"
    du -sh .whl
    exit 0
fi

smoke=0
for a in "$@"; do [[ "$a" == "--smoke" ]] && smoke=1; done

if [[ $smoke == 1 && -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=${PYTHON:-python3}
    if ! "$PY" -c "import bitsandbytes, pydantic" 2>/dev/null; then
        mkdir -p "$GPU_SITE"
        if compgen -G ".whl/*.whl" >/dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$GPU_SITE" .whl/*.whl
        else
            "$PY" -m pip install -q --no-deps --target "$GPU_SITE" "${NEEDS[@]}"
        fi
        export PYTHONPATH="$GPU_SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PY" -c "import torch, transformers, peft, bitsandbytes, pydantic" || {
        echo "gpu.sh: $PY lacks torch/transformers/peft/bitsandbytes/pydantic; run 'bench/gpu.sh --fetch-wheels' where pip works and carry .whl" >&2
        exit 2
    }
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 "$PY" bench/gpu_bench.py "$@"
# The lent machine sends back only what is under $OUT: the results too, then.
if [[ $smoke == 0 && -n "${OUT:-}" && -d "${OUT:-}" ]]; then cp bench/results/gpu-*.json "$OUT"/; fi
