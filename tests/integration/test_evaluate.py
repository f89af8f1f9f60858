"""evaluate on a tiny Llama with a planted QLoRA adapter; the loss and generation helpers it uses.

The adapter is made here, not trained: LoRA on q_proj/v_proj of the 4-bit base, lora_B set to
small random values so it changes the outputs, saved like training saves it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loraflow.core.config import Config
from loraflow.core.errors import ModelError
from loraflow.core.paths import Paths
from loraflow.model import loading
from loraflow.model.generation import (
    IGNORE_INDEX,
    completion_loss,
    encode_example,
    greedy_generate,
)

PROMPT = "### Instruction:\n{}\n\n### Response:\n"
QA = [
    ("What is the opposite of hot?", "cold"),
    ("What day comes after Monday?", "Tuesday"),
    ("Is 37 even or odd?", "odd"),
    ("What is the capital of France?", "Paris"),
    ("What is the opposite of up?", "down"),
    ("Say hello.", "Hello, how are you?"),
]
ROWS = [{"id": f"t{i}", "prompt": PROMPT.format(q), "completion": a} for i, (q, a) in enumerate(QA)]


def make_project(root: Path, base: Path, method: str = "qlora", **sections) -> tuple[Config, Paths]:
    """A project root with a prepared test split and a config pointing at ``base``."""
    raw = {
        "model": {"base": str(base)},
        "method": method,
        "data": {"max_length": 64},
        "eval": {"num_samples": 4, "max_new_tokens": 6, "batch_size": 4},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    cfg = Config.model_validate(raw)
    paths = Paths.at(root)
    paths.prepared.mkdir(parents=True, exist_ok=True)
    paths.split("test").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return cfg, paths


def plant_adapter(cfg: Config, paths: Paths, seed: int = 0, scale: float = 0.2) -> None:
    """Save an adapter the way training does, against the base as training loads it."""
    from peft import LoraConfig, get_peft_model

    model = loading.load_model(cfg, paths, quantized=loading.uses_4bit(cfg))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero (no-op adapter); make it speak
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(paths.adapter)
    loading.load_tokenizer(cfg, paths).save_pretrained(paths.adapter)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_models):
    import loraflow.tasks.evaluate

    cfg, paths = make_project(tmp_path_factory.mktemp("eval"), tiny_models["llama"])
    plant_adapter(cfg, paths)
    logged = {}

    from loraflow.track.tracking import NullTracker

    class Recorder(NullTracker):  # every Tracker method; keeps the metrics and tables
        def log_table(self, data, artifact_file):
            TABLES[artifact_file] = data

        def log_metrics(self, metrics, step=None):
            logged.update(metrics)

    result = loraflow.tasks.evaluate.run(cfg, paths, Recorder())
    return cfg, paths, result, logged


TABLES: dict = {}


def test_samples_table_matches_samples_jsonl(evaluated):
    _, paths, _, _ = evaluated
    samples = [json.loads(line) for line in paths.samples.read_text().splitlines()]
    (name, table), = TABLES.items()
    assert name.endswith(".json")
    assert table["prompt"] == [r["prompt"] for r in samples]
    assert table["reference"] == [r["reference"] for r in samples]
    assert table["tuned_output"] == [r["tuned_output"] for r in samples]


def test_evaluate_writes_reports(evaluated):
    cfg, paths, result, _ = evaluated
    report = json.loads(paths.report("evaluate").read_text())
    assert report["num_samples"] == 4 == result.num_samples
    for who in ("base", "tuned"):
        assert set(report[who]) == {"loss", "perplexity", "exact_match", "token_f1"}
        for value in report[who].values():
            assert isinstance(value, float) and math.isfinite(value)
        assert report[who]["perplexity"] == pytest.approx(math.exp(report[who]["loss"]))
        assert 0.0 <= report[who]["exact_match"] <= 1.0 and 0.0 <= report[who]["token_f1"] <= 1.0
    # the planted adapter changes the model
    assert abs(report["tuned"]["loss"] - report["base"]["loss"]) > 1e-3


def test_evaluate_samples_one_row_per_sample(evaluated):
    cfg, paths, result, _ = evaluated
    samples = [json.loads(line) for line in paths.samples.read_text().splitlines()]
    assert len(samples) == result.num_samples == 4
    for row, source in zip(samples, ROWS):
        assert {"prompt", "reference", "base_output", "tuned_output"} <= row.keys()
        assert row["prompt"] == source["prompt"] and row["reference"] == source["completion"]
        for out in (row["base_output"], row["tuned_output"]):
            assert "<|endoftext|>" not in out and "<|pad|>" not in out
            assert out == out.strip()


def test_evaluate_logs_tuned_and_base_metrics(evaluated):
    _, _, result, logged = evaluated
    expected = {f"{p}eval_{m}" for p in ("", "base_") for m in ("loss", "perplexity", "exact_match", "token_f1")}
    assert set(logged) == expected
    assert logged["eval_loss"] == result.tuned["loss"] and logged["base_eval_loss"] == result.base["loss"]


def test_evaluate_without_adapter_says_train_first(tmp_path, tiny_llama):
    import loraflow.tasks.evaluate

    cfg, paths = make_project(tmp_path, tiny_llama)
    with pytest.raises(ModelError, match="loraflow stage train"):
        loraflow.tasks.evaluate.run(cfg, paths)


def test_attaching_the_adapter_leaves_no_peft_deprecation_in_the_log(tmp_path, tiny_llama):
    """peft asks transformers' deprecated is_gradient_checkpointing when it builds a model; evaluate and
    merge printed that FutureWarning into every pipeline's log. Other warnings still show."""
    import warnings

    from loraflow.model.adapters import attach_adapter

    cfg, paths = make_project(tmp_path, tiny_llama, method="lora")
    plant_adapter(cfg, paths)
    base = loading.load_model(cfg, paths, quantized=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attach_adapter(base, paths)
        warnings.warn("a warning of ours", UserWarning)
    assert not model.training
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []
    assert "a warning of ours" in [str(w.message) for w in caught]


def test_evaluate_measures_the_4bit_model_as_trained(tmp_path, tiny_llama, monkeypatch, cpu_repack_forced):
    """docs/traps.md §1: evaluate's eval-mode, no-grad forwards leave the 4-bit weights as trained (no CPU repack),
    so its losses are what those weights compute: the same NF4 weights dequantized into fp32, plus the adapter
    (what training computed, and what merge ships). ``cpu_repack_forced``: bitsandbytes repacks on any CPU."""
    import bitsandbytes as bnb
    import loraflow.tasks.evaluate

    from loraflow.model import quant
    from loraflow.model.adapters import attach_adapter, load_adapter_tokenizer

    cfg, paths = make_project(tmp_path, tiny_llama)
    plant_adapter(cfg, paths)
    tok = load_adapter_tokenizer(cfg, paths)
    fp32 = loading.load_model(cfg, paths, quantized=False)
    assert quant.dequantize_into(fp32, loading.load_model(cfg, paths, quantized=True)) == 14  # no forward ran on it
    reference = attach_adapter(fp32, paths)
    tuned_loss, _ = completion_loss(reference, tok, ROWS, cfg.eval.batch_size, cfg.data.max_length)
    with reference.disable_adapter():
        base_loss, _ = completion_loss(reference, tok, ROWS, cfg.eval.batch_size, cfg.data.max_length)

    loaded = []
    real_load_tuned = loraflow.tasks.evaluate.load_tuned
    monkeypatch.setattr(loraflow.tasks.evaluate, "load_tuned",
                        lambda *a, **k: loaded.append(real_load_tuned(*a, **k)) or loaded[-1])
    result = loraflow.tasks.evaluate.run(cfg, paths)
    (model,) = loaded
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 linears x 2 layers, all 4-bit: the forced repack applied to each
    assert not [m for m in layers if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert result.tuned["loss"] == pytest.approx(tuned_loss, rel=1e-5, abs=0)
    assert result.base["loss"] == pytest.approx(base_loss, rel=1e-5, abs=0)


# --- the helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, tiny_models):
    cfg, paths = make_project(tmp_path_factory.mktemp("fp32"), tiny_models["llama"], method="lora")
    return loading.load_model(cfg, paths, quantized=False), loading.load_tokenizer(cfg, paths)


def test_encode_example_masks_prompt_and_supervises_eos(fp32):
    _, tok = fp32
    row = ROWS[0]
    ids, labels = encode_example(tok, row["prompt"], row["completion"], max_length=64)
    n_prompt = len(tok(row["prompt"])["input_ids"])
    assert ids[:n_prompt] == tok(row["prompt"])["input_ids"]
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ids[-1] == labels[-1] == tok.eos_token_id
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:-1]) == row["completion"]
    short_ids, short_labels = encode_example(tok, row["prompt"], row["completion"], max_length=8)
    assert len(short_ids) == len(short_labels) == 8


def test_completion_loss_is_token_weighted_and_deterministic(fp32):
    model, tok = fp32
    model.train()  # the helper must switch dropout off and restore the mode
    one, n1 = completion_loss(model, tok, ROWS, batch_size=1, max_length=64)
    four, n4 = completion_loss(model, tok, ROWS, batch_size=4, max_length=64)
    assert model.training
    assert n1 == n4 == sum(len(encode_example(tok, r["prompt"], r["completion"], 64)[0]) -
                           len(tok(r["prompt"])["input_ids"]) for r in ROWS)
    assert one == pytest.approx(four, rel=1e-5)
    # against the model's own loss on one unpadded example
    ids, labels = encode_example(tok, ROWS[0]["prompt"], ROWS[0]["completion"], 64)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    assert completion_loss(model, tok, ROWS[:1], 1, 64)[0] == pytest.approx(ref, rel=1e-5)


def test_greedy_generate_batched_equals_one_by_one(fp32):
    model, tok = fp32
    prompts = [r["prompt"] for r in ROWS]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    single = [greedy_generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored


def test_greedy_generate_stops_at_eos(fp32):
    model, tok = fp32
    prompt = ROWS[1]["prompt"]
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        raw = model.generate(**enc, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                             pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    # declare the k-th greedy token an end-of-sequence token: output must stop right before it
    k = next(i for i in range(2, len(raw)) if raw[i] not in raw[:i] and raw[i] != tok.eos_token_id)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = raw[k]
    try:
        out = greedy_generate(model, tok, [prompt, ROWS[0]["prompt"]], max_new_tokens=8, batch_size=2)[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert out == tok.decode(raw[:k], skip_special_tokens=True).strip()


def test_greedy_generate_eos_first_gives_empty_output(tmp_path, tiny_llama):
    """A model whose first greedy token is EOS: outputs are empty, never the EOS string."""
    cfg, paths = make_project(tmp_path, tiny_llama, method="lora")
    model, tok = loading.load_model(cfg, paths, quantized=False), loading.load_tokenizer(cfg, paths)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0 -> argmax is id 0, which is <|endoftext|>
    assert tok.eos_token_id == 0
    outs = greedy_generate(model, tok, [r["prompt"] for r in ROWS], max_new_tokens=5, batch_size=3)
    assert outs == [""] * len(ROWS)


def test_encode_example_matches_the_training_dataset(fp32, tmp_path):
    """The loss evaluate reports is over the very tokens and labels training used (TRL's dataset)."""
    from peft import LoraConfig, get_peft_model

    from loraflow.train.sft import build_trainer

    model, tok = fp32
    cfg, paths = make_project(tmp_path, model.config._name_or_path, method="lora", data={"max_length": 24})
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    try:
        trainer = build_trainer(cfg, paths, lora, tok, ROWS)
        by_id = {r["id"]: r for r in ROWS}
        seen = 0
        for ex in trainer.train_dataset:
            row = by_id[ex["id"]] if "id" in ex else ROWS[seen]
            assert encode_example(tok, row["prompt"], row["completion"], 24) == (ex["input_ids"], ex["labels"])
            seen += 1
        assert seen == len(ROWS)
    finally:
        lora.unload()
