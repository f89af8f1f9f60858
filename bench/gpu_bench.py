"""LoRA vs QLoRA on a random-init model with Llama-2-7B's shape: peak CUDA memory, tokens/s, MFU.

    bench/gpu.sh                      # on a GPU machine: sets up what is missing, then runs this
    python bench/gpu_bench.py --smoke # anywhere: a tiny shape on the CPU, two steps (a check of the script)
    python bench/gpu_bench.py --predict  # anywhere, no weights: what loraflow's planner expects on an H200

The model is built from Llama-2-7B's config (written out below; nothing is downloaded) with random
weights, directly in bf16 on the device. Both methods use loraflow's defaults: r=16, alpha=32,
dropout 0.05 on q_proj and v_proj, adapters in fp32; QLoRA stores every decoder linear in 4-bit NF4
with double quantization (bitsandbytes ``Linear4bit``, bf16 compute; the LM head stays bf16) and
runs peft's ``prepare_model_for_kbit_training``, as the train stage does. Each method: a fresh
model, ``--warmup`` steps, then ``--steps`` timed steps of ``--batch`` sequences of ``--seq``
tokens (random ids, every token supervised), AdamW on the adapters, bf16 autocast, no gradient
checkpointing. Batches 4 and then 1 by default: at 4 x 1024 both methods carry ~17 GiB of
activations and the planner expects QLoRA at 0.73x LoRA's memory, at 1 x 1024 at 0.52x; one
GPU session measures both.

MFU = tokens/s x ``flops_per_token`` (loraflow/planner/estimates.py: 4·N_mm + 6·P_a for LoRA and
QLoRA) / the device's dense bf16 peak (``gpu_peak_tflops``, the same table). QLoRA's dequantization
is not counted as FLOPs, as in the planner. Issue 8's goals: LoRA bf16 >= 35% MFU; QLoRA <= 0.6x
LoRA's peak memory at >= 0.75x its throughput.

Each method's row also carries the planner's own prediction for the same shape, batch, length and
device (``predict``: ``memory_estimates`` and ``flops_per_token`` at the planner's assumed 40% MFU,
× 1.39 time for QLoRA), so a run checks the planner as well as the goals.

Writes ``bench/results/gpu-<date>-<device>.json`` (``--smoke``: ``--out`` only, default a temp file).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# meta-llama/Llama-2-7b-hf config.json (the fields that shape the model).
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)
# The smoke shape: the same architecture, small enough for a CPU in seconds.
SMOKE = dict(LLAMA2_7B, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])  # loraflow's defaults
GOALS = {"lora_mfu_min": 0.35, "qlora_memory_ratio_max": 0.6, "qlora_throughput_ratio_min": 0.75}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU allowed, 2 steps: checks the script")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; smoke 64)")
    ap.add_argument("--batch", default=None,
                    help="sequences per step, or a list run one after the other (default 4,1: the goal's batch, "
                         "and the one where the planner expects 4-bit weights to matter most; smoke 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--predict", action="store_true",
                    help="build nothing: print the planner's prediction for --device-name and exit")
    ap.add_argument("--device-name", default="NVIDIA H200", help="the GPU --predict plans for")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/gpu-<date>-<device>.json)")
    args = ap.parse_args()

    smoke = args.smoke
    seq = args.seq or (64 if smoke else 1024)
    batches = [int(b) for b in str(args.batch or ("2" if smoke else "4,1")).split(",") if b.strip()]
    if args.predict:
        for batch in batches:
            _print_prediction(LLAMA2_7B, seq, batch, args.device_name)
        return 0

    import torch

    steps = args.steps or (2 if smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        print("gpu_bench: no CUDA device; run on the GPU machine, or pass --smoke for a CPU check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    shape_cfg = SMOKE if smoke else LLAMA2_7B

    results: dict[str, dict[str, Any]] = {}  # batch -> method -> row
    for batch in batches:
        rows = results[str(batch)] = {}
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            print(f"==> {method}: {'smoke shape' if smoke else 'Llama-2-7B shape'}, batch {batch} x {seq} tokens, "
                  f"{warmup} warm-up + {steps} timed steps on {device_name}", file=sys.stderr, flush=True)
            try:
                rows[method] = run_method(method, shape_cfg, device, seq, batch, steps, warmup)
            except Exception as e:  # noqa: BLE001 - keep the other runs' numbers; say what failed
                import traceback

                traceback.print_exc()
                rows[method] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
                if cuda:
                    torch.cuda.empty_cache()
            if "error" not in rows[method]:
                rows[method]["planner"] = predict(method, shape_cfg, seq, batch, device_name if cuda else None)
            print(f"    {json.dumps(rows[method])}", file=sys.stderr, flush=True)

    summary = {b: _summary(rows) for b, rows in results.items()}
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name, "smoke": smoke, "shape": "smoke" if smoke else "Llama-2-7B (random init)",
        "config": shape_cfg, "lora": LORA, "seq": seq, "batches": batches, "steps": steps, "warmup": warmup,
        "versions": _versions(), "results": results, "summary": summary, "goals": GOALS,
        "command": " ".join(["bench/gpu.sh"] + sys.argv[1:]),
    }
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "gpu-smoke.json" if smoke else
        ROOT / "bench" / "results" / f"gpu-{datetime.date.today().isoformat()}-{_slug(device_name)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    for batch, rows in results.items():
        _print_table(rows, summary[batch], f"{device_name}, batch {batch} x {seq}")
    print(f"wrote {out}", file=sys.stderr)
    return 0 if not any("error" in r for rows in results.values() for r in rows.values()) else 1


def build(method: str, shape_cfg: dict, device):
    """A random-init Llama of ``shape_cfg`` on ``device`` with loraflow's LoRA on it (4-bit base for qlora)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape_cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16: no fp32 copy of 7B weights first
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if method == "qlora":
        # Each decoder linear becomes an NF4 Linear4bit (quantized as it is moved to the device), as
        # transformers' bitsandbytes loader does; the LM head stays bf16.
        _quantize_linears(model, dtype, device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    return model, config


def _quantize_linears(model, compute_dtype, device) -> None:
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
                setattr(parent, name, q.to(device))  # quantizes; the bf16 weight is freed with ``child``
    model.is_loaded_in_4bit = True  # what peft's kbit preparation looks for


def run_method(method: str, shape_cfg: dict, device, seq: int, batch: int, steps: int, warmup: int) -> dict:
    import torch
    from transformers import LlamaConfig

    from loraflow.planner import estimates as est
    from loraflow.planner.shapes import model_shape

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    start = time.perf_counter()
    model, _ = build(method, shape_cfg, device)
    build_s = time.perf_counter() - start
    weights = torch.cuda.memory_allocated() if cuda else None
    if cuda:  # the peak of training, not of building (QLoRA is built from a bf16 model here)
        torch.cuda.reset_peak_memory_stats()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape_cfg["vocab_size"], (batch, seq), generator=gen).to(device)
    model.train()

    def step(model=model, optim=optim) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()  # float(): synchronizes each step
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_per_s = batch * seq * steps / seconds
    peak = torch.cuda.max_memory_allocated() if cuda else None

    shape = model_shape(LlamaConfig(**shape_cfg))  # the planner's own shape of this config (meta device)
    flops = est.flops_per_token(shape, method, trainable, checkpointing=False)
    peak_tflops, known = est.gpu_peak_tflops(torch.cuda.get_device_name(0)) if cuda else (None, False)
    mfu = tokens_per_s * flops / (peak_tflops * 1e12) if peak_tflops else None
    del step, model, optim
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"tokens_per_s": round(tokens_per_s, 1), "step_s": round(seconds / steps, 4),
            "peak_cuda_gib": round(peak / 2**30, 2) if peak is not None else None,
            "model_cuda_gib": round(weights / 2**30, 2) if weights is not None else None,
            "mfu": round(mfu, 4) if mfu is not None else None, "flops_per_token": flops,
            "peak_tflops": peak_tflops, "peak_known": known, "trainable_params": trainable,
            "params_matmul": shape.params_matmul, "final_loss": round(loss, 4), "build_s": round(build_s, 1)}


def predict(method: str, shape_cfg: dict, seq: int, batch: int, gpu_name: str | None) -> dict:
    """What ``loraflow plan`` would say of this run: peak GiB and tokens/s (``gpu_name`` None: memory only).

    The planner's terms for a GPU (bf16 compute, no gradient checkpointing, loraflow's LoRA defaults,
    as ``build`` makes them); its time assumes 40% MFU of the device's bf16 peak, × 1.39 for QLoRA.
    """
    from transformers import LlamaConfig

    from loraflow.core.config import load_config
    from loraflow.planner import estimates as est
    from loraflow.planner import memory_estimates
    from loraflow.planner.shapes import model_shape, resolve_targets

    cfg = load_config(None, [f"lora.r={LORA['r']}", f"lora.alpha={LORA['lora_alpha']}",
                             f"lora.dropout={LORA['lora_dropout']}", f"lora.target_modules={LORA['target_modules']}"])
    shape = model_shape(LlamaConfig(**shape_cfg))
    _, adapted = resolve_targets(shape, LORA["target_modules"])
    trainable = est.lora_params(adapted, LORA["r"])
    memory = memory_estimates(shape, cfg, adapted, trainable, seq, batch, False, weight_bytes=2, device_kind="gpu")
    out: dict[str, Any] = {"peak_gib": round(memory[method].total / 2**30, 2)}
    if gpu_name:
        peak, _ = est.gpu_peak_tflops(gpu_name)
        flops = est.flops_per_token(shape, method, trainable, checkpointing=False)
        seconds_per_token = est.train_seconds(flops, 1.0, peak * 1e12 * est.GPU_MFU, method)
        out |= {"tokens_per_s": round(1 / seconds_per_token, 1), "mfu_assumed": est.GPU_MFU}
    return out


def _print_prediction(shape_cfg: dict, seq: int, batch: int, gpu_name: str) -> None:
    rows = {m: predict(m, shape_cfg, seq, batch, gpu_name) for m in ("lora", "qlora")}
    print(f"\nloraflow's planner, Llama-2-7B shape, batch {batch} x {seq}, {gpu_name} (predicted, not measured)\n")
    print("| method | peak GiB | tokens/s |\n|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['peak_gib']} | {r['tokens_per_s']:,.0f} |")
    lora, qlora = rows["lora"], rows["qlora"]
    print(f"\nqlora/lora: memory {qlora['peak_gib'] / lora['peak_gib']:.2f}x (goal <= {GOALS['qlora_memory_ratio_max']}), "
          f"throughput {qlora['tokens_per_s'] / lora['tokens_per_s']:.2f}x (goal >= {GOALS['qlora_throughput_ratio_min']}); "
          f"MFU assumed {lora['mfu_assumed']:.0%} (goal for LoRA >= {GOALS['lora_mfu_min']:.0%})")


def _summary(results: dict) -> dict:
    lora, qlora = (r if r and "error" not in r else None for r in (results.get("lora"), results.get("qlora")))
    out: dict[str, Any] = {}
    if lora and lora.get("mfu") is not None:
        out["lora_mfu"] = lora["mfu"]
        out["lora_mfu_met"] = lora["mfu"] >= GOALS["lora_mfu_min"]
    if lora and qlora:
        out["qlora_throughput_ratio"] = round(qlora["tokens_per_s"] / lora["tokens_per_s"], 3)
        out["qlora_throughput_met"] = out["qlora_throughput_ratio"] >= GOALS["qlora_throughput_ratio_min"]
        if lora.get("peak_cuda_gib") and qlora.get("peak_cuda_gib"):
            out["qlora_memory_ratio"] = round(qlora["peak_cuda_gib"] / lora["peak_cuda_gib"], 3)
            out["qlora_memory_met"] = out["qlora_memory_ratio"] <= GOALS["qlora_memory_ratio_max"]
    return out


def _print_table(results: dict, summary: dict, device_name: str) -> None:
    print(f"\n{device_name}\n\n| method | peak CUDA GiB | tokens/s | MFU |\n|---|---|---|---|")
    for method, r in results.items():
        if "error" in r:
            print(f"| {method} | failed: {r['error'][:80]} | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        print(f"| {method} | {r.get('peak_cuda_gib') or '-'} | {r['tokens_per_s']:,.0f} | {mfu} |")
    if summary:
        print("\n" + ", ".join(f"{k}={v}" for k, v in summary.items()))


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40] or "device"


if __name__ == "__main__":
    sys.exit(main())
