"""How much of its rank a trained LoRA adapter uses: singular values of each ``B·A``.

The seed's advice ("if your adapter plateaus below expectations, raising the rank is the first
thing to try") needs two facts after training: does the adapter fill its rank, and did the loss
stop falling. This module measures the first from the adapter's weights and the second from the
trainer's log history, and turns both into one suggestion.

Effective rank of one module: the fewest singular values of ``ΔW ∝ B·A`` that hold ``ENERGY``
(90%) of its energy ``Σσ²`` (the squared Frobenius norm). The scale α/r multiplies every σ
alike, so it does not change the effective rank and is left out.

The singular values come from an r×r core, never from the out×in product (4096×4096 per
module for a 7B model, 16M floats): with reduced QRs ``B = Q_B·R_B`` and ``Aᵀ = Q_A·R_A``,
``B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ``; Q_B and Q_A have orthonormal columns, so ``B·A`` has exactly the
singular values of ``R_B·R_Aᵀ`` (r×r). Cost O((in + out)·r²) instead of O(in·out·r).

    ranks = rankcheck.module_ranks(load_file("outputs/adapter/adapter_model.safetensors"))
    report = rankcheck.summarise(ranks, log_history, r=16, alpha=32)
    report.to_dict()["rank_utilisation"], report.suggestion
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    import torch

ENERGY = 0.9  # share of Σσ² the effective rank must hold
SATURATED = 0.9  # mean effective rank / r at or above this: the adapter fills its rank
PLATEAU_REL = 0.02  # the loss fell by less than 2% between the last two windows: a plateau
DETAIL_MAX_MODULES = 64  # per-module detail in reports/train.json up to this many modules
_REL_TOL = 1e-9  # float slack on the energy threshold: σ² = [9, 1] holds exactly 90% with one value

# peft names: "<module>.lora_A.weight" in a saved adapter, "<module>.lora_A.<adapter>.weight" in a model.
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class ModuleRank:
    """One adapted module: its rank r, effective rank and singular values (descending)."""

    name: str
    r: int
    effective_rank: int
    singular_values: tuple[float, ...]

    @property
    def utilisation(self) -> float:
        return self.effective_rank / self.r if self.r else 0.0


@dataclass(frozen=True)
class Plateau:
    """Whether the loss stopped falling: the last window's mean against the one before."""

    source: str  # "eval_loss" (the last two evaluations) or "train_loss" (the last two windows)
    previous: float
    last: float
    window_steps: int  # steps per window (0 for evaluations)

    @property
    def improvement(self) -> float:
        """Relative fall of the loss, (previous − last) / previous; negative when it rose."""
        return (self.previous - self.last) / abs(self.previous) if self.previous else 0.0

    @property
    def plateaued(self) -> bool:
        return self.improvement < PLATEAU_REL


@dataclass(frozen=True)
class AdapterRank:
    """The ``adapter`` object of ``reports/train.json``."""

    modules: list[ModuleRank]
    r: int
    alpha: float
    plateau: Plateau | None
    energy: float = ENERGY
    suggestion: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def effective_rank_mean(self) -> float:
        return sum(m.effective_rank for m in self.modules) / len(self.modules) if self.modules else 0.0

    @property
    def rank_utilisation(self) -> float:
        """Mean over modules of effective rank / r (r may differ per module with a rank pattern)."""
        return sum(m.utilisation for m in self.modules) / len(self.modules) if self.modules else 0.0

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics."""
        return {
            "adapter_effective_rank_mean": round(self.effective_rank_mean, 4),
            "adapter_rank_utilisation": round(self.rank_utilisation, 4),
        }

    def to_dict(self) -> dict[str, Any]:
        eff = [m.effective_rank for m in self.modules]
        out: dict[str, Any] = {
            "r": self.r,
            "energy": self.energy,
            "modules_count": len(self.modules),
            "effective_rank_mean": round(self.effective_rank_mean, 4),
            "effective_rank_min": min(eff, default=0),
            "effective_rank_max": max(eff, default=0),
            "rank_utilisation": round(self.rank_utilisation, 4),
            "plateau": None if self.plateau is None else {
                "source": self.plateau.source,
                "previous": round(self.plateau.previous, 6),
                "last": round(self.plateau.last, 6),
                "window_steps": self.plateau.window_steps,
                "improvement": round(self.plateau.improvement, 6),
                "plateaued": self.plateau.plateaued,
            },
            "suggestion": self.suggestion,
        }
        if len(self.modules) <= DETAIL_MAX_MODULES:
            out["modules"] = [
                {"name": m.name, "r": m.r, "effective_rank": m.effective_rank,
                 "singular_values": [float(f"{s:.4g}") for s in m.singular_values]}
                for m in self.modules
            ]
        if self.notes:
            out["notes"] = self.notes
        return out


def singular_values(b: "torch.Tensor", a: "torch.Tensor") -> "torch.Tensor":
    """Singular values of ``b @ a`` (b: out×r, a: r×in), descending, from the r×r core.

    Computed in float64 on the CPU: an adapter is small, and fp32 QR loses the tail that
    separates "rank 3" from "rank 3 plus rounding noise".
    """
    import torch

    b = b.detach().to("cpu", torch.float64)
    a = a.detach().to("cpu", torch.float64)
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"B is {tuple(b.shape)} and A is {tuple(a.shape)}: inner dimensions differ")
    _, r_b = torch.linalg.qr(b, mode="reduced")  # (min(out, r), r)
    _, r_a = torch.linalg.qr(a.T, mode="reduced")  # (min(in, r), r)
    return torch.linalg.svdvals(r_b @ r_a.T)


def effective_rank(sigma: Iterable[float] | "torch.Tensor", energy: float = ENERGY) -> int:
    """The fewest singular values holding ``energy`` of ``Σσ²``; 0 when every σ is 0.

    ``sigma`` is sorted here, so any order works. ``energy`` in (0, 1]: 1.0 counts every
    non-zero singular value.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    squares = sorted((float(s) ** 2 for s in sigma), reverse=True)
    total = math.fsum(squares)
    if total <= 0:
        return 0
    need = energy * total * (1 - _REL_TOL)
    held = 0.0
    for k, sq in enumerate(squares, start=1):
        held += sq
        if held >= need:
            return k
    return len(squares)


def lora_pairs(tensors: Mapping[str, "torch.Tensor"]) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    """``{module: (B, A)}`` from a peft state dict or ``model.named_parameters()``.

    Works on a saved adapter (``…q_proj.lora_A.weight``) and on a live model
    (``…q_proj.lora_A.default.weight``); modules with several adapters are keyed
    ``module[adapter]``. Embedding adapters (``lora_embedding_A``) are not ``.weight`` and are skipped.
    """
    found: dict[str, dict[str, "torch.Tensor"]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue
        name = m["module"] + (f"[{m['adapter']}]" if m["adapter"] not in (None, "default") else "")
        found.setdefault(name, {})[m["ab"]] = tensor
    return {name: (ab["B"], ab["A"]) for name, ab in sorted(found.items()) if "A" in ab and "B" in ab}


def module_ranks(tensors: Mapping[str, "torch.Tensor"], energy: float = ENERGY) -> list[ModuleRank]:
    """Effective rank of every adapted module in ``tensors`` (see ``lora_pairs``)."""
    out = []
    for name, (b, a) in lora_pairs(tensors).items():
        sigma = singular_values(b, a)
        out.append(ModuleRank(_short(name), int(a.shape[0]), effective_rank(sigma, energy),
                              tuple(float(s) for s in sigma)))
    return out


def plateau(history: list[dict], window: int | None = None) -> Plateau | None:
    """Did the loss stop falling? From ``trainer.state.log_history``.

    Two or more evaluations during training: the last two eval losses. Otherwise the train loss:
    the step-weighted mean over the last ``window`` steps against the ``window`` steps before
    (default: a fifth of the logged steps, so the comparison is about the end of training, not
    its first drop). None when the log covers fewer than two windows.
    """
    evals = sorted((int(h.get("step", 0)), float(h["eval_loss"])) for h in history if "eval_loss" in h)
    if len(evals) >= 2:
        return Plateau("eval_loss", evals[-2][1], evals[-1][1], 0)
    logged = sorted((int(h["step"]), float(h["loss"])) for h in history if "loss" in h and "step" in h)
    if len(logged) < 2:
        return None
    end = logged[-1][0]
    w = window or max(1, end // 5)
    if end < 2 * w:
        return None
    last, previous = _window_mean(logged, end - w, end), _window_mean(logged, end - 2 * w, end - w)
    if last is None or previous is None:
        return None
    return Plateau("train_loss", previous, last, w)


def _window_mean(logged: list[tuple[int, float]], lo: int, hi: int) -> float | None:
    """Mean loss over steps (lo, hi]: each logged mean covers the steps since the previous log."""
    total = steps = 0.0
    prev = 0
    for step, loss in logged:
        overlap = min(step, hi) - max(prev, lo)
        if overlap > 0:
            total, steps = total + loss * overlap, steps + overlap
        prev = step
    return total / steps if steps else None


def summarise(
    modules: list[ModuleRank], history: list[dict], r: int, alpha: float, window: int | None = None
) -> AdapterRank:
    """The report and its suggestion: raise r (keeping α/r) when the adapter saturates and plateaus."""
    flat = plateau(history, window)
    report = AdapterRank(modules, r, alpha, flat)
    notes = []
    if not modules:
        notes.append("no LoRA A/B pairs found in the adapter")
    if flat is None:
        notes.append("too few logged losses to tell whether training plateaued")
    suggestion = None
    util = report.rank_utilisation
    if modules and util >= SATURATED and flat is not None and flat.plateaued:
        scale = alpha / r
        suggestion = (
            f"the adapter uses {util:.0%} of its rank (effective rank {report.effective_rank_mean:.1f} of r={r} "
            f"at {ENERGY:.0%} energy) and the {flat.source.replace('_', ' ')} plateaued "
            f"({flat.previous:.4f} -> {flat.last:.4f}); try -s lora.r={2 * r} -s lora.alpha={2 * alpha:g} "
            f"(keeps alpha/r = {scale:g})"
        )
    return AdapterRank(modules, r, alpha, flat, ENERGY, suggestion, notes)


def check_adapter(adapter_dir: str | Path, history: list[dict], r: int, alpha: float) -> AdapterRank:
    """``summarise`` over a saved adapter folder (``adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return summarise(module_ranks(tensors), history, r, alpha)


def _short(name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj`` → ``model.layers.0.self_attn.q_proj``."""
    return name.removeprefix("base_model.model.")
