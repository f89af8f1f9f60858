"""The planner's lints: the seed's four LoRA mistakes, and more, as stable ids.

Each lint is one sentence of advice. Thresholds are named constants, so the README can quote
them and a test can sit on either side of each.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from loraflow.core.config import Config
from loraflow.core.paths import Paths
from loraflow.planner.estimates import HEADROOM, QLORA_SLOWDOWN
from loraflow.planner.result import GIB, Lint, Plan

LINT_IDS = (
    "rank-too-low",  # r <= 8 for a large dataset or MLP targets
    "rank-too-high",  # r >= 64 on a small dataset
    "alpha-ratio-changed",  # rank changed since the last tracked run, and alpha/r with it
    "too-many-targets",  # MLP or more than 4 module kinds on a small dataset
    "qlora-time-cost",  # QLoRA although the 16-bit base fits the GPU
    "alpha-convention",  # alpha/r outside 0.25..2
    "does-not-fit",  # the chosen method's estimate exceeds the device with headroom
    "merged-artifact-large",  # register.log: merged with a merged model over MERGED_ARTIFACT_MAX_BYTES
)

LOW_RANK = 8  # r at or below this is "narrow" (the article's example: r=8 for a new domain)
HIGH_RANK = 64  # r at or above this is "wide"
LARGE_RECORDS = 50_000  # train records that make a dataset large or diverse
LARGE_TOKENS = 10_000_000  # train tokens (one epoch) that make a dataset large
SMALL_RECORDS = 2_000  # train records below which a dataset is small
MAX_KINDS = 4  # q, k, v, o: more module kinds than attention has is "many"
SCALE_RANGE = (0.25, 2.0)  # alpha/r of the two conventions: r/4 .. 2r
# register.log: merged copies the whole merged model into the MLflow artifact store with every registered
# version, and the store shares nothing between versions: a merged 7B in bf16 adds 12.6 GiB (13.5 GB) a
# version, its r=16 q/v adapter 32 MiB (log: adapter pins the base by digest and ships only that). Up to
# 2 GiB (about a 1B model in bf16) ten versions stay below one merged 7B version, and a self-contained model
# (serving needs no base) is worth that; above it every version costs hundreds of times its adapter.
MERGED_ARTIFACT_MAX_BYTES = 2 * GIB


def lints(cfg: Config, paths: Paths, plan: Plan, *, current_run_id: str | None = None) -> list[Lint]:
    """All lints that apply to ``cfg`` given ``plan`` (from ``planner.plan``), in ``LINT_IDS`` order.

    ``alpha-ratio-changed`` reads the last MLflow run of experiment ``register.model_name``
    (params ``lora_r``, ``lora_alpha``), skipping ``current_run_id``; with no store, no
    experiment or no such run it says nothing, and it never creates a store.
    """
    r, alpha, scale = cfg.lora.r, cfg.lora.alpha, cfg.lora.scale
    records = plan.data.train_records
    tokens = records * plan.data.tokens_per_record if records is not None else None
    broad = "mlp" in plan.target_roles
    small = records is not None and records < SMALL_RECORDS
    out: list[Lint] = []

    large = []
    if records is not None and records > LARGE_RECORDS:
        large.append(f"{records:,} train records")
    if tokens is not None and tokens > LARGE_TOKENS:
        large.append(f"~{tokens / 1e6:.0f}M tokens")
    if r <= LOW_RANK and (large or broad):
        why = " and ".join(large) if large else "adapters widened to the MLP layers"
        out.append(Lint("rank-too-low", "warning",
                        f"r={r} is a narrow bottleneck for {why}; match rank to the ambition "
                        f"(r=32–64 for most domain fine-tunes, alpha={32 * scale:g} for r=32 keeps α/r={scale:g})"))

    if r >= HIGH_RANK and small:
        out.append(Lint("rank-too-high", "warning",
                        f"r={r} on {records:,} train records gives {plan.trainable_params:,} trainable parameters "
                        f"to overfit with; try r=8–16 (alpha={16 * scale:g} for r=16 keeps α/r={scale:g})"))

    last = last_tracked_lora(cfg, paths, exclude_run_id=current_run_id)
    if last is not None:
        old_r, old_alpha = last
        old_scale = old_alpha / old_r
        if old_r != r and abs(old_scale - scale) > 1e-9:
            out.append(Lint("alpha-ratio-changed", "warning",
                            f"rank changed {old_r}→{r} since the last tracked run of {cfg.register.model_name}, "
                            f"and with alpha={alpha:g} the scale α/r moved {old_scale:g}→{scale:g}; "
                            f"set alpha={old_scale * r:g} to keep it, or change it on purpose"))

    kinds = len(plan.targets)
    if small and (broad or kinds > MAX_KINDS):
        out.append(Lint("too-many-targets", "warning",
                        f"{kinds} module kinds ({', '.join(plan.targets)}) on {records:,} train records is a fast "
                        "track to overfitting; start with attention-qv or attention and widen only if quality demands it"))

    gpu = plan.device.kind == "gpu"
    if gpu and plan.method == "qlora" and plan.fits("lora", HEADROOM):
        lora_gib, gpu_gib = plan.memory["lora"].total / GIB, plan.device.memory_gib
        saved = ""
        if plan.seconds.get("lora") and plan.seconds.get("qlora"):
            saved = f" ({_duration(plan.seconds['lora'])} instead of {_duration(plan.seconds['qlora'])})"
        out.append(Lint("qlora-time-cost", "warning",
                        f"the 16-bit base fits this GPU (LoRA ~{lora_gib:.1f} of {gpu_gib:g} GiB), so QLoRA's "
                        f"~{round((QLORA_SLOWDOWN - 1) * 100)}% longer training buys nothing; "
                        f"set method: lora (or auto) to finish sooner{saved}"))

    lo, hi = SCALE_RANGE
    if not lo <= scale <= hi:
        out.append(Lint("alpha-convention", "info",
                        f"α/r = {alpha:g}/{r} = {scale:g} is outside both conventions (α = r/4…r/2 in the QLoRA "
                        f"paper, α = 2r in Microsoft's examples); alpha={2 * r} or alpha={r // 2 or 1} would follow one"))

    if not plan.fits(plan.method, HEADROOM):
        need = plan.memory[plan.method].total / GIB
        out.append(Lint("does-not-fit", "warning",
                        f"{plan.method} needs ~{need:.1f} GiB, over {HEADROOM:.0%} of the "
                        f"{plan.device.memory_gib:g} GiB of {plan.device.name}; {plan.fit_hint}"))

    after = plan.after_training.get(plan.method)
    if cfg.register.log == "merged" and after is not None and after.merged_bytes > MERGED_ARTIFACT_MAX_BYTES:
        adapter_mib = 4 * plan.trainable_params / 2**20
        out.append(Lint("merged-artifact-large", "info",
                        f"register.log: merged stores the whole merged model ({after.merged_bytes / GIB:.1f} GiB) in "
                        f"the artifact store again with every registered version; the adapter is ~{adapter_mib:.0f} MiB "
                        "with the base pinned by its digest: set register.log: adapter (-s register.log=adapter) "
                        "where the serving side can reach the base"))
    return out


def last_tracked_lora(cfg: Config, paths: Paths, exclude_run_id: str | None = None) -> tuple[int, float] | None:
    """(lora_r, lora_alpha) of the newest tracked run of ``register.model_name``, or None.

    Never creates a store: a local sqlite or file store that does not exist means no history.
    Any tracking error (a server down, an old schema) also means no history: a lint is advice.
    """
    from loraflow.track.tracking import tracking_uri

    uri = tracking_uri(paths)
    local = _local_store(uri)
    if local is not None and not local.exists():
        return None
    try:
        with _no_retries():
            from loraflow.track import tracking

            cl = tracking.client(paths)
            exp = cl.get_experiment_by_name(cfg.register.model_name)
            if exp is None:
                return None
            runs = cl.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=50)
    except Exception:
        return None
    for run in runs:
        params = run.data.params
        if run.info.run_id == exclude_run_id or "lora_r" not in params or "lora_alpha" not in params:
            continue
        try:
            return int(float(params["lora_r"])), float(params["lora_alpha"])
        except ValueError:
            continue
    return None


def _local_store(uri: str) -> Path | None:
    """The file a local tracking URI points at (sqlite db, file store folder); None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    if "://" not in uri:
        return Path(uri)
    return None


@contextmanager
def _no_retries():
    """A tracking server that is down should cost the planner a second, not minutes of retries.

    Set, not defaulted: the lookup is advice, so no retry setting (loraflow's or the user's) should
    make ``loraflow plan`` wait for it. Put back afterwards."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
