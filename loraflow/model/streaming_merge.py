"""Merge a LoRA/QLoRA adapter into a base checkpoint tensor by tensor, without loading the model.

The merge stage used to load the whole base in fp32 (plus a 4-bit copy for QLoRA) and let peft merge:
~27 GB for a 7B. Here each base tensor is read from its safetensors file (memory mapped), turned into
what the adapter trained against, merged in fp32, written in the output dtype and dropped, so the peak
is a few tensors plus the adapter, whatever the number of layers.

What the adapter trained against (``base``):

- ``dequantized`` (QLoRA): every weight a 4-bit load quantizes goes through the same NF4/FP4 round
  trip as ``loading.load_model(cfg, paths, quantized=True)`` did (same dtype cast first, same
  orientation, block size and double quantization), so the result is bit-identical to what
  ``quant.dequantize_into`` takes out of that model (docs/traps.md §2); targets and non-targets alike,
  since the trained model multiplied by the round-tripped matrices everywhere;
- ``original``: the weights as stored.

Which module is what comes from the model's own skeleton (built from config.json on the meta device),
never from shapes: GPT-2's ``Conv1D`` stores its weight as (in, out), and a 4-bit load replaces it by a
``Linear4bit`` holding the transpose (the bug of the old path: ``4-bit shape (288, 96) != fp32 (96, 288)``).

Every merged weight is checked on random vectors against ``W_ref·x + scale·B·(A·x)`` (``MergeStats``).
The output is written with the safetensors layout the Hub uses; tokenizer files and any check of the
whole model are the caller's (``finish``, run on the folder before it is published). It is written all or
nothing (``core/atomic.atomic_dir``), and its size on disk is known from the plan before the first byte:
too little free space is refused up front, a write refused later (ENOSPC, EDQUOT, EFBIG) is one line
(``DiskFullError``) with the partial output removed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraflow.core import private_api
from loraflow.core.atomic import Space, atomic_dir, disk_full_errno, disk_space
from loraflow.core.errors import ConfigError, DiskFullError, ModelError
from loraflow.core.progress import bar, size_text

if TYPE_CHECKING:
    import torch

    from loraflow.core.config import QuantizationSection

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"
DTYPE_SETTINGS = ("auto", "bfloat16", "float16", "float32")
PEFT_PREFIX = "base_model.model."

# Per-weight proof: random input vectors, fixed seed, so a rerun reports the same numbers.
CHECK_VECTORS = 4
CHECK_SEED = 0
# Rounding each merged element to the output dtype is off by at most eps/2 of it; over a row those
# errors have random signs, so W·x is typically off by ~eps/sqrt(12) ≈ 0.3 eps relative; in fp32 the delta's
# own rounding adds about as much. Measured worst: 0.23-0.33 eps in bf16/fp16, 0.54-0.86 eps in fp32 (test
# models, a 24-layer Llama). 4 eps leaves room for a row whose output is small against its weights; a wrong
# base, scale or orientation is off by |delta|/|W|, which is far more unless the update is below the dtype's
# own resolution (then no check on the written weights could see it).
CHECK_EPS_FACTOR = 4.0
# fp64 rows of a weight converted at once in the check: bounds its memory to ~64 MiB whatever the layer.
CHECK_CHUNK_BYTES = 64 * 2**20

# safetensors' dtype names (the file format's own, see its spec).
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}

# LoRA features whose merge is not W + scale·B·A (+ DoRA): refused rather than merged wrong.
_UNSUPPORTED_CONFIG = ("lora_bias", "use_bdlora", "arrow_config", "alora_invocation_tokens", "velora_config",
                       "monteclora_config", "mica", "kasa_config", "use_qalora", "layer_replication",
                       "target_parameters", "trainable_token_indices")
# Initializations that rewrite the base weights (W - B0·A0): the adapter no longer adds to the checkpoint's W.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class MergeStats:
    """What ``merge_checkpoint`` wrote, and how close every merged weight is to what the adapter computes."""

    tensors_merged: int  # LoRA targets: base + scale·B·A (DoRA: rescaled)
    tensors_replaced: int  # taken from the adapter: modules_to_save, trained biases
    tensors_dequantized: int  # non-target weights through the NF4/FP4 round trip (base=dequantized)
    tensors_copied: int  # as stored, cast to the output dtype (integer/bool buffers kept)
    bytes_written: int  # all files written, headers and configs included
    shards: int
    dtype: str  # output dtype, e.g. "bfloat16"
    base: str  # the base merged into: dequantized | original
    worst_layer: str | None  # merged weight with the largest relative error in the check
    worst_rel_error: float  # max|W_merged·x - reference| / max|reference|, worst over merged weights
    tolerance: float  # what every merged weight was held to: CHECK_EPS_FACTOR × eps of the output dtype
    files: list[str] = field(default_factory=list)


def output_dtype(base_dir: Path, setting: str) -> torch.dtype:
    """``merge.dtype``: an explicit float dtype, or ``auto`` = the base's own (config.json ``torch_dtype``/``dtype``).

    ``auto`` falls back to float32 when the config names none, or names one that is not a float dtype a
    merged model ships in.
    """
    import torch

    if setting not in DTYPE_SETTINGS:
        raise ConfigError(f"merge.dtype: {setting!r} is not one of {', '.join(DTYPE_SETTINGS)}")
    if setting != "auto":
        return getattr(torch, setting)
    config = _read_json(Path(base_dir) / "config.json", "base model config")
    named = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype")
    return getattr(torch, output_dtype_name(setting, named))


def output_dtype_name(setting: str, named: str | None) -> str:
    """The rule of ``output_dtype`` on names (the planner applies it to a config it read): ``setting``, or for
    ``auto`` the dtype the base's config names when it is a float dtype a merged model ships in, else float32."""
    if setting != "auto":
        return setting
    named = str(named or "").removeprefix("torch.")
    return named if named in DTYPE_SETTINGS[1:] else "float32"


def logit_check_runs(setting: str, fp32_bytes: float, available: float) -> bool:
    """``merge.logit_check``: on, off, or auto = when the model in fp32 fits in memory three times over (the
    unmerged reference, the merged model and, for QLoRA, the 4-bit model) within half of ``available`` RAM.
    The merge stage decides by it, and the planner predicts by it."""
    if setting != "auto":
        return setting == "on"
    return 3 * fp32_bytes <= 0.5 * available


def merge_checkpoint(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    base: Literal["dequantized", "original"],
    quant: QuantizationSection | None,
    dtype: torch.dtype,
    max_shard_size: int = 5 * 2**30,
    finish: Callable[[Path], None] | None = None,
    finish_files: tuple[str, Sequence[int]] = ("the files finish adds", ()),
) -> MergeStats:
    """Merge ``adapter_dir`` into the safetensors checkpoint in ``base_dir``; write ``out_dir`` all or nothing.

    ``quant`` is the quantization the adapter trained under (None: a LoRA adapter on the full-precision
    base, where ``base`` makes no difference). ``finish(tmp)`` runs on the written folder before it is
    published: it may add files (the tokenizer) or check the model; if it raises, nothing is published.
    ``finish_files``: what those files are, for a message, and their expected sizes, counted in the space
    the merge needs.
    Raises ``ModelError`` (one line) for a missing or damaged base, an adapter that does not fit it, or a
    merged weight that fails the check; ``DiskFullError`` (one line) when the output does not fit on its
    filesystem: before anything is written where the free space is clearly short, else when a write is
    refused (disk full, quota, file too large), with the partial output removed and a previous ``out_dir`` kept.
    """
    import torch

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not dtype.is_floating_point:
        raise ConfigError(f"merge.dtype: {dtype} is not a floating-point dtype")
    checkpoint = _Checkpoint.open(base_dir)
    adapter = _Adapter.read(adapter_dir)
    effective = base if quant is not None else "original"
    skeleton = _Skeleton.build(base_dir, quant if effective == "dequantized" else None)
    items = _plan(checkpoint, adapter, skeleton, dtype)
    shards = _shard(items, max_shard_size)
    what_finish_writes, finish_sizes = finish_files
    room = _Room(out_dir, base_dir, checkpoint.config, what_finish_writes, finish_sizes, dtype, shards,
                 lambda: _shard(_plan(checkpoint, adapter, skeleton, torch.bfloat16), max_shard_size))
    if room.need > room.space.free:
        raise DiskFullError(room.message(f"merge: {out_dir} will not fit", room.space))
    tol = CHECK_EPS_FACTOR * torch.finfo(dtype).eps
    stats = MergeStats(0, 0, 0, 0, 0, len(shards), str(dtype).removeprefix("torch."), effective, None, 0.0, tol)
    merger = _Merger(adapter, skeleton, dtype, tol, stats)
    doing, tmp = "creating a temporary folder", None
    try:
        with atomic_dir(out_dir) as tmp:
            with bar(total=sum(i.nbytes for i in items), unit="B", unit_scale=True, desc="merge") as progress:
                for name, shard in zip(_shard_names(len(shards)), shards):
                    doing = f"writing {name}"
                    stats.bytes_written += _write_shard(tmp / name, shard, merger.tensor, progress)
                    stats.files.append(name)
            if len(shards) > 1:
                doing = f"writing {INDEX_FILE}"
                stats.bytes_written += _write_index(tmp, shards, _shard_names(len(shards)))
            doing = "writing config.json"
            stats.bytes_written += _write_config(tmp, checkpoint.config, dtype)
            doing = f"writing {GENERATION_FILE}"
            stats.bytes_written += _copy_generation_config(base_dir, tmp)
            if finish is not None:
                doing = f"writing {what_finish_writes}"
                finish(tmp)
            doing = "moving it into place"  # atomic_dir's rename, on leaving the block
    except Exception as e:
        code = disk_full_errno(e)
        if code is None:
            raise
        filename = getattr(e, "filename", None)
        if doing == f"writing {what_finish_writes}" and filename:  # a write of finish's that names its file
            if tmp is None or Path(filename).parent != tmp:
                raise  # not into the output (a cache elsewhere): not this folder's space, not this message
            doing = f"writing {Path(filename).name}"
        what = f"merge: {_DISK_FULL.get(code, 'disk full')} while {doing} into {out_dir} ({os.strerror(code)})"
        raise DiskFullError(room.message(what, disk_space(out_dir), code)) from None
    return stats


_DISK_FULL = {errno.ENOSPC: "disk full", errno.EFBIG: "file too large"} | (
    {errno.EDQUOT: "disk quota exceeded"} if hasattr(errno, "EDQUOT") else {})


@dataclass
class _Room:
    """The space the output takes on its filesystem, known before anything is written: each shard's bytes
    (header and data, from the plan's shapes and dtypes), the index, the configs and what ``finish`` adds,
    each file rounded up to the filesystem's block, and one block for the folder."""

    out_dir: Path
    base_dir: Path
    config: dict
    extra_what: str  # what finish adds, e.g. "the tokenizer files"
    extra: Sequence[int]  # and their sizes
    dtype: torch.dtype
    shards: list[list[_Item]]
    shards_16bit: Callable[[], list[list[_Item]]]  # the plan in bfloat16, for the fix a message offers

    def __post_init__(self) -> None:
        self.space = disk_space(self.out_dir)
        self.need = self.bytes_for(self.shards, self.dtype)

    def bytes_for(self, shards: list[list[_Item]], dtype: torch.dtype) -> int:
        sizes = [8 + len(_shard_header(shard)[1]) + sum(i.nbytes for i in shard) for shard in shards]
        if len(shards) > 1:
            sizes.append(len(_index_text(shards, _shard_names(len(shards))).encode()))
        sizes.append(len(_config_text(self.config, dtype).encode()))
        generation = self.base_dir / GENERATION_FILE
        if generation.exists():
            sizes.append(generation.stat().st_size)
        return sum(self.space.stored(n) for n in [*sizes, *self.extra]) + self.space.block

    def message(self, what: str, space: Space, error: int | None = None) -> str:
        """One line: what, where (the filesystem, its free space, what the merge needs) and how to fix it.
        ``error``: the errno of the write that was refused (None: refused before writing)."""
        import torch

        dtype = str(self.dtype).removeprefix("torch.")
        parts = ", ".join([f"{dtype} weights", "configs", *([self.extra_what] if self.extra else [])])
        where = (f"the merged model needs {size_text(self.need)} ({parts}), its filesystem (mounted on {space.mount}) "
                 f"has {size_text(space.free)} free" + (" with the partial output removed" if error is not None else ""))
        too_large = error == errno.EFBIG
        short = self.need - space.free
        if too_large:
            fix = f"the filesystem on {space.mount} (or `ulimit -f`) refuses a file that large: put outputs/ elsewhere"
            fixes = [fix]
        elif short > 0:
            previous = sum(space.stored(f.stat().st_size) for f in self.out_dir.iterdir() if f.is_file()) \
                if self.out_dir.is_dir() else 0
            fixes = [f"free {size_text(short)} on {space.mount}"
                     + (f" (deleting the previous {self.out_dir.name} folder frees {size_text(previous)})"
                        if previous else "")]
        elif error is not None and error == getattr(errno, "EDQUOT", None):
            fixes = [f"raise your disk quota on {space.mount}, or free some of it"]
        else:  # the space is back: something else wrote there meanwhile
            fixes = [f"free space on {space.mount} (something else used it during the merge)"]
        if not too_large:
            if self.dtype.itemsize > 2:
                need_16bit = self.bytes_for(self.shards_16bit(), torch.bfloat16)
                fixes.append(f"set merge.dtype bfloat16 ({size_text(need_16bit)} needed)")
            fixes.append("put outputs/ on a larger disk (a symlink will do)")
        line = f"{what}: {where}; {', or '.join(fixes)}"
        if error is not None:
            kept = " (the previous one is kept)" if self.out_dir.exists() else ""
            line += f"; nothing was written to {self.out_dir}{kept}"
        return line


# --------------------------------------------------------------------------------------------- the base


@dataclass
class _Entry:
    key: str  # as stored in the checkpoint
    file: Path
    st_dtype: str  # safetensors dtype name
    shape: tuple[int, ...]


@dataclass
class _Checkpoint:
    """The base's config and tensor directory (names, files, dtypes, shapes), headers only."""

    folder: Path
    config: dict
    entries: list[_Entry]

    @classmethod
    def open(cls, folder: Path) -> _Checkpoint:
        config = _read_json(folder / "config.json", "base model config")
        if config.get("quantization_config"):
            raise ModelError(
                f"merge: {folder} is a quantized checkpoint (config.json has a quantization_config); "
                "point model.base at the full-precision model the adapter was trained from"
            )
        entries = [e for f in _weight_files(folder) for e in _headers(f)]
        return cls(folder, config, entries)

    @staticmethod
    def read(entry: _Entry) -> torch.Tensor:
        """The tensor as stored, a view of its file mapped for it alone.

        The file is opened for each tensor: safetensors maps the whole file, and every page read through one
        open handle stays resident until it is closed (a 241 MiB checkpoint read through one handle peaked
        at +266 MiB RSS, opened per tensor at the largest tensor). The tensor keeps its own pages alive,
        and lets them go when the merge drops it.
        """
        from safetensors import safe_open

        with safe_open(str(entry.file), framework="pt") as f:
            return f.get_tensor(entry.key)


def _weight_files(folder: Path) -> list[Path]:
    """The base's safetensors files: the shards its index names, or the single file."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"merge: {index} has no weight_map; copy or download the model again")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelError(
                f"merge: {index} lists {', '.join(missing[:3])}, missing from {folder}; copy or download the model again"
            )
        return files
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE]
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    found = f"only {', '.join(others[:3])}" if others else "no weight file"
    raise ModelError(
        f"merge: {folder} has {found}, no {SINGLE_FILE} or {INDEX_FILE}; the streaming merge reads safetensors "
        "only: convert the weights (model.save_pretrained(folder) with transformers) and merge again"
    )


def _headers(file: Path) -> list[_Entry]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            out = []
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                s = f.get_slice(key)
                out.append(_Entry(key, file, s.get_dtype(), tuple(s.get_shape())))
            return out
    except SafetensorError as e:
        raise ModelError(
            f"merge: {file} is damaged or incomplete ({_first_line(e)}); copy or download the model again"
        ) from None


# --------------------------------------------------------------------------------------------- the adapter


@dataclass
class _Lora:
    a: torch.Tensor  # (r, in), fp32
    b: torch.Tensor  # (out, r), fp32
    scale: float
    magnitude: torch.Tensor | None  # DoRA: (out,), fp32


@dataclass
class _Adapter:
    folder: Path
    loras: dict[str, _Lora]  # model module name -> its LoRA
    replaced: dict[str, torch.Tensor]  # model tensor name -> trained value (modules_to_save, biases)

    @classmethod
    def read(cls, folder: Path) -> _Adapter:
        config = _read_json(folder / "adapter_config.json", "adapter config")
        _refuse_unsupported(config, folder)
        tensors = _adapter_tensors(folder)
        parts: dict[str, dict[str, Any]] = {}
        replaced: dict[str, Any] = {}
        for key, value in tensors.items():
            name = key.removeprefix(PEFT_PREFIX)
            m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)", name)
            if m:
                parts.setdefault(m.group(1), {})[m.group(2).split(".")[0]] = value.float()
            elif re.search(r"(^|\.)(lora_\w+|original_module)(\.|$)", name):
                if ".original_module." not in f".{name}":  # bias='all' also saves the untrained original copy: skip
                    raise ModelError(
                        f"merge: {folder} holds {key}, a LoRA part the streaming merge does not know "
                        "(LoRA on embeddings?); only linear-layer LoRA/DoRA adapters are supported"
                    )
            else:  # modules_to_save weights and trained biases: `x.base_layer.bias`, `x.modules_to_save.bias`
                replaced.setdefault(name.replace(".base_layer.", ".").replace(".modules_to_save.", "."), value)
        loras = {module: _lora(module, p, config, folder) for module, p in parts.items()}
        return cls(folder, loras, replaced)


def _refuse_unsupported(config: dict, folder: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"merge: {folder} is a {config.get('peft_type')} adapter; the streaming merge merges LoRA only")
    used = [k for k in _UNSUPPORTED_CONFIG if config.get(k) not in (None, False, {}, [], "")]
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):  # the adapter is relative to a base that init rewrote
        used.append(f"init_lora_weights={init}")
    if used:
        raise ModelError(
            f"merge: {folder}/adapter_config.json uses {', '.join(used)}, which the streaming merge does not "
            "support; merge it with peft's merge_and_unload instead"
        )


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    if not file.exists():
        hint = " (only adapter_model.bin, a pickle)" if (folder / "adapter_model.bin").exists() else ""
        raise ModelError(f"merge: {folder} has no adapter_model.safetensors{hint}; save the adapter with peft's save_pretrained")
    try:
        return load_file(str(file))  # small: r·(in+out) per target
    except SafetensorError as e:
        raise ModelError(f"merge: {file} is damaged or incomplete ({_first_line(e)}); re-run `loraflow stage train`") from None


def _lora(module: str, parts: dict, config: dict, folder: Path) -> _Lora:
    if "lora_A" not in parts or "lora_B" not in parts:
        raise ModelError(f"merge: {folder}: {module} has {', '.join(sorted(parts))} but not both lora_A and lora_B; "
                         "the adapter file is incomplete: re-run `loraflow stage train`")
    a, b = parts["lora_A"], parts["lora_B"]
    r = a.shape[0]
    if b.shape[1] != r:
        raise ModelError(f"merge: {folder}: {module} lora_A has rank {r} but lora_B {tuple(b.shape)}; re-run training")
    return _Lora(a, b, _scaling(module, r, config), parts.get("lora_magnitude_vector"))


def _scaling(module: str, r: int, config: dict) -> float:
    """peft's ``scaling``: lora_alpha / r, or / sqrt(r) with rsLoRA; per-module alpha from ``alpha_pattern``."""
    # the matching peft applied when it built the layer
    from peft.utils.other import get_pattern_key

    alphas = config.get("alpha_pattern") or {}
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config.get("lora_alpha", 8))
    # r as trained is the shape of A (rank_pattern included); peft scales by the configured per-module r, the same
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# --------------------------------------------------------------------------------------------- the model


@dataclass
class _Skeleton:
    """The model's modules on the meta device: which weights are Conv1D, quantized, tied."""

    model: Any
    quantizer: Any  # transformers' 4-bit quantizer, when merging into the dequantized base
    load_dtype: torch.dtype | None  # what the 4-bit load cast weights to before quantizing them
    tied: set[str]
    params: set[str]
    state_keys: set[str]

    @classmethod
    def build(cls, folder: Path, quant: QuantizationSection | None) -> _Skeleton:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            hf_config = AutoConfig.from_pretrained(str(folder))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf_config)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"merge: cannot build the model of {folder}/config.json ({_first_line(e)}); "
                             "the streaming merge needs an architecture transformers knows") from None
        quantizer, load_dtype = None, None
        if quant is not None:
            quantizer, load_dtype = _as_4bit_load(model, quant)
        tied = private_api.hf_tied_weights(model)
        return cls(model, quantizer, load_dtype, tied, {n for n, _ in model.named_parameters(remove_duplicate=False)},
                   set(model.state_dict()))

    def model_key(self, key: str) -> str:
        """A checkpoint key as the model names it (Hub GPT-2 files leave out the ``transformer.`` prefix)."""
        if key in self.state_keys:
            return key
        prefixed = f"{getattr(self.model, 'base_model_prefix', '')}.{key}"
        return prefixed if prefixed in self.state_keys else key

    def module(self, key: str) -> Any:
        path = key.rsplit(".", 1)[0] if "." in key else ""
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def is_conv1d(self, key: str) -> bool:
        """GPT-2 style ``Conv1D`` (weight stored (in, out)); a 4-bit load keeps the class it replaced."""
        from transformers.pytorch_utils import Conv1D

        m = self.module(key)
        source = private_api.hf_replaced_class(m)
        return isinstance(m, Conv1D) or (source is not None and issubclass(source, Conv1D))

    def is_quantized(self, key: str) -> bool:
        """Whether a 4-bit load quantizes this tensor (transformers' own rule)."""
        return (self.quantizer is not None and key in self.state_keys
                and private_api.hf_param_needs_quantization(self.quantizer, self.model, key))

    def as_loaded_dtype(self, key: str) -> torch.dtype | None:
        """The dtype the 4-bit load kept an unquantized parameter in (embeddings, norms, head), or None."""
        import torch

        if self.load_dtype is None or key not in self.params:
            return None
        strict = private_api.hf_keep_in_fp32_strict(self.model)
        if self.load_dtype == torch.bfloat16 and any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", key) for m in strict):
            return torch.float32
        return self.load_dtype


def _as_4bit_load(model: Any, quant: QuantizationSection) -> tuple[Any, torch.dtype]:
    """Turn the meta skeleton into what ``loading.load_model(quantized=True)`` builds before reading weights.

    Same quantizer, same config (``quant.bnb_config``), same module replacement, so the modules it
    quantizes, their block size, quant type and double quantization are transformers' choice, not a copy
    of it. Returns the quantizer and the dtype ``load_model`` loads weights in (cast before quantizing).
    """
    from loraflow.model.loading import quantized_load_dtypes
    from loraflow.model.quant import bnb_config

    compute_dtype, load_dtype = quantized_load_dtypes(quant)
    return private_api.hf_prepare_4bit_skeleton(model, bnb_config(quant, compute_dtype), load_dtype), load_dtype


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class _Item:
    entry: _Entry
    model_key: str
    action: str  # merge | replace | dequantize | copy
    out_dtype: torch.dtype
    nbytes: int


def _plan(checkpoint: _Checkpoint, adapter: _Adapter, skeleton: _Skeleton, dtype: torch.dtype) -> list[_Item]:
    """What happens to every base tensor; every adapter tensor checked against the base before anything is written."""
    import torch

    by_model_key = {skeleton.model_key(e.key): e for e in checkpoint.entries}
    targets = {f"{module}.weight": lora for module, lora in adapter.loras.items()}
    where = f"merge: adapter {adapter.folder} vs base {checkpoint.folder}"
    for key in [*targets, *adapter.replaced]:
        if key in skeleton.tied:
            raise ModelError(
                f"{where}: the adapter changes {key}, a weight tied to another (tie_word_embeddings); the streaming "
                "merge keeps the checkpoint's tied layout and cannot untie it: train without adapting the tied weight"
            )
        if key not in by_model_key:
            raise ModelError(f"{where}: the adapter changes {key}, which the base does not have; "
                             "was the adapter trained on this base (model.base)?")
    for key, lora in targets.items():
        _check_lora_shape(key, lora, by_model_key[key], skeleton.is_conv1d(key), where)
    for key, value in adapter.replaced.items():
        if tuple(value.shape) != by_model_key[key].shape:
            raise ModelError(f"{where}: the adapter's {key} is {tuple(value.shape)}, the base's {by_model_key[key].shape}; "
                             "was the adapter trained on this base (model.base)?")
    items = []
    for key, entry in by_model_key.items():
        if entry.st_dtype not in _ST_DTYPES:
            raise ModelError(f"merge: {entry.file}: {entry.key} has dtype {entry.st_dtype}, unknown to the streaming merge")
        stored = getattr(torch, _ST_DTYPES[entry.st_dtype])
        out = dtype if stored.is_floating_point else stored  # integer/bool buffers stay as they are
        action = ("merge" if key in targets else "replace" if key in adapter.replaced
                  else "dequantize" if skeleton.is_quantized(key) else "copy")
        items.append(_Item(entry, key, action, out, math.prod(entry.shape) * out.itemsize))
    return items


def _check_lora_shape(key: str, lora: _Lora, entry: _Entry, conv1d: bool, where: str) -> None:
    if len(entry.shape) != 2:
        raise ModelError(f"{where}: the adapter targets {key}, shape {entry.shape} in the base, not a linear layer")
    out_f, in_f = entry.shape[::-1] if conv1d else entry.shape
    ok = lora.a.shape[1] == in_f and lora.b.shape[0] == out_f
    ok = ok and (lora.magnitude is None or tuple(lora.magnitude.shape) == (out_f,))
    if not ok:
        raise ModelError(
            f"{where}: {key} is {in_f}->{out_f} in the base but the adapter's lora_A is {tuple(lora.a.shape)} and "
            f"lora_B {tuple(lora.b.shape)}; was the adapter trained on this base (model.base)?"
        )


def _shard(items: list[_Item], max_bytes: int) -> list[list[_Item]]:
    """Consecutive tensors into shards of at most ``max_bytes`` of data; a larger tensor gets a shard alone."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards if shards[0] else []


def _shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


# --------------------------------------------------------------------------------------------- the merge


class _Merger:
    """Turns one planned base tensor into the tensor to write, and checks every merged weight."""

    def __init__(self, adapter: _Adapter, skeleton: _Skeleton, dtype: torch.dtype, tol: float,
                 stats: MergeStats) -> None:
        self.adapter, self.skeleton, self.dtype, self.tol, self.stats = adapter, skeleton, dtype, tol, stats

    def tensor(self, item: _Item) -> torch.Tensor:
        import torch

        if item.action == "replace":
            self.stats.tensors_replaced += 1
            return self.adapter.replaced[item.model_key].to(item.out_dtype)
        stored = _Checkpoint.read(item.entry)
        if item.action == "copy":
            self.stats.tensors_copied += 1
            if not stored.is_floating_point():
                return stored
            as_loaded = self.skeleton.as_loaded_dtype(item.model_key)  # what dequantize_into copies
            return (stored.to(as_loaded) if as_loaded is not None else stored).to(item.out_dtype)
        with torch.no_grad():
            reference = self._reference(stored, item.model_key)
            if item.action == "dequantize":
                self.stats.tensors_dequantized += 1
                return reference.to(item.out_dtype)
            self.stats.tensors_merged += 1
            return self._merge(reference, item)

    def _reference(self, stored: torch.Tensor, key: str) -> torch.Tensor:
        """The weight the adapter trained against, fp32, in the checkpoint's orientation."""
        import torch

        if self.skeleton.is_quantized(key):
            return _nf4_round_trip(stored, self.skeleton, key)
        as_loaded = self.skeleton.as_loaded_dtype(key)
        return (stored.to(as_loaded) if as_loaded is not None else stored).to(torch.float32)

    def _merge(self, reference: torch.Tensor, item: _Item) -> torch.Tensor:
        """``W + scale·B·A`` (DoRA: rescaled per output row) in fp32, peft's order of operations; then checked."""
        import torch

        conv1d = self.skeleton.is_conv1d(item.model_key)
        lora = self.adapter.loras[item.model_key.removesuffix(".weight")]
        # peft's forward is lora_B(lora_A(x)) whatever fan_in_fan_out says: the update is B·A in (out, in),
        # transposed here only because Conv1D stores (in, out).
        w = reference.T if conv1d else reference
        merged = w + (lora.b @ lora.a) * lora.scale
        factor = None
        if lora.magnitude is not None:  # DoRA: m / ||W + ΔW|| per output row (peft's merge_unsafe)
            factor = lora.magnitude / torch.linalg.norm(merged, dim=1).to(merged.dtype)
            merged = factor.view(-1, 1) * merged
        written = merged.to(item.out_dtype)
        self._check(item.model_key, written, w, lora, factor)
        return (written.T if conv1d else written).contiguous()

    def _check(self, key: str, written: torch.Tensor, w: torch.Tensor, lora: _Lora,
               factor: torch.Tensor | None) -> None:
        """``W_merged·x`` (as written, upcast) against ``W_ref·x + scale·B·(A·x)``, in fp64 so the check measures
        the written weight's rounding and not its own accumulation."""
        import torch

        x = torch.randn(w.shape[1], CHECK_VECTORS, generator=torch.Generator().manual_seed(CHECK_SEED),
                        dtype=torch.float64)
        expected = _matmul64(w, x) + lora.scale * (lora.b.double() @ (lora.a.double() @ x))
        if factor is not None:
            expected = factor.double().view(-1, 1) * expected
        peak = float(expected.abs().max())
        diff = float((_matmul64(written, x) - expected).abs().max())
        err = diff / peak if peak > 0 else (0.0 if diff == 0 else math.inf)
        if self.stats.worst_layer is None or not err <= self.stats.worst_rel_error:
            self.stats.worst_layer, self.stats.worst_rel_error = key, err
        if not err <= self.tol:  # NaN fails too
            raise ModelError(
                f"merge: {key}: the merged weight is {err:.3g} off what base + adapter compute (relative, tolerance "
                f"{self.tol:.3g} for {self.dtype}); the adapter or base is broken (NaN/inf?) or does not match"
            )


def _nf4_round_trip(stored: torch.Tensor, skeleton: _Skeleton, key: str) -> torch.Tensor:
    """What ``dequantize_4bit`` gives back from the weight a 4-bit load made of ``stored``, fp32, as stored.

    The load casts the checkpoint tensor to its dtype, transposes a Conv1D weight into Linear4bit's
    (out, in) and quantizes that contiguously (transformers' ``Bnb4bitQuantize``, bitsandbytes'
    ``Params4bit._quantize``), with the Params4bit settings of the skeleton's layer.
    """
    import bitsandbytes as bnb
    import torch

    param = skeleton.model.get_parameter(key)
    w = stored.to(skeleton.load_dtype)
    conv1d = skeleton.is_conv1d(key)
    if conv1d:
        w = w.T
    q, state = bnb.functional.quantize_4bit(
        w.contiguous(), blocksize=param.blocksize, compress_statistics=param.compress_statistics,
        quant_type=param.quant_type, quant_storage=param.quant_storage,
    )
    out = bnb.functional.dequantize_4bit(q, state).to(torch.float32)
    return out.T.contiguous() if conv1d else out


def _matmul64(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x`` in fp64, a block of rows at a time (a 7B's MLP weight is 360 MB in fp64)."""
    import torch

    rows = max(1, CHECK_CHUNK_BYTES // (8 * max(1, w.shape[1])))
    return torch.cat([w[i:i + rows].double() @ x for i in range(0, w.shape[0], rows)])


# --------------------------------------------------------------------------------------------- writing


def _shard_header(items: list[_Item]) -> tuple[list[_Item], bytes]:
    """A shard's tensors in file order and its JSON header (padded to 8 bytes), known from the plan alone.

    Tensors go largest element first so each starts aligned to its element size (as safetensors' own
    writer orders them).
    """
    ordered = sorted(items, key=lambda i: -i.out_dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in ordered:
        header[item.entry.key] = {"dtype": _st_name(item.out_dtype), "shape": list(item.entry.shape),
                                  "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return ordered, raw + b" " * (-len(raw) % 8)


def _write_shard(path: Path, items: list[_Item], make: Callable[[_Item], torch.Tensor], progress: Any) -> int:
    """One safetensors file, streamed: the header is known from the plan, then each tensor is made and written."""
    import torch

    ordered, raw = _shard_header(items)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for item in ordered:
            t = make(item)
            if t.dtype != item.out_dtype or tuple(t.shape) != item.entry.shape:
                raise AssertionError(f"{item.entry.key}: made {t.dtype} {tuple(t.shape)}, planned {item.out_dtype}")
            data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            fh.write(memoryview(data))
            progress.update(item.nbytes)
            del t, data
    return 8 + len(raw) + sum(i.nbytes for i in ordered)


def _st_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return next(k for k, v in _ST_DTYPES.items() if v == name)


def _index_text(shards: list[list[_Item]], names: list[str]) -> str:
    """``model.safetensors.index.json`` as the Hub's: total tensor bytes and tensor -> file."""
    weight_map = {item.entry.key: name for shard, name in zip(shards, names) for item in shard}
    index = {"metadata": {"total_size": sum(i.nbytes for s in shards for i in s)},
             "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(index, indent=2) + "\n"


def _write_index(folder: Path, shards: list[list[_Item]], names: list[str]) -> int:
    text = _index_text(shards, names)
    (folder / INDEX_FILE).write_text(text, encoding="utf-8")
    return len(text.encode())


def _config_text(config: dict, dtype: torch.dtype) -> str:
    """config.json naming the output dtype."""
    name = str(dtype).removeprefix("torch.")
    config = dict(config, dtype=name)
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    return json.dumps(config, indent=2) + "\n"


def _write_config(folder: Path, config: dict, dtype: torch.dtype) -> int:
    text = _config_text(config, dtype)
    (folder / "config.json").write_text(text, encoding="utf-8")
    return len(text.encode())


def _copy_generation_config(base_dir: Path, folder: Path) -> int:
    """generation_config.json as it is, where the base has one."""
    generation = base_dir / GENERATION_FILE
    if not generation.exists():
        return 0
    shutil.copyfile(generation, folder / GENERATION_FILE)
    return generation.stat().st_size


# --------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"merge: {path} is missing: no {what} there; point at the folder save_pretrained wrote") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"merge: {path} ({what}) cannot be read ({_first_line(e)}); copy or write it again") from None
    if not isinstance(data, dict):
        raise ModelError(f"merge: {path} ({what}) is not a JSON object; copy or write it again")
    return data


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
