"""Does ``loraflow plan``'s CPU memory model match measured peaks? (run by hand, not by the suite)

    python bench/plan_memory.py                       # measure, print the table, write bench/results/
    python bench/plan_memory.py --repeats 1 --points 4x128,8x128,2x256 --models tiny-llama,llama-100m
    python bench/plan_memory.py --allocators glibc,mmap128k,mallopt1m,mallopt4m --points 4x128 --methods lora
    python bench/plan_memory.py --from bench/results/plan_memory-2026-11-29-cpu.json   # re-estimate only

Each case (model × batch × seq × method × allocator × repeat) runs in a fresh subprocess: import torch,
transformers, peft, bitsandbytes and the Llama modeling code, then take the baseline from
``/proc/self/status``, reset the peak (``echo 5 > /proc/self/clear_refs`` zeroes VmHWM), and do what
the train stage does: load the base through ``loraflow.model.loading.load_model`` (fp32 on CPU, or 4-bit NF4
with double quant for QLoRA, which then drops the checkpoint's mapping), attach LoRA through
``loraflow.train.lora.attach_lora``, and train ``--steps`` steps of batch × seq random tokens with fused
AdamW (the Trainer's default optimizer), gradients set to None after each step (as the Trainer does).
Full fine-tuning trains every parameter of the same fp32 model.

Measured: the peak RSS above the baseline (VmHWM − VmRSS at baseline), the peaks of anonymous memory
(RssAnon: tensors, allocator) and file-backed memory (RssFile: the mapped safetensors, library pages
touched for the first time), sampled every 2 ms by a thread, the peak during the load and during each
step, and each step's CPU seconds (user, system) and minor page faults: CPU time, not wall time, prices
an allocator setting on this shared machine (docs/traps.md §8), and system time is where page faults show.
The allocator is glibc's default (what ``loraflow`` runs with) unless ``--allocators`` names others
(``ALLOCATORS``: an environment variable at process start, or ``mallopt`` in the process). The plan
column is what ``loraflow plan`` computes for this CPU: live tensors + glibc's retention + the runtime
(``loraflow/planner/estimates.py``); ``FIT_MODELS``/``FIT_POINT`` mark the points its two CPU constants
were measured on.

Medians over ``--repeats`` runs (machine noise is real, docs/traps.md §8).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
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
# The points the planner's two CPU constants were measured on (estimates.CPU_RUNTIME_BYTES on the tiny
# Llama, estimates.CPU_ALLOCATOR_RETENTION on the 97M one); every other point checks them.
FIT_MODELS = ("tiny-llama", "llama-100m")
FIT_POINT = (4, 128)
# glibc's malloc raises its mmap threshold (up to 32 MiB) each time it frees a large mmapped block, so
# later large tensors come from the heap and their holes are kept, not returned: a 4-bit load and
# QLoRA's per-matmul dequantized weights leave the heap fragmented. A fixed threshold maps every
# block over 128 KiB on its own and unmaps it on free: RSS then follows the live tensors.
ALLOCATORS = {
    "glibc": {},
    "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    # the same set in the process (ctypes mallopt before the load), as a train stage could do it
    "mallopt1m": {"PLAN_MEMORY_MALLOPT": "M_MMAP_THRESHOLD=1048576"},
    "mallopt4m": {"PLAN_MEMORY_MALLOPT": "M_MMAP_THRESHOLD=4194304"},
    "mallopt16m": {"PLAN_MEMORY_MALLOPT": "M_MMAP_THRESHOLD=16777216"},
}
MALLOPT = {"M_MMAP_THRESHOLD": -3, "M_TRIM_THRESHOLD": -1, "M_ARENA_MAX": -8, "M_TOP_PAD": -2}  # glibc's malloc.h


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


def _heap() -> dict[str, int] | None:
    """glibc's own count (``mallinfo2``): bytes in use in its heap, free inside its heap, and in their own
    mappings; None where there is no glibc. Free heap bytes once touched stay in RSS: the retention."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return None
    return {"heap_in_use": m.uordblks, "heap_free": m.fordblks, "mmapped": m.hblkhd}


def child(model_dir: str, method: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    import threading

    import bitsandbytes  # noqa: F401  (imports before the baseline: their memory is not the model's)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from loraflow.core.paths import Paths
    from loraflow.model import loading
    from loraflow.model.targets import resolve_targets
    from loraflow.train import lora

    torch.set_num_threads(threads)
    spec = os.environ.get("PLAN_MEMORY_MALLOPT", "")
    if spec:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        for item in spec.split(","):
            k, v = item.split("=")
            assert libc.mallopt(MALLOPT[k], int(v)) == 1, item
    cfg = _config(model_dir, method)
    paths = Paths.at(tempfile.mkdtemp(prefix="plan-memory-"))
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (batch, seq))  # token ids valid for every vocabulary here

    base = _status()
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    phase = ["load"]  # where the peak happened: the load or training step i
    phase_peak: dict[str, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = _status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            phase_peak[phase[0]] = max(phase_peak.get(phase[0], 0), s["VmRSS"])
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    quantized = method == "qlora"
    model = loading.load_model(cfg, paths, quantized=quantized, dtype=torch.float32)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = lora.attach_lora(model, cfg, resolve_targets(model, cfg.lora.target_modules), quantized=quantized)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    loaded = _status()
    losses, times, cpu, faults, heaps = [], [], [], [], []
    heap_base = _heap()
    for step in range(steps):
        phase[0] = f"step {step + 1}"
        ts, tc, ru = time.perf_counter(), os.times(), resource.getrusage(resource.RUSAGE_SELF)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        heaps.append(_heap())  # at the end of the forward: activations kept for backward, and the holes
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - ts)
        now, ru2 = os.times(), resource.getrusage(resource.RUSAGE_SELF)
        cpu.append((now.user - tc.user, now.system - tc.system))
        faults.append(ru2.ru_minflt - ru.ru_minflt)
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
        "phase_peak_rss_delta": {k: v - base["VmRSS"] for k, v in phase_peak.items()},
        "after_load_anon_delta": loaded["RssAnon"] - base["RssAnon"],
        "after_load_file_delta": loaded["RssFile"] - base["RssFile"],
        "seconds": round(seconds, 2),
        "losses": losses,
        "step_seconds": [round(t, 4) for t in times],
        "step_cpu_user": [round(u, 3) for u, _ in cpu], "step_cpu_sys": [round(y, 3) for _, y in cpu],
        "step_minor_faults": faults,
        # glibc's heap at the end of each forward, above the process after loading (bytes; None without glibc)
        "after_forward_heap": [None if h is None or heap_base is None else {k: v - heap_base[k] for k, v in h.items()}
                               for h in heaps],
    }


def _config(model_dir: str, method: str):
    from loraflow.core.config import Config

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
    """What ``loraflow plan`` says for this CPU: the live tensors, glibc's retention, the runtime, the load."""
    from transformers import AutoConfig

    from loraflow.model.loading import cpu_has_native_bf16
    from loraflow.planner import after_training as at
    from loraflow.planner import estimates as est
    from loraflow.planner import memory_estimates, model_shape, resolve_targets

    cfg = _config(model_dir, method)
    config = AutoConfig.from_pretrained(model_dir)
    shape = model_shape(config)
    _, adapted = resolve_targets(shape, cfg.lora.target_modules)
    trainable = est.lora_params(adapted, cfg.lora.r)
    wbytes = est.compute_bytes(cfg.quantization.compute_dtype, cpu_has_native_bf16())
    tensors, dtypes = at.Tensors.of(shape), at.dtypes(config, cfg, wbytes)
    memory = memory_estimates(shape, cfg, adapted, trainable, seq, batch, False, wbytes, "cpu")[method]
    qlora = method == "qlora"
    mapped = at.mapped_bytes(tensors, dtypes, method, "cpu")
    load = at.train_load_peak(shape, tensors, dtypes, cfg.quantization.double_quant, "cpu") if qlora else 0.0
    live = memory.total - memory.allocator - memory.runtime
    return {"params": shape.params_total, "adapter_params": trainable, "weight_bytes": wbytes,
            "live": live, "allocator": memory.allocator, "runtime": memory.runtime, "estimate": memory.total,
            "activations": memory.activations, "breakdown": memory.gib(), "mapped": mapped, "load_peak": load,
            # what RSS should peak at: the training step, or the load when that is higher
            "rss_estimate": max(memory.total, load)}


def run_case(model_dir: Path, method: str, allocator: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model_dir), method, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PLAN_MEMORY_"))} | ALLOCATORS[allocator]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"case {model_dir.name} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _points(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in p.split("x")) for p in text.split(",")]  # type: ignore[misc]


def table(results: dict) -> list[dict]:
    """Per model, batch × seq and method: the plan's estimate against the measured peak RSS per allocator."""
    rows = []
    for key, by_alloc in results["cases"].items():
        model, point, method = key.split("|")
        batch, seq = _points(point)[0]
        first = next(iter(by_alloc.values()))[0]
        est = estimate(first["model"], method, batch, seq)
        row = {"model": model, "batch": batch, "seq": seq, "method": method, "params": est["params"],
               "fitted": model in FIT_MODELS and (batch, seq) == FIT_POINT,
               **{f"{k}_mib": round(est[k] / MIB, 1) for k in
                  ("live", "allocator", "runtime", "estimate", "activations", "mapped", "load_peak", "rss_estimate")},
               "breakdown_gib": est["breakdown"]}
        for alloc, runs in by_alloc.items():
            rss = statistics.median(r["peak_rss_delta"] for r in runs)
            cpu = [statistics.median(u + y for u, y in zip(r["step_cpu_user"][1:], r["step_cpu_sys"][1:])) for r in runs
                   if len(r.get("step_cpu_user", [])) > 1]
            row[alloc] = {
                "rss_mib": round(rss / MIB, 1),
                "rss_range_mib": [round(min(r["peak_rss_delta"] for r in runs) / MIB, 1),
                                  round(max(r["peak_rss_delta"] for r in runs) / MIB, 1)],
                "anon_mib": round(statistics.median(r["peak_anon_delta"] for r in runs) / MIB, 1),
                "file_mib": round(statistics.median(r["peak_file_delta"] for r in runs) / MIB, 1),
                "load_rss_mib": round(statistics.median(r.get("phase_peak_rss_delta", {}).get("load", 0) for r in runs) / MIB, 1),
                "step_cpu_seconds": round(statistics.median(cpu), 3) if cpu else None,
                "step_sys_seconds": _median_after_first(runs, "step_cpu_sys"),
                "step_minor_faults": _median_after_first(runs, "step_minor_faults"),
                "runs": len(runs),
                "error": round(est["rss_estimate"] / rss - 1, 3) if rss > 0 else None,
                "error_live": round(est["live"] / rss - 1, 3) if rss > 0 else None,
            }
        rows.append(row)
    return rows


def _median_after_first(runs: list[dict], key: str) -> float | None:
    """Median per step of ``key`` over the runs, leaving out each run's first step (its warm-up)."""
    values = [x for r in runs for x in r.get(key, [])[1:]]
    return round(statistics.median(values), 3) if values else None


def show(rows: list[dict], meta: dict) -> str:
    allocs = list(meta["allocators_run"])
    head = (f"{meta['machine']}; {meta['date']}; {meta['steps']} steps, {meta['threads']} thread(s), fp32 compute, "
            f"LoRA r={LORA['r']} on {LORA['target_modules']} (dropout {LORA['dropout']}), median of {meta['repeats']}; "
            f"`{meta['command']}`")
    cols = "".join(f" peak RSS, {a} | error | anon / file |" for a in allocs)
    lines = [head, "",
             "| model | batch × seq | method | live tensors | + glibc retention | + runtime | plan |" + cols,
             "|---|---|---|---:|---:|---:|---:|" + "---:|---:|---:|" * len(allocs)]

    def err(x):
        return "-" if x is None else f"{x:+.0%}"

    for r in rows:
        cells = ""
        for a in allocs:
            m = r.get(a, {})
            cells += (f" {m.get('rss_mib', float('nan')):,.1f} | {err(m.get('error'))} | "
                      f"{m.get('anon_mib', float('nan')):,.0f} / {m.get('file_mib', float('nan')):,.0f} |")
        fit = " (fit)" if r["fitted"] else ""
        lines.append(f"| {r['model']} ({r['params'] / 1e6:.1f}M){fit} | {r['batch']} × {r['seq']} | {r['method']} | "
                     f"{r['live_mib']:,.1f} | {r['allocator_mib']:,.1f} | {r['runtime_mib']:,.1f} | "
                     f"{r['rss_estimate_mib']:,.1f} |" + cells)
    lines.append("")
    lines.append("MiB above the process after imports. live tensors = weights, optimizer state, activations; plan = "
                 "`loraflow plan`'s CPU total (or a QLoRA load's peak, mapped checkpoint + weights, when higher); "
                 "error = plan / measured − 1; (fit) = the points the two CPU constants were measured on.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "METHOD"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--points", default="4x128,8x128,2x256", help="batch x seq points to measure, comma-separated")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny-llama,llama-100m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--allocators", default="glibc", help=f"comma-separated, of {', '.join(ALLOCATORS)}")
    ap.add_argument("--from", dest="source", default=None, help="re-estimate a saved result (no measuring)")
    ap.add_argument("--tag", default="", help="suffix of the JSON's name (plan_memory-DATE-cpu-TAG.json)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.batch, args.seq, args.steps, args.threads)))
        return 0

    if args.source:
        results = json.loads(Path(args.source).read_text())
    else:
        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        allocs = args.allocators.split(",")
        results = {"machine": _machine(), "date": date, "command": " ".join(["python", *sys.argv]),
                   "points": args.points, "steps": args.steps, "threads": args.threads,
                   "repeats": args.repeats, "lora": LORA, "allocators": {a: ALLOCATORS[a] for a in allocs},
                   "allocators_run": allocs, "cases": {}}
        with tempfile.TemporaryDirectory(prefix="plan-memory-models-") as tmp:
            models = build_models(Path(tmp))
            wanted = args.models.split(",")
            for rep in range(args.repeats):  # alternate the cases within each repeat (docs/traps.md §8)
                for name in wanted:
                    for batch, seq in _points(args.points):
                        for method in args.methods.split(","):
                            for alloc in allocs:
                                case = argparse.Namespace(batch=batch, seq=seq, steps=args.steps, threads=args.threads)
                                r = run_case(models[name], method, alloc, case)
                                r["model"], r["allocator"] = str(models[name]), alloc
                                key = f"{name}|{batch}x{seq}|{method}"
                                results["cases"].setdefault(key, {}).setdefault(alloc, []).append(r)
                                print(f"[{rep + 1}/{args.repeats}] {name} {batch}x{seq} {method} {alloc}: "
                                      f"peak RSS +{r['peak_rss_delta'] / MIB:.1f} MiB (anon +{r['peak_anon_delta'] / MIB:.1f}, "
                                      f"file +{r['peak_file_delta'] / MIB:.1f}), {r['seconds']} s", file=sys.stderr, flush=True)
            # the planner reads config.json only: keep a copy for --from after the temp dir is gone
            for name in wanted:
                results.setdefault("configs", {})[name] = json.loads((models[name] / "config.json").read_text())
            rows = table(results)
    if args.source:
        with tempfile.TemporaryDirectory() as tmp:
            for name, config in results["configs"].items():
                folder = Path(tmp) / name
                folder.mkdir()
                (folder / "config.json").write_text(json.dumps(config))
            for key, by_alloc in results["cases"].items():
                for runs in by_alloc.values():
                    for r in runs:
                        r["model"] = str(Path(tmp) / key.split("|")[0])
            rows = table(results)
    results["table"] = rows
    text = show(rows, results)
    print(text)
    out = ROOT / "bench" / "results" / f"plan_memory-{results['date']}-cpu{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    tmp_out.replace(out)
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
