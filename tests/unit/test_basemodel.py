"""The embedded base model: built from the shipped corpus, reproducible, loadable like a hub model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from loraflow.basemodel import build_base

    a = build_base(tmp_path_factory.mktemp("base-a") / "base", seed=0, steps=12)
    b = build_base(tmp_path_factory.mktemp("base-b") / "base", seed=0, steps=12)
    return a, b


def _hash(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_builds_a_llama_that_loads_through_from_pretrained(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path, _ = built
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    assert tok.eos_token and tok.pad_token and tok.pad_token != tok.eos_token
    assert tok.chat_template
    # digits tokenize one per token, so numbers are learnable
    assert len(tok("12345", add_special_tokens=False)["input_ids"]) == 5
    for name in ("hidden_size", "intermediate_size"):
        assert getattr(model.config, name) % 64 == 0


def test_same_seed_same_weights_and_loss_falls(built):
    a, b = built
    assert _hash(a) == _hash(b)
    info = json.loads((a / "build.json").read_text())
    assert info["loss_end"] < info["loss_start"]


def test_ensure_base_reuses_an_existing_build(built, monkeypatch):
    from loraflow import basemodel

    path, _ = built
    monkeypatch.setattr(basemodel, "build_base", lambda *a, **k: pytest.fail("rebuilt an existing base"))
    assert basemodel.ensure_base(path) == path


def test_sample_dataset_regenerates_byte_for_byte(tmp_path):
    out = tmp_path / "sample.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "raw" / "make_sample.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (ROOT / "data" / "raw" / "sample.jsonl").read_bytes()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1000 <= len(rows) <= 5000
    assert all(r["instruction"].strip() and r["output"].strip() for r in rows)
