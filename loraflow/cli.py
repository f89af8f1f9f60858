"""The ``loraflow`` command line (contract: run, stage, plan, promote; plus build-base).

Heavy libraries are imported inside the commands, so ``loraflow --help`` and config errors are
instant. A user error prints one line on stderr and exits non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from loraflow.core.errors import LoraflowError
from loraflow.core.lock import project_lock

STAGES = ("prepare", "train", "evaluate", "merge", "register")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_environment()
    try:
        return int(args.func(args) or 0)
    except LoraflowError as e:
        print(f"loraflow: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("loraflow: interrupted", file=sys.stderr)
        return 130


def console() -> None:
    """The ``loraflow`` console script: ``main()``, then :func:`exit_fast`. ``main()`` itself
    returns normally, for callers in Python."""
    exit_fast(main())


def exit_fast(code: int) -> NoReturn:
    """End the process as the interpreter would, minus its teardown.

    After a run, CPython's own teardown (freeing every module: torch, transformers, MLflow,
    Prefect) took 3 s with no Python frame on the stack (py-spy), a tenth of what the pipeline adds
    over a plain script. So, in the order the interpreter itself uses: wait for non-daemon threads
    and run threading's exit hooks (Prefect sends its last logs and events there), run the
    ``atexit`` handlers (logging's flush, the temporary server's stop), flush stdout/stderr, and end
    with ``os._exit``. Nothing is lost: every file loraflow writes is closed (and renamed) before
    its stage returns.
    """
    try:
        from loraflow.core.private_api import interpreter_teardown

        interpreter_teardown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - anything odd: leave it to the interpreter's normal exit
        sys.exit(code)
    os._exit(code)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraflow", description="LoRA/QLoRA fine-tuning as a reproducible pipeline.")
    sub = p.add_subparsers(metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", default=None, help="params.yaml (default: ./params.yaml if present)")
        sp.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted key, e.g. -s lora.r=32 (repeatable; values parsed as YAML)")
        return sp

    run = with_config(sub.add_parser("run", help="run the whole DAG as one Prefect flow run"))
    run.add_argument("--strict", action="store_true",
                     help="exit 3 before anything runs when `loraflow plan` has warnings")
    run.set_defaults(func=cmd_run)

    deploy = sub.add_parser("deploy", help="create the cpu/gpu work pools and prefect.yaml's deployments")
    deploy.add_argument("--project", default=".", help="folder with prefect.yaml (default: .)")
    deploy.set_defaults(func=cmd_deploy)

    stage = with_config(sub.add_parser("stage", help="run one stage without Prefect (what dvc.yaml calls)"))
    stage.add_argument("name", choices=STAGES + ("base", "base-digest"))
    stage.add_argument("--strict", action="store_true",
                       help="train only: exit 3 before training when `loraflow plan` has warnings")
    stage.set_defaults(func=cmd_stage)

    plan = with_config(sub.add_parser("plan", help="memory/time plan and lints before a run (loads no weights)"))
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GIB")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--strict", action="store_true", help="exit non-zero on warnings")
    plan.set_defaults(func=cmd_plan)

    promote = sub.add_parser("promote", help="move a registry alias (or roll champion back)")
    promote.add_argument("name")
    promote.add_argument("-c", "--config", default=None, help="params.yaml: its folder's mlflow/ store (default: .)")
    promote.add_argument("--version", default=None)
    promote.add_argument("--alias", default="champion")
    promote.add_argument("--rollback", action="store_true", help="move champion back to its previous version")
    promote.add_argument("--reason", default="", help="why; recorded on the version with who and when")
    promote.add_argument("--force", action="store_true",
                         help="make champion a version that failed the gate (needs --reason)")
    promote.set_defaults(func=cmd_promote)

    models = sub.add_parser("models", help="list a registered model's versions with aliases and lineage")
    models.add_argument("name")
    models.add_argument("-c", "--config", default=None, help="params.yaml: its folder's mlflow/ store (default: .)")
    models.add_argument("--json", action="store_true", help="versions, aliases and the audit trail as JSON")
    models.set_defaults(func=cmd_models)

    base = sub.add_parser("build-base", help="build the embedded base model (done on first use anyway)")
    base.add_argument("--out", default="models/base")
    base.add_argument("--steps", type=int, default=None)
    base.set_defaults(func=cmd_build_base)
    return p


def _quiet_environment() -> None:
    """Set before torch is imported. No network is assumed: no telemetry, no fork warnings."""
    # OpenMP threads that spin-wait collapse when another process shares the cores: a 60-step
    # base build took 134 s with the default policy and 6 s with PASSIVE on a busy 2-core box.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for noisy in ("mlflow", "transformers", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(args: argparse.Namespace):
    from loraflow.core.config import load_config
    from loraflow.core.paths import Paths

    path = args.config
    if path is None and Path("params.yaml").exists():
        path = "params.yaml"
    cfg = load_config(path, args.overrides)
    root = Path(path).resolve().parent if path else Path.cwd()
    return cfg, Paths.at(root)


def cmd_run(args: argparse.Namespace) -> int:
    cfg, paths = _load(args)
    if args.strict and (code := _strict(cfg, paths, "run")):
        return code
    from loraflow.track import tracking

    tracking.require_reachable(paths)  # before prepare: an unreachable store fails in seconds, not after work
    from loraflow.flows.local import run_pipeline

    with project_lock(paths.root):
        _print_summary(run_pipeline(cfg, paths), paths)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from loraflow.flows.deploy import deploy

    return deploy(Path(args.project))


def cmd_stage(args: argparse.Namespace) -> int:
    cfg, paths = _load(args)
    if args.strict:
        if args.name != "train":
            raise LoraflowError(f"--strict: applies to `stage train` and `run`, not `stage {args.name}`")
        if code := _strict(cfg, paths, "stage train"):
            return code
    from loraflow.track import tracking

    if args.name in ("train", "evaluate", "merge", "register"):
        tracking.require_reachable(paths)  # before any training: one line in seconds, not MLflow's retries
    with project_lock(paths.root):
        return _stage(args, cfg, paths)


def _stage(args: argparse.Namespace, cfg, paths) -> int:
    if args.name == "base-digest":  # dvc.yaml's always-changed stage: which weights model.base is now
        from loraflow.core.fingerprint import write_digest_file

        print(write_digest_file(cfg, paths))
        return 0
    if args.name == "base":
        from loraflow.core.config import EMBEDDED_BASE
        from loraflow.model.loading import base_location

        if cfg.model.base != EMBEDDED_BASE:  # dvc.yaml's base stage still owns models/base
            from loraflow.model.embedded import write_base_reference

            print(f"model.base is {cfg.model.base}; wrote {write_base_reference(cfg, paths)} instead of building")
            return 0
        print(base_location(cfg, paths))
        return 0
    from loraflow.tasks import runner

    runner.run_one(args.name, cfg, paths)
    return 0


def _strict(cfg, paths, what: str) -> int:
    """The planner's lints before anything is written: 3 (and one line naming them) on warnings, else 0."""
    from loraflow import planner

    return planner.strict_check(cfg, paths, what=what)


def cmd_plan(args: argparse.Namespace) -> int:
    cfg, paths = _load(args)
    try:
        from loraflow import planner
    except ImportError:
        raise LoraflowError("plan: the planner is not built yet in this version") from None
    return planner.cli(cfg, paths, gpu_memory=args.gpu_memory, as_json=args.json, strict=args.strict)


def _registry(args: argparse.Namespace, command: str) -> tuple[Any, str]:
    """The registry client and its URI: MLFLOW_TRACKING_URI, else the store next to ``-c`` params.yaml
    (or in the current folder). A missing local store is an error, not a new empty one."""
    from loraflow.core.paths import Paths
    from loraflow.track import tracking

    if args.config is not None and not Path(args.config).is_file():
        raise LoraflowError(f"{command}: config file {args.config} not found; pass -c path/to/params.yaml")
    paths = Paths.at(Path(args.config).resolve().parent if args.config else Path.cwd())
    uri = tracking.tracking_uri(paths)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise LoraflowError(f"{command}: no MLflow store at {uri.removeprefix('sqlite:///')}; run the pipeline "
                            "there first, pass -c path/to/params.yaml, or set MLFLOW_TRACKING_URI")
    return tracking.client(paths), uri


def cmd_promote(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from loraflow.track import promotion

    cl, uri = _registry(args, "promote")
    try:
        cl.get_registered_model(args.name)
    except MlflowException:
        raise LoraflowError(f"promote: no registered model named {args.name!r} in {uri}; list them with "
                            "`mlflow ui` or check the name (register.model_name)") from None
    if args.rollback:
        old, new = promotion.rollback(cl, args.name, args.reason)
        print(f"{args.name}@champion: v{old} -> v{new} (rollback)")
        return 0
    if args.version is None:
        raise LoraflowError("promote: give --version N (or --rollback)")
    version = str(args.version)
    try:
        tags = cl.get_model_version(args.name, version).tags or {}
    except MlflowException:
        raise LoraflowError(f"promote: {args.name} has no version {version}; see `loraflow models {args.name}`") from None
    forced = promotion.check_allowed(args.name, version, tags, args.alias, args.force, args.reason)
    old = promotion.move(cl, args.name, version, args.alias, args.reason, forced=forced)
    print(f"{args.name}@{args.alias}: v{old or '-'} -> v{version}" + (" (over the gate)" if forced else ""))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from loraflow.track import promotion, registry

    cl, uri = _registry(args, "models")
    versions = sorted(cl.search_model_versions(f"name='{args.name}'"), key=lambda v: int(v.version))
    if not versions:
        raise LoraflowError(f"models: no registered model named {args.name!r} in {uri}; check the name "
                            "(register.model_name) or the store (-c, MLFLOW_TRACKING_URI)")
    model = registry.retry(lambda: cl.get_registered_model(args.name))
    aliases = {a: str(v) for a, v in sorted((model.aliases or {}).items())}
    trail = promotion.audit_trail(model.tags or {})
    held = {str(v.version): sorted(a for a, ver in aliases.items() if ver == str(v.version)) for v in versions}
    if args.json:
        print(json.dumps({"name": args.name, "tracking_uri": uri, "aliases": aliases, "audit": trail,
                          "versions": [{"version": str(v.version), "aliases": held[str(v.version)],
                                        "run_id": v.run_id, "source": v.source, "tags": dict(v.tags or {})}
                                       for v in versions]}, indent=2, sort_keys=True))
        return 0
    table = Table(title=f"{args.name} versions")
    for col in ("version", "aliases", "gate metric", "kind", "rank", "alpha", "method", "dataset digest", "run"):
        table.add_column(col)
    for v in versions:
        t = v.tags or {}
        metric = t.get("gate_metric", "")
        table.add_row(str(v.version), ",".join(held[str(v.version)]),
                      f"{metric}={t.get('gate_new_value', '')}" if metric else "",
                      t.get("model_kind", "merged"), t.get("lora_r", ""), t.get("lora_alpha", ""), t.get("method", ""),
                      t.get("dataset_digest", "")[:12], (v.run_id or "")[:8])
    console = Console()
    console.print(table)
    if trail:
        console.print("[bold]alias moves[/bold] (latest 10; all in --json)")
        for m in trail[-10:]:
            how = " (rollback)" if m.get("rollback") else " (over the gate)" if m.get("forced") else ""
            why = f": {m['reason']}" if m.get("reason") else ""
            console.print(escape(f"  {m.get('at', '?')[:19]}  {m.get('alias')} v{m.get('previous') or '-'} -> "
                                 f"v{m.get('version')}{how} by {m.get('actor')}{why}"))
    return 0


def cmd_build_base(args: argparse.Namespace) -> int:
    from loraflow.model.embedded import cli_build_base

    return cli_build_base(args.out, args.steps)


def _print_summary(out: dict[str, Any], paths) -> None:
    from rich.console import Console
    from rich.table import Table

    ev = out.get("evaluate", {})
    base, tuned = ev.get("base", {}), ev.get("tuned", {})
    table = Table(title="base vs tuned (test split)")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    for m in ("loss", "perplexity", "exact_match", "token_f1"):
        if m in base or m in tuned:
            table.add_row(m, _num(base.get(m)), _num(tuned.get(m)))
    console = Console(stderr=False)
    console.print(table)
    reg = out.get("register", {})
    rel = lambda p: os.path.relpath(p, Path.cwd())  # noqa: E731
    console.print(f"adapter:        {rel(paths.adapter)}")
    console.print(f"merged model:   {rel(paths.merged)}")
    console.print(f"MLflow run:     {out.get('mlflow_run_id')}")
    if reg:
        console.print(f"registered:     {reg.get('name')} v{reg.get('version')} "
                      f"aliases={','.join(reg.get('aliases', []))} ({reg.get('reason')})")
    from loraflow.track.tracking import tracking_uri

    uri = tracking_uri(paths)
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        from loraflow.track.tracking import redact

        console.print(f"open the UI:    {redact('tracking_uri', uri)}")
        return
    if uri.startswith("sqlite:///"):
        uri = "sqlite:///" + rel(uri.removeprefix("sqlite:///"))
    console.print(f"open the UI:    mlflow ui --backend-store-uri {uri}")


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    console()
