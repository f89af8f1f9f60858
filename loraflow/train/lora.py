"""Where rank and alpha are applied: freeze the base, prepare a 4-bit one for training, wrap it with LoRA.

r=16, alpha=32 on the resolved targets: every update ``(alpha/r)·B·A`` is scaled by 2.0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraflow.core.config import Config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def attach_lora(
    model: "PreTrainedModel", cfg: Config, targets: list[str], *, quantized: bool
) -> "torch.nn.Module":
    """Freeze the base, prepare a 4-bit base for training, and wrap it with LoRA on ``targets``.

    r=16, alpha=32 → each update is scaled by alpha/r = 2.0.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    from loraflow.model.loading import peft_quietly
    from loraflow.model.quant import disable_cpu_repack

    with peft_quietly():
        if quantized:
            # Casts norms to fp32, freezes the base, and turns on checkpointing only when asked (docs/traps.md §3).
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
            disable_cpu_repack(model)  # again, in case anything re-created a 4-bit layer (docs/traps.md §1)
        return get_peft_model(model, _lora_config(model, cfg, targets))


def _lora_config(model, cfg: Config, targets: list[str]):
    from peft import LoraConfig

    from loraflow.model.targets import targets_conv1d

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(targets),
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores weights as (in, out): peft must transpose the update.
        fan_in_fan_out=targets_conv1d(model, targets),
    )


def trainable_params(model: "torch.nn.Module") -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts its unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
