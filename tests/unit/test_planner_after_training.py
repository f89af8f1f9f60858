"""loraflow plan's after_training: evaluate, merge and register costs per method, from config.json shapes.

Sizes are checked against real models and adapters built here (parameter counts from real modules, a real
peft adapter folder), not against the planner's own formulas; the memory model's per-tensor arithmetic is
checked against the byte counts worked out by hand in loraflow/planner/after_training.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow import planner
from loraflow.core.config import load_config
from loraflow.core.paths import Paths
from loraflow.planner import after_training as at
from loraflow.planner.checks import MERGED_ARTIFACT_MAX_BYTES

GIB = 2**30
# Llama-2-7B, TinyLlama-1.1B and Qwen2.5-0.5B as published (config.json's shape keys).
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000, "tie_word_embeddings": False}
TINYLLAMA = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000, "tie_word_embeddings": False}
QWEN25_05B = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True}
SMALL = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "intermediate_size": 256, "vocab_size": 512, "tie_word_embeddings": False}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """No GPU probing, a CPU without native bf16, no tracking URI, a fixed amount of free RAM."""
    monkeypatch.setattr(planner, "_cuda", lambda: None)
    monkeypatch.setattr("loraflow.model.loading.cpu_has_native_bf16", lambda: False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(at, "available_ram", lambda: 16 * GIB)


def base_dir(tmp_path: Path, name: str, config: dict) -> Path:
    folder = tmp_path / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def plan_for(tmp_path: Path, config: dict, *overrides: str, name: str = "m", gpu: float | None = None):
    base = base_dir(tmp_path, name, config)
    return planner.plan(load_config(None, [f"model.base={base}", *overrides]), Paths.at(tmp_path / "project"),
                        gpu_memory=gpu, with_lints=False)


def real_params(config: dict) -> int:
    """Parameters of the real (randomly initialised) model: tied weights once, as safetensors stores them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(c)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Sizes


def test_merged_size_of_the_embedded_fp32_base_is_its_parameters_times_4(tmp_path):
    from transformers import LlamaForCausalLM

    from loraflow.model.embedded import base_config

    real = sum(p.numel() for p in LlamaForCausalLM(base_config()).parameters())  # 844k, tied head once
    p = planner.plan(load_config(None, []), Paths.at(tmp_path), with_lints=False)  # models/base not built here
    assert p.after_training["lora"].merged_bytes == real * 4
    assert p.after_training["qlora"].merged_bytes == real * 4  # the same model, merged into full precision


def test_a_bf16_base_merges_to_half_unless_merge_dtype_says_otherwise(tmp_path):
    real = real_params(SMALL)
    bf16 = plan_for(tmp_path, SMALL | {"torch_dtype": "bfloat16"})
    assert bf16.after_training["lora"].merged_bytes == real * 2
    fp32 = plan_for(tmp_path, SMALL | {"torch_dtype": "bfloat16"}, "merge.dtype=float32")
    assert fp32.after_training["lora"].merged_bytes == real * 4
    unsaid = plan_for(tmp_path, SMALL)  # no dtype in config.json: fp32, as merge's output_dtype decides
    assert unsaid.after_training["qlora"].merged_bytes == real * 4
    # register.log: merged ships that folder (+ configs, tokenizer, MLflow's files: kilobytes)
    reg = bf16.after_training["lora"].registered_bytes
    assert real * 2 < reg < real * 2 + 64_000


def test_registered_adapter_is_about_a_real_saved_adapter(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SMALL))
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out, safe_serialization=True)
    (out / "loraflow_train.json").write_text(json.dumps({"method": "lora", "target_modules": ["q_proj", "v_proj"]}))
    real = sum(f.stat().st_size for f in out.iterdir()) + at.MLFLOW_MODEL_FILES_BYTES
    p = plan_for(tmp_path, SMALL, "register.log=adapter", "lora.r=16", "lora.alpha=32",
                 "lora.target_modules=attention-qv")
    assert p.trainable_params == 2 * 2 * 16 * (128 + 128)
    for method in ("lora", "qlora"):
        assert p.after_training[method].registered_bytes == pytest.approx(real, rel=0.15)
    # and far below the merged model it stands for
    assert p.after_training["lora"].registered_bytes < p.after_training["lora"].merged_bytes / 10


# ---------------------------------------------------------------------------------------------
# Merge memory


def test_merge_peak_does_not_grow_with_layers_while_the_merged_size_does(tmp_path):
    wide = dict(LLAMA2_7B, torch_dtype="bfloat16")
    one = plan_for(tmp_path, dict(wide, num_hidden_layers=1), "merge.logit_check='off'", name="one")
    four = plan_for(tmp_path, dict(wide, num_hidden_layers=4), "merge.logit_check='off'", name="four")
    adapter_growth = 4 * (four.trainable_params - one.trainable_params)  # fp32 A and B of 3 more layers: 3 MiB
    for method in ("lora", "qlora"):
        # the streaming part is the same; only the adapter, read whole, grows with the layers
        assert four.after_training[method].merge_peak - one.after_training[method].merge_peak == adapter_growth
        assert adapter_growth < 0.01 * one.after_training[method].merge_peak
        layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # q, k, v, o, three MLP weights, two norms
        grown = four.after_training[method].merged_bytes - one.after_training[method].merged_bytes
        assert grown == 3 * layer * 2  # three more bf16 layers
        assert four.after_training[method].merge_seconds > one.after_training[method].merge_seconds


def test_merge_peak_at_7b_widths_is_the_per_tensor_arithmetic(tmp_path):
    """bf16 base, q/v adapters. LoRA's peak is a 4096² target while its merge is checked: 2 bytes an element
    stored + 4 fp32 reference + 4 merged + 2 written, + one 64 MiB block of rows in fp64 (just above the
    131M-element embedding read through the mapping, 2 bytes each). QLoRA's is an MLP weight (4096 x 11008)
    through bitsandbytes' CPU NF4 quantize: 2 stored + 4 fp32 copy + 10 inside quantize = 16 bytes each."""
    p = plan_for(tmp_path, dict(LLAMA2_7B, torch_dtype="bfloat16"), "merge.logit_check='off'",
                 "lora.r=16", "lora.target_modules=attention-qv", "quantization.compute_dtype=bfloat16")
    runtime = at.CPU_RUNTIME_BYTES + at.MERGE_PROCESS_BYTES + 4 * p.trainable_params
    assert p.after_training["lora"].merge_peak == runtime + 12 * 4096 * 4096 + 64 * 2**20
    assert 12 * 4096 * 4096 + 64 * 2**20 > 2 * 32000 * 4096
    assert p.after_training["qlora"].merge_peak == runtime + 16 * 4096 * 11008
    # a 7B-shaped merge stays far below the model: under 1 GiB above the stage's imports
    assert p.after_training["qlora"].merge_peak < 1 * GIB < p.after_training["qlora"].merged_bytes


def test_tensor_peak_byte_counts():
    mlp, small = 4096 * 11008, 1_000_000
    bf16 = at.Dtypes(stored=2, output=2, compute=2, loaded_4bit=2)
    fp32 = at.Dtypes(stored=4, output=4, compute=4, loaded_4bit=4)
    # stored 2 + fp32 reference 4 + B·A 4 + its scaled copy 4
    assert at.tensor_peak(mlp, "merge", bf16, False) == 14 * mlp
    # a small weight peaks in its check: stored, reference, merged, written (12) + all its rows in fp64 (8)
    assert at.tensor_peak(small, "merge", bf16, False) == 20 * small
    assert at.tensor_peak(mlp, "merge", fp32, False) == 12 * mlp  # the fp32 file is its own reference
    assert at.tensor_peak(mlp, "copy", bf16, False) == 2 * mlp  # bf16 to bf16: the mapped pages only
    assert at.tensor_peak(mlp, "copy", at.Dtypes(2, 4, 2, 2), False) == 6 * mlp  # merge.dtype float32: + the copy
    assert at.tensor_peak(mlp, "dequantize", bf16, True) == 16 * mlp
    assert at.tensor_peak(mlp, "merge", bf16, True) == 16 * mlp  # the NF4 round trip first, then as LoRA (14)
    # a 4-bit load in fp32 (compute float32) round-trips each copied bf16 tensor through fp32: 2 + 4 + 2
    assert at.tensor_peak(mlp, "copy", at.Dtypes(2, 2, 4, 4), True) == 8 * mlp


def test_the_logit_check_loads_the_model_when_it_runs(tmp_path):
    config = dict(LLAMA2_7B, num_hidden_layers=2, torch_dtype="bfloat16")
    off = plan_for(tmp_path, config, "merge.logit_check='off'", name="a")
    on = plan_for(tmp_path, config, "merge.logit_check='on'", name="b")
    assert not off.merge_logit_check and on.merge_logit_check
    for method in ("lora", "qlora"):
        fp32 = 4 * on.params_total
        assert on.after_training[method].merge_peak > fp32 > off.after_training[method].merge_peak
        assert on.after_training[method].merge_seconds > off.after_training[method].merge_seconds
    # auto: when the fp32 model fits three times in half the free RAM (16 GiB here: 2.6 GiB x 3 does)
    auto = plan_for(tmp_path, config, name="c")
    assert auto.merge_logit_check and auto.after_training["lora"].merge_peak == on.after_training["lora"].merge_peak
    big = plan_for(tmp_path, dict(LLAMA2_7B, torch_dtype="bfloat16"), name="d")  # 25 GiB in fp32: no
    assert not big.merge_logit_check


# ---------------------------------------------------------------------------------------------
# Evaluate memory


def test_evaluate_peak_on_a_gpu_is_the_model_as_trained(tmp_path):
    p = plan_for(tmp_path, dict(LLAMA2_7B, torch_dtype="bfloat16"), "eval.batch_size=8", "data.max_length=512",
                 gpu=80.0)
    lora, qlora = p.after_training["lora"], p.after_training["qlora"]
    assert 12.5 * GIB < lora.evaluate_peak < 16 * GIB  # 6.74B in bf16 = 12.55 GiB + adapter + one batch
    assert 3.5 * GIB < qlora.evaluate_peak < 6 * GIB  # NF4 linears + bf16 embeddings and head
    # host RAM for merge and register, whatever the GPU
    assert lora.merge_peak < 1 * GIB and lora.register_peak < 0.1 * GIB


def test_evaluate_on_a_cpu_counts_the_head_copied_per_prompt(tmp_path):
    """Generation's prefill broadcasts the LM head over the batch (b·h·V·w): on a CPU it dominates a loss
    batch of short sequences, and goes with eval.batch_size."""
    config = dict(LLAMA2_7B, num_hidden_layers=1, torch_dtype="bfloat16")
    small = plan_for(tmp_path, config, "eval.batch_size=4", "quantization.compute_dtype=bfloat16", name="a")
    big = plan_for(tmp_path, config, "eval.batch_size=8", "quantization.compute_dtype=bfloat16", name="b")
    none = plan_for(tmp_path, config, "eval.batch_size=8", "eval.metrics=[loss]",
                    "quantization.compute_dtype=bfloat16", name="c")
    head = 4096 * 32000 * 2
    assert big.after_training["lora"].evaluate_peak - small.after_training["lora"].evaluate_peak == 4 * head
    assert none.after_training["lora"].evaluate_peak < small.after_training["lora"].evaluate_peak


# ---------------------------------------------------------------------------------------------
# The lint, the JSON, the report


def test_merged_artifact_lint_sits_on_either_side_of_its_threshold(tmp_path):
    def lint(config, *overrides, name):
        p = plan_for(tmp_path, config, *overrides, name=name)
        found = planner.lints(load_config(None, [f"model.base={tmp_path / 'models' / name}", *overrides]),
                              Paths.at(tmp_path / "project"), p)
        return p.after_training[p.method].merged_bytes, {x.id: x for x in found}

    above, found = lint(dict(TINYLLAMA, torch_dtype="bfloat16"), name="tiny")  # 1.10B x 2 bytes = 2.05 GiB
    assert above > MERGED_ARTIFACT_MAX_BYTES and found["merged-artifact-large"].level == "info"
    assert "register.log: adapter" in found["merged-artifact-large"].message
    below, found = lint(dict(QWEN25_05B, torch_dtype="float32"), name="qwen")  # 0.49B x 4 bytes = 1.84 GiB
    assert below <= MERGED_ARTIFACT_MAX_BYTES and "merged-artifact-large" not in found
    _, found = lint(dict(TINYLLAMA, torch_dtype="bfloat16"), "register.log=adapter", name="tiny2")
    assert "merged-artifact-large" not in found  # already the adapter
    assert planner.LINT_IDS[-1] == "merged-artifact-large"


def test_json_and_report(tmp_path):
    from rich.console import Console

    from loraflow.planner.render import render

    cfg = load_config(None, [f"model.base={base_dir(tmp_path, 'm', SMALL)}"])
    p = planner.plan(cfg, Paths.at(tmp_path / "project"), with_lints=False)
    after = p.to_dict()["after_training"]
    assert set(after) == {"lora", "qlora"}
    assert set(after["lora"]) == {"evaluate_peak_gib", "merge_peak_gib", "merged_gib", "registered_gib",
                                  "merge_seconds", "register_peak_gib"}
    assert after["lora"]["merged_gib"] == round(p.after_training["lora"].merged_bytes / GIB, 3)
    console = Console(record=True, width=160)
    render(p, cfg, console)
    text = console.export_text()
    assert "after training" in text and "merge peak" in text and "register.log: merged" in text
