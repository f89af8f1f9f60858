"""Peak memory of full fine-tuning vs LoRA vs QLoRA on a ~200M-parameter model (run by hand, not by the suite)

    .venv/bin/python bench/memory_methods.py                 # 3 repeats, 3 steps, batch 4 x 128 tokens
    .venv/bin/python bench/memory_methods.py --repeats 1 --steps 2

A random-init Llama of ~200M parameters is built from a config (nothing downloaded) and saved as fp32
safetensors in a temporary folder. Each method then runs in its own fresh process, through the train
stage's own code: ``loraflow.model.loading.load_model`` (fp32, or NF4 + double quant for QLoRA, which drops
the checkpoint's mapping after quantizing: docs/traps.md §5) and ``loraflow.train.lora.attach_lora``, then a few
steps of fused AdamW on random tokens (``bench/plan_memory.py``'s child does the measuring: the peak RSS
above the process after its imports from VmHWM, and the peaks of RssAnon and RssFile, sampled every
2 ms by a thread). The methods alternate within each repeat; the table shows medians. Next to each:
``loraflow plan``'s estimate for the same shapes on this CPU (fp32 compute).

Also per method: CPU seconds (user + system) and wall seconds per step after the first (the machine is
shared: CPU time is the steadier, docs/traps.md §8), and glibc's heap at the end of the last forward (``mallinfo2``:
bytes in use and bytes free inside the heap, which stay in RSS once touched; above the process after loading).

Goals (issue 8, goal 4): QLoRA's peak RSS at least 0.5 GB below LoRA's; LoRA's at least 1.9x below
full fine-tuning's. Writes ``bench/results/memory_methods-DATE-cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import plan_memory as pm  # noqa: E402  (the measuring child and the planner's estimate)

MB = 1e6
MIB = 2**20
# ~200M parameters: 12 layers of 1024 wide, SwiGLU 2816, 24k vocabulary, untied head:
# 12 x (4 x 1024^2 + 3 x 1024 x 2816) + 2 x 24,000 x 1024 + norms = 203.4M.
LLAMA_200M = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=24000, max_position_embeddings=1024, tie_word_embeddings=False)


def build(where: Path) -> Path:
    """The random-init ~200M Llama, saved as fp32 safetensors (what the train stage loads)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **LLAMA_200M))
    model.save_pretrained(where, safe_serialization=True)
    return where


METHODS = pm.METHODS


def _per_step(runs: list[dict], key: str) -> float | None:
    """Median over the runs of each run's median per step after the first (its warm-up)."""
    per_run = []
    for r in runs:
        if key == "cpu":
            steps = [u + y for u, y in zip(r["step_cpu_user"], r["step_cpu_sys"])][1:]
        else:
            steps = r["step_seconds"][1:]
        if steps:
            per_run.append(statistics.median(steps))
    return round(statistics.median(per_run), 2) if per_run else None


def summarise(results: dict) -> list[dict]:
    rows = []
    for method, runs in results["runs"].items():
        est = results["estimates"][method]
        med = {k: statistics.median(r[k] for r in runs) for k in ("peak_rss_delta", "peak_anon_delta", "peak_file_delta")}
        rows.append({
            "method": method,
            "peak_rss_mb": round(med["peak_rss_delta"] / MB, 1),
            "peak_rss_range_mb": [round(min(r["peak_rss_delta"] for r in runs) / MB, 1),
                                  round(max(r["peak_rss_delta"] for r in runs) / MB, 1)],
            "peak_anon_mb": round(med["peak_anon_delta"] / MB, 1),
            "peak_file_mb": round(med["peak_file_delta"] / MB, 1),
            "plan_mb": round(est["rss_estimate"] / MB, 1),
            "plan_live_mb": round(est["live"] / MB, 1),
            "plan_allocator_mb": round(est["allocator"] / MB, 1),
            "plan_load_peak_mb": round(est["load_peak"] / MB, 1),
            "load_peak_rss_mb": round(statistics.median(r["phase_peak_rss_delta"]["load"] for r in runs) / MB, 1),
            "plan_error": round(est["rss_estimate"] / med["peak_rss_delta"] - 1, 3),
            "trainable": runs[0]["trainable"],
            # glibc's heap at the end of the last forward (above the process after loading): in use, and free
            # but still in RSS (the holes), median over the runs
            **{f"last_forward_{k}_mb": round(statistics.median(r["after_forward_heap"][-1][k] for r in runs) / MB, 1)
               for k in ("heap_in_use", "heap_free", "mmapped") if all((r.get("after_forward_heap") or [None])[-1] for r in runs)},
            "step_cpu_s": _per_step(runs, "cpu"),
            "step_wall_s": _per_step(runs, "wall"),
            "runs": len(runs),
        })
    by = {r["method"]: r for r in rows}
    goals: dict = {"qlora_below_lora_goal_mb": 500.0, "full_over_lora_goal": 1.9}
    if {"lora", "qlora"} <= by.keys():
        goals["qlora_below_lora_mb"] = round(by["lora"]["peak_rss_mb"] - by["qlora"]["peak_rss_mb"], 1)
    if {"full", "lora"} <= by.keys():
        goals["full_over_lora"] = round(by["full"]["peak_rss_mb"] / by["lora"]["peak_rss_mb"], 2)
    results["goals"] = goals
    return rows


def show(rows: list[dict], results: dict) -> str:
    g = results["goals"]
    lines = [f"{results['machine']}; {results['date']}; {results['params'] / 1e6:.1f}M-parameter Llama, batch "
             f"{results['batch']} x seq {results['seq']}, {results['steps']} steps, fp32 compute, LoRA r={pm.LORA['r']} "
             f"on {pm.LORA['target_modules']}, median of {results['repeats']}; `{results['command']}`", "",
             "| method | peak RSS (MB) | its anonymous | its file-backed | load's peak RSS | plan (MB) | plan error "
             "| CPU s / step | wall s / step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['peak_rss_mb']:,.0f} | {r['peak_anon_mb']:,.0f} | {r['peak_file_mb']:,.0f} | "
                     f"{r['load_peak_rss_mb']:,.0f} | {r['plan_mb']:,.0f} | {r['plan_error']:+.0%} | "
                     f"{r.get('step_cpu_s') or float('nan'):.2f} | {r.get('step_wall_s') or float('nan'):.2f} |")
    lines.append("")
    if "qlora_below_lora_mb" in g:
        lines.append(f"QLoRA below LoRA: {g['qlora_below_lora_mb']:,.0f} MB (goal >= 500)")
    if "full_over_lora" in g:
        lines.append(f"full / LoRA: {g['full_over_lora']:.2f}x (goal >= 1.9x)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--from", dest="source", default=None, help="re-estimate a saved result (no measuring)")
    args = ap.parse_args()
    if args.source:
        results = json.loads(Path(args.source).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(results["model_config"]))
            _estimate(results, Path(tmp))
        return _finish(results)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    results: dict = {"machine": pm._machine(), "date": date, "command": " ".join(["python", *sys.argv]),
                     "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads,
                     "repeats": args.repeats, "lora": pm.LORA, "config": LLAMA_200M, "runs": {}, "estimates": {}}
    with tempfile.TemporaryDirectory(prefix="memory-methods-") as tmp:
        model = build(Path(tmp) / "llama-200m")
        results["model_config"] = json.loads((model / "config.json").read_text())
        _estimate(results, model)
        methods = args.methods.split(",")
        for rep in range(args.repeats):  # alternate the methods within each repeat (docs/traps.md §8)
            order = methods if rep % 2 == 0 else methods[::-1]
            for method in order:
                r = pm.run_case(model, method, "glibc", args)
                results["runs"].setdefault(method, []).append(r)
                print(f"[{rep + 1}/{args.repeats}] {method}: peak RSS +{r['peak_rss_delta'] / MB:,.0f} MB "
                      f"(anon {r['peak_anon_delta'] / MB:,.0f}, file {r['peak_file_delta'] / MB:,.0f}), "
                      f"{r['seconds']} s", file=sys.stderr, flush=True)
    return _finish(results)


def _estimate(results: dict, model: Path) -> None:
    for method in pm.METHODS:
        results["estimates"][method] = pm.estimate(str(model), method, results["batch"], results["seq"])
        results["params"] = results["estimates"][method]["params"]


def _finish(results: dict) -> int:
    date = results["date"]
    rows = summarise(results)
    results["table"] = rows
    print(show(rows, results))
    out = ROOT / "bench" / "results" / f"memory_methods-{date}-cpu.json"
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"\nwrote {out.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
