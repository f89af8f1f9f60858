"""Load the base model and tokenizer: one code path for a local folder and a hub id.

QLoRA loads the frozen base in 4-bit NF4 (``loraflow.model.quant`` builds the bitsandbytes config and
mends the loaded model); LoRA keeps it in full precision. Weights load from safetensors only (a pickle
can run code on load) unless ``model.allow_pickle``; code shipped with a model runs only with
``model.trust_remote_code``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.core.config import EMBEDDED_BASE, Config, QuantizationSection
from loraflow.core.errors import ConfigError, ModelError
from loraflow.core.paths import Paths

if TYPE_CHECKING:  # heavy imports stay out of `loraflow --help`
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


PAD_TOKEN = "<|pad|>"


# Written by the train stage into the adapter folder: the method, quantization and base it trained against.
ADAPTER_META = "loraflow_train.json"


def base_location(cfg: Config, paths: Paths) -> str:
    """The base model as ``from_pretrained`` takes it: an absolute local path or a hub id.

    A relative path resolves against the project root. The embedded default is built on first use.
    """
    base = cfg.model.base
    local = Path(base) if Path(base).is_absolute() else paths.root / base
    if base == EMBEDDED_BASE and not (local / "config.json").exists():
        from loraflow.model.embedded import ensure_base

        ensure_base(local)
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelError(f"model.base: {local} has no config.json; point it at a Hugging Face model folder")
        return str(local)
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise ModelError(
            f"model.base: {base} does not exist (looked at {local}); give an existing folder or a hub id like org/name"
        )
    return base  # a hub id


def local_base_dir(cfg: Config, paths: Paths) -> Path:
    """The base's files on this machine: its folder, or a hub id's snapshot in the local cache (what
    training loaded). Merge reads the checkpoint file by file from here."""
    where = base_location(cfg, paths)
    if Path(where).is_dir():
        return Path(where)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(where, revision=cfg.model.revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ModelError(f"model.base: {where} is not in the local Hugging Face cache ({_first_line(e)}); "
                         "run the train stage on this machine first, or point model.base at a local folder") from None


def uses_4bit(cfg: Config, paths: Paths | None = None) -> bool:
    """Whether the frozen base is (was) 4-bit NF4.

    For ``auto``, the method the train stage recorded next to the adapter (pass ``paths``): an
    evaluation or merge on another machine must load the base the way training did. Without a
    record, ``auto`` counts as QLoRA.
    """
    if cfg.method != "auto":
        return cfg.method == "qlora"
    meta = adapter_meta(paths) if paths is not None else None
    return meta is None or meta.get("method") == "qlora"


def adapter_meta(paths: Paths) -> dict | None:
    """What the train stage recorded with the adapter (``outputs/adapter/loraflow_train.json``), or None."""
    import json

    f = paths.adapter / ADAPTER_META
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def compute_dtype(cfg: Config) -> "torch.dtype":
    """dtype for matmuls: explicit, or auto = bf16 where the hardware computes it natively (a CUDA GPU
    that has it, a CPU with AVX512-BF16 or AMX), else fp32.

    On a CPU without native bf16 every bf16 matmul is emulated: the tutorial's
    ``bnb_4bit_compute_dtype=bfloat16`` trained ~15x slower than fp32 on such a CPU here, while bf16
    autocast was 1.52x faster than fp32 on CPUs that have AVX512-BF16 (docs/traps.md §4).
    """
    return _resolve_compute_dtype(cfg.quantization.compute_dtype)


def quantized_load_dtypes(quantization: QuantizationSection) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, load dtype) of the 4-bit load under ``quantization``: what bitsandbytes computes in
    (``compute_dtype``'s rule) and what ``from_pretrained`` casts the weights to before quantizing them (and
    keeps the unquantized ones in): the compute dtype, except that fp16 compute loads in fp32.

    ``load_model(quantized=True)`` loads by it and the streaming merge reproduces that load by it
    (``model/streaming_merge.py``), so the two cannot drift apart.
    """
    import torch

    cdtype = _resolve_compute_dtype(quantization.compute_dtype)
    return cdtype, (cdtype if cdtype != torch.float16 else torch.float32)


def _resolve_compute_dtype(name: str) -> torch.dtype:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return getattr(torch, name)


CPU_BF16_ENV = "LORAFLOW_CPU_BF16"  # 0 or 1: overrides the probe below (the test suite sets 0)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as torch detects it.

    ``LORAFLOW_CPU_BF16=0`` (or 1) overrides the probe: CPU workers of one pool that differ in it would
    otherwise train the same config in different dtypes; the test suite sets 0 so that it computes
    the same on every CI machine, and tests of the bf16 path set 1.
    """
    import os

    import torch

    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


# Files of a saved tokenizer besides tokenizer*: what save_pretrained writes for the tokenizer classes we load.
TOKENIZER_EXTRA_FILES = frozenset({"special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                                   "merges.txt", "chat_template.jinja", "chat_template.json"})


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer's files in a model or adapter folder (what merge copies, register ships, the planner counts)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and (f.name.startswith("tokenizer") or f.name in TOKENIZER_EXTRA_FILES))


def load_tokenizer(cfg: Config, paths: Paths) -> "PreTrainedTokenizerBase":
    """The base model's tokenizer, with a pad token added when it has none."""
    from transformers import AutoTokenizer

    where = base_location(cfg, paths)
    check_max_length(cfg, where)
    if Path(where).is_dir() and not any((Path(where) / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(
            f"model.base: {where} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "into the model folder (tokenizer.save_pretrained(folder))"
        )
    try:
        tok = AutoTokenizer.from_pretrained(
            where, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        if _is_remote_code_error(e):
            raise _remote_code_error(where, "tokenizer") from None
        raise ModelError(f"model.base: cannot load a tokenizer from {where} ({_first_line(e)})") from None
    ensure_pad_token(tok)
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# config.json keys that hold how many positions a model has, by architecture family.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(cfg: Config, where: str) -> tuple[int, str] | None:
    """(positions, the config key that says so) from the base's config.json, read as data (no code runs)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(where, revision=cfg.model.revision)
    except (OSError, ValueError):
        return None  # loading the model reports it
    for key in POSITION_KEYS:
        value = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def check_max_length(cfg: Config, where: str) -> None:
    """``data.max_length`` must fit the model's positions: past them a model either crashes or silently
    computes garbage (positions it was never trained on)."""
    found = max_positions(cfg, where)
    if found is not None and cfg.data.max_length > found[0]:
        n, key = found
        raise ConfigError(
            f"data.max_length: {cfg.data.max_length} tokens is more than model.base supports ({key} = {n} in "
            f"{where}); set -s data.max_length={n} or less"
        )


def ensure_pad_token(tok: "PreTrainedTokenizerBase") -> None:
    """Batching needs a pad token; reuse EOS (masked out of labels) when the tokenizer has none."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError("model.base: the tokenizer has neither a pad nor an EOS token; add one to it")
        tok.pad_token = tok.eos_token


def load_model(
    cfg: Config, paths: Paths, *, quantized: bool, dtype: "torch.dtype | None" = None
) -> "PreTrainedModel":
    """Load the base causal LM, in 4-bit NF4 (``quantized``) or full precision (``dtype``, fp32 default)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraflow.model import quant

    where = base_location(cfg, paths)
    allow_pickle = cfg.model.allow_pickle
    if Path(where).is_dir():
        refuse_pickle_only(Path(where), allow_pickle, "model.base", WEIGHT_FILES)
    kwargs: dict = dict(
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        # None: safetensors when the model has them, else the pickle (only with model.allow_pickle).
        use_safetensors=None if allow_pickle else True,
    )
    if quantized:
        cdtype, kwargs["dtype"] = quantized_load_dtypes(cfg.quantization)
        kwargs["quantization_config"] = quant.bnb_config(cfg.quantization, cdtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": 0}
    else:
        kwargs["dtype"] = dtype or torch.float32
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except SafetensorError as e:  # a truncated or corrupted file: a copy or download cut short
        raise ModelError(
            f"model.base: a weight file in {where} is damaged or incomplete ({_first_line(e)}); "
            "copy or download the model again"
        ) from None
    except (OSError, ValueError) as e:
        if _is_remote_code_error(e):
            raise _remote_code_error(where, "model") from None
        hint = "" if allow_pickle else "; a hub model with only pickle weights needs model.allow_pickle: true"
        raise ModelError(f"model.base: cannot load weights from {where} ({_first_line(e)}){hint}") from None
    if quantized:
        quant.disable_cpu_repack(model)
        quant.release_checkpoint_mapping(model)
    return model


# Pickle files a model or adapter folder may hold instead of safetensors (torch.save / pickle formats).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


WEIGHT_FILES = ("pytorch_model", "model")  # stems of a base model's weight files (sharded: pytorch_model-00001-...)


def refuse_pickle_only(folder: Path, allow_pickle: bool, key: str, stems: tuple[str, ...]) -> None:
    """A clear refusal when ``folder`` holds its weights only as pickles and ``model.allow_pickle`` is off.

    A pickle runs arbitrary code when unpickled; safetensors cannot. A folder with safetensors loads
    them (and ignores any pickle next to them) either way.
    """
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(
        p.name for p in folder.iterdir()
        if p.suffix in PICKLE_SUFFIXES and p.name.startswith(stems) and p.name != "training_args.bin"
    )
    if pickles:
        raise ModelError(
            f"{key}: {folder} has only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded; "
            "convert them to safetensors, or set model.allow_pickle: true if you trust the file"
        )


def _is_remote_code_error(e: BaseException) -> bool:
    text = str(e)
    return "trust_remote_code" in text or "custom code" in text


def _remote_code_error(where: str, what: str) -> ModelError:
    return ModelError(
        f"model.base: the {what} at {where} ships its own Python code, which loraflow runs only with "
        "model.trust_remote_code: true; set it only if you trust that code, or use a model transformers supports natively"
    )


@contextmanager
def peft_quietly() -> Iterator[None]:
    """Around peft's model building (``get_peft_model``, ``PeftModel.from_pretrained``): peft still asks
    transformers' deprecated ``is_gradient_checkpointing``, a FutureWarning in every stage's log with
    nothing for a user to act on. Other warnings show as before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
