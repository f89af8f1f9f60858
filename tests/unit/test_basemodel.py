"""The embedded base model and the sample dataset: builds in seconds with a tiny step budget."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from loraflow.core.errors import ConfigError
from loraflow.model import embedded
from loraflow.model.corpus import generate
from loraflow.model.corpus.facts import all_facts

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12  # ~1 s of training: enough for the loss to fall, far from knowing the facts


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> tuple[Path, Path]:
    """Two builds with the same seed into different folders."""
    a = embedded.build_base(tmp_path_factory.mktemp("base") / "a", seed=0, steps=STEPS)
    b = embedded.build_base(tmp_path_factory.mktemp("base") / "b", seed=0, steps=STEPS)
    return a, b


def test_loads_as_a_hugging_face_llama(builds):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = builds[0]
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    assert (path / "model.safetensors").exists()
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    planned = embedded.base_config()  # what `loraflow plan` reads before the model exists
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "pad_token_id"):
        assert getattr(model.config, key) == getattr(planned, key), key
    # bitsandbytes' 4-bit CPU layers want widths that are multiples of 64.
    assert model.config.hidden_size % 64 == 0 and model.config.intermediate_size % 64 == 0


def test_digits_are_single_tokens(builds):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builds[0])
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]
    pieces = tok.tokenize("The number after 137 is 138.")
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == ["1", "3", "7", "1", "3", "8"]
    text = "### Instruction:\nIs 37 even or odd?\n\n### Response:\nodd"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_same_seed_gives_identical_weights(builds):
    a, b = builds
    assert sha256(a / "model.safetensors") == sha256(b / "model.safetensors")
    assert sha256(a / "tokenizer.json") == sha256(b / "tokenizer.json")


def test_training_lowers_the_loss_and_is_recorded(builds):
    info = json.loads((builds[0] / "build.json").read_text())
    assert info["steps"] == STEPS and info["seed"] == 0 and len(info["losses"]) == STEPS
    assert info["loss_end"] < info["loss_start"]
    assert info["corpus_sha256"] == embedded.corpus_digest()
    card = (builds[0] / "README.md").read_text()
    assert f"{info['params']:,}" in card and "public domain" in card


def test_ensure_base_builds_once(tmp_path, monkeypatch):
    calls = []

    def fake_build(out, **kw):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(embedded, "build_base", fake_build)
    target = tmp_path / "models" / "base"
    assert embedded.ensure_base(target) == target
    assert embedded.ensure_base(target) == target
    assert calls == [target]


def test_bad_step_budget_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="--steps"):
        embedded.build_base(tmp_path / "x", steps=0)
    assert not (tmp_path / "x").exists()


def test_corpus_files_are_generated_and_state_every_fact():
    rendered = generate.render()
    for name, text in rendered.items():
        assert (generate.CORPUS_DIR / name).read_text(encoding="utf-8") == text, (
            f"loraflow/corpus/{name} is stale: run python -m loraflow.model.corpus.generate"
        )
    size = sum(len(t.encode()) for t in rendered.values())
    assert size < 300_000
    corpus = "\n".join(generate.read_documents())
    for fact in all_facts():  # each fact is on a quiz sheet: its question, then the bare answer
        assert f"\n{fact.answer}\n" in corpus or corpus.endswith(f"\n{fact.answer}"), fact


def _make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "data" / "raw" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_dataset_regenerates_byte_for_byte(tmp_path):
    out = tmp_path / "sample.jsonl"
    _make_sample().write(out)
    assert out.read_bytes() == (ROOT / "data" / "raw" / "sample.jsonl").read_bytes()


def test_sample_records_are_alpaca_with_short_answers():
    lines = (ROOT / "data" / "raw" / "sample.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert 1000 <= len(records) <= 5000
    assert len(set(lines)) == len(lines)
    for r in records:
        assert list(r) == ["instruction", "input", "output"]
        assert r["instruction"].strip() and r["output"].strip()
        assert isinstance(r["input"], str)
        assert len(r["output"].split()) <= 3  # checkable: exact match means something
    assert 0.2 < sum(bool(r["input"]) for r in records) / len(records) < 0.5
