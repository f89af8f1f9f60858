"""loraflow plan: published model shapes as config.json files, no weights, no network, no GPU.

Exact counts are worked out by hand in each test (r·(in + out) per adapted linear); totals are
the published parameter counts of each model.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from loraflow import planner
from loraflow.core.config import load_config
from loraflow.core.errors import ConfigError, ModelError, TrainingError
from loraflow.core.paths import Paths
from loraflow.planner import estimates as est

LLAMA2_7B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False)
LLAMA_65B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=64, intermediate_size=22016, vocab_size=32000, tie_word_embeddings=False)
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False)
QWEN25_05B = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
GPT2 = dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)
FALCON_7B = dict(model_type="falcon", hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                 vocab_size=65024, multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """No GPU probing, a CPU without native bf16 (as on these machines) and no tracking URI from the
    environment: every test says what it plans for."""
    monkeypatch.setattr(planner, "_cuda", lambda: None)
    monkeypatch.setattr("loraflow.model.loading.cpu_has_native_bf16", lambda: False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "project"


def model_dir(tmp_path: Path, name: str, config: dict) -> Path:
    folder = tmp_path / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def cfg_for(base: Path, *overrides: str):
    return load_config(None, [f"model.base={base}", *overrides])


def write_train_split(root: Path, n: int) -> None:
    split = Paths.at(root).split("train")
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("".join(f'{{"id": "{i}", "prompt": "p", "completion": "c"}}\n' for i in range(n)))


def write_prepare_report(root: Path, p50: int) -> None:
    report = Paths.at(root).report("prepare")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"token_length": {"p50": p50, "p90": 2 * p50, "p99": 3 * p50, "max": 4 * p50}}))


def plan_for(tmp_path, root, config: dict, *overrides: str, gpu: float | None = 80.0, records: int | None = 1000):
    base = model_dir(tmp_path, config["model_type"], config)
    if records is not None:
        write_train_split(root, records)
    return planner.plan(cfg_for(base, *overrides), Paths.at(root), gpu_memory=gpu)


def ids(plan) -> set[str]:
    return {x.id for x in plan.lints}


# ---------------------------------------------------------------------------------------------
# Shapes: published totals and trainable counts


def test_llama2_7b_counts(tmp_path, root):
    p = plan_for(tmp_path, root, LLAMA2_7B, "lora.r=8", "lora.alpha=16", "lora.target_modules=attention-qv")
    assert p.params_total == 6_738_415_616
    assert p.targets == ["q_proj", "v_proj"]
    assert p.adapted_modules == 64
    # 32 layers × (q + v) × r·(in + out) = 32 × 2 × 8·(4096 + 4096)
    assert p.trainable_params == 4_194_304
    assert p.trainable_pct == pytest.approx(0.06220594176090199)  # what peft prints for it


def test_llama2_7b_all_linear(tmp_path, root):
    p = plan_for(tmp_path, root, LLAMA2_7B, "lora.r=16", "lora.target_modules=all-linear")
    assert set(p.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # per layer: 4 × (4096 + 4096) + 2 × (4096 + 11008) + (11008 + 4096) = 78,080
    assert p.trainable_params == 32 * 16 * 78_080 == 39_976_960


def test_mistral_7b_gqa(tmp_path, root):
    p = plan_for(tmp_path, root, MISTRAL_7B, "lora.r=16", "lora.target_modules=attention")
    assert p.params_total == 7_241_732_096
    # k and v project to 8 kv heads × 128 = 1024: q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096
    assert p.trainable_params == 32 * 16 * (8192 + 5120 + 5120 + 8192) == 13_631_488


def test_qwen25_05b_tied_embeddings_counted_once(tmp_path, root):
    p = plan_for(tmp_path, root, QWEN25_05B, "lora.r=8", "lora.target_modules=attention-qv")
    assert p.params_total == 494_032_768  # 151936 × 896 embedding shared with the LM head
    # head_dim 896/14 = 64, v out = 2 × 64 = 128: q 896+896, v 896+128
    assert p.trainable_params == 24 * 8 * (1792 + 1024) == 540_672
    # the tied head is not quantized: P_q is the block linears only
    assert p.params_quantized == p.params_total - 151936 * 896 - (24 * 2 + 1) * 896 - 24 * (896 + 128 + 128)


def test_bias_lora_only_adds_the_adapted_biases(tmp_path, root):
    p = plan_for(tmp_path, root, QWEN25_05B, "lora.r=8", "lora.bias=lora_only")
    assert p.trainable_params == 540_672 + 24 * (896 + 128)  # Qwen2's q and v have biases


def test_gpt2_fused_and_ambiguous_names(tmp_path):
    from transformers import AutoConfig

    folder = model_dir(tmp_path, "gpt2", GPT2)
    shape = planner.model_shape(AutoConfig.from_pretrained(folder))
    assert shape.params_total == 124_439_808
    assert (shape.intermediate, shape.gated_mlp) == (3072, False)
    targets, adapted = planner.resolve_targets(shape, "attention-qv")
    assert targets == ["c_attn"]
    assert est.lora_params(adapted, 8) == 12 * 8 * (768 + 2304) == 294_912
    assert set(planner.resolve_targets(shape, "attention")[0]) == {"c_attn", "attn.c_proj"}
    assert set(planner.resolve_targets(shape, "mlp")[0]) == {"c_fc", "mlp.c_proj"}


def test_falcon_7b_query_key_value(tmp_path):
    from transformers import AutoConfig

    shape = planner.model_shape(AutoConfig.from_pretrained(model_dir(tmp_path, "falcon", FALCON_7B)))
    assert shape.params_total == 6_921_720_704
    targets, adapted = planner.resolve_targets(shape, "attention-qv")
    assert targets == ["query_key_value"]
    # multi-query: q 4544 + one k and one v head of 64 = 4672 out
    assert est.lora_params(adapted, 16) == 32 * 16 * (4544 + 4672) == 4_718_592
    assert set(planner.resolve_targets(shape, "all-linear")[0]) == {
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


def test_explicit_target_list(tmp_path, root):
    p = plan_for(tmp_path, root, LLAMA2_7B, "lora.r=8", "lora.target_modules=[q_proj]")
    assert p.targets == ["q_proj"]
    assert p.trainable_params == 32 * 8 * 8192
    with pytest.raises(ConfigError, match="'query'.*q_proj"):
        plan_for(tmp_path, root, LLAMA2_7B, "lora.target_modules=[query]")


# ---------------------------------------------------------------------------------------------
# Memory formulas


def test_activations_reduce_to_korthikanti_for_a_4h_mlp(tmp_path):
    from transformers import AutoConfig

    shape = planner.model_shape(AutoConfig.from_pretrained(model_dir(tmp_path, "gpt2", GPT2)))
    s, b, h, a, L, V = 512, 4, 768, 12, 12, 50257
    per_layer = s * b * h * (34 + 5 * a * s / h)
    # no (s·b × V) logits: TRL's fused LM head keeps one tile of 2,048 tokens × 32,768 of the 50,257 rows
    tile = 2 * s * b * 32768
    assert V > 32768 and s * b <= 4096
    eager = dict(scores=True)
    assert est.activation_bytes(shape, s, b, False, **eager) == pytest.approx(L * per_layer + tile)
    assert est.activation_bytes(shape, s, b, True, **eager) == pytest.approx(2 * s * b * h * L + per_layer + tile)
    # SDPA (what transformers builds for GPT-2 by default) keeps no s×s scores: 34·s·b·h per layer
    assert shape.attention == "sdpa"
    assert est.activation_bytes(shape, s, b, False) == pytest.approx(L * 34 * s * b * h + tile)
    # fp32 (the CPU): every stored element twice as wide, the tile too
    assert est.activation_bytes(shape, s, b, False, weight_bytes=4) == pytest.approx(L * 68 * s * b * h + 2 * tile)
    assert est.activation_bytes(shape, s, b, False, weight_bytes=4, scores=True) == pytest.approx(
        L * (68 * s * b * h + 9 * a * s * s * b) + 2 * tile)
    # bf16 on a CPU: the tile and its fp32 copy (TRL folds it in torch there, not in a Triton kernel)
    assert est.activation_bytes(shape, s, b, False, device_kind="cpu") == pytest.approx(L * 34 * s * b * h + 3 * tile)


def test_frozen_base_keeps_fewer_activations(tmp_path):
    """LoRA/QLoRA: frozen linears and norms keep no inputs for weight gradients: 6·h + 3·i per layer, not 9·h + 4·i."""
    from transformers import AutoConfig

    shape = planner.model_shape(AutoConfig.from_pretrained(model_dir(tmp_path, "llama", LLAMA2_7B)))
    s, b, h, i, L, V = 512, 2, 4096, 11008, 32, 32000
    logits = 2 * s * b * V  # TRL's fused LM head: one bf16 tile of every token by the whole (< 32,768) vocabulary
    assert est.activation_bytes(shape, s, b, False) == pytest.approx(L * 2 * s * b * (9 * h + 4 * i) + logits)
    assert est.activation_bytes(shape, s, b, False, frozen=True) == pytest.approx(L * 2 * s * b * (6 * h + 3 * i) + logits)
    _, qv = planner.resolve_targets(shape, "attention-qv")
    with_adapters = est.activation_bytes(shape, s, b, False, qv, 16, dropout=True, frozen=True)
    # per adapted linear: its dropped-out 16-bit input + the 1-byte mask, and the rank-16 intermediate
    assert with_adapters - est.activation_bytes(shape, s, b, False, frozen=True) == pytest.approx(
        2 * L * s * b * (3 * h + 2 * 16))


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward in one training forward (parameters excluded), by storage."""
    import torch

    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("batch,seq", [(4, 64), (2, 256)])
def test_activation_formula_matches_what_autograd_keeps(batch, seq):
    """A real (random-init, fp32, SDPA) Llama: the formula within 15% of the saved tensors, full and frozen + LoRA.

    Measured here: full 0.89 of the saved bytes at both lengths (no s² term under SDPA), LoRA 0.97.
    """
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    config = tf.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False)
    shape = planner.model_shape(config)
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (batch, seq))
    model = tf.LlamaForCausalLM(config).train()
    full = _saved_bytes(model, ids)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = _saved_bytes(get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                         target_modules=["q_proj", "v_proj"])).train(), ids)
    _, qv = planner.resolve_targets(shape, "attention-qv")
    assert est.activation_bytes(shape, seq, batch, False, weight_bytes=4) / full == pytest.approx(1.0, abs=0.15)
    assert est.activation_bytes(shape, seq, batch, False, qv, 8, dropout=True, weight_bytes=4, frozen=True) / lora \
        == pytest.approx(1.0, abs=0.15)


def test_full_peak_holds_the_larger_of_gradients_and_activations(tmp_path, root):
    p = plan_for(tmp_path, root, LLAMA2_7B, "train.batch_size=1", "data.max_length=512")
    full, P = p.memory["full"], p.params_total
    assert full.freed == min(2 * P, full.activations)
    assert full.workspace == 4 * 32000 * 4096  # TRL's fused LM head accumulates the head's gradient in fp32
    assert full.total == pytest.approx(2 * P + 8 * P + max(2 * P, full.activations) + full.workspace)
    accum = plan_for(tmp_path, root, LLAMA2_7B, "train.batch_size=1", "data.max_length=512", "train.grad_accum=4")
    assert accum.memory["full"].freed == 0  # accumulated gradients outlive each micro-batch
    assert accum.memory["full"].total == pytest.approx(12 * P + full.activations + full.workspace)
    assert p.memory["lora"].freed == 0 and p.memory["qlora"].freed == 0


def test_cpu_plans_fp32_weights_and_activations(tmp_path, root):
    """On a CPU the train stage computes in fp32 (compute_dtype auto): 4-byte weights, 16 bytes/param full."""
    gpu = plan_for(tmp_path, root, QWEN25_05B, gpu=24)
    cpu = plan_for(tmp_path, root, QWEN25_05B, gpu=None)
    P = cpu.params_total
    assert cpu.memory["lora"].weights == 4 * P and gpu.memory["lora"].weights == 2 * P
    assert cpu.memory["full"].weights + cpu.memory["full"].trainable_state == 16 * P
    assert cpu.memory["qlora"].weights == gpu.memory["qlora"].weights  # NF4 + fp32 rest either way
    h, widest = 896, 896 * 4864  # Qwen2.5-0.5B's hidden size and its largest linear (the MLP's)
    assert cpu.memory["qlora"].workspace == 4 * widest  # one linear dequantized to fp32
    # bf16 on a GPU: the fused LM head's 32,768-row slice of the fp32 head cast to bf16 outweighs that linear
    assert gpu.memory["qlora"].workspace == 2 * 32768 * h > 2 * widest
    assert cpu.memory["full"].activations == pytest.approx(2 * gpu.memory["full"].activations)  # tile included
    bf16 = plan_for(tmp_path, root, QWEN25_05B, "quantization.compute_dtype=bfloat16", gpu=None)
    assert bf16.memory["lora"].weights == 2 * P  # an explicit dtype is taken as given
    assert est.compute_bytes("auto", True) == 2 and est.compute_bytes("float32", True) == 4
    # A CPU QLoRA load reads every linear it quantizes through the checkpoint's mapping (at the checkpoint's
    # dtype) and drops it once loaded (docs/traps.md §5): that counts toward the load's peak, with the NF4 made
    # from it (Qwen2.5-0.5B's head is its embedding, a view never read). LoRA's mapping is its base (in the
    # total); nothing on a GPU
    Pq = cpu.params_quantized
    assert cpu.method == "qlora" and gpu.mapped_bytes == 0 and cpu.mapped_bytes == 4 * Pq  # no dtype: fp32
    load = est.CPU_RUNTIME_BYTES + 4 * Pq + est.NF4_BITS[True] / 8 * Pq
    assert cpu.qlora_load_peak == pytest.approx(load) and cpu.to_dict()["load_peak_gib"] == round(load / 2**30, 3)
    half = plan_for(tmp_path, root, QWEN25_05B | {"torch_dtype": "bfloat16"}, gpu=None)
    assert half.mapped_bytes == 2 * Pq and half.to_dict()["mapped_checkpoint_gib"] == round(2 * Pq / 2**30, 3)
    assert plan_for(tmp_path, root, QWEN25_05B, "method=lora", gpu=None).mapped_bytes == 0


def test_cpu_with_native_bf16_plans_what_the_train_stage_picks_there(tmp_path, root, monkeypatch):
    """compute_dtype auto is bf16 on a CPU with AVX512-BF16 or AMX (modeling.compute_dtype): 2-byte weights."""
    monkeypatch.setattr("loraflow.model.loading.cpu_has_native_bf16", lambda: True)
    bf16 = plan_for(tmp_path, root, QWEN25_05B, gpu=None)
    P = bf16.params_total
    assert bf16.device.kind == "cpu" and bf16.device.bf16
    assert bf16.memory["lora"].weights == 2 * P
    assert "bf16 where the device has it natively" in bf16.assumptions[0]
    fp32 = plan_for(tmp_path, root, QWEN25_05B, "quantization.compute_dtype=float32", gpu=None)
    assert fp32.memory["lora"].weights == 4 * P  # an explicit dtype is taken as given


def test_cpu_totals_add_the_measured_allocator_retention_and_runtime(tmp_path, root):
    """A CPU plan adds glibc's retention (k·activations per method) and the runtime; a GPU plan neither."""
    cpu = plan_for(tmp_path, root, QWEN25_05B, gpu=None)
    gpu = plan_for(tmp_path, root, QWEN25_05B, gpu=24)
    for m in ("full", "lora", "qlora"):
        c, g = cpu.memory[m], gpu.memory[m]
        assert g.allocator == 0 and g.runtime == 0
        assert c.allocator == pytest.approx(est.CPU_ALLOCATOR_RETENTION[m] * c.activations) and c.allocator > 0
        assert c.runtime == est.CPU_RUNTIME_BYTES > 0
        live = c.weights + c.trainable_state + c.activations + c.workspace - c.freed
        assert c.total == pytest.approx(live + c.allocator + c.runtime)
        assert cpu.to_dict()["breakdown_gib"][m]["allocator"] == round(c.allocator / 2**30, 3)
    # full fine-tuning keeps the least (its gradients refill the holes backward leaves), QLoRA the most
    k = est.CPU_ALLOCATOR_RETENTION
    assert k["full"] < k["lora"] < k["qlora"]


def test_weight_formulas(tmp_path, root):
    p = plan_for(tmp_path, root, LLAMA2_7B, "lora.r=8")
    P, Pq = p.params_total, p.params_quantized
    assert Pq == P - 2 * 32000 * 4096 - (2 * 32 + 1) * 4096  # all but embeddings, head and norms
    assert est.NF4_BITS[True] == pytest.approx(4.127, abs=5e-4)
    assert p.memory["full"].weights + p.memory["full"].trainable_state == 12 * P
    assert p.memory["lora"].weights == 2 * P
    assert p.memory["lora"].trainable_state == 16 * p.trainable_params
    assert p.memory["qlora"].weights == pytest.approx(est.NF4_BITS[True] / 8 * Pq + 4 * (P - Pq))
    assert p.memory["qlora"].total < p.memory["lora"].total < p.memory["full"].total


def test_llama_65b_as_the_qlora_paper_reports(tmp_path, root):
    p = plan_for(tmp_path, root, LLAMA_65B, "train.batch_size=1", "data.max_length=512",
                 "train.gradient_checkpointing=true", "lora.r=16", "method=auto", gpu=48)
    assert p.params_total == 65_285_660_672
    assert p.estimates_gib["qlora"] < 48
    assert p.estimates_gib["full"] > 500  # 12 bytes × 65.3B = 783 GB: the paper's ">780 GB"
    assert p.method == "qlora"


def test_checkpointing_and_batch_lower_activations(tmp_path, root):
    a = plan_for(tmp_path, root, LLAMA2_7B, "train.batch_size=8")
    b = plan_for(tmp_path, root, LLAMA2_7B, "train.batch_size=8", "train.gradient_checkpointing=true")
    c = plan_for(tmp_path, root, LLAMA2_7B, "train.batch_size=1")
    assert b.memory["lora"].activations < a.memory["lora"].activations / 5
    assert c.memory["lora"].activations < a.memory["lora"].activations / 7


# ---------------------------------------------------------------------------------------------
# Method choice


def test_auto_picks_lora_when_16bit_fits_else_qlora(tmp_path, root):
    assert plan_for(tmp_path, root, LLAMA2_7B, "method=auto", gpu=80).method == "lora"
    p = plan_for(tmp_path, root, LLAMA2_7B, "method=auto", gpu=24)
    assert p.method == "qlora"
    assert "16-bit LoRA needs" in p.method_reason


def test_auto_too_big_names_what_would_fit(tmp_path, root):
    with pytest.raises(TrainingError, match=r"does not fit.*it would fit with -s train.gradient_checkpointing=true"):
        plan_for(tmp_path, root, LLAMA2_7B, "method=auto", "train.batch_size=16", "data.max_length=2048", gpu=16)
    with pytest.raises(TrainingError, match=r"does not fit.*use a device with at least \d+ GiB"):
        plan_for(tmp_path, root, LLAMA_65B, "method=auto", gpu=16)


def test_explicit_method_is_reported_and_linted(tmp_path, root):
    p = plan_for(tmp_path, root, LLAMA2_7B, "method=lora", gpu=12)
    assert p.method == "lora"
    lint = next(x for x in p.lints if x.id == "does-not-fit")
    assert "-s method=qlora" in lint.message
    assert "does-not-fit" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "method=lora", gpu=80))


def test_unreadable_base_and_bad_gpu_memory(tmp_path, root):
    # A hub id is read with AutoConfig like a folder; offline and uncached it is a one-line ModelError.
    with pytest.raises(ModelError, match="cannot read config.json of no-such-org/no-such-model"):
        planner.plan(load_config(None, ["model.base=no-such-org/no-such-model"]), Paths.at(root), gpu_memory=8)
    with pytest.raises(ConfigError, match="--gpu-memory"):
        plan_for(tmp_path, root, QWEN25_05B, gpu=0)


def test_cpu_when_no_gpu(tmp_path, root):
    p = plan_for(tmp_path, root, QWEN25_05B, gpu=None)
    assert p.device.kind == "cpu" and p.device.memory_gib > 0
    assert "qlora-time-cost" not in ids(p)  # only when a GPU size is known


def test_detected_gpu_sets_speed(tmp_path, root, monkeypatch):
    monkeypatch.setattr(planner, "_cuda", lambda: ("NVIDIA H200", 139.8))
    p = plan_for(tmp_path, root, LLAMA2_7B, gpu=None)
    assert (p.device.name, p.device.memory_gib, p.device.peak_tflops) == ("NVIDIA H200", 139.8, 989.0)


# ---------------------------------------------------------------------------------------------
# Time


def test_time_estimate(tmp_path, root):
    write_prepare_report(root, 100)
    p = plan_for(tmp_path, root, LLAMA2_7B, "lora.r=8", "train.epochs=2", "train.batch_size=8", records=800)
    assert p.data.tokens_per_record == 100
    assert (p.steps, p.train_tokens) == (200, 800 * 2 * 100)
    n = p.params_matmul
    assert n == p.params_quantized + 32000 * 4096
    speed = 312e12 * 0.40  # unknown GPU: A100-class peak at 40% MFU
    assert p.seconds["lora"] == pytest.approx(160_000 * (4 * n + 6 * p.trainable_params) / speed)
    assert p.seconds["full"] == pytest.approx(160_000 * 6 * n / speed)
    assert p.seconds["qlora"] == pytest.approx(1.39 * p.seconds["lora"])


def test_data_size_sources(tmp_path, root):
    raw = root / "data" / "raw" / "d.jsonl"
    raw.parent.mkdir(parents=True)
    raw.write_text('{"text": "a"}\n' * 100 + "\n")
    p = plan_for(tmp_path, root, QWEN25_05B, "data.path=data/raw/d.jsonl", "train.max_steps=7", records=None)
    assert p.data.train_records == 80  # 100 × (1 − 0.1 − 0.1)
    assert "not prepared" in p.data.records_source
    assert p.data.tokens_per_record == 128 and "max_length/2" in p.data.tokens_source
    assert (p.steps, p.train_tokens) == (7, 7 * 8 * 128)
    write_prepare_report(root, 900)  # longer than max_length: training truncates
    assert planner.dataset.data_size(load_config(None, ["data.max_length=512"]), Paths.at(root)).tokens_per_record == 512
    csv = root / "data" / "raw" / "d.csv"
    csv.write_text('prompt,completion\n"a\nb",c\nd,e\n')
    size = planner.dataset.data_size(load_config(None, ["data.path=data/raw/d.csv"]), Paths.at(root))
    assert size.train_records == round(2 * 0.8)


# ---------------------------------------------------------------------------------------------
# Lints, each on both sides of its threshold


def test_rank_too_low(tmp_path, root):
    assert "rank-too-low" in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=8", records=60_000))
    assert "rank-too-low" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=16", records=60_000))
    assert "rank-too-low" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=8", records=1000))
    assert "rank-too-low" in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=8", "lora.target_modules=all-linear"))
    write_prepare_report(root, 400)  # 30,000 × 400 = 12M tokens
    assert "rank-too-low" in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=8", "data.max_length=512",
                                          records=30_000))


def test_rank_too_high(tmp_path, root):
    assert "rank-too-high" in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=64", "lora.alpha=128", records=500))
    assert "rank-too-high" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=64", "lora.alpha=128", records=5000))
    assert "rank-too-high" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=32", "lora.alpha=64", records=500))


def test_too_many_targets(tmp_path, root):
    assert "too-many-targets" in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.target_modules=all-linear", records=500))
    assert "too-many-targets" in ids(plan_for(
        tmp_path, root, LLAMA2_7B, "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj]", records=500))
    assert "too-many-targets" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.target_modules=attention",
                                                  records=500))
    assert "too-many-targets" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.target_modules=all-linear",
                                                  records=5000))


def test_qlora_time_cost(tmp_path, root):
    p = plan_for(tmp_path, root, LLAMA2_7B, "method=qlora", gpu=80)
    lint = next(x for x in p.lints if x.id == "qlora-time-cost")
    assert lint.level == "warning" and "method: lora" in lint.message
    assert "qlora-time-cost" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "method=qlora", gpu=24))
    assert "qlora-time-cost" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "method=lora", gpu=80))
    assert "qlora-time-cost" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "method=qlora", gpu=None))


def test_alpha_convention(tmp_path, root):
    assert "alpha-convention" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=16", "lora.alpha=4"))
    assert "alpha-convention" not in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=16", "lora.alpha=32"))
    lint = next(x for x in plan_for(tmp_path, root, LLAMA2_7B, "lora.r=16", "lora.alpha=64").lints
                if x.id == "alpha-convention")
    assert lint.level == "info"
    assert "alpha-convention" in ids(plan_for(tmp_path, root, LLAMA2_7B, "lora.r=16", "lora.alpha=2"))


def test_alpha_ratio_changed_reads_the_last_tracked_run(tmp_path, root):
    paths = Paths.at(root)
    base = model_dir(tmp_path, "llama", LLAMA2_7B)
    write_train_split(root, 1000)
    # No store: silent, and nothing created.
    p = planner.plan(cfg_for(base, "lora.r=32", "lora.alpha=32"), paths, gpu_memory=80)
    assert "alpha-ratio-changed" not in ids(p)
    assert not paths.mlflow_dir.exists()

    from loraflow.track import tracking

    run = tracking.start_run(paths, "loraflow-demo", "train")
    run.log_params({"lora_r": 16, "lora_alpha": 32})
    tracking.finish(run, ok=True)
    assert planner.last_tracked_lora(cfg_for(base), paths) == (16, 32.0)

    def lint_ids(*overrides):
        return ids(planner.plan(cfg_for(base, *overrides), paths, gpu_memory=80))

    assert "alpha-ratio-changed" in lint_ids("lora.r=32", "lora.alpha=32")  # scale 2 → 1
    assert "alpha-ratio-changed" not in lint_ids("lora.r=32", "lora.alpha=64")  # scale kept
    assert "alpha-ratio-changed" not in lint_ids("lora.r=16", "lora.alpha=8")  # rank kept: a deliberate alpha
    assert "alpha-ratio-changed" not in lint_ids("lora.r=32", "register.model_name=other")
    p = planner.plan(cfg_for(base, "lora.r=32", "lora.alpha=32"), paths, gpu_memory=80, with_lints=False)
    later = planner.lints(cfg_for(base, "lora.r=32", "lora.alpha=32"), paths, p, current_run_id=run.run_id)
    assert "alpha-ratio-changed" not in {x.id for x in later}  # the run being started is not "the last run"


def test_lint_ids_are_stable():
    assert planner.LINT_IDS == ("rank-too-low", "rank-too-high", "alpha-ratio-changed", "too-many-targets",
                                "qlora-time-cost", "alpha-convention", "does-not-fit", "merged-artifact-large")


# ---------------------------------------------------------------------------------------------
# The command


def write_params(root: Path, base: Path, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    params = root / "params.yaml"
    params.write_text(f"model:\n  base: {base}\nmethod: auto\n{extra}")
    return params


def test_cli_json_parses(tmp_path, root, capsys):
    from loraflow.cli import main

    params = write_params(root, model_dir(tmp_path, "llama", LLAMA2_7B))
    write_train_split(root, 1000)
    assert main(["plan", "-c", str(params), "--json", "--gpu-memory", "80", "-s", "lora.r=8", "-s", "lora.alpha=16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "lora"
    assert set(out["estimates_gib"]) == {"full", "lora", "qlora"}
    assert out["trainable_params"] == 4_194_304
    assert out["time"]["steps"] == 125 and out["time"]["seconds"]["qlora"] > out["time"]["seconds"]["lora"]
    # the only advice: a merged 7B (fp32 here: no dtype in config.json) registered whole with every version
    assert [x["id"] for x in out["lints"]] == ["merged-artifact-large"] and out["data"]["train_records"] == 1000


def test_cli_table_and_strict(tmp_path, root, capsys):
    from loraflow.cli import main

    params = write_params(root, model_dir(tmp_path, "llama", LLAMA2_7B), "lora:\n  r: 64\n  alpha: 128\n")
    write_train_split(root, 500)
    assert main(["plan", "-c", str(params), "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "[rank-too-high]" in out and "qlora" in out
    assert main(["plan", "-c", str(params), "--gpu-memory", "80", "--strict"]) == 3
    err = capsys.readouterr().err
    assert "loraflow: warning [rank-too-high]:" in err


TINY_LLAMA = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=128, vocab_size=512, tie_word_embeddings=False)


def strict_project(tmp_path: Path, root: Path, r: int) -> Path:
    """A raw 40-record dataset and a config.json-only base (no weights: --strict must stop before loading)."""
    base = model_dir(tmp_path, "llama", TINY_LLAMA)
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.jsonl").write_text("".join(
        json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(40)))
    return write_params(root, base, f"data:\n  path: data.jsonl\nlora:\n  r: {r}\n  alpha: {2 * r}\n")


def test_run_strict_exits_3_before_anything_runs(tmp_path, root):
    """`loraflow run --strict` with rank-too-high (r=64 on ~32 train records): exit 3, one line naming it, no outputs."""
    import os
    import subprocess

    params = strict_project(tmp_path, root, r=64)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", "-c", str(params), "--strict"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("loraflow: --strict: run stopped before training by 1 warning(s): rank-too-high ")
    assert "loraflow: warning [rank-too-high]: r=64 on 32 train records" in proc.stderr
    assert "Traceback" not in proc.stderr
    # nothing was prepared, trained or tracked: no data/prepared, outputs/, reports/, mlflow/
    assert sorted(p.name for p in root.iterdir()) == ["data.jsonl", "params.yaml"]


def test_stage_train_strict(tmp_path, root, capsys, monkeypatch):
    from loraflow.cli import main

    params = strict_project(tmp_path, root, r=64)
    assert main(["stage", "train", "-c", str(params), "--strict"]) == 3
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "loraflow: --strict: stage train stopped before training by 1 warning(s): rank-too-high")
    assert not (root / "outputs").exists() and not (root / "mlflow").exists()
    assert main(["stage", "prepare", "-c", str(params), "--strict"]) == 1  # strict is about training
    assert "applies to `stage train` and `run`" in capsys.readouterr().err

    # no warnings: strict lets it through (the check itself; the run that follows is the pipeline's tests')
    ok = strict_project(tmp_path, root, r=16)
    from loraflow.core.config import load_config

    assert planner.strict_check(load_config(str(ok), []), Paths.at(root)) == 0
    assert capsys.readouterr().err == ""


def test_cli_too_big_is_one_line(tmp_path, root, capsys):
    from loraflow.cli import main

    params = write_params(root, model_dir(tmp_path, "llama", LLAMA_65B))
    assert main(["plan", "-c", str(params), "--gpu-memory", "24"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraflow: error: plan: llama") and "\n" not in err and "Traceback" not in err


def test_embedded_base_is_never_built(tmp_path, root, monkeypatch):
    from transformers import LlamaConfig

    paths = Paths.at(root)
    # basemodel's published constants (ARCH, VOCAB_SIZE) stand for the config it would build
    import loraflow.model.embedded as bm

    p = planner.plan(load_config(None), paths, gpu_memory=8)
    assert p.model_type == "llama" and p.params_total > 0 and "not built yet" in p.base
    hidden, layers = bm.ARCH["hidden_size"], bm.ARCH["num_hidden_layers"]
    assert p.trainable_params == layers * 16 * 2 * (hidden + hidden)  # r=16 on q and v (kv heads = heads)
    assert not (root / "models").exists()
    # a base_config() function wins; with neither, a one-line error
    fake = types.ModuleType("loraflow.model.embedded")
    fake.base_config = lambda: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, vocab_size=512)
    monkeypatch.setitem(sys.modules, "loraflow.model.embedded", fake)
    p = planner.plan(load_config(None), paths, gpu_memory=8)
    assert p.trainable_params == 2 * 16 * (128 + 128)
    monkeypatch.setitem(sys.modules, "loraflow.model.embedded", types.ModuleType("loraflow.model.embedded"))
    with pytest.raises(ModelError, match="build-base"):
        planner.plan(load_config(None), paths, gpu_memory=8)
    assert not (root / "models").exists()


TINY = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128),
    "falcon": dict(model_type="falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=128, multi_query=True, new_decoder_architecture=False),
}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("preset", ["attention-qv", "attention", "mlp", "all-linear"])
def test_counts_agree_with_peft(tmp_path, arch, preset):
    """The resolved suffixes, given to peft, train exactly the parameters the planner counted."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir(tmp_path, arch, TINY[arch]))
    shape = planner.model_shape(config)
    targets, adapted = planner.resolve_targets(shape, preset)
    torch.manual_seed(0)
    spec = "all-linear" if preset == "all-linear" else targets  # peft's own rule must agree with ours
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, target_modules=spec, fan_in_fan_out=arch == "gpt2"))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == est.lora_params(adapted, 4)
    assert total == shape.params_total + trainable
