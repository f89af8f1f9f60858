"""Answer-only loss: in what the trainer really trains on, exactly the answer + EOS is supervised."""

from __future__ import annotations

import pytest

from loraflow.core.config import Config
from loraflow.core.errors import TrainingError
from loraflow.core.paths import Paths
from loraflow.train.sft import IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    ("What is the opposite of hot?", "cold"),
    ("What day comes after Monday?", "Tuesday"),
    ("Is 37 even or odd?", "odd"),
    ("Name the capital of France, please, in one word.", "Paris is the capital"),
]


def rows(prompts=ROWS):
    return [
        {"id": f"r{i}", "prompt": f"### Instruction:\n{q}\n\n### Response:\n", "completion": a}
        for i, (q, a) in enumerate(prompts)
    ]


def make_trainer(base, root, train_rows, max_length=64, batching="group_by_length"):
    from loraflow.model import loading
    from loraflow.model.targets import resolve_targets
    from loraflow.train import lora, sft

    cfg = Config.model_validate(
        {"model": {"base": str(base)}, "method": "lora", "data": {"max_length": max_length},
         "train": {"batch_size": 4, "max_steps": 1, "batching": batching}}
    )
    paths = Paths.at(root)
    tok = loading.load_tokenizer(cfg, paths)
    model = loading.load_model(cfg, paths, quantized=False)
    model = lora.attach_lora(model, cfg, resolve_targets(model, "attention-qv"), quantized=False)
    return sft.build_trainer(cfg, paths, model, tok, train_rows), tok


@pytest.fixture(scope="module")
def no_pad_llama(tmp_path_factory):
    from tests.tiny import make_model

    return make_model(tmp_path_factory.mktemp("nopad"), "llama", with_pad=False)


@pytest.mark.parametrize("which", ["with_pad", "without_pad"])
def test_collated_batch_supervises_exactly_answer_and_eos(tiny_models, no_pad_llama, tmp_path, which):
    base = tiny_models["llama"] if which == "with_pad" else no_pad_llama
    data = rows()
    trainer, tok = make_trainer(base, tmp_path, data)
    if which == "without_pad":
        assert tok.pad_token_id == tok.eos_token_id  # ensure_pad_token reused EOS
    batch = next(iter(trainer.get_train_dataloader()))  # the real sampler + collator
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape[0] == len(data) and labels.shape == ids.shape
    assert ids.shape[1] > min(int(m.sum()) for m in batch["attention_mask"])  # lengths differ: there is padding
    answers = {r["completion"] + tok.eos_token for r in data}
    seen = set()
    for row_ids, row_labels, mask in zip(ids, labels, batch["attention_mask"]):
        supervised = row_ids[row_labels != IGNORE].tolist()
        text = tok.decode(supervised)
        assert text in answers, text
        seen.add(text)
        # one EOS trained on, at the end of the answer; padding (EOS-valued when pad == eos) is not trained on
        assert supervised.count(tok.eos_token_id) == 1 and supervised[-1] == tok.eos_token_id
        assert (row_labels[mask == 0] == IGNORE).all()
        # everything before the answer is prompt, and masked
        first = int((row_labels != IGNORE).nonzero()[0])
        assert tok.decode(row_ids[:first].tolist()).endswith("### Response:\n")
    assert seen == answers


def test_padding_free_batch_supervises_exactly_answer_and_eos_per_example(tiny_models, tmp_path):
    """The default layout: examples end to end in one row; each segment masks its prompt, trains its answer and EOS."""
    data = rows()
    trainer, tok = make_trainer(tiny_models["llama"], tmp_path, data, batching="auto")
    assert trainer.batching.mode == "padding_free"
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    assert batch["input_ids"].shape[0] == 1 and labels.shape == ids.shape
    starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
    assert len(starts) - 1 == len(data)  # one segment per example, no padding token at all
    answers = {r["completion"] + tok.eos_token for r in data}
    seen = set()
    for a, b in zip(starts[:-1], starts[1:]):
        seg_ids, seg_labels = ids[a:b], labels[a:b]
        supervised = seg_ids[seg_labels != IGNORE].tolist()
        seen.add(tok.decode(supervised))
        assert supervised.count(tok.eos_token_id) == 1 and supervised[-1] == tok.eos_token_id
        first = int((seg_labels != IGNORE).nonzero()[0])
        assert tok.decode(seg_ids[:first].tolist()).endswith("### Response:\n")
    assert seen == answers


def test_audit_renders_the_sample_and_counts(tiny_models, tmp_path):
    from loraflow.train.label_audit import audit_labels

    data = rows()
    trainer, tok = make_trainer(tiny_models["llama"], tmp_path, data)
    audit = audit_labels(trainer, tok, data, max_length=64)
    sample = audit.text.split("----\n", 1)[1]
    assert sample == data[0]["prompt"] + "[[" + data[0]["completion"] + tok.eos_token + "]]\n"
    assert audit.examples == 4 and audit.truncated == 0 and 0 < audit.supervised_tokens < audit.total_tokens


def test_audit_fails_when_a_prompt_fills_max_length(tiny_models, tmp_path):
    from loraflow.train.label_audit import audit_labels

    data = rows() + rows([("word " * 60, "yes")])[:1]
    data[-1]["id"] = "long"
    trainer, tok = make_trainer(tiny_models["llama"], tmp_path, data, max_length=48)
    with pytest.raises(TrainingError, match=r"no answer token within data.max_length=48 \(e.g. id long\)"):
        audit_labels(trainer, tok, data, max_length=48)


def test_audit_counts_truncated_answers_without_failing(tiny_models, tmp_path):
    from loraflow.train.label_audit import audit_labels

    data = rows([("Say it.", "a rather long answer " * 8)])
    trainer, tok = make_trainer(tiny_models["llama"], tmp_path, data, max_length=20)
    audit = audit_labels(trainer, tok, data, max_length=20)
    assert audit.truncated == 1


@pytest.mark.parametrize("fault", ["prompt_supervised", "no_eos"])
def test_audit_catches_masking_faults(tiny_models, tmp_path, fault):
    from loraflow.train.label_audit import audit_labels

    data = rows()
    trainer, tok = make_trainer(tiny_models["llama"], tmp_path, data)

    def plant(example):
        labels = list(example["labels"])
        if fault == "prompt_supervised":
            labels = list(example["input_ids"])
        else:
            labels[-1] = IGNORE
        return {"labels": labels}

    trainer.train_dataset = trainer.train_dataset.map(plant)
    match = "supervises prompt tokens" if fault == "prompt_supervised" else "does not end with a supervised EOS"
    with pytest.raises(TrainingError, match=match):
        audit_labels(trainer, tok, data, max_length=64)
