"""merge on a tiny Llama: QLoRA (dequantized and original bases), plain LoRA, docs/traps.md §1 and 2.

The shape of peft's own merge tests: adapter ≈ merged, no tuner layers left, output differs from
the base; plus what QLoRA adds: the merged model computes what the 4-bit model + adapter computed.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loraflow.core.errors import LoraflowError, ModelError
from loraflow.model import loading, quant
from tests.integration.test_evaluate import ROWS, make_project, plant_adapter

EXACT = 1e-4  # fp32 merge vs unmerged: ~3e-7 measured here


def _probe_logits(model, tok) -> torch.Tensor:
    enc = tok([r["prompt"] + r["completion"] for r in ROWS], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        logits = model(**enc).logits.float()
    return logits[enc["attention_mask"].bool()]


def _trained_logits(cfg, paths) -> torch.Tensor:
    """What training and evaluate computed: the base as trained + the adapter."""
    from loraflow.model.adapters import load_adapter_tokenizer, load_tuned

    return _probe_logits(load_tuned(cfg, paths), load_adapter_tokenizer(cfg, paths))


def _run_merge(cfg, paths):
    import loraflow.tasks.merge

    logged = {}

    class Recorder:
        run_id = None

        def log_metrics(self, metrics, step=None):
            logged.update(metrics)

    return loraflow.tasks.merge.run(cfg, paths, Recorder()), logged


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, tiny_models):
    """A QLoRA project with a planted adapter and an evaluate report holding the tuned loss."""
    from loraflow.model.adapters import load_adapter_tokenizer, load_tuned
    from loraflow.model.generation import completion_loss

    cfg, paths = make_project(tmp_path_factory.mktemp("qlora"), tiny_models["llama"])
    plant_adapter(cfg, paths)
    tuned_loss, _ = completion_loss(load_tuned(cfg, paths), load_adapter_tokenizer(cfg, paths), ROWS, 4, 64)
    paths.reports.mkdir(parents=True, exist_ok=True)
    paths.report("evaluate").write_text(json.dumps({"tuned": {"loss": tuned_loss}, "base": {}}))
    return cfg, paths, _trained_logits(cfg, paths)


@pytest.fixture(scope="module")
def dequantized(qlora):
    cfg, paths, trained = qlora
    result, logged = _run_merge(cfg, paths)
    return cfg, paths, trained, result, logged


def test_dequantized_merge_report(dequantized):
    _, paths, _, result, logged = dequantized
    report = json.loads(paths.report("merge").read_text())
    keys = {"max_abs_logit_diff", "max_abs_logit_diff_trained", "loss", "loss_delta",
            "latency_ms_merged", "latency_ms_base"}
    assert keys <= report.keys() and report["merge_base"] == "dequantized" == result.merge_base
    assert all(isinstance(report[k], float) for k in keys)
    # (merge itself enforces max_abs_logit_diff <= merge.tolerance; that the numbers are measured, not
    # assumed: test_reported_logit_diff_is_measured. The saved model against the trained one: the next test.)
    assert report["max_abs_logit_diff_trained"] < EXACT  # computes what was trained (docs/traps.md §2); not enforced
    # The merged model's test loss is what the fixture measured on the 4-bit model + adapter, independently.
    tuned_loss = json.loads(paths.report("evaluate").read_text())["tuned"]["loss"]
    assert report["loss"] == pytest.approx(tuned_loss, abs=1e-4)
    assert report["loss_delta"] == pytest.approx(report["loss"] - tuned_loss, abs=1e-12)
    assert report["latency_ms_merged"] > 0 and report["latency_ms_base"] > 0
    assert logged["merge_max_abs_logit_diff"] == report["max_abs_logit_diff"]
    assert logged["merge_loss"] == report["loss"]


def test_dequantized_merge_saved_model(dequantized):
    """Reloaded from disk: plain fp32, no LoRA, no quantization_config, = trained model, != base."""
    from loraflow.tasks.merge import lora_modules
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, paths, trained, _, _ = dequantized
    config = json.loads((paths.merged / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    assert (paths.merged / "model.safetensors").exists() and (paths.merged / "tokenizer.json").exists()
    assert not list(paths.merged.parent.glob(".merged.tmp-*"))
    merged = AutoModelForCausalLM.from_pretrained(paths.merged, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(paths.merged)
    assert not lora_modules(merged) and quant.count_4bit_layers(merged) == 0
    logits = _probe_logits(merged, tok)
    assert (logits - trained).abs().max() < EXACT
    base = loading.load_model(cfg, paths, quantized=False)
    assert (logits - _probe_logits(base, tok)).abs().max() > 1e-2


def test_dequantize_into_matches_transformers_dequantize(qlora):
    """Our per-layer dequantization is bit-identical to transformers' model.dequantize() in fp32."""
    from loraflow.model.quant import dequantize_into

    cfg, paths, _ = qlora
    ours = loading.load_model(cfg, paths, quantized=False)
    n = dequantize_into(ours, loading.load_model(cfg, paths, quantized=True))
    theirs = loading.load_model(cfg, paths, quantized=True).dequantize(dtype=torch.float32)
    assert n == 14  # 2 layers x (q, k, v, o, gate, up, down)
    expected = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, expected[name].float()), name


def test_original_base_differs_by_quantization_error(qlora, dequantized, tmp_path):
    """merge.base=original: exact against the fp32 base, but off the trained model by the NF4 error."""
    cfg, paths, trained, dq_result, _ = dequantized
    cfg_o, paths_o = make_project(tmp_path, cfg.model.base, **{"merge": {"base": "original"}})
    shutil.copytree(paths.adapter, paths_o.adapter)
    result, _ = _run_merge(cfg_o, paths_o)
    assert result.merge_base == "original"
    assert result.max_abs_logit_diff < EXACT
    assert result.max_abs_logit_diff_trained > 1e-3 > 100 * dq_result.max_abs_logit_diff_trained
    assert result.loss_delta is None  # evaluate has not run in this project
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(paths_o.merged, use_safetensors=True)
    tok = loading.load_tokenizer(cfg_o, paths_o)
    assert (_probe_logits(merged, tok) - trained).abs().max() > 1e-3


def test_eval_forward_on_4bit_model_before_merge_is_harmless(qlora, cpu_repack_forced):
    """docs/traps.md §1: an eval-mode, no-grad forward (and generation) on the 4-bit model, then merge.

    ``cpu_repack_forced``: bitsandbytes repacks here on any CPU, as on one with AVX512-BF16."""
    import bitsandbytes as bnb
    from loraflow.tasks.merge import lora_modules

    from loraflow.model.adapters import attach_adapter, load_adapter_tokenizer
    from loraflow.model.generation import greedy_generate
    from loraflow.model.quant import dequantize_into

    cfg, paths, trained = qlora
    tok = load_adapter_tokenizer(cfg, paths)
    quantized = loading.load_model(cfg, paths, quantized=True)
    with_adapter = attach_adapter(quantized, paths)
    before = _probe_logits(with_adapter, tok)  # eval() + no_grad: the repack trigger
    greedy_generate(with_adapter, tok, [ROWS[0]["prompt"]], max_new_tokens=3, batch_size=1)
    assert (before - trained).abs().max() < EXACT
    for m in quantized.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)

    fp32 = loading.load_model(cfg, paths, quantized=False)
    # dequantize from the model that ran the forwards (the LoRA wrappers hold the same Linear4bit)
    assert dequantize_into(fp32, with_adapter.get_base_model()) == 14
    merged = attach_adapter(fp32, paths).merge_and_unload()
    assert not lora_modules(merged)
    assert (_probe_logits(merged, tok) - trained).abs().max() < EXACT


def test_repacked_4bit_weights_are_refused(qlora):
    """docs/traps.md §1: weights that bitsandbytes repacked in place for CPU inference are never merged."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from loraflow.model.quant import dequantize_into

    cfg, paths, _ = qlora
    quantized = loading.load_model(cfg, paths, quantized=True)
    layer = quantized.model.layers[0].self_attn.q_proj
    if F.has_avx512bf16():  # the real trigger: an eval-mode no-grad forward with the repack enabled
        layer.support_avx512bf16_for_cpu = True
        quantized.eval()
        with torch.no_grad():
            layer(torch.randn(1, 3, layer.in_features))
    else:  # this CPU cannot run the packed kernel: apply the same in-place conversion the forward does
        layer.weight.data, _ = F._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    assert isinstance(layer, bnb.nn.Linear4bit)
    with pytest.raises(ModelError, match=r"repacked for CPU inference .*traps\.md §1"):
        dequantize_into(loading.load_model(cfg, paths, quantized=False), quantized)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_models):
    cfg, paths = make_project(tmp_path_factory.mktemp("lora"), tiny_models["llama"], method="lora")
    plant_adapter(cfg, paths, seed=1)
    return cfg, paths


def test_lora_merge(lora):
    """method lora: the adapter trained on the fp32 base; merged there, whatever merge.base says."""
    cfg, paths = lora
    trained = _trained_logits(cfg, paths)
    result, _ = _run_merge(cfg, paths)
    assert result.merge_base == "original"
    assert result.max_abs_logit_diff < EXACT and result.max_abs_logit_diff_trained == result.max_abs_logit_diff
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(paths.merged, use_safetensors=True)
    tok = loading.load_tokenizer(cfg, paths)
    assert (_probe_logits(merged, tok) - trained).abs().max() < EXACT
    assert "quantization_config" not in json.loads((paths.merged / "config.json").read_text())


def _drop_the_update(monkeypatch, checked: bool) -> None:
    """A merge that silently loses the adapter: it writes the base weight instead of W + scale·B·A;
    ``checked``: the per-weight check still runs on what it wrote, else it is bypassed too."""
    from loraflow.model import streaming_merge

    def merge(self, reference, item):
        written = reference.to(item.out_dtype)
        if checked:
            self._check(item.model_key, written, reference, self.adapter.loras[item.model_key[:-7]], None)
        return written

    monkeypatch.setattr(streaming_merge._Merger, "_merge", merge)


def test_merge_that_drops_the_adapter_fails_and_saves_nothing(lora, tmp_path, monkeypatch):
    """A merge that silently loses the adapter is caught twice: by the per-weight check on random vectors
    (any size), and, with that bypassed, by merged vs unmerged logits (where the model fits)."""
    cfg, paths = lora
    cfg_t, paths_t = make_project(tmp_path, cfg.model.base, method="lora")
    shutil.copytree(paths.adapter, paths_t.adapter)
    _drop_the_update(monkeypatch, checked=True)
    with pytest.raises(ModelError, match=r"merge: model\.layers\.0\..*\.weight: the merged weight is .* off what "
                                         r"base \+ adapter compute"):
        _run_merge(cfg_t, paths_t)
    assert not paths_t.merged.exists() and not paths_t.report("merge").exists()
    _drop_the_update(monkeypatch, checked=False)
    with pytest.raises(LoraflowError, match="merge.tolerance"):
        _run_merge(cfg_t, paths_t)
    assert not paths_t.merged.exists() and not paths_t.report("merge").exists()


def test_reported_logit_diff_is_measured(lora, tmp_path, monkeypatch):
    """A known answer for merge's check: a "merge" that drops the adapter, let through by a huge tolerance,
    reports exactly |base - base+adapter|, which the test measures itself on the same probe (the first test rows,
    prompt + completion + EOS): the adapter's whole effect, far above merge.tolerance's default 1e-3."""
    from loraflow.tasks.merge import PROBE_ROWS, _probe_batch

    from loraflow.model.adapters import attach_adapter

    cfg, paths = lora
    cfg_t, paths_t = make_project(tmp_path, cfg.model.base, method="lora", merge={"tolerance": 1e9})
    shutil.copytree(paths.adapter, paths_t.adapter)
    tok = loading.load_tokenizer(cfg_t, paths_t)
    probe = _probe_batch(tok, ROWS[:PROBE_ROWS], cfg_t.data.max_length)
    mask = probe["mask"].bool()

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=probe["input_ids"], attention_mask=probe["mask"]).logits.float()[mask]

    base = logits(loading.load_model(cfg_t, paths_t, quantized=False))
    tuned = logits(attach_adapter(loading.load_model(cfg_t, paths_t, quantized=False), paths_t))
    effect = float((tuned - base).abs().max())
    assert effect > 1e-2

    _drop_the_update(monkeypatch, checked=False)
    result, _ = _run_merge(cfg_t, paths_t)
    assert result.max_abs_logit_diff == pytest.approx(effect, rel=1e-4)
    assert result.max_abs_logit_diff_trained == pytest.approx(effect, rel=1e-4)  # fp32 LoRA: trained = unmerged


def test_merge_without_adapter_says_train_first(tmp_path, tiny_llama):
    import loraflow.tasks.merge

    cfg, paths = make_project(tmp_path, tiny_llama)
    with pytest.raises(ModelError, match="loraflow stage train"):
        loraflow.tasks.merge.run(cfg, paths)


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_a_bf16_merge_is_half_the_size_and_inside_its_dtype_aware_tolerance(method, qlora, lora, tmp_path):
    """merge.dtype=bfloat16: bf16 weights on disk (half of fp32), logits within merge.tolerance plus the
    rounding bf16 weights carry (LOGIT_EPS_FACTOR x eps x max |logit|), both numbers in the report."""
    from loraflow.tasks.merge import LOGIT_EPS_FACTOR

    cfg, paths = (qlora[0], qlora[1]) if method == "qlora" else lora
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        cfg_d, paths_d = make_project(tmp_path / dtype, cfg.model.base, method=method, merge={"dtype": dtype})
        shutil.copytree(paths.adapter, paths_d.adapter)
        result, _ = _run_merge(cfg_d, paths_d)
        report = json.loads(paths_d.report("merge").read_text())
        sizes[dtype] = sum(f.stat().st_size for f in paths_d.merged.glob("*.safetensors"))
        assert report["dtype"] == dtype == json.loads((paths_d.merged / "config.json").read_text())["dtype"]
        assert report["max_abs_logit_diff"] <= report["logit_tolerance"]
    eps_scale = torch.finfo(torch.bfloat16).eps * report["logit_scale"]
    assert report["logit_tolerance"] == pytest.approx(cfg.merge.tolerance + LOGIT_EPS_FACTOR * eps_scale)
    assert report["max_abs_logit_diff"] > cfg.merge.tolerance / 100  # bf16 rounding is there, and measured
    print(f"{method}: bf16 logit diff {report['max_abs_logit_diff']:.3g} = "
          f"{report['max_abs_logit_diff'] / eps_scale:.2f} x eps x max|logit|")
    assert 0.45 < sizes["bfloat16"] / sizes["float32"] < 0.55
