"""LoRA target resolution: presets found by inspecting each architecture's own modules."""

from __future__ import annotations

import pytest
import torch

from loraflow.core.errors import ConfigError
from loraflow.model.targets import linear_modules, resolve_targets

EXPECTED = {
    "llama": {
        "attention-qv": ["q_proj", "v_proj"],
        "attention": ["k_proj", "o_proj", "q_proj", "v_proj"],
        "mlp": ["down_proj", "gate_proj", "up_proj"],
        "all-linear": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    },
    # GPT-2: q, k, v are one fused Conv1D (c_attn); c_proj is in attention and in the MLP.
    "gpt2": {
        "attention-qv": ["c_attn"],
        "attention": ["attn.c_proj", "c_attn"],
        "mlp": ["c_fc", "mlp.c_proj"],
        "all-linear": ["c_attn", "c_fc", "c_proj"],
    },
    # Falcon: fused query_key_value, output "dense"; FalconLinear subclasses nn.Linear.
    "falcon": {
        "attention-qv": ["query_key_value"],
        "attention": ["dense", "query_key_value"],
        "mlp": ["dense_4h_to_h", "dense_h_to_4h"],
        "all-linear": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    },
}
EXPECTED["qwen2"] = EXPECTED["mistral"] = EXPECTED["llama"]  # GQA: k/v are narrower, the names are Llama's
PRESETS = ("attention-qv", "attention", "mlp", "all-linear")


@pytest.fixture(scope="module")
def models(tiny_models):
    from transformers import AutoModelForCausalLM

    cache: dict[str, torch.nn.Module] = {}

    def get(arch: str) -> torch.nn.Module:
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", sorted(EXPECTED))
@pytest.mark.parametrize("preset", PRESETS)
def test_presets(models, arch, preset):
    assert resolve_targets(models(arch), preset) == EXPECTED[arch][preset]


@pytest.mark.parametrize("arch", sorted(EXPECTED))
@pytest.mark.parametrize("preset", PRESETS)
def test_peft_wraps_exactly_the_preset(models, arch, preset):
    """The returned names are peft-ready: they wrap the preset's layers and nothing else."""
    from peft import LoraConfig, get_peft_model

    from loraflow.model.targets import targets_conv1d

    base = models(arch)
    want = {m.name for m in linear_modules(base) if _in(m, preset)}
    targets = resolve_targets(base, preset)
    import copy

    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM", fan_in_fan_out=targets_conv1d(base, targets)),
    )
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == want
    assert "lm_head" not in " ".join(wrapped)


def _in(m, preset):
    return {
        "all-linear": True,
        "mlp": m.group == "mlp",
        "attention": m.group == "attention",
        "attention-qv": m.group == "attention" and bool(m.roles & {"q", "v"}),
    }[preset]


def test_gpt2_conv1d_is_found_and_flagged(models):
    from loraflow.model.targets import targets_conv1d

    gpt2 = models("gpt2")
    kinds = {m.kind for m in linear_modules(gpt2)}
    assert kinds == {"Conv1D"}
    assert targets_conv1d(gpt2, ["c_attn"])
    assert not targets_conv1d(models("llama"), ["q_proj"])


def test_explicit_list_is_checked_and_kept(models):
    assert resolve_targets(models("llama"), ["v_proj", "q_proj", "down_proj"]) == ["down_proj", "q_proj", "v_proj"]
    assert resolve_targets(models("gpt2"), ["attn.c_proj"]) == ["attn.c_proj"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon"])
def test_explicit_name_that_matches_nothing_lists_the_linear_layers(models, arch):
    with pytest.raises(ConfigError) as e:
        resolve_targets(models(arch), ["query_proj"])
    msg = str(e.value)
    assert "\n" not in msg and "lora.target_modules" in msg and "'query_proj'" in msg
    for m in linear_modules(models(arch)):
        assert m.leaf in msg  # every linear layer name is offered


def test_lm_head_and_non_linear_modules_are_refused(models):
    with pytest.raises(ConfigError, match="LM head"):
        resolve_targets(models("llama"), ["lm_head"])
    with pytest.raises(ConfigError, match="not a linear layer"):
        resolve_targets(models("llama"), ["self_attn"])


def test_unknown_preset(models):
    with pytest.raises(ConfigError, match="unknown preset 'attn'"):
        resolve_targets(models("llama"), "attn")


class Toy(torch.nn.Module):
    """No attention block anywhere: the attention presets match nothing."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 4)}) for _ in range(2)])
        self.lm_head = torch.nn.Linear(4, 10)

    def get_output_embeddings(self):
        return self.lm_head


def test_preset_that_matches_nothing_names_the_layers():
    toy = Toy()
    assert resolve_targets(toy, "mlp") == ["fc"]
    with pytest.raises(ConfigError) as e:
        resolve_targets(toy, "attention-qv")
    assert "matches no layer of Toy" in str(e.value) and "fc" in str(e.value)


def test_same_names_on_a_4bit_model(tiny_models, tmp_path):
    """Linear4bit layers (QLoRA) resolve exactly like the full-precision ones."""
    from loraflow.core.config import Config
    from loraflow.core.paths import Paths
    from loraflow.model.loading import load_model
    from loraflow.model.quant import count_4bit_layers

    cfg = Config.model_validate({"model": {"base": str(tiny_models["llama"])}})
    model = load_model(cfg, Paths.at(tmp_path), quantized=True)
    assert count_4bit_layers(model) > 0
    assert {m.kind for m in linear_modules(model)} == {"Linear4bit"}
    for preset in PRESETS:
        assert resolve_targets(model, preset) == EXPECTED["llama"][preset]


def test_roles_from_names():
    from loraflow.model.targets import _roles

    assert _roles("q_proj") == {"q"} and _roles("v_proj") == {"v"} and _roles("o_proj") == {"o"}
    assert _roles("qkv_proj") == _roles("Wqkv") == _roles("query_key_value") == _roles("c_attn") == {"q", "k", "v"}
    assert _roles("kv_b_proj") == {"k", "v"}
    assert _roles("out_proj") == _roles("dense") == _roles("c_proj") == _roles("wo") == {"o"}
