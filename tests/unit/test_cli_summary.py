"""The end-of-run summary `loraflow run` prints: where to look next."""

from __future__ import annotations

from loraflow import cli
from loraflow.core.paths import Paths


def test_summary_points_at_a_tracking_servers_own_ui_with_its_password_masked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ci:s3cret@127.0.0.1:5000")
    cli._print_summary({}, Paths.at(tmp_path))
    out = capsys.readouterr().out
    assert "open the UI:    http://ci:***@127.0.0.1:5000" in out
    assert "mlflow ui" not in out and "s3cret" not in out  # `mlflow ui --backend-store-uri http://...` fails


def test_summary_for_a_local_store_says_how_to_start_the_ui(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cli._print_summary({}, Paths.at(tmp_path))
    assert "open the UI:    mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db" in capsys.readouterr().out
