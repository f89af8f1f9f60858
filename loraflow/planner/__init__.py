"""``loraflow plan``: memory, time and the right knobs, known before a run starts.

Reads only the base model's ``config.json`` (the model is built on the meta device: no weights,
no GPU) and counts the dataset cheaply. ``plan()`` returns a typed ``Plan``; ``lints()`` is
separate so ``loraflow run`` can log the advice at its start; ``cli()`` is the command.

    plan = planner.plan(cfg, paths, gpu_memory=24)
    plan.method, plan.estimates_gib["qlora"], plan.trainable_params, [x.id for x in plan.lints]

The formulas live in ``loraflow.planner.estimates`` (memory, activations, time) and the lint
thresholds in ``loraflow.planner.checks``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

from loraflow.core.config import Config
from loraflow.core.errors import ConfigError, TrainingError
from loraflow.core.paths import Paths
from loraflow.model import loading
from loraflow.planner import after_training as at
from loraflow.planner import estimates as est
from loraflow.planner.checks import LINT_IDS, last_tracked_lora, lints
from loraflow.planner.dataset import data_size
from loraflow.planner.estimates import HEADROOM
from loraflow.planner.result import (
    GIB,
    METHODS,
    DataSize,
    Device,
    Lint,
    Memory,
    Plan,
    StageCosts,
)
from loraflow.planner.shapes import (
    Linear,
    ModelShape,
    model_shape,
    read_config,
    resolve_targets,
)

__all__ = [
    "plan", "lints", "cli", "strict_check", "detect_device", "memory_estimates",
    "Plan", "Lint", "Device", "Memory", "DataSize", "StageCosts", "ModelShape", "LINT_IDS", "HEADROOM",
    "last_tracked_lora", "model_shape", "resolve_targets", "resolve_method",
]

STRICT_EXIT = 3  # --strict with warnings: distinct from user errors (1, 2)


def plan(cfg: Config, paths: Paths, gpu_memory: float | None = None, *, with_lints: bool = True) -> Plan:
    """The plan for ``cfg``: estimates for full, LoRA and QLoRA, the method, trainables, time, lints.

    ``gpu_memory`` (GiB) stands for the training GPU; None detects a CUDA GPU through torch, else
    plans for this machine's CPU and RAM. With ``method: auto`` it resolves the method (LoRA when
    its 16-bit estimate is at most 85% of the memory, else QLoRA when that is) or raises
    ``TrainingError`` naming what would fit.
    """
    config, where = read_config(cfg, paths)
    shape = model_shape(config, cfg.model.trust_remote_code)
    targets, adapted = resolve_targets(shape, cfg.lora.target_modules)
    adapter = est.lora_params(adapted, cfg.lora.r)
    trainable = adapter + est.trainable_biases(shape, adapted, cfg.lora.bias)
    device = detect_device(gpu_memory)
    t = cfg.train
    seq, batch, ckpt = cfg.data.max_length, t.batch_size, t.gradient_checkpointing
    w = _weight_bytes(cfg, device)
    tensors, dtypes = at.Tensors.of(shape), at.dtypes(config, cfg, w)
    unread = _unread_embedding(tensors, dtypes, device)
    memory = memory_estimates(shape, cfg, adapted, trainable, seq, batch, ckpt, w, device.kind, unread)
    method, reason, hint = _choose_method(cfg, shape, adapted, trainable, device, memory)
    data = data_size(cfg, paths)
    steps, tokens = est.steps_and_tokens(
        data.train_records, data.tokens_per_record, t.epochs, t.max_steps, batch, t.grad_accum
    )
    after, logit_check = at.after_training(
        shape, tensors, dtypes, cfg, adapted, adapter, trainable, device, where, data.test_records,
        data.tokens_per_record,
    )
    seconds = {
        m: None if tokens is None else est.train_seconds(
            est.flops_per_token(shape, m, trainable, ckpt), tokens, device.effective_flops, m
        )
        for m in METHODS
    }
    result = Plan(
        base=where,
        model_type=shape.model_type,
        params_total=shape.params_total,
        params_quantized=shape.params_quantized,
        params_matmul=shape.params_matmul,
        targets=targets,
        target_roles=sorted({x.role for x in adapted}),
        adapted_modules=len(adapted),
        trainable_params=trainable,
        # peft's print_trainable_parameters: trainable / all parameters of the adapted model.
        trainable_pct=100 * trainable / (shape.params_total + adapter),
        device=device,
        memory=memory,
        method=method,
        method_reason=reason,
        fit_hint=hint,
        data=data,
        steps=steps,
        train_tokens=tokens,
        seconds=seconds,
        seq_len=seq,
        batch_size=batch,
        gradient_checkpointing=ckpt,
        assumptions=_assumptions(cfg, device, data, shape),
        mapped_bytes=at.mapped_bytes(tensors, dtypes, method, device.kind),
        qlora_load_peak=at.train_load_peak(shape, tensors, dtypes, cfg.quantization.double_quant, device.kind),
        after_training=after,
        merge_logit_check=logit_check,
    )
    return replace(result, lints=lints(cfg, paths, result)) if with_lints else result


def resolve_method(cfg: Config, paths: Paths) -> tuple[str, str]:
    """The method training uses, ``qlora`` or ``lora``, and why.

    ``auto`` asks the planner (the seed's guide: plain LoRA when the 16-bit base fits comfortably).
    """
    if cfg.method != "auto":
        return cfg.method, f"method: {cfg.method} as configured"
    p = plan(cfg, paths, with_lints=False)
    return p.method, p.method_reason


def memory_estimates(
    shape: ModelShape, cfg: Config, adapted: list[Linear], trainable: int, seq: int, batch: int, checkpointing: bool,
    weight_bytes: int = 2, device_kind: str = "gpu", unread_embedding: float = 0.0,
) -> dict[str, Memory]:
    """Peak memory of full fine-tuning, LoRA and QLoRA at this batch, length and checkpointing.

    ``weight_bytes``: 2 for 16-bit compute, 4 for fp32 (``est.compute_bytes``).
    ``device_kind`` ``cpu`` adds what a CPU run holds besides its live tensors: glibc malloc's
    retention (``est.cpu_allocator_bytes``) and the runtime's first-step memory; a GPU's CUDA
    context and caching-allocator slack are left to the headroom. ``unread_embedding``: LoRA's
    embedding bytes a CPU never reads (``est.lora_memory``).
    """
    w = weight_bytes
    full_act = est.activation_bytes(shape, seq, batch, checkpointing, weight_bytes=w, device_kind=device_kind)
    lora_act = est.activation_bytes(
        shape, seq, batch, checkpointing, adapted, cfg.lora.r, dropout=cfg.lora.dropout > 0, weight_bytes=w,
        frozen=True, device_kind=device_kind,
    )
    # the head as each method trains with it: in the compute dtype, or fp32 after peft's kbit preparation
    head = {m: est.fused_head_weight_bytes(shape, w, est.QLORA_UNQUANTIZED_BYTES if m == "qlora" else w, device_kind)
            for m in METHODS}
    memory = {
        "full": est.full_memory(shape, full_act, w, accumulate=cfg.train.grad_accum > 1, head_workspace=head["full"]),
        "lora": est.lora_memory(shape, trainable, lora_act, w, head_workspace=head["lora"], unread=unread_embedding),
        "qlora": est.qlora_memory(shape, trainable, lora_act, cfg.quantization.double_quant, w, head["qlora"]),
    }
    if device_kind == "cpu":
        memory = {m: replace(x, allocator=est.cpu_allocator_bytes(m, x.activations), runtime=est.CPU_RUNTIME_BYTES)
                  for m, x in memory.items()}
    return memory


def _unread_embedding(t: at.Tensors, d: at.Dtypes, device: Device) -> float:
    """LoRA on a CPU from a checkpoint in the compute dtype: the untied input embedding stays a mapping
    read row by row (as ``after_training.evaluate_peak`` counts it), so its bytes never become resident."""
    return float(d.compute * t.embedding) if device.kind == "cpu" and d.stored == d.compute and t.head_untied else 0.0


def _weight_bytes(cfg: Config, device: Device) -> int:
    """2 (16-bit) or 4 (fp32): what the train stage computes in on this device (``loading.compute_dtype``)."""
    return est.compute_bytes(cfg.quantization.compute_dtype, device.bf16)


def detect_device(gpu_memory: float | None = None) -> Device:
    """The training device: ``--gpu-memory``, else the first CUDA GPU, else this CPU and its RAM."""
    cuda = _cuda()
    if gpu_memory is not None:
        if not gpu_memory > 0:
            raise ConfigError(f"--gpu-memory: must be a positive number of GiB, got {gpu_memory:g}")
        name = cuda[0] if cuda else f"GPU ({gpu_memory:g} GiB)"
        peak, _ = est.gpu_peak_tflops(name)
        return Device(name, "gpu", float(gpu_memory), peak, est.GPU_MFU, "--gpu-memory", bf16=True)
    if cuda:
        peak, _ = est.gpu_peak_tflops(cuda[0])
        return Device(cuda[0], "gpu", round(cuda[1], 2), peak, est.GPU_MFU, "torch.cuda", bf16=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    # bf16: the train stage's own probe, so ``compute_dtype: auto`` is planned as it will be picked
    return Device(f"CPU ({cores} cores)", "cpu", round(ram, 2), est.CPU_TFLOPS_PER_CORE * cores, 1.0, "system RAM",
                  bf16=loading.cpu_has_native_bf16())


def _cuda() -> tuple[str, float] | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory / GIB
    except Exception:  # a broken driver is "no GPU" for planning
        return None


def _choose_method(
    cfg: Config, shape: ModelShape, adapted: list[Linear], trainable: int, device: Device, memory: dict[str, Memory]
) -> tuple[str, str, str]:
    """(method, why, what would fit): the seed's decision guide for ``auto``."""
    limit = HEADROOM * device.memory_gib * GIB
    where = f"{HEADROOM:.0%} of {device.memory_gib:g} GiB ({device.name})"
    lora, qlora = memory["lora"].total, memory["qlora"].total
    if cfg.method != "auto":
        fits = memory[cfg.method].total <= limit
        hint = "" if fits else _fit_hint(cfg, shape, adapted, trainable, device, cfg.method)
        return cfg.method, f"method: {cfg.method} as configured", hint
    if lora <= limit:
        return "lora", f"auto: the 16-bit LoRA estimate {lora / GIB:.1f} GiB fits within {where}", ""
    if qlora <= limit:
        return "qlora", (f"auto: 16-bit LoRA needs {lora / GIB:.1f} GiB, over {where}; "
                         f"QLoRA's 4-bit base needs {qlora / GIB:.1f} GiB"), ""
    raise TrainingError(
        f"plan: {shape.model_type} ({shape.params_total / 1e9:.2f}B parameters) does not fit {where}: "
        f"QLoRA needs ~{qlora / GIB:.1f} GiB, LoRA ~{lora / GIB:.1f} GiB; "
        + _fit_hint(cfg, shape, adapted, trainable, device, None)
    )


def _fit_hint(
    cfg: Config, shape: ModelShape, adapted: list[Linear], trainable: int, device: Device, method: str | None
) -> str:
    """The least change that fits: the other method, then checkpointing, smaller batches, shorter sequences."""
    limit = HEADROOM * device.memory_gib * GIB
    methods = ["lora", "qlora"] if method in (None, "lora") else [method]
    seq, batch, ckpt = cfg.data.max_length, cfg.train.batch_size, cfg.train.gradient_checkpointing
    options: list[tuple[int, int, bool]] = [(seq, batch, ckpt), (seq, batch, True)]
    b = batch
    while b > 1:
        b //= 2
        options.append((seq, b, True))
    s = seq
    while s > 128:
        s //= 2
        options.append((s, 1, True))
    w = _weight_bytes(cfg, device)
    for s, b, c in options:
        memory = memory_estimates(shape, cfg, adapted, trainable, s, b, c, w, device.kind)
        for m in methods:
            if memory[m].total > limit:
                continue
            changes = [f"-s method={m}"] if method is not None and m != method else []
            changes += ["-s train.gradient_checkpointing=true"] if c and not ckpt else []
            changes += [f"-s train.batch_size={b}"] if b != batch else []
            changes += [f"-s data.max_length={s}"] if s != seq else []
            then = f"{m} ~{memory[m].total / GIB:.1f} GiB"
            keep = "; raise train.grad_accum to keep the effective batch" if b < batch else ""
            return f"it would fit with {' '.join(changes)} ({then}){keep}"
    floor = memory_estimates(shape, cfg, adapted, trainable, options[-1][0], 1, True, w, device.kind)
    smallest = min(methods, key=lambda m: floor[m].total)
    need = floor[smallest].total / HEADROOM / GIB
    return (f"even at batch 1, {options[-1][0]} tokens and gradient checkpointing {smallest} needs "
            f"~{floor[smallest].total / GIB:.1f} GiB (its weights alone {floor[smallest].weights / GIB:.1f} GiB): "
            f"use a device with at least {need:.0f} GiB or a smaller model.base")


def _assumptions(cfg: Config, device: Device, data: DataSize, shape: ModelShape) -> list[str]:
    bits = est.NF4_BITS[cfg.quantization.double_quant]
    w = _weight_bytes(cfg, device)
    width = "16-bit" if w == 2 else "fp32"
    known = est.gpu_peak_tflops(device.name)[1] if device.kind == "gpu" else True
    speed = (f"{device.peak_tflops:g} TFLOP/s bf16 dense peak × {device.mfu:.0%} MFU"
             + ("" if known else " (GPU model unknown: A100-class assumed)")
             if device.kind == "gpu" else
             f"{device.peak_tflops:g} TFLOP/s effective on CPU ({est.CPU_TFLOPS_PER_CORE:g} per core)")
    return [
        f"memory ({'16-bit: bf16 compute' if w == 2 else 'fp32 compute'}"
        f"{' (compute_dtype auto: bf16 where the device has it natively)' if cfg.quantization.compute_dtype == 'auto' else ''}): "
        f"full = {w + 8}·P + max({w}·P gradients, activations) ({width} weights and gradients, fp32 Adam "
        "moments; backward frees activations as it makes gradients); "
        f"LoRA = {w}·P + 16·P_adapter ({width} frozen base, fp32 adapters with gradients and Adam); "
        f"QLoRA = {bits:.3f}/8·P_linear + 4·P_rest + 16·P_adapter + one dequantized linear or the LM head's "
        "slice, whichever is larger; "
        f"each + activations (Korthikanti et al. 2022 per layer, less what a frozen base need not keep, "
        f"{shape.attention} attention"
        f"{': no s×s scores stored' if shape.attention != 'eager' else ''}, + the logits tile of TRL's fused LM "
        f"head: ≤ {est.TRL_TOKEN_CHUNK:,} tokens × {est.TRL_VOCAB_CHUNK:,} vocabulary rows); QLoRA before its "
        "first step: the 4-bit load or peft's fp32 upcast of the unquantized weights, whichever is higher"
        + ("; on a CPU: + glibc malloc's retention (freed blocks kept in its heap: "
           + ", ".join(f"{m} {k:g}×" for m, k in est.CPU_ALLOCATOR_RETENTION.items())
           + f" the activations, measured) + {est.CPU_RUNTIME_BYTES / 2**20:.0f} MiB runtime; a 16-bit or fp32 base in "
           "the compute dtype is the memory-mapped checkpoint itself (file-backed RSS; its embedding read row by "
           "row); a 4-bit load reads every linear it quantizes through that mapping and drops it once loaded "
           "(bench/plan_memory.py, bench/scale_rehearsal.py)" if device.kind == "cpu" else ""),
        f"activations at batch {cfg.train.batch_size} × {cfg.data.max_length} tokens (data.max_length, fully padded), "
        f"gradient checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}; "
        f"fits = at most {HEADROOM:.0%} of the device memory",
        f"time: {speed}; FLOPs/token full 6·N, LoRA 4·N + 6·P_adapter (frozen weights get no weight "
        f"gradient), + 2·N with checkpointing; QLoRA × {est.QLORA_SLOWDOWN} for dequantization",
        "after training: evaluate = the base as load_tuned loads it (LoRA w·P, the mapped checkpoint on a CPU; "
        "QLoRA NF4·P_q + the head, its load reading every linear through the mapping) + the fp32 adapter + "
        f"max(one loss batch of eval.batch_size {cfg.eval.batch_size} × {cfg.data.max_length} tokens, "
        + ("generation's prefill copying the LM head once per prompt on a CPU in bf16" if device.kind == "cpu"
           else "generation")
        + "); merge = the adapter + a few copies of the largest tensor (a bf16 weight merged in fp32: 14 bytes per "
        "element; QLoRA's NF4 round trip: 16), whatever the depth, or the logit check (the fp32 model and one more "
        "copy of the model) when merge.logit_check runs; merged = parameters × bytes of merge.dtype; registered = "
        "that folder (register.log: merged) or the adapter folder, + tokenizer and MLflow's files; merge time = "
        f"{at.MERGE_FIXED_SECONDS:g} s + read + write at {at.MERGE_IO_BYTES_PER_SECOND / 1e9:g} GB/s (page cache) "
        f"+ {at.MERGE_SECONDS_PER_ELEMENT * 1e9:g} ns per merged weight element and "
        f"{at.NF4_ROUND_TRIP_SECONDS_PER_ELEMENT * 1e9:g} ns per NF4 round trip on {at.CALIBRATION_CORES} cores"
        + ("; CPU peaks are above each stage's imports, with measured runtime terms (bench/plan_after_training.py)"
           if device.kind == "cpu" else "; merge and register peaks are host RAM"),
        f"records: {data.records_source}",
        f"tokens per record: {data.tokens_source}",
    ]


def strict_check(cfg: Config, paths: Paths, gpu_memory: float | None = None, *, what: str = "run") -> int:
    """``--strict`` for ``loraflow run`` and ``stage train``: the lints before anything is written or trained.

    Returns ``STRICT_EXIT`` after printing each warning and one line naming their ids, else 0.
    A plan that cannot be made (the model fits nowhere, an unreadable config.json) raises its
    ``LoraflowError`` as ``loraflow plan`` would: strict means stop on what the planner finds.
    """
    found = [x for x in lints(cfg, paths, plan(cfg, paths, gpu_memory, with_lints=False)) if x.level == "warning"]
    if not found:
        return 0
    for lint in found:
        print(f"loraflow: warning [{lint.id}]: {lint.message}", file=sys.stderr)
    print(f"loraflow: --strict: {what} stopped before training by {len(found)} warning(s): "
          f"{', '.join(x.id for x in found)} (see `loraflow plan`; drop --strict to run anyway)", file=sys.stderr)
    return STRICT_EXIT


def cli(cfg: Config, paths: Paths, gpu_memory: float | None = None, as_json: bool = False, strict: bool = False) -> int:
    """``loraflow plan``: print the plan (a table, or one JSON object); exit 3 on warnings with ``strict``."""
    result = plan(cfg, paths, gpu_memory)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        from loraflow.planner.render import render

        render(result, cfg)
    if strict and result.warnings:
        for lint in result.warnings:
            print(f"loraflow: warning [{lint.id}]: {lint.message}", file=sys.stderr)
        print(f"loraflow: --strict: {len(result.warnings)} warning(s)", file=sys.stderr)
        return STRICT_EXIT
    return 0
