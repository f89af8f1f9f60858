#!/usr/bin/env bash
# LoRA vs QLoRA on a random-init Llama-2-7B-shaped model (bench/gpu_bench.py): peak CUDA memory,
# tokens/s and MFU, sequence 1024; results JSON with date and device in bench/results/.
#
#   bench/gpu.sh --fetch-wheels   HERE, first: the wheels the GPU machine lacks, into .whl/ (git-ignored
#                                 through .git/info/exclude); that machine reaches no package registry
#   bench/gpu.sh                  ON THE GPU MACHINE, from the repo root (carry .whl): a few minutes on an
#                                 H200 (not yet run there: no GPU was lent when this was written)
#   bench/gpu.sh --smoke          anywhere, CPU too: a tiny shape, 2 steps, checks the whole script
#   bench/gpu.sh --rehearsal      ON THE GPU MACHINE: bench/scale_rehearsal.py (issue 16's scale rehearsal:
#                                 7B-shaped Llamas at 1/2/4 layers through every `loraflow stage`, QLoRA and
#                                 LoRA, train and evaluate on the GPU, device peaks through NVML); ~25 min
#   bench/gpu.sh --fetch-wheels --rehearsal   HERE: also what the rehearsal's stages import (TRL, datasets,
#                                 MLflow and theirs) into .whl-rehearsal/; with .whl/ that is over one call's
#                                 64 MiB, so carry .whl in one call ('bench/gpu.sh --install'), then
#                                 .whl-rehearsal in the next, which runs the rehearsal: $GPU_SITE is kept on the
#                                 warm machine between the two (not yet run there: no GPU was lent)
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
# What `loraflow stage prepare|train|evaluate|merge|register` imports beyond NEEDS and the image (KINDS.md's
# package list), pinned to the project's .venv; listed from sys.modules after importing every stage's modules.
REHEARSAL_NEEDS=(Mako==1.4.3 SQLAlchemy==2.1.9 alembic==1.20.1 cachetools==7.3.3 cryptography==50.0.2
    databricks-sdk==0.167.0 datasets==5.2.0 dill==0.4.1 fastapi==0.150.0 google-auth==2.63.1 h2==4.4.1 hpack==4.2.0
    httpcore2==2.17.0 httpx2==2.17.0 hyperframe==6.1.0 importlib_metadata==10.2.0 kernels==0.19.1
    lazy-importer==0.1.0 mlflow==3.18.0 mlflow-skinny==3.18.0 mlflow-tracing==3.18.0 multiprocess==0.70.19
    opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
    opentelemetry-semantic-conventions==0.66b2 orjson==3.13.0 pydantic-extra-types==2.11.1 pydot==4.0.1
    python-multipart==0.0.34 pytz==2026.6 redis==8.2.0 sniffio==1.3.1 sqlparse==0.6.1 starlette==1.10.0
    trl==1.16.0 truststore==0.10.5)

smoke=0 rehearsal=0 fetch=0 install=0
for a in "$@"; do
    case "$a" in
        --smoke) smoke=1 ;; --rehearsal) rehearsal=1 ;; --fetch-wheels) fetch=1 ;; --install) install=1 ;;
    esac
done

download() {  # download DIR PIN...: wheels for the GPU machine's python3, 3.12 on x86-64 (KINDS.md)
    local dir=$1; shift
    grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$dir" "$@"
    du -sh "$dir"
}

if [[ $fetch == 1 ]]; then
    download .whl "${NEEDS[@]}"
    [[ $rehearsal == 1 ]] && download .whl-rehearsal "${REHEARSAL_NEEDS[@]}"
    exit 0
fi

if [[ $smoke == 1 && -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=${PYTHON:-python3}
    mkdir -p "$GPU_SITE"
    # Whatever wheel folders this call carried go into $GPU_SITE, which outlives the call on a warm machine.
    for dir in .whl .whl-rehearsal; do
        if compgen -G "$dir/*.whl" >/dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$GPU_SITE" "$dir"/*.whl
        fi
    done
    export PYTHONPATH="$PWD:$GPU_SITE${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import bitsandbytes, pydantic" 2>/dev/null && [[ $install == 0 ]]; then
        "$PY" -m pip install -q --no-deps --target "$GPU_SITE" "${NEEDS[@]}"  # where an index is reachable
    fi
    if [[ $install == 1 ]]; then echo "gpu.sh: installed into $GPU_SITE"; exit 0; fi
    imports="torch, transformers, peft, bitsandbytes, pydantic"
    [[ $rehearsal == 1 ]] && imports="$imports, trl, datasets, mlflow, loraflow.cli, loraflow.tasks.train"
    "$PY" -c "import $imports" || {
        echo "gpu.sh: $PY cannot import all of: $imports; run 'bench/gpu.sh --fetch-wheels$([[ $rehearsal == 1 ]] && echo ' --rehearsal')' where pip works and carry the wheel folders (see the top of this file)" >&2
        exit 2
    }
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [[ $rehearsal == 1 ]]; then
    # The CPU rehearsal's command (README, "Scale rehearsal"), both methods, into bench/results/ ($OUT too)
    out=bench/results/scale_rehearsal-$(date -u +%F)-gpu.json
    args=(--shapes llama2-7b,llama3-8b --gqa-vocab 128256 --methods qlora,lora --out "$out")
    [[ $smoke == 1 ]] && args=(--smoke --methods qlora)
    PYTHONUNBUFFERED=1 "$PY" bench/scale_rehearsal.py "${args[@]}"
    if [[ $smoke == 0 && -n "${OUT:-}" && -d "${OUT:-}" ]]; then cp "$out" "$OUT"/; fi
    exit 0
fi
PYTHONUNBUFFERED=1 "$PY" bench/gpu_bench.py "$@"
# The lent machine sends back only what is under $OUT: the results too, then.
if [[ $smoke == 0 && -n "${OUT:-}" && -d "${OUT:-}" ]]; then cp bench/results/gpu-*.json "$OUT"/; fi
