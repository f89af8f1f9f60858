"""The ``finetune`` Prefect flow: prepare -> train -> evaluate -> merge -> register.

Each task wraps the same plain stage function that ``loraflow stage NAME`` (and so ``dvc repro``)
calls; the flow adds orchestration only: one MLflow run for the pipeline, names, ordering,
retries, caching, Prefect artifacts, and training on another machine.

Training runs in-process as the ``train`` subflow, or, when ``orchestration.train_deployment`` is
set (or this flow runs as a deployment: then ``train/gpu``), as a run of that deployment on its
work pool, waited for. Nothing is handed over on disk: the prepared data goes up to the MLflow run
(``prepared/``), training brings the adapter back there (``adapter/``), and this flow downloads
it into ``outputs/adapter/`` for evaluate and merge. The flows pass run ids, never files.

Caching: each stage's task is keyed on its inputs as ``fingerprint.stage_inputs`` says them (for
prepare: the data section, the model, the raw data's digest; for training: the training-relevant
config and the prepared data's digest; for evaluate and merge: the adapter's bytes and the test
split; always the code digest and the base's weights, not only its name), plus where the output
lives (the project folder; for training, the MLflow store). Every stage runs through
``tasks/runner.run_stage``. A re-run with nothing changed skips them (task state ``Cached``), says so
in the log, and tags the MLflow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraflow.flows.common import (
    DEFAULT_TRAIN_DEPLOYMENT,
    as_config,
    label,
    mlflow_link,
    plain,
    publish,
    quiet_worker,
    redact_stored_parameters,
    retrying,
    run_name,
    stage_logs,
    table,
)
from loraflow.flows.common import (
    tracker as _tracker,
)
from loraflow.tasks import runner
from prefect import flow, task
from prefect.logging import get_run_logger

from loraflow.core import fingerprint
from loraflow.core.config import Config
from loraflow.core.errors import ConfigError, TrainingError
from loraflow.core.messages import note
from loraflow.core.paths import Paths
from loraflow.track import handoff, tracking
from loraflow.track.secretref import externalize

TRAIN_PARAMS = ("base_model", "method", "lora_r", "lora_alpha", "lora_scale", "lora_dropout", "lora_target_modules",
                "quant_type", "double_quant", "compute_dtype", "trainable_params", "trainable_pct",
                "dataset_digest", "max_length", "learning_rate")


# --------------------------------------------------------------------------------------------- cache keys


def prepare_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """The prepare stage's inputs (``fingerprint.stage_inputs``), in this project (its outputs live there)."""
    paths = Paths.at(parameters["root"])
    inputs = fingerprint.stage_inputs("prepare", parameters["config"], paths)
    return None if inputs is None else "prepare-" + fingerprint.key(inputs | {"root": str(paths.root)})


def train_key(context: Any, parameters: dict[str, Any]) -> str:
    """The train stage's inputs, in this MLflow store (the adapter is handed over there)."""
    paths = Paths.at(parameters["root"])
    inputs = fingerprint.stage_inputs("train", parameters["config"], paths, dataset=parameters["dataset_digest"])
    return "train-" + fingerprint.key(inputs | {"mlflow": tracking.tracking_uri(paths)})


def evaluate_key(context: Any, parameters: dict[str, Any]) -> str | None:
    paths = Paths.at(parameters["root"])
    inputs = fingerprint.stage_inputs("evaluate", parameters["config"], paths)
    return None if inputs is None else "evaluate-" + fingerprint.key(inputs | {"root": str(paths.root)})


def merge_key(context: Any, parameters: dict[str, Any]) -> str | None:
    paths = Paths.at(parameters["root"])
    inputs = fingerprint.stage_inputs("merge", parameters["config"], paths)
    return None if inputs is None else "merge-" + fingerprint.key(inputs | {"root": str(paths.root)})


def _outputs(paths: Paths, stage: str) -> dict[str, Any]:
    """A stamp of what ``stage`` leaves on disk, stored with its cached result: a cache hit is
    trusted only while the files are still those (a ``loraflow stage`` run in between rewrites them).
    Small reports by md5; the merged model by name, size and mtime (hashing a 7B model costs a minute)."""
    from loraflow.core.fingerprint import file_md5

    files = [paths.report(stage)] + ([paths.samples] if stage == "evaluate" else [])
    stamp: dict[str, Any] = {str(f.relative_to(paths.root)): file_md5(f) if f.exists() else None for f in files}
    if stage == "merge":
        stamp["merged"] = sorted([p.relative_to(paths.merged).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                                 for p in paths.merged.rglob("*") if p.is_file()) if paths.merged.is_dir() else None
    return stamp


# --------------------------------------------------------------------------------------------- tasks


@task(name="prepare", cache_key_fn=prepare_key, persist_result=True)
def prepare_task(config: Config, root: str) -> dict[str, Any]:
    return plain(runner.run_stage("prepare", config, Paths.at(root)))


@task(name="upload prepared data")
def upload_prepared_task(root: str, run_id: str, digest: str) -> str:
    return handoff.upload_prepared(Paths.at(root), run_id, digest)


@task(name="train", cache_key_fn=train_key, persist_result=True)
def train_task(config: Config, root: str, run_id: str, dataset_digest: str, deployment: str | None) -> dict[str, Any]:
    """Train in-process (the ``train`` subflow) or on ``deployment``; the adapter ends up in ``adapter/`` of the run.

    The planner's lints run here, just before training: a cached training skips them with it (they
    would load the model's config through transformers, seconds of imports on a no-op re-run) and
    the flow copies the lints of the run it reuses."""
    paths = Paths.at(root)
    _lint(config, paths, _tracker(root, run_id))
    if deployment:
        _train_on_deployment(config, paths, run_id, deployment, dataset_digest)
        report = handoff.read_json_artifact(paths, run_id, "reports/train.json")
    else:
        from loraflow.flows.train import train

        # secrets as ${env:...} references (the subflow's stored parameters): it runs in this process
        report = train(run_id=run_id, config=externalize(config.model_dump(mode="json")), root=str(paths.root),
                       dataset_digest=dataset_digest)
    return {**report, "adapter_run_id": run_id, "trained_on": deployment or "in-process"}


@task(name="download adapter")
def download_adapter_task(root: str, run_id: str) -> None:
    handoff.download_adapter(Paths.at(root), run_id)


@task(name="evaluate", task_run_name="evaluate base vs tuned", cache_key_fn=evaluate_key, persist_result=True)
def evaluate_task(config: Config, root: str, run_id: str | None) -> dict[str, Any]:
    result = plain(runner.run_stage("evaluate", config, Paths.at(root), _tracker(root, run_id)))
    return {**result, "mlflow_run_id": run_id, "outputs": _outputs(Paths.at(root), "evaluate")}


@task(name="merge", task_run_name="merge into {config.merge.base} base", cache_key_fn=merge_key, persist_result=True)
def merge_task(config: Config, root: str, run_id: str | None) -> dict[str, Any]:
    result = plain(runner.run_stage("merge", config, Paths.at(root), _tracker(root, run_id)))
    return {**result, "mlflow_run_id": run_id, "outputs": _outputs(Paths.at(root), "merge")}


@task(name="register", task_run_name="register {config.register.model_name}")
def register_task(config: Config, root: str, run_id: str | None, dataset_digest: str) -> dict[str, Any]:
    return plain(runner.run_stage("register", config, Paths.at(root), _tracker(root, run_id),
                                  dataset_digest=dataset_digest))


# --------------------------------------------------------------------------------------------- training elsewhere


def require_server(deployment: str | None) -> str | None:
    """The Prefect API URL, or one line saying what needs a server and how to get one.

    With ``deployment`` (training elsewhere) a server must be set and reachable; without, only a
    set ``PREFECT_API_URL`` must be reachable (unset: Prefect starts a temporary local server).
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    what = f"orchestration.train_deployment is {deployment!r} but" if deployment else "PREFECT_API_URL is set but"
    fix = ("start one (`prefect server start`), `export PREFECT_API_URL=http://127.0.0.1:4200/api`, create the "
           "deployments (`loraflow deploy`); or set orchestration.train_deployment: null to train in-process"
           if deployment else "start it (`prefect server start`), or unset PREFECT_API_URL to use a temporary local server")
    if not url:
        if deployment:
            raise ConfigError(f"{what} no Prefect server is set (PREFECT_API_URL is empty): {fix}")
        return None
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise ConfigError(f"{what} the Prefect server at {url} is not reachable ({type(e).__name__}): {fix}") from None
    return url


def _train_on_deployment(cfg: Config, paths: Paths, run_id: str, deployment: str, dataset_digest: str) -> None:
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    log = get_run_logger()
    url = require_server(deployment)
    o = cfg.orchestration
    wait = o.train_timeout_s * (o.retries + 1) + 3600  # every attempt, plus an hour for a worker to pick it up
    log.info(f"training on deployment {deployment} (MLflow run {run_id}); waiting up to {wait} s")
    try:
        # secrets as ${env:...} references: the deployment's worker reads them from its own environment
        child = run_deployment(name=deployment, parameters={"run_id": run_id, "dataset_digest": dataset_digest,
                                                            "config": externalize(cfg.model_dump(mode="json"))},
                               flow_run_name=f"train {label(cfg)}", timeout=wait, poll_interval=2,
                               tags=["loraflow", f"mlflow-run:{run_id}"])
    except ObjectNotFound:
        raise ConfigError(f"orchestration.train_deployment: no deployment {deployment!r} on {url}; create it with "
                          "`loraflow deploy` (or `prefect --no-prompt deploy --all` in the project folder)") from None
    state = child.state
    if state is None or not state.is_final():
        pool = child.work_pool_name or "its work pool"
        raise TrainingError(f"{deployment} flow run {child.name} is still {state.name if state else 'unknown'} after "
                            f"{wait} s; is a worker polling {pool}? start one: `prefect worker start --pool {pool}`")
    if not state.is_completed():
        raise TrainingError(f"training on {deployment} ({child.name}) ended {state.name}: "
                            f"{' '.join((state.message or '').split())[:300]}")
    log.info(f"{deployment} flow run {child.name} completed on pool {child.work_pool_name}")


# --------------------------------------------------------------------------------------------- the flow


def _lint(config: Config, paths: Paths, tracker: tracking.MlflowTracker) -> None:
    """The planner's lints (the seed's four mistakes) at the start of every run, logged to MLflow."""
    from loraflow import planner
    from loraflow.core.errors import LoraflowError

    try:
        found = planner.lints(config, paths, planner.plan(config, paths, with_lints=False),
                              current_run_id=tracker.run_id)
    except LoraflowError as e:  # a plan that cannot be made must not stop a run that may still fit
        note("loraflow", f"plan: {e}")
        return
    for lint in found:
        note("loraflow", f"{lint.level} [{lint.id}]: {lint.message}")
    tracker.set_tags({"lints": ",".join(x.id for x in found) or "none"})


def train_deployment(cfg: Config) -> str | None:
    """Where training runs: the configured deployment; train/gpu when this pipeline is itself a deployment."""
    if cfg.orchestration.train_deployment:
        return cfg.orchestration.train_deployment
    from prefect.runtime import deployment

    return DEFAULT_TRAIN_DEPLOYMENT if deployment.id else None


@flow(name="finetune", flow_run_name=run_name("finetune"))
def finetune(params: str | None = "params.yaml", overrides: list[str] | None = None, root: str | None = None,
             config: Config | None = None) -> dict[str, Any]:
    """The whole DAG as one flow run and one MLflow run; returns every stage's result.

    ``params`` + ``overrides`` (``lora.r=32``, as ``-s``) build the config, so a deployment is
    parametrised as JSON; Python callers may pass ``config`` instead. ``root``: the project folder
    (default: the folder of ``params``, else the working directory).
    """
    quiet_worker()
    with stage_logs():
        return _finetune(params, overrides, root, config)


def _finetune(params: str | None, overrides: list[str] | None, root: str | None, config: Config | None) -> dict[str, Any]:
    cfg = as_config(config, params if config is None else None, overrides)
    root = str(Path(root).resolve() if root else Path(params).resolve().parent if params and config is None
               else Path.cwd())
    paths = Paths.at(root)
    log = get_run_logger()
    redact_stored_parameters()
    deployment = train_deployment(cfg)
    if deployment:
        require_server(deployment)

    refresh = not (paths.split("train").exists() and paths.report("prepare").exists())
    prepare = prepare_task.with_options(task_run_name=f"prepare {cfg.data.path}")
    # None, not False: PREFECT_TASKS_REFRESH_CACHE=true still forces every stage to run
    state = prepare.with_options(refresh_cache=True if refresh else None)(cfg, root, return_state=True)
    if state.name == "Cached" and not _prepared_matches(paths, state.result()):
        # data/prepared/ was rewritten since (e.g. `loraflow stage prepare` with other params): prepare again
        state = prepare.with_options(refresh_cache=True)(cfg, root, return_state=True)
    out: dict[str, Any] = {"prepare": state.result()}
    prepared_cached = state.name == "Cached"
    if prepared_cached:
        log.info(f"prepare skipped: cached (same data, data section, tokenizer and code); {paths.prepared} is current")

    tracker = runner.open_run(cfg, paths, "finetune", tags=_prefect_tags())
    run_id = tracker.run_id
    out["mlflow_run_id"] = run_id
    with runner.finishing(tracker, end=True):
        tracker.log_params({f"config.{k}": v for k, v in cfg.flat().items()})
        tracker.set_tags({"prepare_cached": str(prepared_cached).lower(), "train_on": deployment or "in-process"})
        tracker.log_artifact(paths.report("prepare"), "reports")  # prepare ran before the run was opened
        data_digest = retrying(upload_prepared_task, cfg).with_options(
            task_run_name=f"upload prepared/ to run {run_id[:8]}")(root, run_id, out["prepare"]["dataset_digest"])
        _publish_prepare(out["prepare"], paths, run_id)

        out["train"] = _train(cfg, paths, run_id, data_digest, deployment, tracker)
        out["evaluate"] = _cached_stage(evaluate_task, "evaluate", cfg, paths, tracker)
        _publish_evaluate(out["evaluate"], paths, run_id)
        out["merge"] = _cached_stage(merge_task, "merge", cfg, paths, tracker)
        out["register"] = retrying(register_task, cfg)(cfg, root, run_id, data_digest)
        _publish_register(out["register"], paths, run_id)
        for extra in (paths.samples, paths.train_log, paths.label_audit):
            tracker.log_artifact(extra, "reports")
    return out


def _train(cfg: Config, paths: Paths, run_id: str, data_digest: str, deployment: str | None,
           tracker: tracking.MlflowTracker) -> dict[str, Any]:
    """Train (or reuse a cached training of the same setup), and leave its adapter in outputs/adapter/."""
    log = get_run_logger()
    root = str(paths.root)
    task_obj = train_task.with_options(task_run_name=f"train {label(cfg)}" + (f" on {deployment}" if deployment else ""))
    state = task_obj(cfg, root, run_id, data_digest, deployment, return_state=True)
    result = state.result()
    if state.name == "Cached" and not _has_adapter(paths, result.get("adapter_run_id")):
        log.info(f"cached training of run {result.get('adapter_run_id')} has no adapter any more; training again")
        state = task_obj.with_options(refresh_cache=True)(cfg, root, run_id, data_digest, deployment, return_state=True)
        result = state.result()
    source = result["adapter_run_id"]
    if state.name == "Cached":
        log.info(f"training skipped: cached (same config, data digest {data_digest[:12]} and code); "
                 f"reusing the adapter of MLflow run {source}")
        old = handoff.client(paths).get_run(source).data
        tracker.set_tags({"train_cached_from": source,
                          **({"lints": old.tags["lints"]} if "lints" in old.tags else {})})  # the lints it trained with
        tracker.log_params({k: v for k, v in old.params.items() if k in TRAIN_PARAMS})
        if "train_loss" in old.metrics:
            tracker.log_metrics({"train_loss": old.metrics["train_loss"]}, step=result.get("steps"))
        tracker.log_artifact(paths.report("train"), "reports")  # the runner logs it where training ran
    if state.name == "Cached" or deployment:
        retrying(download_adapter_task, cfg).with_options(task_run_name=f"download adapter/ of run {source[:8]}")(
            root, source)
    if state.name == "Cached":
        publish("train-summary", f"## train {label(cfg)}: skipped (cached)\n\nSame config, data and code as "
                f"{mlflow_link(paths, source)}; its adapter was reused.", f"train {label(cfg)} (cached)")
    return result


# What a cached stage's result logs into this run (the metrics its own run got).
CACHED_METRICS = {
    "evaluate": lambda r: {f"eval_{k}": v for k, v in (r.get("tuned") or {}).items()}
    | {f"base_eval_{k}": v for k, v in (r.get("base") or {}).items()},
    "merge": lambda r: {"merge_max_abs_logit_diff": r.get("max_abs_logit_diff"),
                        "merge_max_abs_logit_diff_trained": r.get("max_abs_logit_diff_trained"),
                        "merge_loss": r.get("loss")},
}


def _cached_stage(task_obj: Any, stage: str, cfg: Config, paths: Paths, tracker: tracking.MlflowTracker) -> dict[str, Any]:
    """Run evaluate or merge, or reuse its cached result (same adapter, test split, base, config
    section and code) while the files it wrote are still on disk unchanged; a reused result's
    metrics are logged into this run, tagged ``<stage>_cached_from``."""
    root = str(paths.root)
    state = task_obj(cfg, root, tracker.run_id, return_state=True)
    result = state.result()
    if state.name == "Cached" and result.get("outputs") != _outputs(paths, stage):
        get_run_logger().info(f"{stage}: cached result, but its files on disk changed since; running it again")
        state = task_obj.with_options(refresh_cache=True)(cfg, root, tracker.run_id, return_state=True)
        result = state.result()
    if state.name == "Cached":
        source = result.get("mlflow_run_id") or "-"
        get_run_logger().info(f"{stage} skipped: cached (same adapter, test split, base, config and code); "
                              f"reusing the result of MLflow run {source}")
        tracker.set_tags({f"{stage}_cached_from": source})
        tracker.log_metrics({k: v for k, v in CACHED_METRICS[stage](result).items() if v is not None})
        tracker.log_artifact(paths.report(stage), "reports")  # the runner logs it where the stage ran
    return result


def _prepared_matches(paths: Paths, result: dict[str, Any]) -> bool:
    from loraflow.core.fingerprint import dataset_digest

    return paths.split("train").exists() and dataset_digest(paths.prepared) == result.get("dataset_digest")


def _has_adapter(paths: Paths, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        return handoff.has_artifact(handoff.client(paths), run_id, "adapter/adapter_config.json")
    except Exception:  # noqa: BLE001 - a deleted run or another store: train again
        return False


def _prefect_tags() -> dict[str, str]:
    from prefect.runtime import flow_run

    return {"prefect_flow_run_id": str(flow_run.id)} if flow_run.id else {}


# --------------------------------------------------------------------------------------------- Prefect artifacts


def _publish_prepare(result: dict[str, Any], paths: Paths, run_id: str) -> None:
    rows = [["records read", result.get("records_read")], ["records kept", result.get("records_kept")],
            ["records dropped", result.get("records_dropped")]]
    rows += [[f"dropped: {k}", v] for k, v in sorted((result.get("dropped") or {}).items()) if v]
    rows += [[f"{k} split", v] for k, v in (result.get("splits") or {}).items()]
    rows += [[f"tokens {k}", v] for k, v in (result.get("token_length") or {}).items()]
    rows += [["truncated", result.get("truncated")], ["format", result.get("format")],
             ["dataset digest", result.get("dataset_digest")]]
    publish("prepare-stats", f"## prepared data\n\n{table(['', 'value'], rows)}\n\n"
            f"Data: `prepared/` of {mlflow_link(paths, run_id)}", "data stats after prepare")


def _publish_evaluate(result: dict[str, Any], paths: Paths, run_id: str) -> None:
    base, tuned = result.get("base") or {}, result.get("tuned") or {}
    rows = [[m, base.get(m), tuned.get(m)] for m in ("loss", "perplexity", "exact_match", "token_f1")
            if m in base or m in tuned]
    publish("evaluate-base-vs-tuned", f"## base vs tuned (test split)\n\n{table(['metric', 'base', 'tuned'], rows)}"
            f"\n\n{mlflow_link(paths, run_id)}", "base vs tuned after evaluate")


def _publish_register(result: dict[str, Any], paths: Paths, run_id: str) -> None:
    rows = [["model", result.get("name")], ["version", result.get("version")],
            ["aliases", ", ".join(result.get("aliases") or []) or "-"], ["decision", result.get("decision")],
            ["reason", result.get("reason")], ["gate metric", result.get("gate_metric")],
            ["new value", result.get("new_value")], ["champion value", result.get("champion_value")],
            ["previous champion", result.get("previous_champion")]]
    publish("register-decision", f"## registry decision\n\n{table(['', ''], rows)}\n\n{mlflow_link(paths, run_id)}",
            "registry decision after register")
