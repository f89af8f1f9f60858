"""Faults inside training: a diverging loss, running out of memory, and the silent failures
(no supervised token, no EOS, an unmasked prompt, gradient checkpointing that trains nothing)."""

from __future__ import annotations

import re

import loraflow.tasks.train
import pytest
import torch
from transformers import TrainerCallback

from loraflow.core.config import load_config
from loraflow.core.errors import LoraflowError, TrainingError
from loraflow.core.paths import Paths
from tests.reliability.conftest import write_params, write_prepared


def project(root, base, **sections):
    write_prepared(root)
    return load_config(write_params(root, base, **sections)), Paths.at(root)


def adapter_bytes(paths: Paths) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(paths.adapter.iterdir())}


@pytest.mark.slow
def test_an_absurd_learning_rate_stops_at_the_step_and_keeps_the_published_adapter(tiny_llama, tmp_path):
    cfg, paths = project(tmp_path, tiny_llama, train={"max_steps": 2})
    loraflow.tasks.train.run(cfg, paths)
    before = adapter_bytes(paths)

    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1e30, "max_steps": 8})})
    with pytest.raises(TrainingError) as e:
        loraflow.tasks.train.run(bad, paths)
    msg = str(e.value)
    assert re.match(r"train: (loss is (nan|inf|-inf)|adapter weights became non-finite) at step \d+", msg), msg
    assert "lower train.learning_rate (now 1e+30)" in msg and "\n" not in msg
    assert adapter_bytes(paths) == before  # the diverged adapter never replaced the published one
    assert not list(paths.outputs.glob(".adapter.tmp-*"))
    for ckpt in paths.checkpoints.glob("checkpoint-*"):  # nothing non-finite was checkpointed
        from safetensors.torch import load_file

        assert all(t.isfinite().all() for t in load_file(ckpt / "adapter_model.safetensors").values())


class Allocate(TrainerCallback):
    """At ``step``, asks for memory that cannot exist: a real failed allocation, not a raised exception."""

    def __init__(self, step: int, how: str):
        self.step, self.how = step, how

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if self.how == "python":
                bytearray(1 << 60)  # MemoryError
            else:
                torch.empty(1 << 50, dtype=torch.uint8)  # the CPU allocator's RuntimeError (CUDA: OutOfMemoryError)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["python", "torch"])
def test_out_of_memory_is_one_line_with_the_planners_advice(tiny_llama, tmp_path, how):
    cfg, paths = project(tmp_path, tiny_llama, method="lora", train={"max_steps": 4, "batch_size": 8})
    with pytest.raises(TrainingError) as e:
        loraflow.tasks.train.run(cfg, paths, callbacks=[Allocate(2, how)])
    msg = str(e.value)
    assert isinstance(e.value, LoraflowError) and "\n" not in msg  # the CLI prints it as one line, exit 1
    assert msg.startswith("train: out of memory at step 3 ("), msg
    assert ("MemoryError" if how == "python" else "can't allocate memory") in msg
    # the advice, least change first: half the batch (same effective batch), checkpointing, QLoRA
    assert "try -s train.batch_size=4 -s train.grad_accum=2 (same effective batch)" in msg
    assert "-s train.gradient_checkpointing=true" in msg and "-s method=qlora" in msg
    assert "the planner estimates ~" in msg and "GiB for lora at batch 8" in msg
    assert not paths.adapter.exists() and not paths.report("train").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_with_gradient_checkpointing_the_first_optimizer_step_changes_the_lora_weights(tiny_llama, tmp_path, method):
    """Checkpointing with a frozen base can cut the graph (no input grads): training then learns nothing, silently."""

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            self.model = model

        def on_step_end(self, args, state, control, model=None, **kwargs):
            now = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            self.after = getattr(self, "after", {}) | {state.global_step: now}
            self.checkpointing = getattr(self.model, "is_gradient_checkpointing", None)

    watch = Watch()
    cfg, paths = project(tmp_path, tiny_llama, method=method,
                         train={"max_steps": 2, "gradient_checkpointing": True})
    loraflow.tasks.train.run(cfg, paths, callbacks=[watch])
    assert watch.checkpointing is True  # it really was on
    lora_a = sorted(n for n in watch.before if "lora_A" in n)
    lora_b = sorted(n for n in watch.before if "lora_B" in n)
    assert len(lora_a) == len(lora_b) == 14  # every linear of both layers
    # B starts at zero, so the first step moves every B (A's gradient is B-weighted: zero on step 1) ...
    changed = [n for n in lora_b if not torch.equal(watch.before[n], watch.after[1][n])]
    assert changed == lora_b, f"unchanged after step 1: {sorted(set(lora_b) - set(changed))[:4]}"
    # ... and the second step moves every A
    changed = [n for n in lora_a if not torch.equal(watch.after[1][n], watch.after[2][n])]
    assert changed == lora_a, f"unchanged after step 2: {sorted(set(lora_a) - set(changed))[:4]}"


# --- the pre-flight label audit ------------------------------------------------------------------


def _trainer(cfg, paths, rows):
    from loraflow.model import loading
    from loraflow.model.targets import resolve_targets
    from loraflow.train import lora, sft

    tok = loading.load_tokenizer(cfg, paths)
    model = loading.load_model(cfg, paths, quantized=False)
    model = lora.attach_lora(model, cfg, resolve_targets(model, "attention-qv"), quantized=False)
    return sft.build_trainer(cfg, paths, model, tok, rows), tok


def test_every_training_example_has_a_masked_prompt_an_answer_and_eos(tiny_llama, tmp_path):
    from loraflow.data.splits import load_split
    from loraflow.train import label_audit, sft

    cfg, paths = project(tmp_path, tiny_llama, method="lora")
    rows = load_split(paths, "train")
    trainer, tok = _trainer(cfg, paths, rows)
    audit = label_audit.audit_labels(trainer, tok, rows, cfg.data.max_length)
    assert audit.examples == len(rows) and audit.truncated == 0
    by_id = {r["id"]: r for r in rows}
    for i, ids, labels in zip(trainer.train_dataset["id"], trainer.train_dataset["input_ids"],
                              trainer.train_dataset["labels"]):
        n_prompt = len(tok(by_id[i]["prompt"])["input_ids"])
        assert all(lab == sft.IGNORE for lab in labels[:n_prompt])  # prompt masked
        assert sum(lab != sft.IGNORE for lab in labels) >= 2  # the answer and EOS
        assert labels[-1] == ids[-1] == tok.eos_token_id  # EOS supervised


@pytest.mark.parametrize("fault", ["unmasked_prompt", "no_eos", "nothing_supervised"])
def test_the_audit_refuses_a_dataset_that_would_train_silently_wrong(tiny_llama, tmp_path, fault):
    """Corrupt what the trainer would train on, for real, and the audit stops before step 1."""
    from loraflow.data.splits import load_split
    from loraflow.train import label_audit, sft

    cfg, paths = project(tmp_path, tiny_llama, method="lora")
    rows = load_split(paths, "train")
    trainer, tok = _trainer(cfg, paths, rows)

    def corrupt(example, k):
        labels = list(example["labels"])
        ids = list(example["input_ids"])
        if k == 3:
            if fault == "unmasked_prompt":
                labels = ids[:]  # the prompt is trained on too
            elif fault == "no_eos":
                ids, labels = ids[:-1], labels[:-1]
                for key in ("attention_mask", "completion_mask"):
                    if key in example:
                        example[key] = example[key][:-1]
            else:
                labels = [sft.IGNORE] * len(labels)
        example["labels"], example["input_ids"] = labels, ids
        return example

    trainer.train_dataset = trainer.train_dataset.map(corrupt, with_indices=True)
    want = {"unmasked_prompt": r"example train3 supervises prompt tokens",
            "no_eos": r"example train3 does not end with a supervised EOS",
            "nothing_supervised": r"example train3 has no supervised token"}[fault]
    with pytest.raises(TrainingError, match=want):
        label_audit.audit_labels(trainer, tok, rows, cfg.data.max_length)


@pytest.mark.slow
def test_a_prompt_past_max_length_stops_training_before_it_starts(tiny_llama, tmp_path):
    """Prepared data edited by hand (or an older prepare): the audit catches an example with no answer token."""
    import json

    cfg, paths = project(tmp_path, tiny_llama, method="lora")
    with open(paths.split("train"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "long", "prompt": "hot cold " * 60, "completion": "x"}) + "\n")
    with pytest.raises(TrainingError, match=r"1 of 25 training examples have no answer token within "
                                            r"data.max_length=64 \(e.g. id long\)"):
        loraflow.tasks.train.run(cfg, paths)
    assert not paths.adapter.exists() and not list(paths.checkpoints.glob("checkpoint-*"))


@pytest.mark.slow
def test_out_of_memory_through_the_cli_is_one_line_and_exit_1(tiny_llama, tmp_path, monkeypatch):
    """`loraflow stage train` with a real failed allocation at step 2: one error line, exit 1, no traceback."""
    from tests.reliability.conftest import cli_in_process, error_line

    write_prepared(tmp_path)
    write_params(tmp_path, tiny_llama, train={"max_steps": 4})
    run = loraflow.tasks.train.run
    monkeypatch.setattr(loraflow.tasks.train, "run", lambda cfg, paths, tracker, callbacks=None:
                        run(cfg, paths, tracker, callbacks=[Allocate(2, "torch")]))
    with cli_in_process(tmp_path) as cli:
        rc, err = cli("stage", "train", "-s", f"register.model_name=oom-{tmp_path.name}")
    assert rc == 1
    msg = error_line(err)
    assert msg.startswith("loraflow: error: train: out of memory at step 3 (RuntimeError:"), msg
    assert "-s method=qlora" not in msg  # already QLoRA: not advised again
    assert "-s train.gradient_checkpointing=true" in msg
    assert not Paths.at(tmp_path).adapter.exists()
