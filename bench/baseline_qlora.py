"""The plain QLoRA script a user would write instead of loraflow: the baseline of bench/train_throughput.py.

It is the snippet most tutorials show, kept deliberately ordinary: a Hugging Face ``Trainer`` with
peft QLoRA (NF4, double quantization, ``bnb_4bit_compute_dtype=torch.bfloat16``), loss on the answer
only (prompt labels -100), dynamic padding with ``DataCollatorForSeq2Seq``, shuffled batches.
Nothing here is tuned; that is the point of a baseline.
"""

from __future__ import annotations

import time
from typing import Any


def train(model_dir: str, rows: list[dict[str, str]], knobs: dict[str, Any], out_dir: str) -> dict[str, float]:
    """Train one epoch on ``rows`` (``prompt``/``completion``); return seconds spent in ``trainer.train``."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.manual_seed(knobs["seed"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, knobs.get("compute_dtype", "bfloat16")),
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(
        model,
        LoraConfig(r=knobs["r"], lora_alpha=knobs["alpha"], lora_dropout=0.0,
                   target_modules=knobs["targets"], task_type="CAUSAL_LM"),
    )

    def encode(row: dict[str, str]) -> dict[str, list[int]]:
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (prompt + answer)[: knobs["max_length"]]
        labels = ([-100] * len(prompt) + answer)[: knobs["max_length"]]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    dataset = [encode(r) for r in rows]
    supervised = sum(sum(1 for x in d["labels"] if x != -100) for d in dataset)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    computed = [0]

    def collate(features):  # counts what the model computes, padding included; the batches are unchanged
        batch = collator(features)
        computed[0] += int(batch["input_ids"].numel())
        return batch

    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=knobs["batch_size"],
        num_train_epochs=1,
        learning_rate=knobs["learning_rate"],
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=knobs["seed"],
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[clock],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": clock.seconds, "supervised_tokens": supervised, "steps": trainer.state.global_step,
            "final_loss": losses[-1] if losses else float("nan"),
            "tokens": sum(len(d["input_ids"]) for d in dataset), "computed_tokens": computed[0]}
