"""What the planner knows about a base model, from its ``config.json`` alone.

The model is built from its config on PyTorch's ``meta`` device: every module and parameter
shape exists, nothing is allocated and no weight file is read. Parameter counts come from its
parameters; LoRA targets from ``loraflow.model.targets``, the same resolver the train stage runs on the
loaded model, so the planner counts exactly the modules training will adapt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.core.config import Config
from loraflow.core.errors import ConfigError, ModelError
from loraflow.core.paths import Paths

if TYPE_CHECKING:
    from transformers import PretrainedConfig

@dataclass(frozen=True)
class Linear:
    """A linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) by its full module name."""

    name: str
    in_features: int
    out_features: int
    role: str  # attention | mlp | other (loraflow.model.targets' groups) | head
    has_bias: bool

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """Shapes of a causal LM: counts for memory and time, linears for LoRA targets."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    intermediate: int  # width of the MLP's hidden layer (input of its down projection)
    gated_mlp: bool  # SwiGLU-style gate and up projections (Llama, Mistral, Qwen2)
    vocab: int
    params_total: int  # unique parameters: tied embeddings counted once
    linears: tuple[Linear, ...]  # every linear but the output head
    head: Linear | None  # the LM head (shares its weight with the embeddings when tied)
    model: Any = field(default=None, repr=False, compare=False)  # the meta-device model itself
    attention: str = "sdpa"  # transformers' attention implementation: eager stores the s×s scores

    @property
    def params_quantized(self) -> int:
        """Weights bitsandbytes stores in 4-bit: every linear's weight except the LM head."""
        return sum(x.weight_numel for x in self.linears)

    @property
    def params_matmul(self) -> int:
        """Weights a token multiplies through: the linears and the LM head (not the lookup)."""
        return self.params_quantized + (self.head.weight_numel if self.head else 0)


def read_config(cfg: Config, paths: Paths) -> tuple["PretrainedConfig", str]:
    """The base model's config and where it came from; reads ``config.json`` only.

    A local folder or a hub id, through ``AutoConfig.from_pretrained``. The embedded default
    ``models/base`` is never built here: when it is missing, its config comes from
    ``loraflow.model.embedded`` (``base_config()`` if it exists, else its ``ARCH`` and ``VOCAB_SIZE``).
    """
    from transformers import AutoConfig

    from loraflow.core.config import EMBEDDED_BASE
    from loraflow.model.loading import base_location

    base = cfg.model.base
    local = Path(base) if Path(base).is_absolute() else paths.root / base
    if base == EMBEDDED_BASE and not (local / "config.json").exists():
        return _embedded_config(), f"{base} (embedded, not built yet: planned from loraflow.model.embedded)"
    where = base_location(cfg, paths)
    try:
        config = AutoConfig.from_pretrained(
            where, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"model.base: cannot read config.json of {where} ({_first_line(e)})") from None
    return config, where


def _embedded_config() -> "PretrainedConfig":
    """The embedded base's config without building it: ``embedded.base_config()`` when it
    exists, else ``LlamaConfig(vocab_size=VOCAB_SIZE, **ARCH)`` from its published constants."""
    import importlib

    from loraflow.core.config import EMBEDDED_BASE

    bm = importlib.import_module("loraflow.model.embedded")
    if hasattr(bm, "base_config"):
        return bm.base_config()
    if hasattr(bm, "ARCH") and hasattr(bm, "VOCAB_SIZE"):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=bm.VOCAB_SIZE, **bm.ARCH)
    raise ModelError(
        f"model.base: the embedded base {EMBEDDED_BASE} is not built yet; run `loraflow build-base` first "
        "(plan never builds or downloads a model)"
    )


_CACHE: dict[tuple[str, bool], ModelShape] = {}


def model_shape(config: "PretrainedConfig", trust_remote_code: bool = False) -> ModelShape:
    """Build the model on the meta device and read its shapes (memoised per config)."""
    key = (config.to_json_string(use_diff=False), trust_remote_code)
    if key not in _CACHE:
        _CACHE[key] = _inspect(_meta_model(config, trust_remote_code), config)
    return _CACHE[key]


def _meta_model(config: "PretrainedConfig", trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"model.base: cannot build a causal LM of model_type {getattr(config, 'model_type', '?')!r} "
            f"from its config ({_first_line(e)}); use a causal language model"
        ) from None


def _inspect(model: Any, config: "PretrainedConfig") -> ModelShape:
    from loraflow.model.targets import linear_modules

    modules = dict(model.named_modules())
    linears = tuple(
        _linear(x.name, modules[x.name], x.group) for x in linear_modules(model)
    )
    head_module = model.get_output_embeddings()
    head_name = next((n for n, m in modules.items() if m is head_module), None) if head_module is not None else None
    head = _linear(head_name, head_module, "head") if head_name is not None else None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    intermediate, gated = _mlp_width(list(linears), hidden)
    return ModelShape(
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        hidden=hidden,
        layers=int(text.num_hidden_layers),
        heads=int(text.num_attention_heads),
        intermediate=intermediate,
        gated_mlp=gated,
        vocab=int(text.vocab_size),
        params_total=sum(p.numel() for p in model.parameters()),  # deduplicates tied weights
        linears=linears,
        head=head,
        model=model,
        attention=str(getattr(model.config, "_attn_implementation", None) or "eager"),
    )


def _linear(name: str, module: Any, role: str) -> Linear:
    """(in, out) of ``nn.Linear``; GPT-2's ``Conv1D`` stores its weight transposed (in, out)."""
    if type(module).__name__ == "Conv1D":
        n_in, n_out = module.weight.shape[0], module.nf
    elif hasattr(module, "in_features"):
        n_in, n_out = module.in_features, module.out_features
    else:  # an untied Embedding-like head: (vocab, hidden)
        n_out, n_in = module.weight.shape
    return Linear(name, int(n_in), int(n_out), role, getattr(module, "bias", None) is not None)


def _mlp_width(linears: list[Linear], hidden: int) -> tuple[int, bool]:
    """The MLP's inner width (input of the down projection) and whether it is gated.

    Gated (SwiGLU) MLPs project h → i twice (gate and up, or one fused 2i projection).
    """
    first = _first_layer(linears)
    mlp = [x for x in first if x.role == "mlp"]
    down = [x for x in mlp if x.out_features == hidden and x.in_features != hidden]
    if not down:
        return 4 * hidden, False
    inner = down[0].in_features
    up_width = sum(x.out_features for x in mlp if x.in_features == hidden)
    return inner, up_width >= 2 * inner


def _first_layer(linears: list[Linear]) -> list[Linear]:
    """Linears of the first decoder block: those under the first numbered path component."""
    for x in linears:
        parts = x.name.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                prefix = ".".join(parts[: i + 1]) + "."
                return [y for y in linears if y.name.startswith(prefix)]
    return linears


# ---------------------------------------------------------------------------------------------
# LoRA targets


def resolve_targets(shape: ModelShape, spec: str | list[str]) -> tuple[list[str], list[Linear]]:
    """peft ``target_modules`` for a preset or an explicit list, and the linears they adapt.

    The names come from ``loraflow.model.targets.resolve_targets`` on the meta model (presets:
    attention-qv, attention, mlp, all-linear; see that module); the adapted linears are those
    names matched the way peft matches them (the full name, or a ``.``-suffix of it).
    """
    from loraflow.model.targets import resolve_targets as resolve

    targets = resolve(shape.model, spec)
    adapted = [x for x in shape.linears if any(_matches(x.name, t) for t in targets)]
    if not adapted:  # the resolver raises first; this guards a name that matches no linear
        raise ConfigError(f"lora.target_modules: {targets} adapt no linear layer of {shape.model_type}")
    return targets, adapted


def _matches(name: str, key: str) -> bool:
    """peft's rule for a list of target names: the full name, or a ``.``-separated suffix."""
    return name == key or name.endswith("." + key)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
