"""Every private API of another library (or of CPython) that loraflow relies on, in one place.

Each one is here because the public way costs what loraflow measured it to cost (said at each), and
each was checked against the versions in ``CHECKED_AGAINST``. ``tests/unit/test_private_api.py``
fails loudly when an installed version differs or a private name is gone: re-check the use here,
then update the version.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# major.minor of what each use below was read against
CHECKED_AGAINST = {"python": "3.11", "mlflow": "3.18", "prefect": "3.9", "transformers": "5.25"}


def interpreter_teardown() -> None:
    """What ``Py_Finalize`` runs first, without freeing every module afterwards: wait for non-daemon
    threads and run threading's exit hooks (Prefect sends its last logs and events there), then the
    ``atexit`` handlers (logging's flush, the temporary server's stop).

    Public way: ``sys.exit``, whose module teardown took 3 s after a run here (py-spy: no Python
    frame on the stack), a tenth of what the pipeline adds over a plain script (``cli.exit_fast``).
    """
    import atexit
    import threading

    threading._shutdown()  # CPython: there since 3.4
    atexit._run_exitfuncs()


def mlflow_initialize_tables(engine: Any) -> None:
    """Create MLflow's tables in an empty sqlite database: what ``SqlAlchemyStore`` runs on a new one.

    Public way: let MLflow replay every alembic migration on each new store, 2.4 s on this CPU
    (``track/sqlite_store.py`` runs it once per MLflow version instead, into a cached template)."""
    from mlflow.store.db.utils import _initialize_tables

    _initialize_tables(engine)


@contextmanager
def mlflow_fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``log_model`` has no client form) at ``uri`` for a moment.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI into the environment, where it would
    outlive the stage: the next pipeline in the same process (another project root) would log into
    this store. So the environment and MLflow's module globals are put back afterwards; there is no
    public getter that tells "unset" from "the default"."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    import mlflow

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prefect_server_command(python: str, prefect_dir: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment Prefect's own temporary server runs with
    (``SubprocessASGIServer._run_uvicorn_command``), to start it before Prefect is imported.

    Public way: the flow's first API call starts it, 8-12 s here, after this process has already
    spent seconds importing the server package only to start it (``flows/local.TemporaryServer``)."""
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    argv = [python, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]
    return argv, env


# transformers' Trainer: loraflow's trainer (train/sft.py) overrides Trainer._save_checkpoint to write its
# token counts into each checkpoint, last and atomically, so a checkpoint holding them is complete.
# The public callback (on_save) runs after the checkpoint is written but is not told its folder.
TRAINER_SAVE_CHECKPOINT = "_save_checkpoint"


# transformers' 4-bit load, re-enacted on a meta-device skeleton by the streaming merge (model/streaming_merge.py):
# which modules a 4-bit load replaces, which weights it quantizes, which it keeps in fp32 and which are tied are
# transformers' decisions, taken from it rather than copied (a copy drifts from the load training did).
# Public way: load the model in 4-bit (from_pretrained with a BitsAndBytesConfig), the whole model in memory,
# which is what the streaming merge exists to avoid (~27 GB for a 7B with the fp32 copy the merge needs).


def hf_prepare_4bit_skeleton(model: Any, bnb_config: Any, dtype: Any) -> Any:
    """Replace the modules of ``model`` (built on the meta device) as ``from_pretrained(quantization_config=
    bnb_config, dtype=dtype)`` does before it reads any weight; return transformers' quantizer for it
    (``AutoHfQuantizer.from_config``, ``HfQuantizer.preprocess_model``)."""
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"})
    return quantizer


def hf_param_needs_quantization(quantizer: Any, model: Any, key: str) -> bool:
    """Whether the load that ``quantizer`` prepared quantizes the parameter ``key`` (transformers' own rule)."""
    return bool(quantizer.param_needs_quantization(model, key))


def hf_replaced_class(module: Any) -> type | None:
    """The class a quantized load replaced ``module``'s with (``source_cls``, which transformers'
    ``replace_with_bnb_linear`` sets on each ``Linear4bit``), or None."""
    source = getattr(module, "source_cls", None)
    return source if isinstance(source, type) else None


def hf_tied_weights(model: Any) -> set[str]:
    """Every parameter name tied to another, both sides (``all_tied_weights_keys``: {target: source}, set by
    ``PreTrainedModel.post_init``)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values())


def hf_keep_in_fp32_strict(model: Any) -> set[str] | list[str] | tuple[()]:
    """Modules a load keeps in fp32 even when asked for bf16 (``_keep_in_fp32_modules_strict``)."""
    return getattr(model, "_keep_in_fp32_modules_strict", None) or ()
