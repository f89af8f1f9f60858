"""Prepare throughput: the streaming, batch-tokenizing prepare vs the read-everything-first path it replaced.

    .venv/bin/python bench/prepare_throughput.py [--records 300000] [--reps 1] [--sides old,new]
                                                 [--tokenizers embedded,gpt2] [--work /tmp/loraflow-bench-prepare]

Data: ``--records`` synthetic alpaca records (default 300,000; ``--records 1000000`` for a million), words drawn
from the embedded corpus, ~550 bytes a record (165 MB for 300k, like the alpaca-sized file the issue measured),
40% with an input, 1% exact duplicates; written once per size into ``--work`` and reused.

Tokenizers (nothing is downloaded):

- ``embedded``: the embedded base's (``models/base``, built on first use like ``make run`` does): byte-level BPE,
  1,024 tokens, one token per digit;
- ``gpt2``: a GPT-2-style byte-level BPE (vocab 8,192) trained here on the first 20,000 generated records.

Sides, each in a fresh process, alternating (the machine may be shared: medians), config defaults
(``max_length`` 256), ``TOKENIZERS_PARALLELISM=false`` as ``loraflow stage prepare`` sets it:

- ``old``: the prepare before streaming, kept here verbatim in its algorithm (``_old_prepare``): read and render
  every record into memory, then ``tokenizer(texts, add_special_tokens=False)`` in batches of 512 over all
  prompts and all prompt + answer texts, then split and write;
- ``new``: ``loraflow.tasks.prepare.run``;
- ``encode`` (with ``--sides old,new,encode``): no prepare, the ceiling of any exact one: the tokenizer's Rust
  backend encoding each record's prompt + answer once, in batch calls of 2,048 on one thread (texts
  rendered beforehand, untimed). prepare must count every kept record's full text, so on one core it cannot beat this.

Reports records/s (wall), CPU seconds (user + sys, all threads) and the peak RSS of the process
(``resource.getrusage``, tokenizer loaded included; ``rss_before`` is the RSS with the tokenizer loaded, before
prepare), checks that both sides wrote the same dataset digest, and writes
``bench/results/prepare_throughput-<date>-cpu-<records>.json``. Goal: >= 10,000 records/s with the embedded tokenizer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL = 10_000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=300_000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--sides", default="old,new")
    ap.add_argument("--tokenizers", default="embedded,gpt2")
    ap.add_argument("--work", default="/tmp/loraflow-bench-prepare")
    ap.add_argument("--one", nargs=2, metavar=("SIDE", "TOKENIZER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.one:
        print(json.dumps(_run_one(*args.one, work, args.records)))
        return 0

    data = _setup(work, args.records)
    sides, toks = args.sides.split(","), args.tokenizers.split(",")
    runs: dict[str, dict[str, list[dict]]] = {t: {s: [] for s in sides} for t in toks}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    for rep in range(args.reps):
        for tok in toks:
            for side in sides if rep % 2 == 0 else sides[::-1]:
                out = subprocess.run([sys.executable, __file__, "--one", side, tok, "--work", str(work),
                                      "--records", str(args.records)], capture_output=True, text=True, cwd=ROOT, check=False,
                                     env=env)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs[tok][side].append(r)
                print(f"rep {rep + 1} {tok:8s} {side:4s} {r['records'] / r['seconds']:9.0f} records/s "
                      f"({r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, peak RSS {r['peak_rss_mb']:.0f} MB, "
                      f"digest {r['digest']})", file=sys.stderr, flush=True)
    _report(runs, args, data)
    return 0


def _report(runs: dict[str, dict[str, list[dict]]], args: argparse.Namespace, data: Path) -> None:
    size = data.stat().st_size
    print(f"\nprepare throughput, {args.records:,} alpaca records ({size / 1e6:.0f} MB), median of {args.reps} "
          f"({os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end)")
    print(f"{'tokenizer':9s} {'side':4s} {'records/s':>10s} {'wall s':>7s} {'CPU s':>6s} {'peak RSS MB':>12s} "
          f"{'RSS before':>11s} {'ratio':>6s}")
    summary: dict = {}
    for tok, sides in runs.items():
        digests = {r["digest"] for rs in sides.values() for r in rs if r["digest"] != "-"}
        med = {side: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu_seconds", "peak_rss_mb",
                                                                         "rss_before_mb")}
               for side, rs in sides.items() if rs}
        base = med.get("old")
        for side, m in med.items():
            rate = args.records / m["seconds"]
            ratio = f"{base['seconds'] / m['seconds']:5.2f}x" if base else "     -"
            print(f"{tok:9s} {side:4s} {rate:10.0f} {m['seconds']:7.1f} {m['cpu_seconds']:6.1f} "
                  f"{m['peak_rss_mb']:12.0f} {m['rss_before_mb']:11.0f} {ratio}")
        print(f"{tok:9s} same dataset digest on every run: {len(digests) == 1} ({', '.join(sorted(digests))})")
        summary[tok] = {"median": med, "runs": sides, "same_digest": len(digests) == 1}
    if "embedded" in runs and "new" in runs["embedded"]:
        rate = args.records / statistics.median(r["seconds"] for r in runs["embedded"]["new"])
        print(f"goal >= {GOAL:,} records/s with the embedded tokenizer: {'met' if rate >= GOAL else 'NOT met'} "
              f"({rate:,.0f})")
    out = ROOT / "bench" / "results" / f"prepare_throughput-{datetime.date.today()}-cpu-{args.records}.json"
    out.write_text(json.dumps({"records": args.records, "bytes": size, "reps": args.reps, **summary}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


# --------------------------------------------------------------------------------------------- data


def _setup(work: Path, n: int) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"alpaca-{n}.jsonl"
    if not data.exists():
        t = time.perf_counter()
        _write_records(data, n)
        print(f"wrote {n:,} records to {data} ({data.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t:.0f} s)",
              file=sys.stderr)
    gpt2 = work / "gpt2-tokenizer"
    if not (gpt2 / "tokenizer.json").exists():
        _gpt2_tokenizer(data, gpt2)
    from loraflow.model.embedded import ensure_base

    ensure_base(ROOT / "models" / "base")
    return data


def _write_records(path: Path, n: int, seed: int = 0) -> None:
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "loraflow/model/corpus").glob("*.txt")))
    words = sorted(set(re.findall(r"[A-Za-z']+|[0-9]+|[.,?!;:]", text)))
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(lo, hi)))

    recent: list[str] = []
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for _ in range(n):
            if recent and rng.random() < 0.01:
                fh.write(rng.choice(recent))  # an exact duplicate of a recent record
                continue
            rec = {"instruction": sentence(6, 24), "input": sentence(4, 30) if rng.random() < 0.4 else "",
                   "output": sentence(20, 120)}
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            if len(recent) < 1000:
                recent.append(line)
            else:
                recent[rng.randrange(1000)] = line
            fh.write(line)
    tmp.replace(path)


def _gpt2_tokenizer(data: Path, out: Path) -> None:
    """A GPT-2-style byte-level BPE trained on the first 20,000 records, saved as a model folder (config.json too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    with open(data, encoding="utf-8") as fh:
        docs = [" ".join(json.loads(line).values()) for line, _ in zip(fh, range(20_000))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    GPT2Config(vocab_size=len(fast), n_positions=1024).save_pretrained(out)


# --------------------------------------------------------------------------------------------- one side (child)


def _run_one(side: str, tok: str, work: Path, n: int) -> dict:
    import resource

    from loraflow.core.config import load_config
    from loraflow.core.fingerprint import dataset_digest
    from loraflow.core.paths import Paths
    from loraflow.model.loading import load_tokenizer

    root = work / f"project-{side}-{tok}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "data" / "raw").mkdir(parents=True)
    os.link(work / f"alpaca-{n}.jsonl", root / "data" / "raw" / "x.jsonl")
    base = ROOT / "models" / "base" if tok == "embedded" else work / "gpt2-tokenizer"
    cfg = load_config(None, [f"model.base={base}", "data.path=data/raw/x.jsonl"])
    paths = Paths.at(root)
    load_tokenizer(cfg, paths)  # imports and files warm; each side loads its own below, as the stage does
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0, t0 = _cpu(), time.perf_counter()
    if side == "old":
        _old_prepare(cfg, paths)
    elif side == "encode":
        return _encode_only(cfg, paths, work / f"alpaca-{n}.jsonl", {"side": side, "tokenizer": tok, "records": n,
                                                                     "rss_before_mb": rss_before})
    else:
        from loraflow.tasks import prepare

        prepare.run(cfg, paths)
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    result = {"side": side, "tokenizer": tok, "records": n, "seconds": seconds, "cpu_seconds": cpu,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss_before,
              "digest": dataset_digest(paths.prepared)}
    shutil.rmtree(root, ignore_errors=True)
    return result


def _encode_only(cfg, paths, data: Path, result: dict) -> dict:
    import resource

    from loraflow.data.formats import render
    from loraflow.model.loading import load_tokenizer

    backend = load_tokenizer(cfg, paths).backend_tokenizer
    with open(data, encoding="utf-8") as fh:
        texts = ["".join(render(json.loads(line), "alpaca", {})) for line in fh]
    cpu0, t0 = _cpu(), time.perf_counter()
    for i in range(0, len(texts), 2048):  # prepare's batch: all encodings at once would take gigabytes
        backend.encode_batch_fast(texts[i : i + 2048], add_special_tokens=False)
    return {**result, "seconds": time.perf_counter() - t0, "cpu_seconds": _cpu() - cpu0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "digest": "-"}


def _cpu() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _old_prepare(cfg, paths) -> None:
    """The prepare stage before streaming (loraflow at c91df1a), its algorithm and memory use unchanged; messages,
    the report and the error paths left out. Good records only here: every record is read and rendered into
    memory, then all prompts and all prompt + answer texts are tokenized through the tokenizer's call."""
    from dataclasses import dataclass

    from loraflow.tasks.prepare import assign_split, content_key

    from loraflow.core.atomic import atomic_dir, write_jsonl
    from loraflow.data.formats import detect_format, render
    from loraflow.data.readers import find_source, read_records
    from loraflow.data.splits import SPLITS
    from loraflow.model.loading import load_tokenizer

    @dataclass
    class Example:
        key: str
        where: str
        prompt: str
        completion: str

    data = cfg.data
    source = find_source(data.path, paths.root)
    tokenizer = load_tokenizer(cfg, paths)
    fmt, unique = None, {}
    for row in read_records(source, data.split, data.max_record_bytes):
        fmt = fmt or detect_format(row.record, data.fields)
        prompt, completion = render(row.record, fmt, data.fields, tokenizer)
        key = content_key(prompt, completion)
        if key not in unique:
            unique[key] = Example(key, row.where, prompt, completion)
    examples = list(unique.values())

    def counts(texts: list[str]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), 512):
            out.extend(len(ids) for ids in tokenizer(texts[i : i + 512], add_special_tokens=False)["input_ids"])
        return out

    prompt_lens = counts([e.prompt for e in examples])
    full_lens = counts([e.prompt + e.completion for e in examples])
    kept = [(e, f + 1) for e, p, f in zip(examples, prompt_lens, full_lens) if p < data.max_length - 1]
    splits: dict[str, list] = {name: [] for name in SPLITS}
    for ex, _ in kept:
        splits[assign_split(ex.key[:16], data.seed, data.val_fraction, data.test_fraction)].append(ex)
    with atomic_dir(paths.prepared) as tmp:
        for name, members in splits.items():
            members.sort(key=lambda e: (e.key[:16], e.key))
            write_jsonl(tmp / paths.split(name).name,
                        [{"id": e.key[:16], "prompt": e.prompt, "completion": e.completion} for e in members])
    sorted(n for _, n in kept)  # the percentiles' sort


if __name__ == "__main__":
    raise SystemExit(main())
