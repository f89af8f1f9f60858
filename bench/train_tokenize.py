"""Train's tokenization: ``sft.tokenize`` (batched) vs TRL's own per-row preparation of the same rows.

    .venv/bin/python bench/train_tokenize.py [--records 50000] [--tokenizer embedded|gpt2]
                                             [--work /tmp/loraflow-bench-prepare]

Data: the synthetic alpaca records of ``bench/prepare_throughput.py`` (same generator, same ``--work``), run
through ``loraflow.tasks.prepare`` once (untimed); the train split's rows are what both sides tokenize. Sides, in
this one process, one after the other (the machine may be shared: run it idle):

- ``trl``: ``trl.SFTTrainer`` built on ``sft.to_dataset(rows)`` as train did before issue 16: TRL appends EOS,
  tokenizes each row twice (prompt, prompt + completion), builds labels, truncates and filters, one row at a time
  through ``datasets.map``; timed is the trainer's construction;
- ``loraflow``: ``sft.tokenize(tokenizer, rows, max_length)``, what ``build_trainer`` hands TRL now
  (``skip_prepare_dataset``).

Checks that both give the same ids, input_ids and labels, and writes
``bench/results/train_tokenize-<date>-cpu-<records>.json`` with rows/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as `loraflow stage train` runs it
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench.prepare_throughput import _setup


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--tokenizer", default="embedded", choices=["embedded", "gpt2"])
    ap.add_argument("--work", default="/tmp/loraflow-bench-prepare")
    args = ap.parse_args()
    work = Path(args.work)
    data = _setup(work, args.records)
    rows, cfg, tokenizer = _prepared_rows(work, data, args.tokenizer)
    print(f"{len(rows):,} train rows, max_length {cfg.data.max_length}", file=sys.stderr)

    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from loraflow.core.atomic import write_json
    from loraflow.train import sft

    datasets.disable_progress_bars()
    datasets.disable_caching()
    model = AutoModelForCausalLM.from_pretrained(ROOT / "models" / "base")
    t = time.perf_counter()
    reference = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(work / "trl-out"), completion_only_loss=True, max_length=cfg.data.max_length,
                       report_to="none", use_cpu=True),
        train_dataset=sft.to_dataset(rows), processing_class=tokenizer,
    ).train_dataset
    trl_s = time.perf_counter() - t
    t = time.perf_counter()
    ours = sft.tokenize(tokenizer, rows, cfg.data.max_length)
    ours_s = time.perf_counter() - t
    same = (ours["id"] == reference["id"] and ours["input_ids"] == reference["input_ids"]
            and ours["labels"] == reference["labels"])
    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "tokenizer": args.tokenizer, "rows": len(rows), "max_length": cfg.data.max_length,
        "trl_seconds": round(trl_s, 2), "trl_rows_per_s": round(len(rows) / trl_s),
        "loraflow_seconds": round(ours_s, 2), "loraflow_rows_per_s": round(len(rows) / ours_s),
        "speedup": round(trl_s / ours_s, 2), "identical": same,
    }
    out = ROOT / "bench" / "results" / f"train_tokenize-{result['date']}-cpu-{args.records}.json"
    write_json(out, result)
    print(f"TRL per row: {result['trl_rows_per_s']:,} rows/s ({trl_s:.1f} s)   sft.tokenize: "
          f"{result['loraflow_rows_per_s']:,} rows/s ({ours_s:.1f} s)   x{result['speedup']}   identical: {same}")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0 if same else 1


def _prepared_rows(work: Path, data: Path, tok: str):
    from loraflow.tasks import prepare

    from loraflow.core.config import load_config
    from loraflow.core.paths import Paths
    from loraflow.data.splits import load_split
    from loraflow.model.loading import load_tokenizer

    root = work / f"project-train-tokenize-{tok}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "data" / "raw").mkdir(parents=True)
    os.link(data, root / "data" / "raw" / "x.jsonl")
    base = ROOT / "models" / "base" if tok == "embedded" else work / "gpt2-tokenizer"
    cfg = load_config(None, [f"model.base={base}", "data.path=data/raw/x.jsonl"])
    paths = Paths.at(root)
    prepare.run(cfg, paths)
    return load_split(paths, "train"), cfg, load_tokenizer(cfg, paths)


if __name__ == "__main__":
    sys.exit(main())
