"""merge: fold the adapter into a full-precision base, check it, measure it, save it.

    loraflow stage merge               # what dvc.yaml calls; outputs/merged/, reports/merge.json
    loraflow stage merge -s merge.base=original

Never into 4-bit weights: that re-quantizes the sum, 0.13-0.24 relative logit error (docs/traps.md §2).
A QLoRA adapter was trained against the NF4 base, so by default (``merge.base: dequantized``) the
4-bit base is loaded exactly as training loaded it and every ``Linear4bit`` is dequantized into
an fp32 copy of the model, before any forward touches it (docs/traps.md §1); merging there gives a
model that computes what was trained and evaluated (|Δlogit| ~1e-7 here). ``original`` merges
into the original fp32 weights instead, which differs from the trained model by the base's own
quantization error. A plain LoRA adapter was trained on the full-precision base: both mean that.

Checks: merged vs unmerged logits within ``merge.tolerance``, no LoRA layer left; the merged
model's test loss is measured (the registered model is a measured model) and compared with the
tuned loss from evaluate; forward latency merged vs base shows there is no runtime tax.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraflow.core.atomic import atomic_dir, write_json
from loraflow.core.config import Config
from loraflow.core.errors import DataError, LoraflowError
from loraflow.core.messages import say, stage
from loraflow.core.paths import Paths
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
    max_abs_logit_diff: float  # merged vs unmerged on the same fp32 base
    max_abs_logit_diff_trained: float  # merged vs the model as trained (4-bit + adapter for QLoRA)
    loss: float | None
    loss_delta: float | None  # merged loss - tuned loss from reports/evaluate.json
    latency_ms_merged: float
    latency_ms_base: float


def run(cfg: Config, paths: Paths, tracker: Tracker = NullTracker()) -> MergeResult:
    """Merge ``outputs/adapter`` into a full-precision base; write ``outputs/merged`` and ``reports/merge.json``."""
    stage("merge")
    require_adapter(paths)
    rows = load_split(paths, "test")
    if not rows:
        raise DataError(f"{paths.split('test')}: the test split is empty; the merged model must be measured on one")
    tokenizer = load_adapter_tokenizer(cfg, paths)
    probe = _probe_batch(tokenizer, rows[:PROBE_ROWS], cfg.data.max_length)
    qlora = loading.uses_4bit(cfg, paths)
    merge_base = cfg.merge.base if qlora else "original"

    base = loading.load_model(cfg, paths, quantized=False)
    trained_logits = None
    if qlora:
        quantized = loading.load_model(cfg, paths, quantized=True)
        if merge_base == "dequantized":
            n = dequantize_into(base, quantized)  # before any forward on the 4-bit model
            say(f"dequantized {n} NF4 layers to fp32")
        # The model as trained and evaluated: 4-bit base + adapter.
        trained_logits = _logits(attach_adapter(quantized, paths, cfg.model.allow_pickle), probe)
        del quantized
    elif loading.compute_dtype(cfg) != base.dtype:  # LoRA trained in bf16 (GPU): that is the trained model
        trained_logits = _logits(load_tuned(cfg, paths), probe)

    base = to_accelerator(base)
    latency_base = _latency_ms(base, probe)
    model = attach_adapter(base, paths, cfg.model.allow_pickle)
    unmerged_logits = _logits(model, probe)
    if trained_logits is None:  # plain LoRA in fp32: the unmerged model is the trained one
        trained_logits = unmerged_logits
    merged = model.merge_and_unload()
    leftover = lora_modules(merged)
    if leftover:
        raise LoraflowError(f"merge: LoRA layers remain after merge_and_unload ({', '.join(leftover[:3])}, ...)")
    merged_logits = _logits(merged, probe)
    diff = _max_abs_diff(merged_logits, unmerged_logits, probe["mask"])
    diff_trained = _max_abs_diff(merged_logits, trained_logits, probe["mask"])
    say(f"max |merged - unmerged| logit {diff:.3g}; vs trained model {diff_trained:.3g}")
    if not diff <= cfg.merge.tolerance:  # NaN fails too
        raise LoraflowError(
            f"merge: merged and unmerged logits differ by {diff:.3g} > merge.tolerance {cfg.merge.tolerance:g}; "
            "the merged model does not compute what the adapter does. Check the adapter, or raise merge.tolerance"
        )
    latency_merged = _latency_ms(merged, probe)

    loss, _ = completion_loss(merged, tokenizer, rows, cfg.eval.batch_size, cfg.data.max_length, desc="merged loss")
    loss = loss if loss == loss else None  # NaN: nothing supervised
    tuned_loss = _tuned_loss(paths)
    loss_delta = loss - tuned_loss if loss is not None and tuned_loss is not None else None

    _save(merged, tokenizer, paths)
    report = {
        "merge_base": merge_base,
        "max_abs_logit_diff": diff,
        "max_abs_logit_diff_trained": diff_trained,
        "loss": loss,
        "loss_delta": loss_delta,
        "latency_ms_merged": latency_merged,
        "latency_ms_base": latency_base,
    }
    write_json(paths.report("merge"), report)
    tracker.log_metrics(
        {"merge_max_abs_logit_diff": diff, "merge_max_abs_logit_diff_trained": diff_trained}
        | ({"merge_loss": loss} if loss is not None else {})
    )
    delta = f"{loss_delta:+.4f}" if loss_delta is not None else "n/a (run evaluate first)"
    say(f"merged test loss {loss}, vs tuned {delta}; forward {latency_merged:.1f} ms merged, "
          f"{latency_base:.1f} ms base")
    return MergeResult(str(paths.merged), str(paths.report("merge")), merge_base, diff, diff_trained, loss,
                       loss_delta, latency_merged, latency_base)


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


def _save(merged, tokenizer, paths: Paths) -> None:
    """safetensors + config + tokenizer, all or nothing; a full-precision config with no quantization_config."""
    if getattr(merged.config, "quantization_config", None) is not None:  # never ship a 4-bit recipe
        del merged.config.quantization_config
    with atomic_dir(paths.merged) as tmp:
        merged.save_pretrained(tmp)  # transformers 5 always writes safetensors
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        if "quantization_config" in config:
            raise LoraflowError(f"merge: {tmp}/config.json still has a quantization_config; not saving it")
