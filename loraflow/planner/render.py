"""The readable ``loraflow plan`` report (rich): memory and time per method, trainables, lints."""

from __future__ import annotations

from loraflow.core.config import Config
from loraflow.planner.checks import _duration
from loraflow.planner.estimates import HEADROOM
from loraflow.planner.result import GIB, METHODS, Plan


def render(plan: Plan, cfg: Config, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape as e
    from rich.table import Table

    console = console or Console()
    d = plan.device
    console.print(f"[bold]base[/bold]      {e(plan.base)} ({plan.model_type}, {_count(plan.params_total)} parameters)")
    console.print(f"[bold]device[/bold]    {e(d.name)}: {d.memory_gib:g} GiB ({d.source}); "
                  f"fits = at most {HEADROOM:.0%} = {HEADROOM * d.memory_gib:.1f} GiB")
    console.print(f"[bold]shape[/bold]     batch {plan.batch_size} × {plan.seq_len} tokens, gradient checkpointing "
                  f"{'on' if plan.gradient_checkpointing else 'off'}")

    table = Table(title="peak training memory and time")
    for col in ("method", "weights", "grads + optimizer", "activations", "total", "fits", "time"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in METHODS:
        mem = plan.memory[m]
        chosen = " ◀" if m == plan.method else ""
        secs = plan.seconds.get(m)
        table.add_row(
            f"{m}{chosen}",
            _size(mem.weights),
            _size(mem.trainable_state),
            _size(mem.activations + mem.workspace),
            f"[bold]{_size(mem.total)}[/bold]",
            "yes" if plan.fits(m, HEADROOM) else "[red]no[/red]",
            _duration(secs) if secs is not None else "?",
        )
    console.print(table)
    if plan.memory["full"].freed:
        console.print(f"[dim]full: the total counts max(gradients, activations), not both: backward frees "
                      f"activations as it makes gradients ({_size(plan.memory['full'].freed)} less)[/dim]")
    cpu = plan.memory[plan.method]
    if cpu.allocator or cpu.runtime:
        console.print(f"[dim]{plan.method} on a CPU: the total includes {_size(cpu.allocator)} that glibc's malloc keeps "
                      f"in its heap and {_size(cpu.runtime)} of runtime (measured: bench/plan_memory.py)[/dim]")
    if plan.method == "qlora" and plan.qlora_load_peak:
        mapped = (f", {_size(plan.mapped_bytes)} of it file-backed (the checkpoint read through its memory mapping "
                  "to quantize it, dropped once loaded)") if plan.mapped_bytes else ""
        higher = " [bold]higher than training's[/bold]" if plan.qlora_load_peak > plan.memory["qlora"].total else ""
        console.print(f"[dim]qlora: before the first step, loading the 4-bit base and upcasting the rest to fp32 "
                      f"peaks at {_size(plan.qlora_load_peak)}{higher}{mapped}[/dim]")

    if plan.after_training:
        _after_training(console, plan, cfg)

    console.print(f"[bold]method[/bold]    {plan.method} — {e(plan.method_reason)}")
    if plan.fit_hint:
        console.print(f"          [red]{e(plan.fit_hint)}[/red]")
    console.print(f"[bold]trainable[/bold] {plan.trainable_params:,} ({plan.trainable_pct:.4f}%) in "
                  f"{plan.adapted_modules} modules: {e(', '.join(plan.targets))} "
                  f"(r={cfg.lora.r}, α={cfg.lora.alpha:g}, α/r={cfg.lora.scale:g})")
    data = plan.data
    records = f"{data.train_records:,}" if data.train_records is not None else "?"
    tokens = f"{plan.train_tokens / 1e6:.2f}M" if plan.train_tokens is not None else "?"
    steps = f"{plan.steps:,}" if plan.steps is not None else "?"
    console.print(f"[bold]data[/bold]      {records} train records, ~{data.tokens_per_record:g} tokens each → "
                  f"{steps} steps, {tokens} tokens")
    if plan.lints:
        console.print("[bold]lints[/bold]")
        for lint in plan.lints:
            color = "yellow" if lint.level == "warning" else "cyan"
            console.print(f"  [{color}]{lint.level}[/{color}] {e('[' + lint.id + ']')} {e(lint.message)}", highlight=False)
    else:
        console.print("[bold]lints[/bold]     none")
    console.print("[dim]assumptions:[/dim]")
    for line in plan.assumptions:
        console.print(f"[dim]  - {e(line)}[/dim]", highlight=False)


def _after_training(console, plan: Plan, cfg: Config) -> None:
    """evaluate, merge and register per method: peaks, sizes, merge time (loraflow.planner.after_training)."""
    from rich.table import Table

    where = "RSS above imports" if plan.device.kind == "cpu" else "evaluate: GPU memory; merge, register: host RAM"
    # artifact: what register logs (register.log, in the title: longer headers get cut to "register…" in 80 columns)
    table = Table(title=f"after training ({where}; register.log: {cfg.register.log})")
    for col in ("method", "evaluate peak", "merge peak", "merged", "artifact", "merge time", "register peak"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m, c in plan.after_training.items():
        table.add_row(f"{m}{' ◀' if m == plan.method else ''}", _size(c.evaluate_peak), _size(c.merge_peak),
                      _size(c.merged_bytes), _size(c.registered_bytes), _duration(c.merge_seconds),
                      _size(c.register_peak))
    console.print(table)
    check = ("merge peak and time include the logit check (it loads the model in fp32: merge.logit_check "
             f"{cfg.merge.logit_check})" if plan.merge_logit_check else
             f"no logit check (merge.logit_check {cfg.merge.logit_check}): the streaming merge's peak is a few "
             "copies of the largest tensor, whatever the number of layers")
    console.print(f"[dim]{check}[/dim]")


def _size(n: float) -> str:
    if n >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
