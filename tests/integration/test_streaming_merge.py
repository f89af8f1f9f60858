"""The streaming merge (loraflow/model/streaming_merge.py) against peft's merge_and_unload, on tiny models.

Every layer type the trainer adapts: Llama's ``nn.Linear`` (no bias) and GPT-2's fused, transposed
``Conv1D`` (with bias, square and not), tied and untied heads, LoRA and QLoRA adapters trained on the
base as ``loading.load_model`` loads it, merged into the dequantized and the original base. The
reference for ``dequantized`` is peft's merge into an fp32 model whose 4-bit weights were replaced by
their dequantized values (``quant.dequantize_into``, docs/traps.md §2).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from loraflow.core.config import Config
from loraflow.core.errors import ConfigError, ModelError
from loraflow.core.paths import Paths
from loraflow.model import loading, quant
from loraflow.model.streaming_merge import INDEX_FILE, merge_checkpoint, output_dtype

pytestmark = pytest.mark.usefixtures("one_thread")

RELATIVE = 1e-6  # merged tensors vs peft merge_and_unload, relative to the largest value (measured: 0, bit-identical)
LOGITS = 1e-4  # merged checkpoint vs unmerged model, absolute (test_merge.py EXACT; measured 2e-7 to 6e-7)
VOCAB = 128


# --------------------------------------------------------------------------------------------- tiny models


def make_base(folder: Path, arch: str, *, tied: bool, dtype: torch.dtype = torch.float32, seed: int = 0,
              layers: int = 2, hidden: int = 64) -> Path:
    """A tiny random causal LM saved as a Hugging Face folder (no tokenizer: the merge needs none).

    Widths are multiples of 64 (bitsandbytes' CPU kernels); GPT-2's MLP is square (n_inner = n_embd), so a
    transposed Conv1D weight has the same shape as the right one and only the layer type tells them apart.
    """
    import transformers as tf

    common = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": tied}
    if arch == "llama":
        config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, **common)
    else:
        config = tf.GPT2Config(n_embd=hidden, n_inner=hidden, n_layer=layers, n_head=4, n_positions=64, **common)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(folder)
    return folder


def cfg_for(base: Path, method: str = "qlora", **quantization) -> tuple[Config, Paths]:
    cfg = Config.model_validate({"model": {"base": str(base)}, "method": method, "quantization": quantization,
                                 "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    return cfg, Paths.at(base.parent / f"project-{base.name}")


def train_adapter(base: Path, out: Path, *, qlora: bool, targets: list[str], bias: str = "none",
                  steps: int = 2, lora_config=None) -> Path:
    """An adapter trained the way the train stage trains: base from ``load_model`` (4-bit for QLoRA),
    ``attach_lora`` (or a given peft ``LoraConfig``), lora_B random so the update is not zero, a few steps."""
    from peft import get_peft_model

    from loraflow.train.lora import attach_lora

    cfg, paths = cfg_for(base)
    cfg.lora.bias = bias
    model = loading.load_model(cfg, paths, quantized=qlora)
    if lora_config is None:
        model = attach_lora(model, cfg, targets, quantized=qlora)
    else:
        model = get_peft_model(model, lora_config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, VOCAB, (2, 12), generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------- references


def dequantize_reference(target, quantized) -> None:
    """The 4-bit model's matrices into the fp32 model: ``quant.dequantize_into`` itself where it can.

    It refuses GPT-2 (Conv1D stores (in, out), Linear4bit (out, in): the old merge path's bug), so there the
    same copy is done here, transposed back by the fp32 model's own layer type."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    if not any(isinstance(m, Conv1D) for m in target.modules()):
        quant.dequantize_into(target, quantized)
        return
    with torch.no_grad():
        done = set()
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
                name = name.replace(".base_layer", "")  # under a peft wrapper
                dest = target.get_submodule(name)
                dest.weight.copy_(w.T if isinstance(dest, Conv1D) else w)
                done.add(f"{name}.weight")
        params = dict(target.named_parameters())
        for name, p in quantized.named_parameters():
            name = name.replace(".base_layer", "")
            if name not in done and name in params:
                params[name].copy_(p.float())


def fp32_base(base: Path, dequantized_from: Config | None = None):
    model = loading.load_model(*cfg_for(base), quantized=False)
    if dequantized_from is not None:  # a fresh 4-bit load: no forward has touched it (docs/traps.md §1)
        dequantize_reference(model, loading.load_model(dequantized_from, cfg_for(base)[1], quantized=True))
    return model


def peft_merged_state(base: Path, adapter: Path, dequantized_from: Config | None = None) -> dict:
    from peft import PeftModel

    model = PeftModel.from_pretrained(fp32_base(base, dequantized_from), str(adapter))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def read_checkpoint(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


PROBE = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))


def assert_matches(got: dict, expected: dict, keys: set[str]) -> float:
    """Every written tensor within RELATIVE of the reference; returns the worst relative difference."""
    assert set(got) == keys  # the checkpoint's own layout: a tied head stays absent
    worst = 0.0
    for k, v in got.items():
        ref = expected[k].float()
        rel = float((v.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        assert rel <= RELATIVE, (k, rel)
        worst = max(worst, rel)
    return worst


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": make_base(root / "llama", "llama", tied=False),
        "llama-tied": make_base(root / "llama-tied", "llama", tied=True, seed=1),
        "gpt2": make_base(root / "gpt2", "gpt2", tied=True, seed=2),
        "gpt2-untied": make_base(root / "gpt2-untied", "gpt2", tied=False, seed=3),
    }


# Every layer type, both head layouts, both methods. GPT-2 adapts the fused c_attn and the square attn.c_proj
# (with its bias trained: lora_only); its square MLP stays a non-target 4-bit layer.
CASES = {
    "llama-lora": ("llama", False, ["q_proj", "v_proj"], "none"),
    "llama-tied-qlora": ("llama-tied", True, ["q_proj", "v_proj", "down_proj"], "none"),
    "gpt2-tied-qlora": ("gpt2", True, ["c_attn", "attn.c_proj"], "lora_only"),
    "gpt2-untied-lora": ("gpt2-untied", False, ["c_attn", "attn.c_proj"], "lora_only"),
    "gpt2-untied-qlora": ("gpt2-untied", True, ["c_attn", "attn.c_proj", "mlp.c_fc"], "all"),
}


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: train_adapter(bases[b], root / name, qlora=q, targets=t, bias=bias)
            for name, (b, q, t, bias) in CASES.items()}


def _merge_case(name, bases, adapters, tmp_path, base_mode):
    base_key, qlora, _, _ = CASES[name]
    base = bases[base_key]
    cfg, _ = cfg_for(base)
    out = tmp_path / "merged"
    stats = merge_checkpoint(base, adapters[name], out, base=base_mode, quant=cfg.quantization if qlora else None,
                             dtype=torch.float32)
    return base, cfg, out, stats


# --------------------------------------------------------------------------------------------- equality with peft


@pytest.mark.parametrize("name,base_mode", [
    ("llama-lora", "original"),
    ("llama-tied-qlora", "dequantized"),
    ("llama-tied-qlora", "original"),
    ("gpt2-tied-qlora", "dequantized"),
    ("gpt2-tied-qlora", "original"),
    ("gpt2-untied-lora", "original"),
    ("gpt2-untied-qlora", "dequantized"),
])
def test_equals_peft_merge_and_computes_the_unmerged_model(name, base_mode, bases, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, cfg, out, stats = _merge_case(name, bases, adapters, tmp_path, base_mode)
    qlora = CASES[name][1]
    dequantized = qlora and base_mode == "dequantized"
    expected = peft_merged_state(base, adapters[name], cfg if dequantized else None)
    got = read_checkpoint(out)
    assert_matches(got, expected, set(read_checkpoint(base)))
    assert stats.tensors_merged == sum(k.endswith("lora_A.weight") for k in read_checkpoint(adapters[name]))
    assert stats.base == base_mode and stats.worst_rel_error <= stats.tolerance
    assert stats.tensors_dequantized > 0 if dequantized else stats.tensors_dequantized == 0
    assert stats.tensors_replaced > 0 if CASES[name][3] != "none" else stats.tensors_replaced == 0

    # The saved checkpoint, loaded by transformers, computes what the unmerged adapter computes: on the 4-bit
    # base (the model as trained) for `dequantized`, on the fp32 base otherwise.
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    unmerged_base = loading.load_model(cfg, cfg_for(base)[1], quantized=True) if dequantized else fp32_base(base)
    unmerged = PeftModel.from_pretrained(unmerged_base, str(adapters[name]))
    diff = float((logits(merged, PROBE) - logits(unmerged, PROBE)).abs().max())
    assert diff < LOGITS
    assert float((logits(merged, PROBE) - logits(fp32_base(base), PROBE)).abs().max()) > 1e-3  # the adapter did something


def test_config_and_generation_config_copied(bases, adapters, tmp_path):
    base, _, out, stats = _merge_case("llama-lora", bases, adapters, tmp_path, "original")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert stats.shards == 1 and stats.bytes_written == sum(p.stat().st_size for p in out.iterdir())


def test_finish_hook_writes_into_the_published_folder(bases, adapters, tmp_path):
    out = tmp_path / "merged"
    merge_checkpoint(bases["llama"], adapters["llama-lora"], out, base="original", quant=None, dtype=torch.float32,
                     finish=lambda folder: (folder / "tokenizer.json").write_text("{}"))
    assert (out / "tokenizer.json").read_text() == "{}"


def test_dora_rslora_and_modules_to_save(bases, tmp_path):
    """DoRA (magnitude vector, peft's formula), rsLoRA's alpha/sqrt(r) and a modules_to_save layer, on the
    4-bit GPT-2 (Conv1D) and the fp32 Llama."""
    from peft import LoraConfig

    for base_key, qlora, targets, save in (("gpt2-untied", True, ["c_attn", "attn.c_proj"], ["ln_f"]),
                                           ("llama", False, ["q_proj", "v_proj", "gate_proj"], ["lm_head"])):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, use_rslora=True,
                          modules_to_save=save)
        adapter = train_adapter(bases[base_key], tmp_path / f"dora-{base_key}", qlora=qlora, targets=targets,
                                lora_config=lora)
        cfg, _ = cfg_for(bases[base_key])
        out = tmp_path / f"merged-{base_key}"
        stats = merge_checkpoint(bases[base_key], adapter, out, base="dequantized",
                                 quant=cfg.quantization if qlora else None, dtype=torch.float32)
        expected = peft_merged_state(bases[base_key], adapter, cfg if qlora else None)
        assert_matches(read_checkpoint(out), expected, set(read_checkpoint(bases[base_key])))
        assert stats.tensors_replaced == (2 if qlora else 1)  # ln_f weight + bias; lm_head weight


def test_hub_gpt2_keys_without_the_model_prefix(bases, adapters, tmp_path):
    """The Hub's GPT-2 files name tensors without ``transformer.``: the same merge, under the file's own names."""
    from safetensors.torch import save_file

    base = tmp_path / "hub-gpt2"
    shutil.copytree(bases["gpt2"], base)
    stored = read_checkpoint(bases["gpt2"])
    save_file({k.removeprefix("transformer."): v for k, v in stored.items()}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    cfg, _ = cfg_for(base)
    for mode in ("dequantized", "original"):
        kw = {"base": mode, "quant": cfg.quantization, "dtype": torch.float32}
        merge_checkpoint(base, adapters["gpt2-tied-qlora"], tmp_path / f"hub-{mode}", **kw)
        merge_checkpoint(bases["gpt2"], adapters["gpt2-tied-qlora"], tmp_path / f"prefixed-{mode}", **kw)
        got, expected = read_checkpoint(tmp_path / f"hub-{mode}"), read_checkpoint(tmp_path / f"prefixed-{mode}")
        assert set(got) == {k.removeprefix("transformer.") for k in expected}
        assert all(torch.equal(got[k.removeprefix("transformer.")], v) for k, v in expected.items())


# --------------------------------------------------------------------------------------------- the NF4 round trip


@pytest.mark.parametrize("arch,quantization,bf16_env,repack", [
    ("llama", {}, "0", False),
    ("gpt2", {}, "0", True),
    ("gpt2", {"quant_type": "fp4", "double_quant": False, "compute_dtype": "bfloat16"}, "0", False),
    ("llama", {"compute_dtype": "auto"}, "1", False),  # auto = bf16 where the CPU has it, as load_model decides
])
def test_nf4_round_trip_is_bit_identical_to_the_loaded_4bit_model(arch, quantization, bf16_env, repack, bases,
                                                                    tmp_path, monkeypatch, request):
    """With a zero update (peft's initial B = 0) the merge writes the base as the adapter trained against it: every
    4-bit weight dequantized (targets and not), every other parameter as the 4-bit load kept it, bit for bit what
    dequantize_into takes out of ``load_model(cfg, paths, quantized=True)``."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv(loading.CPU_BF16_ENV, bf16_env)
    if repack:  # bitsandbytes repacks on an eval forward on AVX512-BF16 CPUs (docs/traps.md §1); force it anywhere
        request.getfixturevalue("cpu_repack_forced")
    base = bases["gpt2-untied" if arch == "gpt2" else "llama"]
    cfg, paths = cfg_for(base, **quantization)
    quantized = loading.load_model(cfg, paths, quantized=True)
    targets = ["c_attn", "attn.c_proj"] if arch == "gpt2" else ["q_proj", "v_proj"]
    get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=targets)).save_pretrained(tmp_path / "zero")
    if repack:  # an eval forward before the reference is taken: load_model turned the repack off
        logits(quantized, PROBE)
    out = tmp_path / "merged"
    stats = merge_checkpoint(base, tmp_path / "zero", out, base="dequantized", quant=cfg.quantization,
                             dtype=torch.float32)
    reference = loading.load_model(cfg, paths, quantized=False)
    dequantize_reference(reference, quantized)
    expected = reference.state_dict()
    got = read_checkpoint(out)
    assert stats.tensors_merged + stats.tensors_dequantized == quant.count_4bit_layers(quantized)
    for key, value in got.items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[key]), key
    if bf16_env == "1" or quantization.get("compute_dtype") == "bfloat16":  # the cast before quantizing mattered
        assert not torch.equal(got["lm_head.weight"], read_checkpoint(base)["lm_head.weight"])


# --------------------------------------------------------------------------------------------- dtype, sharding


def test_bf16_base_gives_bf16_shards_of_half_the_size(tmp_path):
    base = make_base(tmp_path / "bf16", "llama", tied=False, dtype=torch.bfloat16)
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    assert output_dtype(base, "auto") == torch.bfloat16
    adapter = train_adapter(base, tmp_path / "adapter", qlora=False, targets=["q_proj", "v_proj"])
    half = merge_checkpoint(base, adapter, tmp_path / "out-bf16", base="original", quant=None,
                            dtype=output_dtype(base, "auto"))
    full = merge_checkpoint(base, adapter, tmp_path / "out-fp32", base="original", quant=None,
                            dtype=output_dtype(base, "float32"))
    got = read_checkpoint(tmp_path / "out-bf16")
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out-bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "out-fp32" / "config.json").read_text())["dtype"] == "float32"  # not the base's
    size = lambda d: (d / "model.safetensors").stat().st_size
    assert 0.49 < size(tmp_path / "out-bf16") / size(tmp_path / "out-fp32") < 0.51
    # one rounding of the fp32 merge: exactly peft's fp32 merge cast to bf16
    expected = peft_merged_state(base, adapter)
    for key, value in got.items():
        assert torch.equal(value, expected[key].to(torch.bfloat16)), key
    assert half.dtype == "bfloat16" and half.tolerance == 4 * torch.finfo(torch.bfloat16).eps
    assert 0 < half.worst_rel_error <= half.tolerance and full.worst_rel_error < 1e-6


def test_output_dtype_settings(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert output_dtype(folder, "auto") == torch.float16
    assert output_dtype(folder, "bfloat16") == torch.bfloat16
    (folder / "config.json").write_text(json.dumps({}))
    assert output_dtype(folder, "auto") == torch.float32
    with pytest.raises(ConfigError, match="merge.dtype"):
        output_dtype(folder, "int8")


def test_sharded_output_loads_and_sharded_input_reads(bases, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter = bases["llama"], adapters["llama-lora"]
    limit = 40_000  # bytes; the largest tensor here is 32 KiB (the embedding)
    single = merge_checkpoint(base, adapter, tmp_path / "single", base="original", quant=None, dtype=torch.float32)
    sharded = merge_checkpoint(base, adapter, tmp_path / "sharded", base="original", quant=None,
                               dtype=torch.float32, max_shard_size=limit)
    files = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert single.shards == 1 and sharded.shards == len(files) > 3
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    got = read_checkpoint(tmp_path / "sharded")
    assert set(index["weight_map"]) == set(got) and set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in got.values())
    from safetensors.torch import load_file

    for f in files:
        assert sum(v.numel() * v.element_size() for v in load_file(str(f)).values()) <= limit
    expected = read_checkpoint(tmp_path / "single")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", use_safetensors=True)
    assert torch.equal(logits(merged, PROBE),
                       logits(AutoModelForCausalLM.from_pretrained(tmp_path / "single"), PROBE))

    # A sharded base (transformers' own index) merges to the same tensors.
    model = AutoModelForCausalLM.from_pretrained(base)
    model.save_pretrained(tmp_path / "base-sharded", max_shard_size="40KB")
    assert (tmp_path / "base-sharded" / INDEX_FILE).exists()
    merge_checkpoint(tmp_path / "base-sharded", adapter, tmp_path / "from-sharded", base="original", quant=None,
                     dtype=torch.float32)
    again = read_checkpoint(tmp_path / "from-sharded")
    assert set(again) == set(expected) and all(torch.equal(again[k], expected[k]) for k in expected)


# --------------------------------------------------------------------------------------------- bad inputs


def _broken(kind: str, bases, adapters, tmp: Path) -> tuple[Path, Path, str]:
    """(base, adapter, what the message must say) for one kind of bad input."""
    from peft import LoraConfig

    base, adapter = bases["llama"], adapters["llama-lora"]
    if kind == "no-safetensors":
        broken = tmp / "pickle-only"
        broken.mkdir()
        shutil.copy(base / "config.json", broken)
        (broken / "pytorch_model.bin").write_bytes(b"not loaded")
        return broken, adapter, "only pytorch_model.bin"
    if kind in ("missing-shard", "truncated"):
        from transformers import AutoModelForCausalLM

        broken = tmp / kind
        AutoModelForCausalLM.from_pretrained(base).save_pretrained(broken, max_shard_size="100KB")
        shard = sorted(broken.glob("model-*.safetensors"))[1]
        if kind == "missing-shard":
            shard.unlink()
            return broken, adapter, f"lists {shard.name}, missing"
        os.truncate(shard, shard.stat().st_size // 2)
        return broken, adapter, "damaged or incomplete"
    if kind == "shape":
        broken, key = _edit_adapter(adapter, tmp / "adapter-shape", "lora_A.weight",
                                    lambda t: torch.zeros(t.shape[0], 96))
        return base, broken, "was the adapter trained on this base"
    if kind == "tied":
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
        tied = train_adapter(bases["llama-tied"], tmp / "adapter-tied", qlora=False, targets=[], lora_config=lora,
                             steps=0)
        return bases["llama-tied"], tied, "lm_head.weight, a weight tied"
    if kind == "embedding-lora":
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
        emb = train_adapter(base, tmp / "adapter-emb", qlora=False, targets=[], lora_config=lora, steps=0)
        return base, emb, "does not know"
    if kind == "pissa":
        broken = tmp / "adapter-pissa"
        shutil.copytree(adapter, broken)
        config = json.loads((broken / "adapter_config.json").read_text())
        (broken / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": "pissa"}))
        return base, broken, "init_lora_weights=pissa"
    if kind == "nan":
        broken, key = _edit_adapter(adapter, tmp / "adapter-nan", "lora_B.weight",
                                    _one_nan)
        return base, broken, key.removeprefix("base_model.model.").replace("lora_B.", "")
    raise ValueError(kind)


def _one_nan(t):
    t[0, 0] = float("nan")
    return t


def _edit_adapter(adapter, out, suffix: str, edit):
    """A copy of ``adapter`` whose first tensor ending in ``suffix`` is replaced by ``edit(tensor)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith(suffix))
    tensors[key] = edit(tensors[key])
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out, key


@pytest.mark.parametrize("kind", ["no-safetensors", "missing-shard", "truncated", "shape", "tied",
                                  "embedding-lora", "pissa", "nan"])
def test_bad_input_is_one_line_and_leaves_nothing(kind, bases, adapters, tmp_path):
    base, adapter, says = _broken(kind, bases, adapters, tmp_path)
    out = tmp_path / "merged"
    with pytest.raises(ModelError) as err:
        merge_checkpoint(base, adapter, out, base="original", quant=None, dtype=torch.float32)
    message = str(err.value)
    assert says in message and "\n" not in message, message
    assert no_leftovers(out)


def test_failed_merge_keeps_the_previous_output(bases, adapters, tmp_path):
    base, adapter, _ = _broken("nan", bases, adapters, tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "kept").write_text("previous merge")
    with pytest.raises(ModelError):
        merge_checkpoint(base, adapter, out, base="original", quant=None, dtype=torch.float32)
    assert (out / "kept").read_text() == "previous merge"
    assert not list(tmp_path.glob(".merged.tmp-*"))

