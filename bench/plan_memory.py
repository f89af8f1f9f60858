"""Does ``loraflow plan``'s memory model match measured peaks? (run by hand, not by the suite)

    python bench/plan_memory.py                       # measure, print the table, write bench/results/
    python bench/plan_memory.py --repeats 3 --steps 3 --batch 4 --seq 128
    python bench/plan_memory.py --from bench/results/plan_memory-2026-11-29-cpu.json   # re-estimate only

Each case (model × method × repeat) runs in a fresh subprocess: import torch, transformers, peft,
bitsandbytes and the Llama modeling code, then take the baseline from ``/proc/self/status``,
reset the peak (``echo 5 > /proc/self/clear_refs`` zeroes VmHWM), and do what the train stage
does: load the base through ``loraflow.modeling.load_model`` (fp32 on CPU, or 4-bit NF4 with
double quant for QLoRA), attach LoRA through ``loraflow.training.attach_lora``, and train
``--steps`` steps of batch × seq random tokens with fused AdamW (the Trainer's default optimizer),
gradients set to None after each step (as the Trainer does). Full fine-tuning trains every
parameter of the same fp32 model.

Measured: the peak RSS above the baseline (VmHWM − VmRSS at baseline), and separately the peaks
of anonymous memory (RssAnon: tensors, allocator) and file-backed memory (RssFile: the mapped
safetensors, TRAPS 5, and library pages touched for the first time), sampled every 2 ms by a
thread. Each case runs under glibc's default malloc and with ``MALLOC_MMAP_THRESHOLD_=131072``
(see ``ALLOCATORS``). The planner's estimate for the same shapes is what ``loraflow plan``
computes for this CPU (fp32 compute); it estimates anonymous memory (``Memory.total``), and the
mapped checkpoint (``estimates.mapped_checkpoint_bytes``) is reported beside the file-backed peak.

Medians over ``--repeats`` runs (machine noise is real, TRAPS 8).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MIB = 2**20
METHODS = ("full", "lora", "qlora")
# ~100M-parameter Llama: 12 layers of 768 wide (GPT-2-small shapes), SwiGLU 2048, 8k vocabulary, untied.
LLAMA_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=8000, max_position_embeddings=1024, tie_word_embeddings=False)
LORA = dict(r=16, alpha=32, dropout=0.05, target_modules="attention-qv")
# glibc's malloc raises its mmap threshold (up to 32 MiB) each time it frees a large mmapped block, so
# later large tensors come from the heap and their holes are kept, not returned: a 4-bit load and
# QLoRA's per-matmul dequantized weights leave the heap fragmented. A fixed threshold maps every
# block over 128 KiB on its own and unmaps it on free: RSS then follows the live tensors.
ALLOCATORS = {"glibc": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


# ---------------------------------------------------------------------------------------------
# the child: one measured training run


def _status() -> dict[str, int]:
    """Bytes of VmRSS, VmHWM, RssAnon, RssFile, RssShmem from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def child(model_dir: str, method: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    import threading

    import bitsandbytes  # noqa: F401  (imports before the baseline: their memory is not the model's)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from loraflow import modeling, training
    from loraflow.config import Config
    from loraflow.paths import Paths
    from loraflow.targets import resolve_targets

    torch.set_num_threads(threads)
    cfg = _config(model_dir, method)
    paths = Paths.at(tempfile.mkdtemp(prefix="plan-memory-"))
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (batch, seq))  # token ids valid for every vocabulary here

    base = _status()
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = _status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    quantized = method == "qlora"
    model = modeling.load_model(cfg, paths, quantized=quantized, dtype=torch.float32)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = training.attach_lora(model, cfg, resolve_targets(model, cfg.lora.target_modules), quantized=quantized)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    loaded = _status()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    end = _status()
    return {
        "model": model_dir, "method": method, "batch": batch, "seq": seq, "steps": steps, "threads": threads,
        "trainable": sum(p.numel() for p in params),
        "baseline_rss": base["VmRSS"],
        "peak_rss_delta": end["VmHWM"] - base["VmRSS"],
        "peak_anon_delta": max(peak["RssAnon"], end["RssAnon"]) - base["RssAnon"],
        "peak_file_delta": max(peak["RssFile"], end["RssFile"]) - base["RssFile"],
        "after_load_anon_delta": loaded["RssAnon"] - base["RssAnon"],
        "after_load_file_delta": loaded["RssFile"] - base["RssFile"],
        "seconds": round(seconds, 2),
        "losses": losses,
    }


def _config(model_dir: str, method: str):
    from loraflow.config import Config

    return Config.model_validate({
        "model": {"base": model_dir},
        "method": "lora" if method == "full" else method,
        "quantization": {"double_quant": True, "compute_dtype": "float32"},
        "lora": LORA,
    })


# ---------------------------------------------------------------------------------------------
# the parent: models, cases, estimates, table


def build_models(where: Path) -> dict[str, Path]:
    """The tests' tiny Llama, and a ~100M random-init Llama saved as fp32 safetensors."""
    import torch
    import transformers as tf

    from tests.tiny import make_model

    tiny = make_model(where / "tiny-llama", "llama")
    big = where / "llama-100m"
    big.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **LLAMA_100M))
    model.save_pretrained(big, safe_serialization=True)
    del model
    return {"tiny-llama": tiny, "llama-100m": big}


def estimate(model_dir: str, method: str, batch: int, seq: int) -> dict:
    """What the planner says for this CPU: anonymous memory (``total``) and the mapped checkpoint."""
    from transformers import AutoConfig

    from loraflow.planner import estimates as est
    from loraflow.planner import memory_estimates, model_shape, resolve_targets

    cfg = _config(model_dir, method)
    shape = model_shape(AutoConfig.from_pretrained(model_dir))
    _, adapted = resolve_targets(shape, cfg.lora.target_modules)
    trainable = est.lora_params(adapted, cfg.lora.r)
    wbytes = est.compute_bytes(cfg.quantization.compute_dtype, "cpu")
    memory = memory_estimates(shape, cfg, adapted, trainable, seq, batch, False, weight_bytes=wbytes)[method]
    return {"params": shape.params_total, "adapter_params": trainable, "weight_bytes": wbytes,
            "estimate": memory.total, "breakdown": {k: v for k, v in memory.gib().items()},
            "mapped": est.mapped_checkpoint_bytes(shape, method, "cpu")}


def run_case(model_dir: Path, method: str, allocator: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model_dir), method, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | ALLOCATORS[allocator]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"case {model_dir.name} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> list[dict]:
    """Per model and method: the estimate (``total`` + the mapped originals) against the measured peak RSS."""
    rows = []
    for model, methods in results["cases"].items():
        for method, by_alloc in methods.items():
            first = next(iter(by_alloc.values()))[0]
            est = estimate(first["model"], method, results["batch"], results["seq"])
            rss_estimate = est["estimate"] + est["mapped"]
            row = {"model": model, "params": est["params"], "method": method,
                   "estimate_mib": round(est["estimate"] / MIB, 1), "estimate_mapped_mib": round(est["mapped"] / MIB, 1),
                   "estimate_rss_mib": round(rss_estimate / MIB, 1), "breakdown_gib": est["breakdown"]}
            for alloc, runs in by_alloc.items():
                rss = statistics.median(r["peak_rss_delta"] for r in runs)
                row[alloc] = {
                    "rss_mib": round(rss / MIB, 1),
                    "rss_range_mib": [round(min(r["peak_rss_delta"] for r in runs) / MIB, 1),
                                      round(max(r["peak_rss_delta"] for r in runs) / MIB, 1)],
                    "anon_mib": round(statistics.median(r["peak_anon_delta"] for r in runs) / MIB, 1),
                    "file_mib": round(statistics.median(r["peak_file_delta"] for r in runs) / MIB, 1),
                    "seconds": statistics.median(r["seconds"] for r in runs),
                    "runs": len(runs),
                    "error": round(rss_estimate / rss - 1, 3) if rss > 0 else None,
                }
            rows.append(row)
    return rows


def show(rows: list[dict], meta: dict) -> str:
    head = (f"{meta['machine']}; {meta['date']}; batch {meta['batch']} × seq {meta['seq']}, {meta['steps']} steps, "
            f"{meta['threads']} thread(s), fp32 compute, LoRA r={LORA['r']} on {LORA['target_modules']} "
            f"(dropout {LORA['dropout']}), median of {meta['repeats']}; `{meta['command']}`")
    lines = [head, "",
             "| model | method | plan total | + mapped | plan RSS | peak RSS, glibc default | error "
             "| peak RSS, MALLOC_MMAP_THRESHOLD_=128K | error | its anon / file-backed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def err(x):
        return "-" if x is None else f"{x:+.0%}"

    nan = float("nan")
    for r in rows:
        g, m = r.get("glibc", {}), r.get("mmap128k", {})
        lines.append(
            f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['method']} | {r['estimate_mib']:,.1f} | "
            f"{r['estimate_mapped_mib']:,.1f} | {r['estimate_rss_mib']:,.1f} | "
            f"{g.get('rss_mib', nan):,.1f} | {err(g.get('error'))} | "
            f"{m.get('rss_mib', nan):,.1f} | {err(m.get('error'))} | "
            f"{m.get('anon_mib', nan):,.1f} / {m.get('file_mib', nan):,.1f} |")
    lines.append("")
    lines.append("MiB above the process after imports. plan total = `loraflow plan`'s estimate on this CPU; "
                 "+ mapped = the original weights a 4-bit load leaves memory-mapped; error = plan RSS / measured − 1.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "METHOD"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny-llama,llama-100m")
    ap.add_argument("--from", dest="source", default=None, help="re-estimate a saved result (no measuring)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.batch, args.seq, args.steps, args.threads)))
        return 0

    if args.source:
        results = json.loads(Path(args.source).read_text())
    else:
        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        results = {"machine": _machine(), "date": date, "command": " ".join(["python", *sys.argv]),
                   "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads,
                   "repeats": args.repeats, "lora": LORA, "allocators": ALLOCATORS, "cases": {}}
        with tempfile.TemporaryDirectory(prefix="plan-memory-models-") as tmp:
            models = build_models(Path(tmp))
            wanted = args.models.split(",")
            for rep in range(args.repeats):  # alternate the cases within each repeat (TRAPS 8)
                for name in wanted:
                    for method in METHODS:
                        for alloc in ALLOCATORS:
                            r = run_case(models[name], method, alloc, args)
                            r["model"], r["allocator"] = str(models[name]), alloc
                            results["cases"].setdefault(name, {}).setdefault(method, {}).setdefault(alloc, []).append(r)
                            print(f"[{rep + 1}/{args.repeats}] {name} {method} {alloc}: "
                                  f"anon +{r['peak_anon_delta'] / MIB:.1f} MiB, file +{r['peak_file_delta'] / MIB:.1f} MiB, "
                                  f"{r['seconds']} s", file=sys.stderr, flush=True)
            # the planner reads config.json only: keep a copy for --from after the temp dir is gone
            for name in wanted:
                results.setdefault("configs", {})[name] = json.loads((models[name] / "config.json").read_text())
            rows = table(results)
    if args.source:
        with tempfile.TemporaryDirectory() as tmp:
            for name, methods in results["cases"].items():
                folder = Path(tmp) / name
                folder.mkdir()
                (folder / "config.json").write_text(json.dumps(results["configs"][name]))
                for by_alloc in methods.values():
                    for runs in by_alloc.values():
                        for r in runs:
                            r["model"] = str(folder)
            rows = table(results)
    results["table"] = rows
    text = show(rows, results)
    print(text)
    out = ROOT / "bench" / "results" / f"plan_memory-{results['date']}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}", file=sys.stderr)
    return 0


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {ram:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, torch {torch.__version__}, no GPU")


if __name__ == "__main__":
    sys.exit(main())
