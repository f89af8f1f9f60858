"""Resolve ``lora.target_modules`` against the loaded model's own modules.

Presets are found by inspecting the model, never by a table that only knows Llama:

- every linear layer is listed (``nn.Linear`` and its subclasses: bitsandbytes ``Linear4bit``,
  Falcon's ``FalconLinear``; GPT-2's ``Conv1D``), except the LM head (the output embedding);
- a layer is *attention* when the module it sits in is an attention block (its class or attribute
  name says attention/attn), else *mlp* when it sits inside a repeated block (``layers.3``, ``h.3``);
- inside attention, a layer's role comes from its name's parts: ``q``/``query``, ``k``/``key``,
  ``v``/``value``, fused ``qkv``/``query_key_value``/``c_attn``, output ``o``/``out``/``dense``/``proj``;
  an attention layer whose name says nothing is an input projection, unless it is the last one
  registered (the output projection comes last in every attention block seen).

``attention-qv`` takes the query and value projections; where q, k and v are one fused layer
(GPT-2 ``c_attn``, Falcon/NeoX ``query_key_value``, Phi-3 ``qkv_proj``) it takes that layer,
since q and v cannot be adapted apart. Names come back as the shortest suffixes peft matches
(``key == name or key.endswith("." + name)``) that hit no other module: GPT-2's ``c_proj`` is
in attention and in the MLP, so ``attention`` gives ``attn.c_proj``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraflow.core.config import TARGET_PRESETS
from loraflow.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")
_WORD_ROLES = {"query": "q", "key": "k", "value": "v"}
_OUTPUT_WORDS = {"o", "out", "output", "dense", "wo", "proj"}


@dataclass(frozen=True)
class LinearModule:
    """One linear layer of the model, as target resolution sees it."""

    name: str  # full dotted name, e.g. model.layers.0.self_attn.q_proj
    kind: str  # Linear, Linear4bit, Conv1D, ...
    group: str  # attention | mlp | other
    roles: frozenset[str]  # subset of {q, k, v, o}; empty when unknown

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def linear_modules(model: "torch.nn.Module") -> list[LinearModule]:
    """Every linear layer of ``model`` except its LM head, with group (attention/mlp) and role."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    found: list[tuple[str, torch.nn.Module]] = [
        (name, m)
        for name, m in modules.items()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head and name.rsplit(".", 1)[-1] != "lm_head"
    ]
    # peft wraps a layer in a LoRA layer whose base_layer is the original linear: report the wrapper's name.
    found = [(name.removesuffix(".base_layer"), m) for name, m in found if not _is_lora_part(name)]

    out = []
    attention_members: dict[str, list[int]] = {}
    for name, m in found:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        attention_at = _attention_ancestor(name, modules)
        if attention_at is not None:
            group = "attention"
            attention_members.setdefault(attention_at, []).append(len(out))
        elif _BLOCK_INDEX.search(parent):
            group = "mlp"
        else:
            group = "other"
        roles = _roles(name.rsplit(".", 1)[-1]) if group == "attention" else frozenset()
        out.append(LinearModule(name, type(m).__name__, group, roles))
    # A nameless role inside attention: the last layer registered is the output, the rest are inputs.
    for members in attention_members.values():
        for pos, i in enumerate(members):
            if not out[i].roles:
                roles = frozenset("o") if pos == len(members) - 1 and len(members) > 1 else frozenset("qkv")
                out[i] = LinearModule(out[i].name, out[i].kind, out[i].group, roles)
    return out


def resolve_targets(model: "torch.nn.Module", spec: str | list[str]) -> list[str]:
    """peft ``target_modules`` for ``spec``: a preset (attention-qv, attention, mlp, all-linear) or explicit names.

    Raises ``ConfigError`` naming the model's linear layers when nothing matches.
    """
    linears = linear_modules(model)
    all_names = list(dict(model.named_modules()))
    if isinstance(spec, str):
        if spec not in TARGET_PRESETS:
            raise ConfigError(
                f"lora.target_modules: unknown preset {spec!r}; use one of {', '.join(TARGET_PRESETS)} "
                f"or a list of module names ({_menu(linears)})"
            )
        chosen = [m.name for m in linears if _in_preset(m, spec)]
        if not chosen:
            raise ConfigError(
                f"lora.target_modules: preset {spec} matches no layer of {type(model).__name__}; "
                f"its linear layers are {_menu(linears)}; list some of them explicitly"
            )
        return _suffixes(chosen, all_names)

    linear_names = {m.name for m in linears}
    for target in spec:
        hits = [n for n in all_names if n == target or n.endswith("." + target)]
        if not hits or not all(n in linear_names for n in hits):
            if _is_head(model, hits) or (not hits and target == "lm_head"):
                what = "is the LM head, which takes no adapter (the trainer reads its weight directly)"
            elif hits:
                what = f"matches {next(n for n in hits if n not in linear_names)}, which is not a linear layer"
            else:
                what = "matches no module"
            raise ConfigError(
                f"lora.target_modules: {target!r} in {type(model).__name__} {what}; "
                f"list some of its linear layers ({_menu(linears)}) or use a preset ({', '.join(TARGET_PRESETS)})"
            )
    return sorted(dict.fromkeys(spec))


def targets_conv1d(model: "torch.nn.Module", targets: list[str]) -> bool:
    """True when the targets are GPT-2 style ``Conv1D`` layers (weights stored transposed: peft's fan_in_fan_out)."""
    return any(
        m.kind == "Conv1D" and any(m.name == t or m.name.endswith("." + t) for t in targets)
        for m in linear_modules(model)
    )


# ---------------------------------------------------------------------------------------------


def _in_preset(m: LinearModule, preset: str) -> bool:
    if preset == "all-linear":
        return True
    if preset == "mlp":
        return m.group == "mlp"
    if m.group != "attention":
        return False
    if preset == "attention":
        return True
    return bool(m.roles & {"q", "v"})  # attention-qv; a fused qkv layer counts


def _roles(leaf: str) -> frozenset[str]:
    """Roles a layer name says it has: ``q_proj`` → {q}; ``qkv_proj``, ``c_attn`` → {q,k,v}; ``o_proj`` → {o}."""
    parts = [p for p in re.split(r"[_\W\d]+", leaf.lower()) if p]
    roles: set[str] = set()
    for p in parts:
        bare = p[1:] if p.startswith("w") and len(p) > 1 and set(p[1:]) <= set("qkvo") else p  # Wqkv, wq, wo
        if bare in _WORD_ROLES:
            roles.add(_WORD_ROLES[bare])
        elif set(bare) <= set("qkv"):  # q, k, v, kv, qk, qkv
            roles.update(bare)
        elif p in ("attn", "in"):  # GPT-2 c_attn, torch MultiheadAttention in_proj: fused q, k, v
            roles.update("qkv")
    if not roles and any(p in _OUTPUT_WORDS for p in parts):
        roles.add("o")
    return frozenset(roles)


def _attention_ancestor(name: str, modules: dict) -> str | None:
    """The nearest enclosing attention block (by attribute or class name), below the repeated block."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        attr, prefix = parts[i - 1], ".".join(parts[:i])
        if attr.isdigit():  # reached the repeated block (layers.3) without meeting attention
            return None
        m = modules.get(prefix)
        if _ATTENTION.search(attr) or (m is not None and _ATTENTION.search(type(m).__name__)):
            return prefix
    return None


def _is_lora_part(name: str) -> bool:
    return bool(re.search(r"\.lora_(A|B|embedding_A|embedding_B)(\.|$)", name))


def _is_head(model, hits: list[str]) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    return head is not None and any(modules.get(h) is head for h in hits)


def _suffixes(chosen: list[str], all_names: list[str]) -> list[str]:
    """Shortest dotted suffix of each chosen module that matches no module outside ``chosen``."""
    chosen_set = set(chosen)
    others = [n for n in all_names if n not in chosen_set]
    out: list[str] = []
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                break
        if suffix not in out:
            out.append(suffix)
    # One suffix may stand for several layers (q_proj in every block); drop longer ones that a kept one covers.
    out = [s for s in out if not any(t != s and s.endswith("." + t) for t in out)]
    return sorted(out)


def _generic(name: str) -> str:
    """model.layers.3.self_attn.q_proj → model.layers.*.self_attn.q_proj"""
    return re.sub(r"\.\d+\.", ".*.", name)


def _menu(linears: list[LinearModule]) -> str:
    """The distinct layer names a user can list, e.g. ``q_proj, k_proj, ..., attn.c_proj, mlp.c_proj``."""
    leaves = {}
    for m in linears:
        leaves.setdefault(m.leaf, set()).add(_generic(m.name).rsplit(".", 2)[-2] if "." in m.name else "")
    names = []
    for leaf, parents in leaves.items():
        names.extend([f"{p}.{leaf}" for p in sorted(parents)] if len(parents) > 1 else [leaf])
    return ", ".join(names) if names else "(none)"
