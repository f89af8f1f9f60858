"""merge: fold the adapter into the base checkpoint, tensor by tensor; check it, measure it.

    loraflow stage merge               # what dvc.yaml calls; outputs/merged/, reports/merge.json
    loraflow stage merge -s merge.base=original -s merge.dtype=float32

The merge streams (``loraflow/model/streaming_merge.py``): each base tensor is read from its
safetensors file, turned into what the adapter trained against, merged in fp32 and written in the
output dtype (``merge.dtype``: auto = the base's own, so a bf16 base ships as bf16), so its memory is
a few tensors plus the adapter whatever the model's size, and no GPU is needed. Never into 4-bit
weights: that re-quantizes the sum, 0.13-0.24 relative logit error (docs/traps.md §2). A QLoRA
adapter was trained against the NF4 base, so by default (``merge.base: dequantized``) each 4-bit
weight goes through the same NF4 round trip as training's load; ``original`` merges into the stored
weights instead, which differ from the trained model by the base's own quantization error. A plain
LoRA adapter was trained on the full-precision base: both mean that.

Checks: every merged weight on random vectors against ``W·x + scale·B·(A·x)`` (any size); where the
model fits in memory (``merge.check_logits``), merged vs unmerged logits within a dtype-aware
tolerance, the merged model's test loss (the registered model is a measured model) against the tuned
loss from evaluate, and forward latency merged vs base (no runtime tax).

Disk space: the merged size is known before anything is written (shapes x output dtype, the configs, the
tokenizer files): merge refuses up front where ``outputs/`` has less free, and a disk that fills anyway
(another writer, a quota) stops it with one line; either way ``outputs/merged`` is the previous one or none.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.core.atomic import write_json
from loraflow.core.config import Config, QuantizationSection
from loraflow.core.errors import DataError, LoraflowError
from loraflow.core.messages import say, stage
from loraflow.core.paths import Paths
from loraflow.core.progress import size_text
from loraflow.data.splits import load_split
from loraflow.model import loading
from loraflow.model.adapters import (
    attach_adapter,
    load_adapter_tokenizer,
    load_tuned,
    require_adapter,
    to_accelerator,
)
from loraflow.model.generation import completion_loss, encode_example
from loraflow.model.quant import dequantize_into
from loraflow.model.streaming_merge import logit_check_runs, merge_checkpoint, output_dtype
from loraflow.track.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    import torch

PROBE_ROWS = 4  # test examples whose logits are compared and timed
LATENCY_REPEATS = 5


@dataclass
class MergeResult:
    merged_dir: str
    report: str
    merge_base: str  # dequantized | original
    dtype: str  # of the merged weights
    bytes_on_disk: int
    max_weight_rel_error: float  # per-weight check: worst |W_merged·x - (W·x + s·B·A·x)| / |W·x + s·B·A·x|
    # Where the model fits in memory (merge.logit_check), else None:
    max_abs_logit_diff: float | None  # merged vs unmerged on the same full-precision base
    logit_tolerance: float | None  # what that difference was held to (merge.tolerance, dtype-aware)
    max_abs_logit_diff_trained: float | None  # merged vs the model as trained (4-bit + adapter for QLoRA)
    loss: float | None
    loss_delta: float | None  # merged loss - tuned loss from reports/evaluate.json
    latency_ms_merged: float | None
    latency_ms_base: float | None


def run(cfg: Config, paths: Paths, tracker: Tracker = NullTracker()) -> MergeResult:
    """Merge ``outputs/adapter`` into the base checkpoint; write ``outputs/merged`` and ``reports/merge.json``."""
    stage("merge")
    require_adapter(paths)
    rows = load_split(paths, "test")
    if not rows:
        raise DataError(f"{paths.split('test')}: the test split is empty; the merged model must be measured on one")
    tokenizer = load_adapter_tokenizer(cfg, paths)
    quant = trained_quantization(cfg, paths)  # None: a LoRA adapter on the full-precision base
    merge_base = cfg.merge.base if quant is not None else "original"
    base_dir = loading.local_base_dir(cfg, paths)
    dtype = output_dtype(base_dir, cfg.merge.dtype)

    checked: dict = {k: None for k in ("max_abs_logit_diff", "logit_tolerance", "logit_scale",
                                       "max_abs_logit_diff_trained", "loss", "loss_delta", "latency_ms_merged",
                                       "latency_ms_base")}

    def finish(folder: Path) -> None:  # on the written folder, before it becomes outputs/merged
        tokenizer.save_pretrained(folder)
        if _logit_check(cfg, _size(folder), dtype):
            checked.update(_check_logits(cfg.model_copy(update={"quantization": quant or cfg.quantization}), paths,
                                         folder, tokenizer, rows, merge_base, dtype, qlora=quant is not None))
        else:
            say("merged vs unmerged logits not compared: the model does not fit in memory three times over "
                "(merge.logit_check: auto); the per-weight check covers every merged weight")

    stats = merge_checkpoint(base_dir, paths.adapter, paths.merged, base=merge_base, quant=quant, dtype=dtype,
                             finish=finish, finish_files=("the tokenizer files", _tokenizer_sizes(paths, base_dir)))
    say(f"merged {stats.tensors_merged} weights into the {merge_base} base ({stats.tensors_dequantized} more NF4 "
        f"round trips): {size_text(stats.bytes_written)} of {stats.dtype} in {stats.shards} file(s); worst "
        f"per-weight relative error {stats.worst_rel_error:.3g} ({stats.worst_layer}), tolerance {stats.tolerance:.3g}")
    report: dict = {"merge_base": merge_base, "dtype": stats.dtype, "bytes_on_disk": _size(paths.merged),
                    "shards": stats.shards, "max_weight_rel_error": stats.worst_rel_error,
                    "weight_tolerance": stats.tolerance, "worst_layer": stats.worst_layer}
    report |= checked
    write_json(paths.report("merge"), report)
    tracker.log_metrics({k: v for k, v in {"merge_max_weight_rel_error": stats.worst_rel_error,
                                           "merge_max_abs_logit_diff": checked["max_abs_logit_diff"],
                                           "merge_max_abs_logit_diff_trained": checked["max_abs_logit_diff_trained"],
                                           "merge_loss": checked["loss"]}.items() if v is not None})
    return MergeResult(str(paths.merged), str(paths.report("merge")), merge_base, stats.dtype, report["bytes_on_disk"],
                       stats.worst_rel_error, checked["max_abs_logit_diff"], checked["logit_tolerance"],
                       checked["max_abs_logit_diff_trained"], checked["loss"], checked["loss_delta"],
                       checked["latency_ms_merged"], checked["latency_ms_base"])


def trained_quantization(cfg: Config, paths: Paths) -> "QuantizationSection | None":
    """The quantization the adapter trained under, as train recorded it with the adapter (quant type,
    double quant, the compute dtype it resolved to: a merge on another machine must round-trip the same
    way); None for a LoRA adapter on the full-precision base."""
    if not loading.uses_4bit(cfg, paths):
        return None
    meta = loading.adapter_meta(paths) or {}
    recorded = meta.get("quantization") or cfg.quantization.model_dump()
    return QuantizationSection(**{**recorded, "compute_dtype": meta.get("compute_dtype") or recorded["compute_dtype"]})


# Logits of a 16-bit merged model differ from the full-precision unmerged ones by the weights' rounding
# (each weight off by up to eps/2), compounded through the layers: measured 0.56-0.67 x eps x max|logit|
# in bf16 on the 2-layer test models (test_merge.py::test_a_bf16_merge_is_half_the_size_...). 8 leaves
# room for deeper models; a wrong merge (a dropped or mis-scaled update) moves logits by the adapter's
# whole effect, and the per-weight check catches it first anyway.
LOGIT_EPS_FACTOR = 8.0


def logit_tolerance(cfg: Config, dtype: "torch.dtype", scale: float) -> float:
    """``merge.tolerance`` (absolute, what an fp32 merge is held to), plus for a 16-bit output the rounding
    its weights carry: ``LOGIT_EPS_FACTOR`` x the dtype's eps x the logits' scale (max |logit|)."""
    import torch

    extra = 0.0 if dtype == torch.float32 else LOGIT_EPS_FACTOR * torch.finfo(dtype).eps * scale
    return cfg.merge.tolerance + extra


def _logit_check(cfg: Config, merged_bytes: int, dtype: "torch.dtype") -> bool:
    """merge.logit_check for the model just written (``streaming_merge.logit_check_runs``), against free RAM now."""
    import psutil
    import torch

    fp32_bytes = merged_bytes / torch.empty((), dtype=dtype).element_size() * 4
    return logit_check_runs(cfg.merge.logit_check, fp32_bytes, psutil.virtual_memory().available)


def _tokenizer_sizes(paths: Paths, base_dir: Path) -> list[int]:
    """Sizes of the tokenizer files where ``load_adapter_tokenizer`` reads them (saved with the adapter, else
    the base's): about what ``finish`` writes into the merged folder, counted in the space the merge needs."""
    folder = paths.adapter if (paths.adapter / "tokenizer_config.json").exists() else base_dir
    return [f.stat().st_size for f in loading.tokenizer_files(folder)]


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


def _check_logits(cfg: Config, paths: Paths, merged_dir: Path, tokenizer, rows: list[dict], merge_base: str,
                  dtype: "torch.dtype", *, qlora: bool) -> dict:
    """Merged (read back from disk, in fp32) vs unmerged logits on the same full-precision base, and vs the
    model as trained (``qlora``: the 4-bit base + adapter); the merged model's test loss; forward latency
    merged vs base."""
    import torch
    from transformers import AutoModelForCausalLM

    probe = _probe_batch(tokenizer, rows[:PROBE_ROWS], cfg.data.max_length)
    base = loading.load_model(cfg, paths, quantized=False)
    trained_logits = None
    if qlora:
        quantized = loading.load_model(cfg, paths, quantized=True)
        if merge_base == "dequantized":
            dequantize_into(base, quantized)  # before any forward on the 4-bit model
        # The model as trained and evaluated: 4-bit base + adapter.
        trained_logits = _logits(attach_adapter(quantized, paths, cfg.model.allow_pickle), probe)
        del quantized
    elif loading.compute_dtype(cfg) != base.dtype:  # LoRA trained in bf16: that is the trained model
        trained_logits = _logits(load_tuned(cfg, paths), probe)

    base = to_accelerator(base)
    latency_base = _latency_ms(base, probe)
    unmerged_logits = _logits(attach_adapter(base, paths, cfg.model.allow_pickle), probe)
    del base
    if trained_logits is None:  # plain LoRA in fp32: the unmerged model is the trained one
        trained_logits = unmerged_logits
    merged = to_accelerator(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32,
                                                                 use_safetensors=True))
    leftover = lora_modules(merged)
    if leftover:
        raise LoraflowError(f"merge: LoRA layers remain in the merged model ({', '.join(leftover[:3])}, ...)")
    merged_logits = _logits(merged, probe)
    diff = _max_abs_diff(merged_logits, unmerged_logits, probe["mask"])
    diff_trained = _max_abs_diff(merged_logits, trained_logits, probe["mask"])
    scale = float(unmerged_logits[probe["mask"].bool()].abs().max())
    allowed = logit_tolerance(cfg, dtype, scale)
    trained = f"{'4-bit base' if qlora else 'base'} + adapter in {str(loading.compute_dtype(cfg)).removeprefix('torch.')}"
    say(f"max |merged - unmerged| logit {diff:.3g} (allowed {allowed:.3g} for {str(dtype).removeprefix('torch.')} "
        f"weights, logits up to {scale:.3g}); vs the model as trained ({trained}, read back here in float32) "
        f"{diff_trained:.3g}")
    if not diff <= allowed:  # NaN fails too
        raise LoraflowError(
            f"merge: merged and unmerged logits differ by {diff:.3g} > {allowed:.3g} (merge.tolerance "
            f"{cfg.merge.tolerance:g}, dtype-aware); the merged model does not compute what the adapter does. "
            "Check the adapter, or raise merge.tolerance"
        )
    latency_merged = _latency_ms(merged, probe)
    loss, _ = completion_loss(merged, tokenizer, rows, cfg.eval.batch_size, cfg.data.max_length, desc="merged loss")
    loss = loss if loss == loss else None  # NaN: nothing supervised
    tuned_loss = _tuned_loss(paths)
    loss_delta = loss - tuned_loss if loss is not None and tuned_loss is not None else None
    delta = f"{loss_delta:+.4f}" if loss_delta is not None else "n/a (run evaluate first)"
    shown = f"{loss:.4f}" if loss is not None else "n/a (no supervised token)"
    say(f"merged test loss {shown}, vs tuned {delta}; forward {latency_merged:.1f} ms merged, "
        f"{latency_base:.1f} ms base")
    return {"max_abs_logit_diff": diff, "logit_tolerance": allowed, "logit_scale": scale,
            "max_abs_logit_diff_trained": diff_trained, "loss": loss, "loss_delta": loss_delta,
            "latency_ms_merged": latency_merged, "latency_ms_base": latency_base}


def lora_modules(model: "torch.nn.Module") -> list[str]:
    """Names of modules that are still PEFT tuner layers or LoRA sub-modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer) or "lora_" in name]


def _probe_batch(tokenizer, rows: list[dict], max_length: int) -> dict:
    """A right-padded batch of test examples (prompt + completion + EOS), encoded as in training."""
    import torch

    encoded = [encode_example(tokenizer, r["prompt"], r["completion"], max_length)[0] for r in rows]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "mask": mask}


def _logits(model, probe: dict) -> "torch.Tensor":
    import torch

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = model(input_ids=probe["input_ids"].to(device), attention_mask=probe["mask"].to(device))
    return out.logits.float().cpu()


def _max_abs_diff(a: "torch.Tensor", b: "torch.Tensor", mask: "torch.Tensor") -> float:
    """Largest |a - b| over real (unpadded) positions and the whole vocabulary."""
    return float((a - b).abs()[mask.bool()].max())


def _latency_ms(model, probe: dict) -> float:
    """Median wall time of one forward on the probe batch, after a warm-up forward."""
    import torch

    device = next(model.parameters()).device
    kwargs = {"input_ids": probe["input_ids"].to(device), "attention_mask": probe["mask"].to(device)}
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(LATENCY_REPEATS + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(**kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _tuned_loss(paths: Paths) -> float | None:
    path = paths.report("evaluate")
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("tuned", {}).get("loss")
    except (json.JSONDecodeError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None
