"""Secrets never reach MLflow params or tags (a real sqlite store, searched afterwards)."""

from __future__ import annotations

import sqlite3

from loraflow.core.paths import Paths
from loraflow.track import tracking


def test_planted_secrets_are_redacted_in_the_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = Paths.at(tmp_path)
    t = tracking.start_run(paths, "secrets", "probe")
    t.log_params({"HF_TOKEN": "hf_plantedsecret1", "db_uri": "postgresql://me:plantedpw2@db/x", "lora_r": 8,
                  # a mapping value (as config.data.fields is logged): redacted in its JSON form
                  "config.data.fields": {"prompt": "postgresql://u:plantedpw4@h/db"}})
    t.log_params({"lora_r": 99, "later": 1})  # already-logged keys are skipped, new ones added
    t.set_tags({"MY_API_KEY": "plantedkey3"})
    tracking.finish(t, ok=True)
    dump = "\n".join(sqlite3.connect(tmp_path / "mlflow" / "mlflow.db").iterdump())
    for secret in ("hf_plantedsecret1", "plantedpw2", "plantedkey3", "plantedpw4"):
        assert secret not in dump
    run = t.client.get_run(t.run_id)
    assert run.data.params["lora_r"] == "8" and run.data.params["later"] == "1"
    assert run.data.params["db_uri"] == "postgresql://me:***@db/x"
    assert run.data.params["config.data.fields"] == '{"prompt": "postgresql://u:***@h/db"}'
    # System info is logged with every run.
    assert run.data.params["sys_mlflow"] and run.data.params["sys_device"].startswith(("cpu", "cuda"))


def test_secret_looking_keys_and_counts_that_only_mention_tokens():
    for key in ("HF_TOKEN", "config.hub.token", "access_token", "MY_API_KEY", "aws_secret_access_key",
                "db_password", "config.x.credentials", "OPENAI_APIKEY"):
        assert tracking.redact(key, "s3cr3t") == "***", key
    for key in ("config.eval.max_new_tokens", "train_tokens_per_second", "supervised_tokens", "tokenizer",
                "config.model.base", "lora_r", "monkey"):
        assert tracking.redact(key, "visible") == "visible", key
