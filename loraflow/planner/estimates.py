"""Memory and time formulas of ``loraflow plan``: plain arithmetic on a model's shapes.

Notation: P total parameters (tied embeddings once), P_q the linear weights QLoRA stores in
4-bit (every linear but the LM head), N_mm the weights a token multiplies through (the linears
and the LM head), P_a the trainable adapter parameters, h hidden size, L layers, a attention
heads, i the MLP's inner width, V vocabulary, s sequence length (``data.max_length``: the
worst case, a batch padded to the limit), b the per-device batch (``train.batch_size``;
gradient accumulation adds no activation memory), w bytes per element of the compute dtype
(``compute_bytes``: 2 for bf16, which ``compute_dtype: auto`` picks on a GPU and on a CPU with
AVX512-BF16 or AMX, 4 for the fp32 it picks on other CPUs). All
figures are estimates of the peak of live tensors, in bytes; on a GPU the CUDA context and the
caching allocator's slack are not counted, which is what the 15% headroom is for. On a CPU two
measured terms are added (``cpu_allocator_bytes``, ``CPU_RUNTIME_BYTES``): there glibc's malloc
holds far more than the live tensors. Validated on a CPU against measured peak RSS by
``bench/plan_memory.py`` and ``bench/memory_methods.py`` up to 200M parameters, and at 7B layer
widths by ``bench/scale_rehearsal.py`` (README, "Plan before you run", "Performance" and "Scale
rehearsal"); not yet on a GPU.
"""

from __future__ import annotations

import math

from loraflow.planner.result import Memory
from loraflow.planner.shapes import Linear, ModelShape

# A method "fits" when its estimate is at most this share of the device's memory.
HEADROOM = 0.85

# NF4 stores 4 bits per weight plus one absmax constant per block of 64. Double quantization
# stores those constants in 8 bits with one fp32 constant per 256 of them:
# 4 + 8/64 + 32/(64·256) = 4.127 bits; without it 4 + 32/64 = 4.5 bits (QLoRA paper, §3).
NF4_BITS = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}

# Bytes per full-fine-tuning parameter: 16-bit weight (2) + 16-bit gradient (2) + Adam's two
# fp32 moments (4 + 4). 12 × 65.3B = 783 GB: the QLoRA paper's ">780 GB" for LLaMA-65B.
# The article's "about 4× the 16-bit model" (8 bytes) keeps the moments in 16-bit too; an fp32
# master copy (mixed precision, ZeRO paper) would add 4 more.
FULL_BYTES_PER_PARAM = 2 + 2 + 4 + 4

# Bytes per adapter parameter: peft upcasts adapters to fp32 (autocast_adapter_dtype=True), so
# fp32 weight (4) + fp32 gradient (4) + Adam's two fp32 moments (8).
ADAPTER_BYTES_PER_PARAM = 4 + 4 + 8

# Bytes per parameter QLoRA does not quantize (embeddings, LM head, norms, biases): peft's
# prepare_model_for_kbit_training upcasts every non-4-bit parameter to fp32.
QLORA_UNQUANTIZED_BYTES = 4

# QLoRA dequantizes every 4-bit weight in every forward and backward: the article (and the
# QLoRA paper's measurements it quotes) put it at about 39% slower than 16-bit LoRA.
QLORA_SLOWDOWN = 1.39

# Dense bf16 tensor-core peaks (TFLOP/s) by GPU name, most specific first; MFU is what a
# fine-tuning run reaches of it. An unknown GPU is assumed A100-class.
GPU_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIE", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A6000", 155.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("T4", 65.0),
)
UNKNOWN_GPU_TFLOPS = 312.0
GPU_MFU = 0.40
# A CPU has no comparable "peak": this is an effective training throughput per core, the order
# measured on the project's 2-core machines (a 5M-parameter Llama at ~3k tokens/s ≈ 0.1 TFLOP/s).
CPU_TFLOPS_PER_CORE = 0.05

# TRL's SFTTrainer (1.16) computes the loss through a fused LM head (``trl.trainer.utils.add_fused_lm_head``,
# ``trl/kernels/chunked_logprob.py``): no (tokens x vocabulary) logits, but tiles of at most this many tokens
# by this many vocabulary rows, each projected through that slice of the head (cast to the compute dtype)
# and recomputed in backward, whose gradients accumulate in fp32.
TRL_TOKEN_CHUNK = 4096
TRL_VOCAB_CHUNK = 32768


def activation_bytes(
    shape: ModelShape,
    seq: int,
    batch: int,
    checkpointing: bool,
    adapted: list[Linear] = (),  # type: ignore[assignment]
    rank: int = 0,
    dropout: bool = False,
    weight_bytes: int = 2,
    scores: bool | None = None,
    frozen: bool = False,
    device_kind: str = "gpu",
) -> float:
    """Activations kept for the backward pass, at the peak, in bytes, for w-byte compute.

    Per decoder layer, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", eq. 2, no tensor parallelism) give ``s·b·h·(34 + 5·a·s/h)`` bytes in
    16-bit: attention ``11·s·b·h + 5·a·s²·b``, two layer norms ``4·s·b·h``, MLP ``19·s·b·h``.
    Written per element for the model's own MLP width i and any element width w (2 for bf16,
    4 for fp32 on a CPU):

        layer  = w·s·b·(9·h + 2·i·(2 if gated else 1))         (i = 4h, w = 2 gives back 34·s·b·h)
        scores = (2·w + 1)·a·s²·b                              (eager attention only)

    ``frozen`` (LoRA, QLoRA): a frozen linear or norm weight needs no input for its weight
    gradient, so the two normalised inputs, the output projection's input and the down
    projection's input are not kept: ``layer = w·s·b·(6·h + i·(3 if gated else 1))``.

    ``scores``: the attention probabilities and their dropout mask, stored only by eager
    attention; SDPA (transformers' default for Llama, GPT-2, Qwen2, Mistral, Falcon) and flash
    kernels keep q, k, v, the output and a log-sum-exp instead, already in the 9·h. None takes
    it from ``shape.attention`` (what transformers picks for the model). Measured with
    saved-tensor hooks on a 97M Llama, fp32, b·s = 512: SDPA 392.5 MiB at s = 128 and at s = 512
    (the formula: 370 MiB), eager 428 / 536 MiB; a frozen base with LoRA r=16 on q, v and
    dropout 0.05: 337.8 MiB (the formula with ``frozen``: 313 MiB).

    Adapters add, per adapted linear, its input as A sees it, ``(w + 1 if dropout else w)·s·b·in``
    (bf16: peft casts the input to the adapters' fp32 and autocast back to 16-bit, a copy; fp32:
    the dropped-out copy; + the 1-byte dropout mask), and the rank-r intermediate ``w·s·b·r`` that
    B keeps; ``adapter`` is that sum over the model divided by L.

        no checkpointing:  L·(layer + scores + adapter)
        checkpointing:     w·s·b·h·L + layer + scores + adapter   (each layer's input is kept;
                           one layer's activations are rebuilt at a time in backward)

    plus the loss's logits: not the (s·b × V) fp32 tensor of a model's own loss (Korthikanti et al.
    §4.3) but TRL's fused LM head's tile (``fused_head_tile_bytes``), the same 4·s·b·V in fp32 while
    s·b ≤ 4,096 and V ≤ 32,768.
    """
    s, b, h, i, w = seq, batch, shape.hidden, shape.intermediate, weight_bytes
    if scores is None:
        scores = shape.attention == "eager"
    if frozen:
        layer = w * s * b * (6 * h + i * (3 if shape.gated_mlp else 1))
    else:
        layer = w * s * b * (9 * h + 2 * i * (2 if shape.gated_mlp else 1))
    if scores:
        layer += (2 * w + 1) * shape.heads * s * s * b
    adapter = s * b * sum((w + 1 if dropout else w) * x.in_features + w * rank for x in adapted) / shape.layers
    if checkpointing:
        kept = w * s * b * h * shape.layers + layer + adapter
    else:
        kept = shape.layers * (layer + adapter)
    return kept + fused_head_tile_bytes(shape, s * b, w, device_kind)


def fused_head_tile_bytes(shape: ModelShape, tokens: int, weight_bytes: int, device_kind: str) -> float:
    """TRL's fused LM head's logits tile: ``n·c·w`` (n = min(tokens, 4096), c = min(V, 32768)), and on a
    CPU in 16-bit its fp32 copy, ``4·n·c``: without Triton the tile is folded, and its gradient
    accumulated, in torch on an fp32 copy (``_forward_tile``, ``_addmm_fp32``)."""
    n, c, w = min(tokens, TRL_TOKEN_CHUNK), min(shape.vocab, TRL_VOCAB_CHUNK), weight_bytes
    return n * c * w + (4 * n * c if device_kind == "cpu" and w != 4 else 0)


def fused_head_weight_bytes(shape: ModelShape, weight_bytes: int, head_bytes: int, device_kind: str) -> float:
    """The head's slice TRL's fused LM head projects through, at its peak (the backward of the loss).

    ``c·h·w`` when the head is stored in another dtype than the compute one (QLoRA: peft's
    ``prepare_model_for_kbit_training`` keeps the head in fp32 while training computes in bf16), plus,
    on a CPU in 16-bit, that slice upcast to fp32, ``4·c·h``, for the fp32 gradient GEMM (on CUDA
    ``torch.addmm(out_dtype=float32)`` takes the 16-bit slice). Llama-2-7B, QLoRA, bf16 on a CPU:
    32,000 × 4,096 × 6 = 750 MiB, whatever the depth; measured at 7B widths (``bench/scale_rehearsal.py``,
    1 to 4 layers, Llama-2 and Llama-3 vocabularies): a step's peak is 0.70-0.74 GiB above the memory
    before it. Not counted besides QLoRA's dequantized linear: they are not alive at once.
    """
    c, h, w = min(shape.vocab, TRL_VOCAB_CHUNK), shape.hidden, weight_bytes
    cast = c * h * w if head_bytes != w else 0
    return cast + (4 * c * h if device_kind == "cpu" and w != 4 else 0)


def lora_params(adapted: list[Linear], rank: int) -> int:
    """Adapter parameters: ``r·(in + out)`` per adapted linear (A is r×in, B is out×r).

    Llama-2-7B, r=8 on q_proj and v_proj: 32 layers × 2 × 8·(4096 + 4096) = 4,194,304.
    """
    return sum(rank * (x.in_features + x.out_features) for x in adapted)


def trainable_biases(shape: ModelShape, adapted: list[Linear], bias: str) -> int:
    """Biases peft trains besides the adapters: ``all`` every bias, ``lora_only`` the adapted ones'."""
    if bias == "all":
        pool = list(shape.linears) + ([shape.head] if shape.head else [])
    elif bias == "lora_only":
        pool = adapted
    else:
        return 0
    return sum(x.out_features for x in pool if x.has_bias)


def full_memory(
    shape: ModelShape, activations: float, weight_bytes: int = 2, accumulate: bool = False, head_workspace: float = 0.0
) -> Memory:
    """Full fine-tuning with Adam: ``w·P + 8·P + max(w·P, activations)``; states 12·P in 16-bit, 16·P in fp32.

    Weights w·P, gradients w·P (w = 2 for 16-bit, 4 for fp32 on a CPU), Adam's fp32 moments 8·P.
    Gradients and activations are not all alive at once: the Trainer frees the gradients after
    each optimizer step (``zero_grad(set_to_none=True)``), and backward frees each layer's
    activations as it makes that layer's gradients, so the peak holds about the larger of the two
    (``freed = min(gradients, activations)``). With gradient accumulation (``accumulate``) the
    gradients outlive the micro-batch and both count. Measured on a 97M Llama, fp32: 1,549 MiB
    with every freed block returned (MALLOC_MMAP_THRESHOLD_), against 16·P + activations = 1,853.
    ``head_workspace``: the fused LM head's slices (``fused_head_weight_bytes``), and in 16-bit the
    head's gradient, which it accumulates in fp32 (4·V·h) before casting it.
    """
    p = shape.params_total
    grads = weight_bytes * p
    head_grad = 4 * shape.vocab * shape.hidden if weight_bytes != 4 else 0
    return Memory(weights=weight_bytes * p, trainable_state=grads + 8 * p, activations=activations,
                  workspace=head_workspace + head_grad, freed=0.0 if accumulate else min(grads, activations))


def lora_memory(
    shape: ModelShape, trainable: int, activations: float, weight_bytes: int = 2, head_workspace: float = 0.0,
    unread: float = 0.0,
) -> Memory:
    """LoRA: ``w·P − unread + 16·P_a + activations + head workspace``; the frozen base in 16-bit (w = 2) or fp32 (w = 4).

    The frozen base has no gradients and no optimizer state; each adapter parameter costs 16
    bytes (fp32 weight, gradient and two Adam moments). ``unread``: on a CPU, where the checkpoint is
    stored in the compute dtype, the base *is* its memory mapping and an untied input embedding is
    read row by row (the rows a batch looks up): ``w·V·h`` never becomes resident (as evaluate's
    ``after_training.evaluate_peak``). ``head_workspace``: ``fused_head_weight_bytes``.
    """
    return Memory(
        weights=weight_bytes * shape.params_total - unread,
        trainable_state=ADAPTER_BYTES_PER_PARAM * trainable,
        activations=activations,
        workspace=head_workspace,
    )


def qlora_memory(
    shape: ModelShape, trainable: int, activations: float, double_quant: bool = True, weight_bytes: int = 2,
    head_workspace: float = 0.0,
) -> Memory:
    """QLoRA: ``4.127/8·P_q + 4·(P − P_q) + 16·P_a + activations + max(w·max(in·out), head workspace)``.

    The linear weights in NF4 (4.127 bits each with double quantization, 4.5 without); the rest
    (embeddings, LM head, norms, biases) in fp32, as prepare_model_for_kbit_training leaves
    them; the adapters as in LoRA; and the larger of one linear's weight dequantized to the compute
    dtype (w bytes; one at a time) and the fused LM head's slices (``fused_head_weight_bytes``: the
    head's backward runs before any layer's, so the two are never alive together).
    """
    pq = shape.params_quantized
    weights = NF4_BITS[double_quant] / 8 * pq + QLORA_UNQUANTIZED_BYTES * (shape.params_total - pq)
    dequantized = weight_bytes * max((x.weight_numel for x in shape.linears), default=0)
    workspace = max(dequantized, head_workspace)
    return Memory(
        weights=weights,
        trainable_state=ADAPTER_BYTES_PER_PARAM * trainable,
        activations=activations,
        workspace=workspace,
    )


# CPU only: glibc malloc's retention, per byte of activations (``cpu_allocator_bytes``), and the
# runtime's own first-step memory (oneDNN/BLAS kernels and code pages touched for the first time,
# thread-pool buffers: ~15 MiB of it file-backed). Measured at ONE point each (bench/plan_memory.py,
# 2026-11-29): the retention factors on the 97M Llama at batch 4 x 128 (1.11, 1.63, 1.91), the
# runtime on the tiny Llama at 4 x 128 (19-20 MiB once its retention is counted); checked on points
# not used to measure them (batch 8 x 128 and 2 x 256 on the 97M, 8 x 256 on the tiny one, the 200M
# Llama of bench/memory_methods.py): within 11% of every measured peak, README "Measured against
# the estimate". Re-measure when torch or glibc change.
CPU_ALLOCATOR_RETENTION = {"full": 1.1, "lora": 1.6, "qlora": 1.9}
CPU_RUNTIME_BYTES = 20 * 2**20


def cpu_allocator_bytes(method: str, activations: float) -> float:
    """Freed memory glibc's malloc keeps resident in its heap at the peak of a CPU training step.

    Why it exists: glibc serves a request of at least its mmap threshold from a fresh mapping and
    unmaps it on free, but it raises that threshold (up to 32 MiB) to the size of each such block
    freed, so after the first steps every activation comes from the heap. A forward pass
    interleaves tensors kept for backward with temporaries freed at once (QLoRA also dequantizes
    each weight per matmul); the holes they leave are too small or too scattered for the next
    requests, and the heap grows past the live tensors. Measured with ``mallinfo2`` on the 97M
    Llama (LoRA, batch 4 x 128): at the end of the first forward 467 MiB in use, 252 MiB free
    inside the heap. The peak reaches its plateau by the second or third step (8 steps checked).

    Why it is a term and not a setting: a fixed mmap threshold small enough to catch those blocks
    (1 MiB, or ``MALLOC_MMAP_THRESHOLD_=131072``) brings RSS down to the live tensors but turns
    every activation into fresh pages: 340-460 thousand page faults and 1.0-1.5 s of system time
    per 3.1 s step of user time (+35-45% CPU); 4 or 16 MiB costs nothing and changes nothing (the
    fragmenting blocks are smaller). ``bench/plan_memory.py`` has the numbers.

    Modelled as ``k·activations`` per method (``CPU_ALLOCATOR_RETENTION``), a measured, stated
    factor: full fine-tuning retains least (its gradients reuse the holes backward leaves), QLoRA
    most (its dequantized weights are large short-lived blocks between kept activations).
    """
    return CPU_ALLOCATOR_RETENTION[method] * activations


def compute_bytes(compute_dtype: str, native_bf16: bool) -> int:
    """Bytes per weight and activation element the train stage computes in.

    ``auto`` is what ``loraflow.model.loading.compute_dtype`` picks: bf16 where the device computes it
    natively (a GPU; a CPU with AVX512-BF16 or AMX), else fp32 (emulated bf16 is far slower there,
    docs/traps.md §4); an explicit dtype is taken as given.
    """
    if compute_dtype == "auto":
        return 2 if native_bf16 else 4
    return 4 if compute_dtype == "float32" else 2


def flops_per_token(shape: ModelShape, method: str, trainable: int, checkpointing: bool) -> float:
    """Training FLOPs per token (the attention-score matmuls, ~2·L·s·h, are left out).

    - full: ``6·N_mm`` (forward 2·N_mm, backward 4·N_mm: input and weight gradients);
    - LoRA and QLoRA: ``4·N_mm + 6·P_a``: backward through a frozen weight computes only the
      input gradient (2·N_mm), not the weight gradient; the adapters train in full;
    - gradient checkpointing repeats the forward: ``+ 2·N_mm``.
    QLoRA's dequantization cost is applied to the time, not counted as FLOPs.
    """
    n = shape.params_matmul
    base = 6 * n if method == "full" else 4 * n + 6 * trainable
    return base + (2 * n if checkpointing else 0)


def train_seconds(flops: float, tokens: float, effective_flops: float, method: str) -> float:
    """``tokens × FLOPs/token ÷ (peak × MFU)``, × 1.39 for QLoRA's on-the-fly dequantization."""
    seconds = tokens * flops / effective_flops
    return seconds * (QLORA_SLOWDOWN if method == "qlora" else 1.0)


def gpu_peak_tflops(name: str) -> tuple[float, bool]:
    """Dense bf16 peak of a GPU by its name, and whether the name was known."""
    upper = name.upper()
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in upper:
            return tflops, True
    return UNKNOWN_GPU_TFLOPS, False


def steps_and_tokens(
    records: int | None, tokens_per_record: float, epochs: float, max_steps: int, batch: int, accum: int
) -> tuple[int | None, float | None]:
    """Optimizer steps and tokens trained: ``max_steps`` when set, else ``epochs`` over the records."""
    per_step = batch * accum
    if max_steps > 0:
        return max_steps, max_steps * per_step * tokens_per_record
    if records is None:
        return None, None
    steps = math.ceil(epochs * math.ceil(math.ceil(records / batch) / accum))
    return steps, records * epochs * tokens_per_record
