"""Running out of memory as one line of advice (the planner's estimate and what to change), never a crash."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from loraflow.core.config import Config
from loraflow.core.errors import TrainingError
from loraflow.core.paths import Paths

if TYPE_CHECKING:
    pass


def is_out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, CUDA's OutOfMemoryError, or the CPU allocator's "can't allocate memory"."""
    if isinstance(e, MemoryError):
        return True
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def oom_advice(cfg: Config, paths: Paths, method: str) -> str:
    """What to change, least first, with the planner's estimate for this setup when it can make one."""
    t = cfg.train
    changes = []
    if t.batch_size > 1:
        changes.append(f"-s train.batch_size={t.batch_size // 2} -s train.grad_accum={t.grad_accum * 2} "
                       "(same effective batch)")
    if not t.gradient_checkpointing:
        changes.append("-s train.gradient_checkpointing=true")
    if method == "lora":
        changes.append("-s method=qlora (4-bit base)")
    if cfg.data.max_length > 128:
        changes.append(f"-s data.max_length={cfg.data.max_length // 2}")
    advice = "try " + ", then ".join(changes) if changes else "use a device with more memory or a smaller model.base"
    try:  # the estimate is advice: a planner failure must not hide the out-of-memory error
        from loraflow.planner import plan

        p = plan(cfg, paths, with_lints=False)
        advice += (f"; the planner estimates ~{p.estimates_gib[method]:.1f} GiB for {method} at batch "
                   f"{t.batch_size}, length {cfg.data.max_length}")
        if p.fit_hint:
            advice += f" ({p.fit_hint})"
    except Exception:  # noqa: BLE001
        pass
    return advice + "; `loraflow plan` shows what fits"


@contextlib.contextmanager
def out_of_memory_as_error(cfg: Config, paths: Paths, method: str, trainer=None) -> Iterator[None]:
    """Turn running out of memory into one ``TrainingError`` line with the planner's advice (not a crash)."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        step = getattr(getattr(trainer, "state", None), "global_step", None)
        where = f" at step {step + 1}" if step is not None else ""
        detail = " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())[:160]
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        raise TrainingError(
            f"train: out of memory{where} ({type(e).__name__}: {detail or 'no details'}); "
            + oom_advice(cfg, paths, method)
        ) from None
