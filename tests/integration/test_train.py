"""The train stage on tiny models: QLoRA and LoRA learn, docs/traps.md §1 stays fixed, NaN stops, resume continues."""

from __future__ import annotations

import csv
import json

import loraflow.tasks.train
import pytest
import torch
from transformers import TrainerCallback

from loraflow.core.config import Config
from loraflow.core.errors import TrainingError
from loraflow.core.paths import Paths

pytestmark = pytest.mark.usefixtures("one_thread")

QA = [
    ("What is the opposite of hot?", "cold"),
    ("What day comes after Monday?", "Tuesday"),
    ("Is 37 even or odd?", "odd"),
    ("What is the capital of France?", "Paris"),
    ("What color is the sky?", "blue"),
    ("How many legs does a dog have?", "four"),
]

CONTRACT_PARAMS = {
    "base_model", "method", "lora_r", "lora_alpha", "lora_scale", "lora_dropout", "lora_target_modules",
    "quant_type", "double_quant", "compute_dtype", "trainable_params", "trainable_pct", "dataset_digest",
    "max_length", "learning_rate",
}


def project(root, n_train=24, n_val=6) -> Paths:
    """A project root with prepared splits of a small, repetitive alpaca-style dataset."""
    paths = Paths.at(root)
    paths.prepared.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("val", n_val), ("test", 0)):
        rows = [
            {"id": f"{name}{i}", "prompt": f"### Instruction:\n{QA[i % 6][0]}\n\n### Response:\n",
             "completion": QA[i % 6][1]}
            for i in range(n)
        ]
        paths.split(name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def config(base, method="qlora", **train) -> Config:
    return Config.model_validate({
        "model": {"base": str(base)},
        "method": method,
        "data": {"max_length": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": 40, "learning_rate": 1e-2, "batch_size": 8, "warmup_ratio": 0.0,
                  "lr_scheduler": "constant", "logging_steps": 5, "save_steps": 20} | train,
    })


def read_log(paths: Paths) -> list[dict]:
    with open(paths.train_log, newline="") as fh:
        return list(csv.DictReader(fh))


class Recorder:
    run_id = "run-123"

    def __init__(self):
        self.params, self.metrics = {}, []

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_dataset(self, name, digest, source, context):
        pass


@pytest.mark.slow
def test_qlora_loss_falls_and_outputs_follow_the_contract(tiny_llama, tmp_path):
    paths = project(tmp_path)
    paths.reports.mkdir(parents=True, exist_ok=True)
    paths.report("prepare").write_text(json.dumps({"dataset_digest": "abc123"}))
    tracker = Recorder()
    result = loraflow.tasks.train.run(config(tiny_llama), paths, tracker)

    log = read_log(paths)
    first, final = float(log[0]["loss"]), result.train_loss
    assert log[0]["step"] == "1" and result.steps == 40
    assert final < first - 0.6, (first, final)  # 6.09 -> ~5.0: a random frozen head caps how low it goes
    assert result.eval_loss is not None and result.eval_loss < first - 0.6
    assert result.method == "qlora" and result.quantized_layers == 14  # 7 linears x 2 layers
    assert [r["step"] for r in log if r["loss"]] == ["1", "5", "10", "15", "20", "25", "30", "35", "40"]
    assert log[-1]["eval_loss"] and float(log[-1]["eval_loss"]) == pytest.approx(result.eval_loss)
    assert all(float(r["tokens_per_second"]) > 0 for r in log if r["loss"])

    # the adapter: safetensors + config + tokenizer, and it loads onto the 4-bit base
    adapter = paths.adapter
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"} <= {p.name for p in adapter.iterdir()}
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["r"] == 8 and acfg["lora_alpha"] == 16 and sorted(acfg["target_modules"]) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert not list(paths.outputs.glob(".adapter.tmp-*"))

    report = json.loads(paths.report("train").read_text())
    assert report["train_loss"] == pytest.approx(final) and report["steps"] == 40
    assert report["tokens"]["total"] > report["tokens"]["supervised"] > 0
    assert report["trainable_params"] == result.trainable_params > 0 and 0 < report["trainable_pct"] < 100
    assert report["adapter_dir"] == "outputs/adapter" and report["mlflow_run_id"] == "run-123"
    assert report["method"] == "qlora" and report["lora_r"] == 8 and report["lora_alpha"] == 16
    assert report["eval_loss"] == pytest.approx(result.eval_loss) and report["tokens_per_second"] > 0

    # how much of r the trained adapter uses: singular values of each B·A (loraflow.train.rankcheck)
    rank = report["adapter"]
    assert rank["r"] == 8 and rank["modules_count"] == 14 and len(rank["modules"]) == 14
    assert 1 <= rank["effective_rank_min"] <= rank["effective_rank_mean"] <= rank["effective_rank_max"] <= 8
    assert rank["rank_utilisation"] == pytest.approx(rank["effective_rank_mean"] / 8, abs=1e-3)
    assert all(len(m["singular_values"]) == 8 and m["singular_values"][0] > 0 for m in rank["modules"])
    assert rank["plateau"]["source"] == "train_loss" and rank["plateau"]["window_steps"] == 8
    # The loss flattens (the last 8 steps improve 1.3% < 2%), but the adapter uses under half of r=8 (effective
    # rank 2..5): not saturated, so no advice to raise r. (Saturated and flat: the next test.)
    assert rank["plateau"]["plateaued"] and rank["rank_utilisation"] < 0.6
    assert rank["suggestion"] is None
    logged = {k: v for _, m in tracker.metrics for k, v in m.items() if k.startswith("adapter_")}
    assert logged == {"adapter_effective_rank_mean": rank["effective_rank_mean"],
                      "adapter_rank_utilisation": rank["rank_utilisation"]}

    # the tracker: the contract's params once, per-step metrics at every log
    assert CONTRACT_PARAMS <= set(tracker.params)
    assert tracker.params["dataset_digest"] == "abc123" and tracker.params["lora_scale"] == 2.0
    assert tracker.params["quant_type"] == "nf4" and tracker.params["compute_dtype"] == "float32"
    steps = [s for s, m in tracker.metrics if "train_loss" in m]
    assert steps == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    assert all({"train_loss", "learning_rate", "train_tokens_per_second"} <= m.keys()
               for s, m in tracker.metrics if "train_loss" in m)

    # the audit: the first example, its answer + EOS marked
    audit = paths.label_audit.read_text()
    assert "[[cold<|endoftext|>]]" in audit and "### Response:\n[[" in audit


@pytest.mark.slow
def test_lora_full_precision_learns_without_4bit_layers(tiny_llama, tmp_path):
    paths = project(tmp_path, n_val=0)
    result = loraflow.tasks.train.run(config(tiny_llama, "lora", max_steps=30), paths)
    log = read_log(paths)
    assert result.method == "lora" and result.quantized_layers == 0
    assert result.train_loss < float(log[0]["loss"]) - 0.6
    assert result.eval_loss is None  # no val split: no eval
    assert not any(r["eval_loss"] for r in log)


@pytest.mark.slow
def test_saturated_flat_adapter_gets_a_rank_suggestion(tiny_llama, tmp_path):
    """r=1 fills its rank by construction; a near-zero learning rate keeps the loss flat: raise r, keep α/r."""
    paths = project(tmp_path, n_val=0)
    cfg = config(tiny_llama, "lora", max_steps=10, learning_rate=1e-6, logging_steps=1)
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 1, "alpha": 2, "target_modules": "attention-qv"})})
    loraflow.tasks.train.run(cfg, paths)
    rank = json.loads(paths.report("train").read_text())["adapter"]
    assert rank["effective_rank_mean"] == 1 and rank["rank_utilisation"] == 1.0 and rank["modules_count"] == 4
    assert rank["plateau"]["plateaued"] and abs(rank["plateau"]["improvement"]) < 0.02
    assert "-s lora.r=2 -s lora.alpha=4" in rank["suggestion"] and "alpha/r = 2" in rank["suggestion"]


def _lora_grads(cfg: Config, paths: Paths, batch: dict, eval_first: bool) -> dict[str, torch.Tensor]:
    """LoRA gradients of one batch on a freshly loaded 4-bit model, as the train stage builds it."""
    from transformers import set_seed

    from loraflow.model import loading
    from loraflow.model.targets import resolve_targets
    from loraflow.train import lora

    set_seed(0)
    model = loading.load_model(cfg, paths, quantized=True)
    model = lora.attach_lora(model, cfg, resolve_targets(model, "all-linear"), quantized=True)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave every A gradient zero
            p.data = torch.randn(p.shape, generator=g) * 0.05
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        import bitsandbytes as bnb

        for m in model.modules():  # the repack (docs/traps.md §1) never happened
            if isinstance(m, bnb.nn.Linear4bit):
                assert m.support_avx512bf16_for_cpu is False
                assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


@pytest.mark.slow
def test_eval_forward_before_training_leaves_4bit_gradients_intact(tiny_llama, tmp_path, cpu_repack_forced):
    """docs/traps.md §1: an eval-mode no-grad forward on the 4-bit model must not change what backward computes.

    ``cpu_repack_forced``: bitsandbytes repacks here on any CPU, as on one with AVX512-BF16."""
    from loraflow.model import loading, quant

    cfg = config(tiny_llama)
    paths = Paths.at(tmp_path)
    tok = loading.load_tokenizer(cfg, paths)
    enc = tok(["### Instruction:\nWhat is hot?\n\n### Response:\ncold", "Is 37 odd?\nodd"], padding=True,
              return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    fresh = _lora_grads(cfg, paths, batch, eval_first=False)
    after_eval = _lora_grads(cfg, paths, batch, eval_first=True)
    assert fresh.keys() == after_eval.keys() and len(fresh) == 2 * 14  # A and B on every 4-bit linear
    for name, grad in fresh.items():
        assert grad.norm() > 0, name
        assert torch.allclose(grad, after_eval[name], rtol=1e-5, atol=1e-8), name

    lora_base = loading.load_model(cfg, paths, quantized=False)
    assert quant.count_4bit_layers(lora_base) == 0


class PlantNaN(TrainerCallback):
    """Sets one LoRA weight to NaN after ``step``: the next step's loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))


@pytest.mark.slow
def test_nan_loss_stops_training_and_writes_no_adapter(tiny_llama, tmp_path):
    paths = project(tmp_path)
    with pytest.raises(TrainingError, match=r"train: loss is nan at step 4; lower train.learning_rate"):
        loraflow.tasks.train.run(config(tiny_llama, max_steps=10, save_steps=3), paths, callbacks=[PlantNaN(3)])
    assert not paths.adapter.exists() and not paths.report("train").exists()
    # the checkpoint at step 3 was taken before the NaN; nothing non-finite was checkpointed
    assert sorted(p.name for p in paths.checkpoints.glob("checkpoint-*")) == ["checkpoint-3"]


class Crash(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt  # a kill mid-training


@pytest.mark.slow
def test_rerun_resumes_from_the_last_checkpoint(tiny_llama, tmp_path):
    paths = project(tmp_path, n_val=0)
    cfg = config(tiny_llama, max_steps=8, save_steps=3, logging_steps=1)
    with pytest.raises(KeyboardInterrupt):
        loraflow.tasks.train.run(cfg, paths, callbacks=[Crash(5)])
    assert not paths.adapter.exists()

    # same setup: continues from step 3, not from 0; the log's earlier rows come from the checkpoint
    # (dvc repro deletes a stage's outputs, train_log.csv too, before it runs the stage again)
    paths.train_log.unlink()
    result = loraflow.tasks.train.run(cfg, paths)
    assert result.resumed_from == "outputs/checkpoints/checkpoint-3" and result.steps == 8
    assert [int(r["step"]) for r in read_log(paths)] == list(range(1, 9))
    assert paths.adapter.exists()
    assert [p.name for p in paths.checkpoints.glob("checkpoint-*")] == ["checkpoint-8"]  # only the last is kept
    tokens_after_8, loss_after_8 = result.tokens, result.train_loss

    # the same setup again (dvc repro --force): the last checkpoint is the planned end, nothing is trained
    from safetensors.torch import load_file

    weights = load_file(paths.adapter / "adapter_model.safetensors")
    paths.train_log.unlink()
    result = loraflow.tasks.train.run(cfg, paths)
    assert result.steps == 8 and result.train_loss == loss_after_8 and result.tokens == tokens_after_8
    assert [int(r["step"]) for r in read_log(paths)] == list(range(1, 9))
    again = load_file(paths.adapter / "adapter_model.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)

    # more steps: the global step continues from the end of the last run
    result = loraflow.tasks.train.run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 10})}), paths)
    assert result.resumed_from == "outputs/checkpoints/checkpoint-8" and result.steps == 10
    assert [int(r["step"]) for r in read_log(paths)] == list(range(1, 11))
    assert result.tokens > tokens_after_8

    # another setup (a different rank): the old checkpoints are not resumed
    other = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 4})})
    result = loraflow.tasks.train.run(other, paths)
    assert result.resumed_from is None and result.steps == 8


@pytest.mark.slow
def test_auto_method_is_resolved_and_recorded_with_the_adapter(tiny_llama, tmp_path, monkeypatch):
    from loraflow import planner
    from loraflow.model import loading

    # A 0.15M-parameter model: its 16-bit LoRA estimate (0.03 GiB) fits any machine, so auto is plain LoRA.
    paths = project(tmp_path / "auto", n_val=0)
    cfg = config(tiny_llama, "auto", max_steps=2)
    result = loraflow.tasks.train.run(cfg, paths)
    assert result.method == "lora" and result.quantized_layers == 0
    meta = loading.adapter_meta(paths)
    assert meta["method"] == "lora" and meta["quantization"] is None
    assert meta["target_modules"] == sorted(meta["target_modules"])
    # evaluate and merge load the base the way training did
    assert loading.uses_4bit(cfg, paths) is False

    # When the planner answers QLoRA (a bigger model on a smaller device), the stage trains QLoRA and records it.
    monkeypatch.setattr(planner, "resolve_method", lambda cfg, paths: ("qlora", "auto: planted for the test"))
    paths = project(tmp_path / "planted", n_val=0)
    result = loraflow.tasks.train.run(cfg, paths)
    assert result.method == "qlora" and result.quantized_layers == 14
    assert loading.adapter_meta(paths)["method"] == "qlora" and loading.uses_4bit(cfg, paths) is True


def test_final_loss_covers_a_whole_logging_window():
    from loraflow.train.callbacks import final_loss

    history = [{"step": 1, "loss": 9.0}, {"step": 5, "loss": 4.0}, {"step": 10, "loss": 3.0}, {"step": 11, "loss": 6.0},
               {"step": 11, "eval_loss": 1.0}]
    # the last log covers one short step; it counts for 1 of the last 6 steps, not as "the" final loss
    assert final_loss(history, 5) == pytest.approx((3.0 * 5 + 6.0 * 1) / 6)
    assert final_loss(history[:3], 5) == 3.0
    assert final_loss([], 5) is None


def test_pretokenized_equals_trl(tiny_llama, tmp_path):
    """``sft.tokenize`` (batched) gives exactly the ids and labels TRL's own per-row preparation derives from the
    prompt/completion rows: EOS appended unless present, prompt masked, truncation, fully-masked rows dropped;
    with a tokenizer that adds no special tokens and one that prepends BOS."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from loraflow.train import sft

    rows = [{"id": f"r{i}", "prompt": f"### Instruction:\n{q}\n\n### Response:\n", "completion": a}
            for i, (q, a) in enumerate(QA)]
    rows += [
        {"id": "eos", "prompt": "Say it.\n", "completion": "done<|endoftext|>"},  # EOS already there
        {"id": "space", "prompt": "The quick brown", "completion": " fox jumps"},  # tokens merge across the cut
        {"id": "long", "prompt": "Paris is the capital of France. " * 20, "completion": "yes"},  # prompt > max_length
        {"id": "cut", "prompt": "Q: ", "completion": "the quick brown fox jumps over the lazy dog " * 6},
        {"id": "uni", "prompt": "Übersetze: ", "completion": "héllo — 你好"},
    ]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plain = AutoTokenizer.from_pretrained(tiny_llama)
    with_bos = AutoTokenizer.from_pretrained(tiny_llama)
    with_bos._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", plain.eos_token_id)])
    assert with_bos("a")["input_ids"][0] == plain.eos_token_id
    for tok in (plain, with_bos):
        args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, max_length=32, report_to="none",
                         use_cpu=True, dataset_num_proc=None)
        reference = SFTTrainer(model=model, args=args, train_dataset=sft.to_dataset(rows),
                               processing_class=tok).train_dataset
        ours = sft.tokenize(tok, rows, max_length=32)
        assert "long" not in ours["id"] and "long" not in reference["id"]
        assert ours["id"] == reference["id"]
        assert ours["input_ids"] == reference["input_ids"]
        assert ours["labels"] == reference["labels"]
        assert max(len(x) for x in ours["input_ids"]) == 32  # "cut" was truncated
        eos_row = ours["labels"][ours["id"].index("eos")]
        assert eos_row[-1] == tok.eos_token_id and eos_row.count(tok.eos_token_id) == 1  # not doubled
