"""What comes after training, per method: evaluate's and merge's peaks, the merged and registered sizes, merge's time.

``Plan.after_training[method]`` (a ``StageCosts``) for ``lora`` and ``qlora``: the same meta-device
``ModelShape`` as the training estimates, the dtypes the stages will pick, and constants measured by
``bench/plan_after_training.py`` (``bench/results/plan_after_training-2026-12-08-cpu.json``).

Peaks follow the training estimate's convention (``estimates.py``): on a CPU, the stage process's
resident memory (anonymous and file-backed: a memory-mapped checkpoint counts once its pages are read)
*above what its imports hold* (torch, transformers, peft, bitsandbytes, MLflow: ~0.58 GiB for evaluate
and merge, ~0.19 GiB for register on this machine, measured apart as ``bench/scale_rehearsal.py``
does), with runtime terms like training's ``CPU_RUNTIME_BYTES``. On a GPU, evaluate's is device memory
(its forwards run there); merge's and register's are host RAM (neither puts its peak on the GPU).

Notation as in ``estimates.py``, and: n the elements of one checkpoint tensor, sb bytes per stored
element (config.json's dtype), ob bytes per merged element (``merge.dtype``; auto = the base's own),
w the compute dtype's bytes (what train computed in), lb what a 4-bit load keeps the unquantized
weights in (w, or 4 for float16 compute), E the input embedding, H an untied LM head, P_q the linear
weights a 4-bit load quantizes, b ``eval.batch_size``, s ``data.max_length``.

Evaluate (``tasks/evaluate.py``: ``load_tuned``, then a token-weighted loss batch by batch and greedy
generation for ``eval.num_samples`` prompts, base and tuned):

    lora   w·(P − E) (sb = w: the mapped checkpoint, the embedding read row by row; else w·P converted)
    qlora  NF4·P_q + lb·H (copied off the mapping) + 2·lb·max(in·out) (a dequantized weight, and its
           copy for the CPU matmul); while loading sb·P_q + NF4 + 2·sb·H (every linear read through the
           mapping to quantize it, the head read and copied), then the mapping goes
    both   + 4·P_a (fp32 adapter) + max(loss batch b·s·(V·(w + 8) + (2h + 3i)·w): the logits, the
           scored rows upcast and their log-softmax; generation's prefill on a CPU in bf16: b·h·V·2, the
           LM head copied once per prompt, see ``generation_bytes``) + runtime; on a CPU the load's own
           peak when higher (a 16-bit checkpoint converted: (sb + w)·P)

Merge (``loraflow/model/streaming_merge.py``, tensor by tensor; ``streaming_peak``): the runtime, the
adapter, and the largest *per-tensor* peak: what one tensor holds while it is read (sb·n of the mapped
file), turned into what the adapter trained against and merged in fp32 (14·n for a merged bf16 weight:
2 stored + 4 reference + 4 B·A + 4 its scaled copy; while it is checked 2 + 4 + 4 merged + 2 written +
one block of rows in fp64, at most 64 MiB), or, for QLoRA, through bitsandbytes' CPU NF4
quantization (16·n for a bf16 weight: its fp32 copy, scaled and clamped values, int32 bucket indices,
bytes, nibbles). Independent of the number of layers. When ``merge.logit_check`` runs (auto: the fp32
model fits three times in half the free RAM, ``tasks/merge.py``), the check's peak (``check_peak``):
the fp32 base 4·P plus the largest of its conversion from the checkpoint, the 4-bit load and its
``dequantize_into``, the bf16 model as trained, and the merged model's load.

Register (``tasks/register.py``) copies the folder into the artifact store file by file (``merged``:
the merged weights, configs and tokenizer; ``adapter``: the adapter folder, the base pinned by its
digest); it loads no model, so its peak is its runtime alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.model.loading import tokenizer_files
from loraflow.model.streaming_merge import logit_check_runs as merge_logit_check_runs
from loraflow.model.streaming_merge import output_dtype_name
from loraflow.planner.estimates import CPU_RUNTIME_BYTES, NF4_BITS
from loraflow.planner.result import Device, StageCosts
from loraflow.planner.shapes import Linear, ModelShape

MIB = 2**20

# ---------------------------------------------------------------------------------------------
# Constants: bench/plan_after_training.py, 2026-12-08, 2-core AMD EPYC (shared), 24 GiB RAM, torch 2.13.0+cpu,
# glibc malloc, bf16 compute (AVX512-BF16); random Llamas of Llama-2-7B's widths (hidden 4096, MLP 11008,
# vocabulary 32000), 1 and 2 layers, bf16 safetensors, and the embedded 844k-parameter base. Each stage a
# fresh `loraflow stage` process; peaks above the stage's imports (bench/results/plan_after_training-*.json).

# Each stage's own memory above its imports that is not tensors of the model: lazily imported modules
# (tokenizer, safetensors, peft's tuner code, bitsandbytes' backend, MLflow's logging), oneDNN/BLAS
# buffers and code pages of the first matmuls (what CPU_RUNTIME_BYTES is for training), glibc's heap.
# Measured where the model's own tensors are negligible: evaluate and merge (with its logit check) on the
# embedded base, 90 and 87 MiB above imports; the streaming merge alone at 7B widths 51 MiB besides its
# largest tensor (the same with 1 and 2 layers); register 43 MiB with a 3.4 MB or a 0.93 GB folder.
EVALUATE_PROCESS_BYTES = 58 * MIB  # + CPU_RUNTIME_BYTES: 78 MiB
MERGE_PROCESS_BYTES = 30 * MIB  # + CPU_RUNTIME_BYTES: 50 MiB
CHECK_PROCESS_BYTES = 30 * MIB  # the logit check's forwards, tokenizer and model classes on top
REGISTER_PROCESS_BYTES = 43 * MIB

# bitsandbytes' CPU 4-bit quantize (its "default" backend op: ``A.float()``, ``A·(1/absmax)`` clamped
# to [-1, 1], ``bucketize`` to int32, then uint8 and packed nibbles): 10 bytes per element besides its
# fp32 input; + 4 more when the input is not fp32 already.
NF4_QUANTIZE_BYTES = 10
# The per-weight check converts a block of rows to fp64 at a time (streaming_merge.CHECK_CHUNK_BYTES).
CHECK_CHUNK_BYTES = 64 * MIB
# A QLoRA forward on a CPU holds a dequantized weight and the copy its matmul makes: 2·lb·max(in·out).
# Measured: evaluate's RSS grew ~170-180 MiB past the 4-bit model at 7B widths (lb = 2, max 45.1M) and
# stayed there (1 and 2 layers alike).
QLORA_EVAL_WORKSPACE_COPIES = 2

# Time, on this 2-core CPU, scaled by 2 / cores elsewhere (torch's elementwise and BLAS ops use every
# core). Per element: a merged weight (fp32 B·A, add, cast, fp64 check on 4 vectors) 20 ns (16-27 over
# 2-7 merged weights a model); an NF4 round trip (bitsandbytes' CPU quantize + dequantize) 38 ns (35-45,
# bf16 and fp32 loads, 5 and 10 weights). Reading the checkpoint and writing the merged file: 2 GB/s
# (read + written bytes) from the page cache, as here where the base was just written (a checkpoint read
# cold runs at the disk's rate instead), + 2.7 s to build the skeleton, read the adapter and the headers
# (2.9 s on the embedded base, where there is nothing else). The streaming part came within 21% of every
# measured merge (1 and 2 layers, q/v and all-linear adapters, bf16 and fp32 loads).
CALIBRATION_CORES = 2
MERGE_SECONDS_PER_ELEMENT = 20e-9
NF4_ROUND_TRIP_SECONDS_PER_ELEMENT = 38e-9
MERGE_IO_BYTES_PER_SECOND = 2.0e9
MERGE_FIXED_SECONDS = 2.7
# The logit check (tasks/merge.py): an fp32 model loads at 0.7 GB/s of fp32 weights (the base converted
# from bf16: 3.7 s for 1.86 GB; the merged one, just written: 1.4 s); a 4-bit load quantizes each linear
# (the NF4 round trip's rate) and ``dequantize_into`` takes 8 ns an element back (7.5 and 1.6 s for
# 202M); its fp32 forwards run at 0.035 TFLOP/s per core (its latency probe: 4 x 32 tokens through
# 333M matmul weights in 1.27 s on 2 cores).
CHECK_LOAD_BYTES_PER_SECOND = 0.7e9
DEQUANTIZE_INTO_SECONDS_PER_ELEMENT = 8e-9
CPU_INFER_TFLOPS_PER_CORE = 0.035
PROBE_ROWS = 4  # tasks.merge.PROBE_ROWS
LATENCY_REPEATS = 5  # tasks.merge.LATENCY_REPEATS

# Files besides the weights. MLflow's own (MLmodel, conda.yaml, python_env.yaml, requirements.txt, the
# pyfunc code file): 13.1-13.6 KB measured; a safetensors header entry ~100 B a tensor; config.json and
# generation_config.json ~1 KB; an adapter folder's adapter_config.json, README.md and
# loraflow_train.json ~7.6 KB.
MLFLOW_MODEL_FILES_BYTES = 13_600
SAFETENSORS_ENTRY_BYTES = 100
CONFIG_FILES_BYTES = 1_000
ADAPTER_FILES_BYTES = 7_600


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element: stored (checkpoint), merged output, compute, and a 4-bit load's unquantized weights."""

    stored: int
    output: int
    compute: int
    loaded_4bit: int
    bf16: bool = False  # the compute dtype is bfloat16 (the LM head computes in it: see generation_bytes)


@dataclass(frozen=True)
class Tensors:
    """The checkpoint's tensors as the merge sees them (tied weights once), from the meta model."""

    numel: dict[str, int]  # parameter name -> elements
    quantized: frozenset[str]  # weights a 4-bit load quantizes (every linear but the head)
    embedding: int  # input embedding elements
    head_untied: int  # an untied LM head's elements (0 when tied to the embedding)

    @classmethod
    def of(cls, shape: ModelShape) -> Tensors:
        model = shape.model
        named = dict(model.named_parameters()) if model is not None else {}
        numel = {n: int(p.numel()) for n, p in named.items()}
        emb_w = getattr(_module(model, "get_input_embeddings"), "weight", None)
        head_w = getattr(_module(model, "get_output_embeddings"), "weight", None)
        tied = head_w is not None and head_w is emb_w
        return cls(
            numel=numel,
            quantized=frozenset(f"{x.name}.weight" for x in shape.linears) & set(numel),
            embedding=int(emb_w.numel()) if emb_w is not None else 0,
            head_untied=0 if tied or head_w is None else int(head_w.numel()),
        )

    @property
    def total(self) -> int:
        return sum(self.numel.values())

    @property
    def quantized_numel(self) -> int:
        return sum(self.numel[n] for n in self.quantized)

    def largest(self, names) -> int:
        return max((self.numel[n] for n in names), default=0)


def _module(model: Any, getter: str) -> Any:
    """``model.get_input_embeddings()`` / ``get_output_embeddings()``, or None where a model has none."""
    try:
        return getattr(model, getter)() if model is not None and hasattr(model, getter) else None
    except (NotImplementedError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# dtypes


def dtype_bytes(name: Any, default: int = 4) -> int:
    """2 for bfloat16/float16, 4 for float32; ``default`` for anything else (None, an integer dtype)."""
    text = str(name or "").removeprefix("torch.")
    return {"bfloat16": 2, "float16": 2, "float32": 4}.get(text, default)


def config_dtype(config: Any) -> str | None:
    """The dtype config.json names (``dtype``; older files' ``torch_dtype`` arrive as ``dtype`` in
    transformers 5; a multimodal config's text part), as a string, or None."""
    for c in (config, getattr(config, "text_config", None)):
        value = getattr(c, "dtype", None) if c is not None else None
        if value:
            return str(value).removeprefix("torch.")
    return None


def output_bytes(config: Any, setting: str) -> int:
    """Bytes per element of ``merge.dtype`` as the merge resolves it (``streaming_merge.output_dtype_name``)."""
    return dtype_bytes(output_dtype_name(setting, config_dtype(config)))


def dtypes(config: Any, cfg: Any, compute: int) -> Dtypes:
    """The stored, merged, compute and 4-bit-load bytes for this config (``compute`` from ``estimates.compute_bytes``)."""
    name = cfg.quantization.compute_dtype
    loaded = 4 if name == "float16" else compute  # loading.load_model: float16 compute loads in fp32
    bf16 = name == "bfloat16" or (name == "auto" and compute == 2)
    return Dtypes(dtype_bytes(config_dtype(config)), output_bytes(config, cfg.merge.dtype), compute, loaded, bf16)


# ---------------------------------------------------------------------------------------------
# merge: the streaming pass


def tensor_peak(n: int, action: str, d: Dtypes, quantized_base: bool) -> float:
    """Bytes one checkpoint tensor of ``n`` elements holds at its peak in the streaming merge.

    ``action`` as ``streaming_merge._plan`` decides it: ``merge`` (a LoRA target), ``dequantize`` (a
    4-bit load quantized it: QLoRA's other linears), ``copy``. ``quantized_base``: QLoRA, where a
    copied tensor is first cast to the 4-bit load's dtype and a merged one goes through NF4 first.
    """
    sb, ob, lb = d.stored, d.output, d.loaded_4bit
    stored = sb * n  # the mapped file's pages, resident once read
    if action == "copy":
        cast = lb * n if quantized_base and lb != sb else 0  # what dequantize_into copies: the load's dtype
        current = lb if cast else sb
        return stored + cast + (ob * n if ob != current else 0)
    if quantized_base:  # _nf4_round_trip: cast to the load dtype, quantize (fp32 inside), dequantize
        cast = lb * n if lb != sb else 0
        round_trip = stored + cast + (4 * n if lb != 4 else 0) + NF4_QUANTIZE_BYTES * n
        reference = 4 * n  # dequantized, then fp32
    else:
        round_trip = 0
        reference = 4 * n if sb != 4 else 0  # an fp32 checkpoint is its own reference
    held = stored + reference
    written = ob * n if ob != 4 else 0
    if action == "dequantize":
        return max(round_trip, held + written)
    combine = held + 8 * n  # B·A and its scaled copy (then the sum, once B·A is gone)
    check = held + 4 * n + written + min(8 * n, CHECK_CHUNK_BYTES)  # merged, written, one fp64 block
    return max(round_trip, combine, check)


def streaming_peak(t: Tensors, targets: set[str], d: Dtypes, method: str) -> tuple[float, str]:
    """The largest per-tensor peak of the streaming merge, and the tensor that sets it."""
    qlora = method == "qlora"
    best, where = 0.0, ""
    for name, n in t.numel.items():
        action = "merge" if name in targets else "dequantize" if qlora and name in t.quantized else "copy"
        peak = tensor_peak(n, action, d, qlora)
        if peak > best:
            best, where = peak, name
    return best, where


# ---------------------------------------------------------------------------------------------
# evaluate and the 4-bit load


def qlora_weights(shape: ModelShape, t: Tensors, d: Dtypes, double_quant: bool, device_kind: str) -> float:
    """A 4-bit model as evaluate (and the logit check) hold it: NF4 linears + the unquantized rest.

    On a CPU with the checkpoint in the load's dtype the rest stay views of the checkpoint until
    ``quant.release_checkpoint_mapping`` copies the head and maps the embedding privately (only the rows
    a batch looks up become resident); elsewhere the rest are converted copies.
    """
    nf4 = NF4_BITS[double_quant] / 8 * t.quantized_numel
    rest = shape.params_total - t.quantized_numel
    if device_kind == "cpu" and d.loaded_4bit == d.stored:
        return nf4 + d.loaded_4bit * (rest - t.embedding)
    return nf4 + d.loaded_4bit * rest


def qlora_load_peak(shape: ModelShape, t: Tensors, d: Dtypes, double_quant: bool) -> float:
    """A CPU 4-bit load's peak: the linears' pages read to quantize them + their NF4 copies; then the head
    read and copied before the mapping goes (same dtype), or every unquantized weight converted."""
    nf4 = NF4_BITS[double_quant] / 8 * t.quantized_numel
    if d.loaded_4bit == d.stored:
        return d.stored * t.quantized_numel + nf4 + 2 * d.stored * t.head_untied
    rest = shape.params_total - t.quantized_numel
    return d.stored * shape.params_total + nf4 + d.loaded_4bit * rest


def mapped_bytes(t: Tensors, d: Dtypes, method: str, device_kind: str) -> float:
    """The checkpoint's pages a CPU 4-bit load reads through its mapping: every linear it quantizes (the
    embedding and head are views it does not read), dropped once loaded; 0 elsewhere."""
    return float(d.stored * t.quantized_numel) if device_kind == "cpu" and method == "qlora" else 0.0


def qlora_prepare_peak(shape: ModelShape, t: Tensors, d: Dtypes, double_quant: bool, device_kind: str) -> float:
    """Peak while peft's ``prepare_model_for_kbit_training`` readies a 4-bit model for training (the train stage).

    It upcasts every unquantized weight (embedding, head, norms) to fp32 one at a time: NF4·P_q +
    4·(P − P_q), with the largest of them still in the load's dtype beside its fp32 copy
    (+ lb·max rest tensor; for the embedding, its privately mapped pages, read to convert it). An fp32
    load converts nothing; on a CPU its embedding then stays a mapping read row by row, as in evaluate.
    Measured at 7B widths (``bench/scale_rehearsal.py`` with a phase probe, 1 layer): 1.39 GiB for
    Llama-2's vocabulary (this: 1.32), 5.07 for Llama-3's 128,256 (this: 5.00).
    """
    if d.loaded_4bit == 4:
        return qlora_weights(shape, t, d, double_quant, device_kind)
    nf4 = NF4_BITS[double_quant] / 8 * t.quantized_numel
    rest = shape.params_total - t.quantized_numel
    largest = t.largest(n for n in t.numel if n not in t.quantized)
    return nf4 + 4 * rest + d.loaded_4bit * largest


def train_load_peak(shape: ModelShape, t: Tensors, d: Dtypes, double_quant: bool, device_kind: str) -> float:
    """QLoRA's train stage before its first step: the 4-bit load (a CPU's, through the checkpoint's
    mapping: ``qlora_load_peak``; a GPU's reads it in host memory) or its preparation, whichever is higher;
    plus the CPU runtime, as the step's estimate counts it."""
    prepare = qlora_prepare_peak(shape, t, d, double_quant, device_kind)
    if device_kind != "cpu":
        return prepare
    return CPU_RUNTIME_BYTES + max(qlora_load_peak(shape, t, d, double_quant), prepare)


def loss_batch_bytes(shape: ModelShape, batch: int, seq: int, w: int) -> float:
    """One loss batch under no_grad: the logits (w), the scored rows upcast to fp32 and their log-softmax
    (8), the widest layer's transients (the hidden state twice, the MLP's three i-wide tensors)."""
    return batch * seq * (shape.vocab * (w + 8) + (2 * shape.hidden + 3 * shape.intermediate) * w)


def generation_bytes(shape: ModelShape, batch: int, bf16: bool, device_kind: str) -> float:
    """Generation's prefill on a CPU in bf16: ``max(1, batch)·h·V·2``, the LM head copied once per prompt.

    transformers' prefill keeps only the last position's logits (``hidden[:, -1:, :]``, a non-contiguous
    (b, 1, h) view); ``F.linear`` cannot fold that into one matrix, so ATen's matmul broadcasts the head
    to (b, h, V), and the CPU's bf16 batched matmul (oneDNN) makes that contiguous: 1,000 MiB for 4
    prompts at 7B widths, 2,000 for 8, and seconds of copying (torch 2.13; fp32 and fp16 take the
    broadcast as it is: 0; one prompt still reorders the head once). Measured with ``F.linear`` alone
    and in evaluate. A CUDA batched matmul takes the broadcast stride too: 0 on a GPU (not measured).
    """
    if device_kind != "cpu" or not bf16 or batch <= 0:
        return 0.0
    return max(1, batch) * shape.hidden * shape.vocab * 2


def evaluate_peak(shape: ModelShape, t: Tensors, cfg: Any, d: Dtypes, adapter_params: int, method: str,
                  device_kind: str, generated: int) -> float:
    """evaluate's peak: the model as ``load_tuned`` loads it, the adapter, one loss batch or generation batch."""
    b, s, w = cfg.eval.batch_size, cfg.data.max_length, d.compute
    adapter = 4 * adapter_params
    if method == "qlora":
        weights = qlora_weights(shape, t, d, cfg.quantization.double_quant, device_kind)
        copies = QLORA_EVAL_WORKSPACE_COPIES if device_kind == "cpu" else 1
        weights += copies * d.loaded_4bit * t.largest(t.quantized)
    else:
        mapped = device_kind == "cpu" and d.stored == w
        weights = w * (shape.params_total - (t.embedding if mapped and t.head_untied else 0))
    act = max(loss_batch_bytes(shape, b, s, w), generation_bytes(shape, min(b, generated), d.bf16, device_kind))
    if device_kind != "cpu":
        return weights + adapter + act
    runtime = CPU_RUNTIME_BYTES + EVALUATE_PROCESS_BYTES
    load = 0.0
    if method == "qlora":
        load = qlora_load_peak(shape, t, d, cfg.quantization.double_quant)
    elif d.stored != w:  # converted while the checkpoint's pages are read
        load = (d.stored + w) * shape.params_total
    return runtime + max(load, weights + adapter + act)


# ---------------------------------------------------------------------------------------------
# merge's logit check


def logit_check_runs(setting: str, params: int, available: float | None = None) -> bool:
    """Whether merge compares logits (``streaming_merge.logit_check_runs``, the rule the stage decides by) for
    ``params`` parameters, against ``available`` RAM (None: this machine's now)."""
    return merge_logit_check_runs(setting, 4 * params, available_ram() if available is None else available)


def available_ram() -> float:
    """What merge's auto check compares against: psutil's available memory now (0 without psutil)."""
    try:
        import psutil
    except ImportError:
        return 0.0
    return float(psutil.virtual_memory().available)


def check_peak(shape: ModelShape, t: Tensors, cfg: Any, d: Dtypes, adapter_params: int, method: str) -> float:
    """The logit check's host peak (``tasks/merge._check_logits``), above the merge's own runtime.

    The unmerged base in fp32 (4·P: converted from a 16-bit checkpoint while its pages are read, or the
    fp32 checkpoint's mapping itself) stays while, in turn: QLoRA's 4-bit model loads
    (``qlora_load_peak``) and is dequantized into it (each unquantized weight upcast to fp32 while its
    pages are read: (4 + sb)·max rest tensor); LoRA trained in 16-bit loads that model too (its mapped
    pages as evaluate reads them); the merged model loads in fp32 after the base is gone (its file's
    pages read while converting, when merged in 16-bit).
    """
    p = shape.params_total
    fp32 = 4 * p
    convert = d.stored * p if d.stored != 4 else 0
    merged = d.output * p if d.output != 4 else 0
    phases = [convert, merged]
    if method == "qlora":
        dq = cfg.quantization.double_quant
        rest = [n for name, n in t.numel.items() if name not in t.quantized]
        phases.append(qlora_load_peak(shape, t, d, dq))
        phases.append(qlora_weights(shape, t, d, dq, "cpu") + (4 + d.stored) * max(rest, default=0))
    elif d.compute != 4:
        mapped = d.stored == d.compute
        phases.append(d.compute * (p - (t.embedding if mapped and t.head_untied else 0)) + 4 * adapter_params)
    return fp32 + max(phases) + CHECK_PROCESS_BYTES


# ---------------------------------------------------------------------------------------------
# time


def merge_seconds(shape: ModelShape, t: Tensors, targets: set[str], d: Dtypes, method: str, cores: int) -> float:
    """The streaming merge: read sb·P, write ob·P, merge each target, NF4-round-trip each 4-bit weight (QLoRA)."""
    scale = CALIBRATION_CORES / max(1, cores)
    merged = sum(t.numel[n] for n in targets if n in t.numel)
    round_trips = t.quantized_numel if method == "qlora" else 0
    compute = merged * MERGE_SECONDS_PER_ELEMENT + round_trips * NF4_ROUND_TRIP_SECONDS_PER_ELEMENT
    io = (d.stored + d.output) * shape.params_total / MERGE_IO_BYTES_PER_SECOND
    return MERGE_FIXED_SECONDS + io + compute * scale


def check_seconds(shape: ModelShape, t: Tensors, d: Dtypes, method: str, device: Device, cores: int,
                  test_tokens: float, probe_tokens: float) -> float:
    """The logit check: its loads (the fp32 base and the merged model; QLoRA's 4-bit model, quantized and
    dequantized into the base; LoRA's model as trained, converted unless it is the mapped checkpoint) and
    its fp32 forwards (the probe batch through the trained, unmerged and merged models, the latency
    repeats of both, the merged model's loss over the test split)."""
    scale = CALIBRATION_CORES / max(1, cores)
    p = shape.params_total
    load = 2 * 4 * p / CHECK_LOAD_BYTES_PER_SECOND
    if method == "qlora":
        per = NF4_ROUND_TRIP_SECONDS_PER_ELEMENT + DEQUANTIZE_INTO_SECONDS_PER_ELEMENT
        load += t.quantized_numel * per * scale
    elif d.compute != 4 and d.stored != d.compute:
        load += d.compute * p / CHECK_LOAD_BYTES_PER_SECOND
    forwards = (3 + 2 * (LATENCY_REPEATS + 1)) * probe_tokens + test_tokens
    flops = device.effective_flops if device.kind == "gpu" else CPU_INFER_TFLOPS_PER_CORE * 1e12 * max(1, cores)
    return load + 2 * shape.params_matmul * forwards / flops


# ---------------------------------------------------------------------------------------------
# sizes


def tokenizer_bytes(base: str | Path | None) -> int:
    """The base's tokenizer files (register ships the tokenizer training saved: the same files), 0 when
    the base is not a local folder."""
    if base is None:
        return 0
    return sum(f.stat().st_size for f in tokenizer_files(Path(base)))


def merged_bytes(t: Tensors, d: Dtypes) -> float:
    """The merged weights: every parameter (tied ones once) × bytes of the output dtype."""
    return float(t.total * d.output)


def registered_bytes(t: Tensors, d: Dtypes, log: str, adapter_tensors: int, trainable: int, tokenizer: int) -> float:
    """What register adds per version: the merged folder, or the adapter folder (fp32 A, B and trained biases)."""
    if log == "adapter":
        weights = 4 * trainable + SAFETENSORS_ENTRY_BYTES * adapter_tensors
        return weights + ADAPTER_FILES_BYTES + tokenizer + MLFLOW_MODEL_FILES_BYTES
    header = SAFETENSORS_ENTRY_BYTES * len(t.numel)
    return merged_bytes(t, d) + header + CONFIG_FILES_BYTES + tokenizer + MLFLOW_MODEL_FILES_BYTES


# ---------------------------------------------------------------------------------------------
# all of it


def after_training(
    shape: ModelShape, t: Tensors, d: Dtypes, cfg: Any, adapted: list[Linear], adapter_params: int, trainable: int,
    device: Device, base_dir: str | Path | None, test_records: int | None, tokens_per_record: float,
    available: float | None = None,
) -> tuple[dict[str, StageCosts], bool]:
    """``StageCosts`` for lora and qlora, and whether merge's logit check would run.

    ``t``, ``d``: the checkpoint's tensors and dtypes (``Tensors.of``, ``dtypes``), as the training
    estimate uses them; ``available``: free host RAM for ``merge.logit_check: auto`` (None: this machine's now).
    """
    targets = {f"{x.name}.weight" for x in adapted}
    cores = _cores()
    check = logit_check_runs(cfg.merge.logit_check, shape.params_total, available)
    generated = _generated(cfg, test_records)
    tok = tokenizer_bytes(base_dir)
    tokens = min(float(tokens_per_record), float(cfg.data.max_length))
    test_tokens = (test_records or 0) * tokens
    probe_tokens = min(PROBE_ROWS, test_records or PROBE_ROWS) * tokens
    out = {}
    for method in ("lora", "qlora"):
        stream, _ = streaming_peak(t, targets, d, method)
        merge_peak = CPU_RUNTIME_BYTES + MERGE_PROCESS_BYTES + 4 * trainable + stream
        seconds = merge_seconds(shape, t, targets, d, method, cores)
        if check:
            merge_peak = max(merge_peak, CPU_RUNTIME_BYTES + MERGE_PROCESS_BYTES + 4 * trainable
                             + check_peak(shape, t, cfg, d, adapter_params, method))
            seconds += check_seconds(shape, t, d, method, device, cores, test_tokens, probe_tokens)
        out[method] = StageCosts(
            evaluate_peak=evaluate_peak(shape, t, cfg, d, adapter_params, method, device.kind, generated),
            merge_peak=merge_peak,
            merged_bytes=merged_bytes(t, d),
            registered_bytes=registered_bytes(t, d, cfg.register.log, 2 * len(adapted), trainable, tok),
            merge_seconds=seconds,
            register_peak=float(REGISTER_PROCESS_BYTES),
        )
    return out, check


def _generated(cfg: Any, test_records: int | None) -> int:
    """Prompts evaluate generates for: ``eval.num_samples`` (0 = the whole test split) when a text metric is asked."""
    if not {"exact_match", "token_f1"} & set(cfg.eval.metrics):
        return 0
    n = cfg.eval.num_samples
    if n == 0:
        return test_records if test_records is not None else cfg.eval.batch_size
    return min(n, test_records) if test_records is not None else n


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
