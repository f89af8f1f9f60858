"""evaluate: base vs tuned on the test split — loss, perplexity, exact match, token F1.

    loraflow stage evaluate            # what dvc.yaml calls; reports/evaluate.json, reports/samples.jsonl

One model in memory: the base loaded the way it was trained (4-bit NF4 for QLoRA, the CPU repack
disabled, docs/traps.md §1) with the adapter attached; "base" is that model with the adapter disabled.
Loss is token-weighted over the whole test split, with the training convention (completion + EOS
scored, prompt masked). Exact match and token F1 are means over greedy generations of the first
``eval.num_samples`` test records (0 = all), from the prompts exactly as prepared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraflow.core.atomic import write_json, write_jsonl
from loraflow.core.config import Config
from loraflow.core.errors import DataError
from loraflow.core.messages import say, stage
from loraflow.core.paths import Paths
from loraflow.data.splits import load_split
from loraflow.data.textmetrics import exact_match, mean, token_f1
from loraflow.model.adapters import load_adapter_tokenizer, load_tuned, require_adapter
from loraflow.model.generation import completion_loss, greedy_generate
from loraflow.track.tracking import NullTracker, Tracker, loss_figure

LOSS_METRICS = ("loss", "perplexity")
SAMPLES_TABLE = "eval/samples.json"  # MLflow table artifact of reports/samples.jsonl
LOSS_PLOT = "plots/train_loss.png"
TEXT_METRICS = ("exact_match", "token_f1")


@dataclass
class EvaluateResult:
    base: dict[str, float | None]
    tuned: dict[str, float | None]
    num_samples: int  # generated samples behind exact_match / token_f1
    loss_tokens: int  # supervised test tokens behind loss / perplexity
    report: str
    samples: str


def run(cfg: Config, paths: Paths, tracker: Tracker = NullTracker()) -> EvaluateResult:
    """Evaluate base and tuned on the test split; write the reports; log ``eval_*`` and ``base_eval_*``."""
    stage("evaluate")
    require_adapter(paths)
    rows = load_split(paths, "test")
    if not rows:
        raise DataError(f"{paths.split('test')}: the test split is empty; raise data.test_fraction or add records")
    wanted = set(cfg.eval.metrics)
    n = len(rows) if cfg.eval.num_samples == 0 else min(cfg.eval.num_samples, len(rows))
    samples = rows[:n] if wanted & set(TEXT_METRICS) else []

    tokenizer = load_adapter_tokenizer(cfg, paths)
    model = load_tuned(cfg, paths)

    with model.disable_adapter():
        base, base_outputs, loss_tokens = _measure(cfg, model, tokenizer, rows, samples, wanted, "base")
    tuned, tuned_outputs, _ = _measure(cfg, model, tokenizer, rows, samples, wanted, "tuned")

    report = {"base": base, "tuned": tuned, "num_samples": len(samples), "loss_tokens": loss_tokens}
    write_json(paths.report("evaluate"), report)
    write_jsonl(
        paths.samples,
        [
            {"id": r["id"], "prompt": r["prompt"], "reference": r["completion"], "base_output": b, "tuned_output": t}
            for r, b, t in zip(samples, base_outputs, tuned_outputs)
        ],
    )
    metrics = {f"eval_{k}": v for k, v in tuned.items()} | {f"base_eval_{k}": v for k, v in base.items()}
    tracker.log_metrics({k: v for k, v in metrics.items() if v is not None})
    if samples:  # the UI's evaluation view (Artifacts, "Evaluation" tab) compares rows across runs
        refs = [r["completion"] for r in samples]
        tracker.log_table({
            "id": [r["id"] for r in samples], "prompt": [r["prompt"] for r in samples], "reference": refs,
            "base_output": base_outputs, "tuned_output": tuned_outputs,
            "tuned_exact_match": [exact_match(p, r) for p, r in zip(tuned_outputs, refs)],
            "tuned_token_f1": [round(token_f1(p, r), 4) for p, r in zip(tuned_outputs, refs)],
        }, SAMPLES_TABLE)
    figure = loss_figure(paths.train_log)  # training is over: its loss curve as an image in the run
    if figure is not None:
        tracker.log_figure(figure, LOSS_PLOT)
    for name in cfg.eval.metrics:
        say(f"{name:12s} base {_fmt(base.get(name))}  tuned {_fmt(tuned.get(name))}")
    return EvaluateResult(base, tuned, len(samples), loss_tokens, str(paths.report("evaluate")), str(paths.samples))


def _measure(cfg: Config, model, tokenizer, rows, samples, wanted, who: str):
    out: dict[str, float | None] = {}
    loss_tokens = 0
    if wanted & set(LOSS_METRICS):
        loss, loss_tokens = completion_loss(
            model, tokenizer, rows, cfg.eval.batch_size, cfg.data.max_length, desc=f"{who} loss"
        )
        if "loss" in wanted:
            out["loss"] = _finite(loss)
        if "perplexity" in wanted:
            out["perplexity"] = _finite(math.exp(loss) if loss < 700 else math.inf)
    outputs: list[str] = []
    if samples:
        outputs = greedy_generate(
            model, tokenizer, [r["prompt"] for r in samples], cfg.eval.max_new_tokens, cfg.eval.batch_size,
            desc=f"{who} generate",
        )
        refs = [r["completion"] for r in samples]
        if "exact_match" in wanted:
            out["exact_match"] = mean([exact_match(p, r) for p, r in zip(outputs, refs)])
        if "token_f1" in wanted:
            out["token_f1"] = mean([token_f1(p, r) for p, r in zip(outputs, refs)])
    return out, outputs, loss_tokens


def _finite(x: float) -> float | None:
    """JSON (and DVC's metrics) have no NaN or infinity: a non-finite value is reported as null."""
    return x if math.isfinite(x) else None


def _fmt(v: float | None) -> str:
    return f"{v:10.4f}" if v is not None else "       n/a"
