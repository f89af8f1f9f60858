"""The trained adapter: find it, load it on the base the way training did (evaluate and merge share this)."""

from __future__ import annotations

from loraflow.core.config import Config
from loraflow.core.errors import ModelError
from loraflow.core.paths import Paths
from loraflow.model.loading import (
    compute_dtype,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    peft_quietly,
    refuse_pickle_only,
    uses_4bit,
)


def require_adapter(paths: Paths) -> None:
    """A clear error when training has not produced an adapter yet."""
    if not (paths.adapter / "adapter_config.json").exists():
        raise ModelError(f"{paths.adapter}: no trained adapter (adapter_config.json); run `loraflow stage train` first")


def load_adapter_tokenizer(cfg: Config, paths: Paths):
    """The tokenizer saved with the adapter (what training used), else the base model's."""
    from transformers import AutoTokenizer

    if (paths.adapter / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(paths.adapter)
        ensure_pad_token(tokenizer)
        return tokenizer
    return load_tokenizer(cfg, paths)


def load_tuned(cfg: Config, paths: Paths):
    """The base as train loaded it (4-bit with the repack disabled, or the compute dtype) + the adapter."""
    quantized = uses_4bit(cfg, paths)
    base = load_model(cfg, paths, quantized=quantized, dtype=None if quantized else compute_dtype(cfg))
    return attach_adapter(to_accelerator(base), paths, cfg.model.allow_pickle)


def to_accelerator(model):
    """A full-precision model onto the GPU when there is one (load_model places 4-bit models itself)."""
    import torch

    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model = model.to("cuda")
    return model


def attach_adapter(base, paths: Paths, allow_pickle: bool = False):
    """``paths.adapter`` on ``base``, inference only (eval mode: no LoRA dropout, nothing trainable).

    An adapter saved only as ``adapter_model.bin`` (a pickle) is refused unless ``allow_pickle``.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    refuse_pickle_only(paths.adapter, allow_pickle, "adapter", ("adapter_model",))
    try:
        with peft_quietly():
            model = PeftModel.from_pretrained(base, str(paths.adapter), is_trainable=False)
    except SafetensorError as e:
        raise ModelError(
            f"{paths.adapter}: the adapter's weights are damaged or incomplete ({str(e).strip().splitlines()[0]}); "
            "re-run `loraflow stage train`"
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(
            f"{paths.adapter}: cannot attach the adapter ({str(e).strip().splitlines()[0]}); "
            "was it trained on this base (model.base)? re-run `loraflow stage train`"
        ) from None
    return model.eval()
