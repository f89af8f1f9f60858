"""Padding-free batches: the same per-token loss as padded ones, no attention across examples, same loss curve.

Real forward and backward passes on a tiny Llama loaded and wrapped by the train stage's own code.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, set_seed
from transformers.masking_utils import AttentionMaskInterface
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from loraflow.core.config import Config
from loraflow.core.errors import ConfigError
from loraflow.model import loading
from loraflow.model.targets import resolve_targets
from loraflow.train import lora, packing, sft
from tests.integration.test_train import project

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# Different lengths on purpose: a cross-example leak shows on every token after the first example.
ROWS = [
    ("### Instruction:\nWhat is the opposite of hot?\n\n### Response:\n", "cold"),
    ("### Instruction:\nIs 37 even or odd?\n\n### Input:\n37\n\n### Response:\n", "odd"),
    ("### Instruction:\nWhat day comes after Monday?\n\n### Response:\n", "Tuesday, the day after Monday"),
    ("### Instruction:\nName a fruit.\n\n### Response:\n", "an apple"),
]


def cfg_for(base, **train) -> Config:
    return Config.model_validate({
        "model": {"base": str(base)},
        "method": "qlora",
        "data": {"max_length": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": 8, "learning_rate": 1e-2, "batch_size": 4, "warmup_ratio": 0.0,
                  "lr_scheduler": "constant", "logging_steps": 1, "save_steps": 1000} | train,
    })


def rows(n=16):
    return [{"id": str(i), "prompt": ROWS[i % 4][0], "completion": ROWS[i % 4][1]} for i in range(n)]


def trainer_for(cfg, paths, train_rows):
    set_seed(0)
    tok = loading.load_tokenizer(cfg, paths)
    model = loading.load_model(cfg, paths, quantized=True)
    model = lora.attach_lora(model, cfg, resolve_targets(model, cfg.lora.target_modules), quantized=True)
    # A trained adapter, not the identity LoRA starts as: the comparison must cover the adapter's path too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return sft.build_trainer(cfg, paths, model, tok, train_rows)


def test_packed_and_padded_batches_give_the_same_per_token_loss_and_gradients(tiny_llama, tmp_path):
    cfg = cfg_for(tiny_llama)
    trainer = trainer_for(cfg, project(tmp_path), rows())
    model = trainer.model
    assert trainer.batching.mode == "padding_free", trainer.batching.reason
    assert packing._transformers_model(model).config._attn_implementation == packing.VARLEN

    examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in trainer.train_dataset.select(range(4))]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) >= 3
    packed = trainer.data_collator(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(examples)
    # The layout: one row, no padding, positions restarting at each example, no attention mask.
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    starts = [sum(lengths[:k]) for k in range(4)]
    assert packed["position_ids"][0, starts].tolist() == [0, 0, 0, 0]
    assert padded["input_ids"].shape == (4, max(lengths))

    def losses_and_grads(batch):
        model.zero_grad()
        per_token = packing.per_token_losses(model, batch)
        per_token.mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return per_token.detach(), grads

    a, grads_a = losses_and_grads(padded)
    b, grads_b = losses_and_grads(packed)
    n_supervised = sum(int((torch.tensor(e["labels"][1:]) != -100).sum()) for e in examples)
    assert a.numel() == b.numel() == n_supervised
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name

    # The same row with attention across examples (an all-ones mask: nothing tells them apart) changes the
    # loss of every example but the first: the equality above is not a coincidence of this model.
    crossed = {"input_ids": packed["input_ids"], "labels": packed["labels"],
               "attention_mask": torch.ones_like(packed["input_ids"])}
    with torch.no_grad():
        c = packing.per_token_losses(model, crossed)
    first = int((torch.tensor(examples[0]["labels"][1:]) != -100).sum())
    assert torch.allclose(c[:first], b[:first], atol=1e-5)
    assert float((c[first:] - b[first:]).abs().max()) > 1e-2


def _leaky(module, query, key, value, attention_mask, **kwargs):
    """Causal attention over the whole packed row, ignoring where examples start: the bug the check must catch."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, is_causal=True)


def test_the_check_catches_attention_that_crosses_examples(tiny_llama, tmp_path):
    cfg = cfg_for(tiny_llama)
    paths = project(tmp_path)
    tok = loading.load_tokenizer(cfg, paths)
    model = loading.load_model(cfg, paths, quantized=True)
    examples = [{"input_ids": ids, "labels": ids} for ids in tok([p + c for p, c in ROWS])["input_ids"]]

    packing.enable(model)
    assert packing.check(model, examples, tok.pad_token_id, 1e-3).ok
    AttentionInterface.register("leaky", _leaky)
    AttentionMaskInterface.register("leaky", packing._varlen_mask)
    model.set_attn_implementation("leaky")
    leak = packing.check(model, examples, tok.pad_token_id, 1e-3)
    assert not leak.ok and leak.max_abs_diff > 1e-2


def test_auto_keeps_length_grouped_batches_for_a_model_without_the_attention_interface(tiny_models, tmp_path):
    cfg = cfg_for(tiny_models["falcon"])
    trainer = trainer_for(cfg, project(tmp_path), rows())
    assert trainer.batching.mode == "group_by_length"
    assert "attention interface" in trainer.batching.reason
    assert trainer.args.train_sampling_strategy == "group_by_length"
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" in batch and batch["input_ids"].shape[0] == 4
    with pytest.raises(ConfigError, match="train.batching: padding_free"):
        trainer_for(cfg_for(tiny_models["falcon"], batching="padding_free"), project(tmp_path / "b"), rows())


def test_padding_free_training_follows_the_padded_loss_curve(tiny_llama, tmp_path):
    """Same seed, same shuffled batches: only the layout differs, so every step's loss must match."""
    curves = {}
    for mode in ("padded", "padding_free"):
        cfg = cfg_for(tiny_llama, batching=mode)
        trainer = trainer_for(cfg, project(tmp_path / mode), rows())
        assert trainer.batching.mode == mode
        trainer.train()
        curves[mode] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(curves["padded"]) == 8
    assert curves["padded"][-1] < curves["padded"][0]
    assert curves["padding_free"] == pytest.approx(curves["padded"], rel=1e-3)
