"""Everything bitsandbytes: the 4-bit NF4 config, the loaded 4-bit model's repairs, its dequantization.

One place for what loraflow knows about bitsandbytes (as peft keeps its own in ``tuners/lora/bnb.py``):

- ``bnb_config``: how training, evaluation and merge load the frozen base in 4-bit;
- ``disable_cpu_repack``: bitsandbytes rewrites NF4 weights in place on an eval-mode CPU forward,
  after which backward and merging are silently wrong (docs/traps.md, "4-bit CPU repack");
- ``release_checkpoint_mapping``: a 4-bit CPU load keeps the whole checkpoint mapped;
- ``dequantize_into``: the exact matrices the 4-bit forward multiplies by, for merge.

(``loraflow/track/pyfunc_model.py`` repeats the config and the repack switch: the served model's code
imports nothing from loraflow.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraflow.core.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

    from loraflow.core.config import QuantizationSection


def bnb_config(q: "QuantizationSection", compute_dtype: "torch.dtype") -> "BitsAndBytesConfig":
    """The 4-bit NF4 load of the frozen base: ``quantization.*`` with the resolved compute dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def disable_cpu_repack(model: "torch.nn.Module") -> int:
    """Stop bitsandbytes from repacking NF4 weights in place on an eval-mode CPU forward.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode rewrites the weight into a
    CPU-only layout; afterwards backward and merging are silently wrong (docs/traps.md §1).
    Returns the number of 4-bit layers touched.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def count_4bit_layers(model: "torch.nn.Module") -> int:
    """bitsandbytes ``Linear4bit`` layers in ``model`` (0 for a full-precision base)."""
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def release_checkpoint_mapping(model: "torch.nn.Module") -> int:
    """Drop the memory-mapped weight files a 4-bit CPU load leaves behind (docs/traps.md §5); returns tensors moved.

    transformers reads safetensors through one mmap per file and quantizes each linear weight from
    it; the parameters it keeps unquantized (embeddings, LM head, norms) stay *views* of that mapping,
    so the whole file stays mapped and every page read to quantize stays in this process's RSS
    (4 bytes per linear weight for an fp32 checkpoint, besides its NF4 copy). Copying those few
    tensors (P_rest, a small share of the model) lets the mapping go; then the allocator's heap,
    left with the loader's freed per-weight buffers, is returned to the system (``malloc_trim``).
    The input embedding is not copied but mapped again on its own (``_map_privately``): a lookup
    reads only the rows of a batch's tokens, so, as in a full-precision load, the rest of it never
    enters memory (98 MB of fp32 on the 200M model of README "Memory", 24k x 1024).
    A full-precision load keeps its mapping on purpose: there the mapped file *is* the frozen base.
    Linux only (it reads ``/proc/self/maps``); elsewhere it does nothing.
    """
    import gc

    maps = _weight_file_mappings(detail=True)
    if not maps:
        return 0
    embedding = getattr(model.get_input_embeddings(), "weight", None) if hasattr(model, "get_input_embeddings") else None
    moved = 0
    for tensors in (model.parameters(), model.buffers()):
        for t in tensors:
            if t.device.type != "cpu":
                continue
            where = next((m for m in maps if m[0] <= t.data_ptr() < m[1]), None)
            if where is None:
                continue
            fresh = _map_privately(t, *where) if t is embedding else None
            # same Parameter object either way: ties and optimizer references stay valid
            t.data = fresh if fresh is not None else t.data.clone()
            moved += 1
    gc.collect()  # the file's storage is freed (and unmapped) with its last view
    _malloc_trim()
    return moved


def _map_privately(t: "torch.Tensor", lo: int, hi: int, offset: int, path: str) -> "torch.Tensor | None":
    """``t`` (a view of ``path`` mapped at ``lo``..``hi`` from file ``offset``) as a view of a new private
    mapping of only its own bytes of that file; None when it cannot be (then it is copied).

    Copy-on-write (``ACCESS_COPY``): a write changes this process's pages, never the file. Pages are
    read from the file when first touched, and, being clean file pages, the kernel can drop them under
    memory pressure as it does a full-precision base's.
    """
    import mmap

    import torch

    if not t.is_contiguous():
        return None
    start = offset + (t.data_ptr() - lo)
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    nbytes = t.numel() * t.element_size()
    try:
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), start - aligned + nbytes, access=mmap.ACCESS_COPY, offset=aligned)
    except (OSError, ValueError):
        return None
    # the tensor keeps the mmap object (and so the mapping) alive
    return torch.frombuffer(mapped, dtype=t.dtype, count=t.numel(), offset=start - aligned).view(t.shape)


def _weight_file_mappings(detail: bool = False) -> list[tuple]:
    """Address ranges (lo, hi) of this process's mappings of ``*.safetensors`` files (``/proc/self/maps``);
    with ``detail``, (lo, hi, file offset, path)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip().endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi, int(fields[2], 16), fields[5].strip()) if detail else (lo, hi))
    return out


def _malloc_trim() -> None:
    """Give glibc's free heap pages back to the system; a no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def dequantize_into(target: "torch.nn.Module", quantized: "torch.nn.Module") -> int:
    """Copy ``quantized`` (a bitsandbytes 4-bit model) into ``target`` (the same model in fp32), dequantized.

    Every ``Linear4bit`` weight becomes exactly the matrix its forward multiplies by
    (``dequantize_4bit``, as bitsandbytes' CPU and GPU matmuls do), in fp32; every other parameter
    (embeddings, norms, lm_head) is copied too, so a base loaded in bf16 compute is matched as well.
    Refuses weights that bitsandbytes repacked for CPU inference (docs/traps.md §1): that layout is not
    what was trained, and the in-place repack already rounded the scales to bf16.
    ``quantized`` may carry LoRA wrappers (a PeftModel's base): their base layers are used.
    Returns the number of 4-bit layers dequantized.
    """
    import bitsandbytes as bnb
    import torch
    from transformers.pytorch_utils import Conv1D

    n = 0
    four_bit_weights = set()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if not isinstance(module, bnb.nn.Linear4bit):
                continue
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                raise ModelError(
                    f"merge: {name} was repacked for CPU inference by an eval-mode forward (docs/traps.md §1); "
                    "load the 4-bit base afresh with loading.load_model (which disables the repack) and merge that"
                )
            weight = bnb.functional.dequantize_4bit(module.weight.data, state).to(torch.float32)
            dest = target.get_submodule(_unwrapped(name))
            if isinstance(dest, Conv1D):  # GPT-2 stores (in, out); its 4-bit Linear4bit holds the transpose
                weight = weight.T
            if tuple(dest.weight.shape) != tuple(weight.shape):
                raise ModelError(f"merge: {name}: 4-bit shape {tuple(weight.shape)} != fp32 {tuple(dest.weight.shape)}")
            dest.weight.copy_(weight)
            four_bit_weights.add(f"{name}.weight")
            n += 1
        params = dict(target.named_parameters())
        for name, p in quantized.named_parameters():  # LoRA's own parameters have no match: skipped
            dest = params.get(_unwrapped(name))
            if name not in four_bit_weights and dest is not None:
                dest.copy_(p.to(dest.dtype))
    return n


def _unwrapped(name: str) -> str:
    """The module name without PEFT's wrapper level: ``q_proj.base_layer.weight`` -> ``q_proj.weight``."""
    return name.replace(".base_layer", "")
