"""Training throughput: loraflow's train stage vs the plain QLoRA script a user would write.

    .venv/bin/python bench/train_throughput.py [--reps 3] [--records 1000] [--batch-size 8] [--grouped]
                                                [--hidden 256 --layers 6]
                                                [--baseline-dtype bfloat16|float32] [--work /tmp/lf-bench]

Same model (a random-init ~5M-parameter Llama with the embedded base's tokenizer; nothing is
downloaded), same data (``--records`` alpaca records of log-normal length, prepared once by loraflow),
same knobs (QLoRA NF4 + double quant, r=16, alpha=32, q/v, batch 8, one epoch, lr 1e-3, max_length
256) and so the same supervised tokens. Each run is a fresh process; the two sides alternate, and
the table shows medians (this machine has minutes-long slow spells: docs/traps.md §8). Throughput is
supervised (answer + EOS) tokens per second of ``trainer.train``; model loading is not counted.
``--hidden``/``--layers`` size the model (intermediate 4x hidden, heads of 32): a bigger
one spends more of each step on its tokens and less on per-step costs.
``--grouped`` adds a third side: loraflow with ``train.batching=group_by_length`` (the padded,
length-grouped batches ``auto`` replaces with padding-free ones where the model passes the check).
Writes ``bench/results/train_throughput-<date>-<device>-<baseline dtype>-b<batch>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KNOBS = {"r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"], "batch_size": 8, "learning_rate": 1e-3,
         "max_length": 256, "seed": 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--work", default="/tmp/loraflow-bench-throughput")
    ap.add_argument("--baseline-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the baseline's bnb_4bit_compute_dtype (tutorials: bfloat16; on a CPU without AVX512-BF16 "
                         "it was 15x slower than float32 in a first smoke run here, so compare against float32 too)")
    ap.add_argument("--batch-size", type=int, default=KNOBS["batch_size"], help="train.batch_size of both sides")
    ap.add_argument("--grouped", action="store_true", help="also run loraflow with train.batching=group_by_length")
    ap.add_argument("--hidden", type=int, default=256, help="the model's hidden size (default: the ~5M model)")
    ap.add_argument("--layers", type=int, default=6, help="the model's decoder layers")
    ap.add_argument("--one", choices=["ours", "baseline", "grouped"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    KNOBS["batch_size"] = args.batch_size
    if args.one:
        KNOBS["compute_dtype"] = args.baseline_dtype
        print(json.dumps(_run_one(args.one, work)))
        return 0

    _setup(work, args.records, args.hidden, args.layers)
    sides = ["baseline", "ours"] + (["grouped"] if args.grouped else [])
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for rep in range(args.reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        for side in order:
            out = subprocess.run([sys.executable, __file__, "--one", side, "--work", str(work),
                                  "--baseline-dtype", args.baseline_dtype, "--batch-size", str(args.batch_size)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[side].append(result)
            print(f"rep {rep + 1} {side:8s} {result['supervised_tokens'] / result['seconds']:8.1f} supervised tok/s "
                  f"({result['seconds']:.1f} s, {result['steps']} steps, final loss {result['final_loss']:.3f})",
                  file=sys.stderr, flush=True)
    _report(runs, args)
    return 0


def _setup(work: Path, records: int, hidden: int = 256, layers: int = 6) -> None:
    """The bench model and data, built once; loraflow's prepare stage writes the train split both sides read."""
    import loraflow.tasks.prepare
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraflow.core.config import load_config
    from loraflow.core.paths import Paths
    from loraflow.model.embedded import ensure_base

    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(ensure_base(ROOT / "models" / "base"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32,
                         num_key_value_heads=hidden // 32, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    params = sum(p.numel() for p in model.parameters())

    # Log-normal lengths, as real instruction data has: most records short, a long tail.
    words = " ".join((ROOT / "loraflow" / "corpus" / "facts.txt").read_text(encoding="utf-8").split()).split()
    rng = random.Random(0)

    def text(median: float, sigma: float) -> str:
        n = max(1, min(150, int(rng.lognormvariate(math.log(median), sigma))))
        start = rng.randrange(len(words) - n)
        return " ".join(words[start : start + n])

    rows = [{"instruction": text(12, 0.8), "input": "", "output": text(25, 1.0)} for _ in range(records)]
    (work / "data" / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(ROOT / "params.yaml", _overrides(work))
    loraflow.tasks.prepare.run(cfg, Paths.at(work))
    (work / "bench.json").write_text(json.dumps({"model_params": params, "records": records}), encoding="utf-8")


def _overrides(work: Path, side: str = "ours") -> list[str]:
    return [
        f"model.base={work / 'model'}", f"data.path={work / 'data' / 'bench.jsonl'}", "data.format=alpaca",
        f"data.max_length={KNOBS['max_length']}", "data.val_fraction=0.02", "data.test_fraction=0.02",
        "method=qlora", f"lora.r={KNOBS['r']}", f"lora.alpha={KNOBS['alpha']}", "lora.dropout=0.0",
        "lora.target_modules=attention-qv", "train.epochs=1", f"train.batch_size={KNOBS['batch_size']}",
        f"train.learning_rate={KNOBS['learning_rate']}", "train.save_steps=100000", "train.logging_steps=10",
        f"train.seed={KNOBS['seed']}",
    ] + (["train.batching=group_by_length"] if side == "grouped" else [])


def _run_one(side: str, work: Path) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from loraflow.core.config import load_config
    from loraflow.core.paths import Paths
    from loraflow.data.splits import load_split

    paths = Paths.at(work)
    rows = load_split(paths, "train")
    if side == "baseline":
        from bench.baseline_qlora import train

        return train(str(work / "model"), rows, KNOBS, str(work / "baseline-out"))

    import time

    import loraflow.tasks.train
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

    shutil.rmtree(work / "outputs", ignore_errors=True)  # never resume from the previous rep's checkpoint
    clock = Clock()
    cfg = load_config(ROOT / "params.yaml", _overrides(work, side))
    result = loraflow.tasks.train.run(cfg, paths, callbacks=[clock])
    report = json.loads(paths.report("train").read_text(encoding="utf-8"))
    return {"seconds": clock.seconds, "supervised_tokens": result.supervised_tokens, "steps": result.steps,
            "final_loss": result.train_loss if result.train_loss is not None else float("nan"),
            "batching": report.get("batching"), "compute_dtype": str(modeling_dtype(cfg))}


def modeling_dtype(cfg):
    from loraflow.model.loading import compute_dtype

    return compute_dtype(cfg)


def _report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    import platform

    import torch

    def rate(side: str) -> float:
        return statistics.median(r["supervised_tokens"] / r["seconds"] for r in runs[side])

    rates = {side: rate(side) for side in runs}
    base = rates["baseline"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = json.loads((Path(args.work) / "bench.json").read_text(encoding="utf-8"))
    native_bf16 = _native_bf16()
    print(f"\ntraining throughput, median of {args.reps} alternating runs ({device}, {os.cpu_count()} cores, native "
          f"bf16: {native_bf16}, {info['model_params']:,}-param Llama, {info['records']} records, batch "
          f"{KNOBS['batch_size']}, baseline compute {args.baseline_dtype})")
    print(f"{'':10s} {'supervised tok/s':>17s} {'final loss':>11s} {'ratio':>6s}  batching / compute")
    names = {"baseline": "baseline", "ours": "loraflow", "grouped": "grouped"}
    for side, r in rates.items():
        loss = statistics.median(x["final_loss"] for x in runs[side])
        how = "" if side == "baseline" else f"  {runs[side][0].get('batching')} / {runs[side][0].get('compute_dtype')}"
        print(f"{names[side]:10s} {r:17.1f} {loss:11.3f} {r / base:6.2f}x{how}")
    padded = [r for r in runs["baseline"] if r.get("computed_tokens")]
    ceiling = None
    if padded:  # what the baseline's padded batches cost in tokens: the most that removing padding can win
        ceiling = statistics.median(r["computed_tokens"] / r["tokens"] for r in padded)
        print(f"baseline batches computed {padded[0]['computed_tokens']:,} tokens for {padded[0]['tokens']:,} real ones "
              f"({1 - 1 / ceiling:.0%} padding): dropping all padding is worth at most {ceiling:.2f}x")
    out = (ROOT / "bench" / "results" /
           f"train_throughput-{datetime.date.today()}-{device}-{args.baseline_dtype}-b{KNOBS['batch_size']}"
           f"{'' if (args.hidden, args.layers) == (256, 6) else f'-h{args.hidden}x{args.layers}'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": str(datetime.date.today()), "device": device, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "cpu_native_bf16": native_bf16, "torch": torch.__version__, "knobs": KNOBS, **info,
        "hidden": args.hidden, "layers": args.layers,
        "baseline_compute_dtype": args.baseline_dtype, "reps": args.reps,
        "runs": runs, "median_supervised_tok_s": {names[k]: v for k, v in rates.items()},
        "ratio": rates["ours"] / base,
        "baseline_padding_ceiling": ceiling,
        **({"ratio_grouped": rates["grouped"] / base} if "grouped" in rates else {}),
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")


def _native_bf16() -> bool:
    from loraflow.model.loading import cpu_has_native_bf16

    return cpu_has_native_bf16()


if __name__ == "__main__":
    raise SystemExit(main())
