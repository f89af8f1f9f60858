"""The pooled CPU 4-bit matmul (loraflow/cpu_nf4.py) computes exactly what bitsandbytes' own path does."""

from __future__ import annotations

import pytest
import torch

from loraflow import cpu_nf4, modeling, training
from loraflow.config import Config
from loraflow.paths import Paths
from loraflow.targets import resolve_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def _qlora(base, tmp_path, compute_dtype: str = "float32", double_quant: bool = True):
    """The tiny Llama loaded as the train stage loads it for QLoRA, LoRA on every linear, B non-zero."""
    cfg = Config.model_validate({
        "model": {"base": str(base)}, "method": "qlora", "lora": {"dropout": 0.0},
        "quantization": {"double_quant": double_quant, "compute_dtype": compute_dtype},
    })
    model = modeling.load_model(cfg, Paths.at(tmp_path), quantized=True)
    model = training.attach_lora(model, cfg, resolve_targets(model, "all-linear"), quantized=True)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave every A gradient zero
            p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05
    return model


def _layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _step(model, ids):
    """Logits, the input's gradient and every LoRA gradient of one training forward and backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), emb.grad, grads


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_pooled_forward_and_backward_equal_bitsandbytes_bit_for_bit(tiny_llama, tmp_path, compute_dtype):
    model = _qlora(tiny_llama, tmp_path, compute_dtype)
    layers = _layers(model)
    assert len(layers) == 14 and all(cpu_nf4.is_installed(m) for m in layers)  # LoRA wraps them, keeps them
    assert all(m.weight.quant_state.nested for m in layers)  # double quant: the nested absmax path
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))

    pooled = _step(model, ids)
    with torch.no_grad():
        pooled_eval = model.eval()(input_ids=ids).logits
    for m in layers:  # bitsandbytes' own Linear4bit.forward again
        del m.forward
    assert not any(cpu_nf4.is_installed(m) for m in layers)
    own = _step(model, ids)
    with torch.no_grad():
        own_eval = model.eval()(input_ids=ids).logits

    assert torch.equal(pooled[0], own[0]) and torch.equal(pooled_eval, own_eval)
    assert torch.equal(pooled[1], own[1]) and pooled[1].abs().sum() > 0  # the input's gradient
    assert pooled[2].keys() == own[2].keys() and len(own[2]) == 28  # A and B of 14 layers
    for name, grad in own[2].items():
        assert torch.equal(pooled[2][name], grad), name
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantized_weights_equal_bitsandbytes_and_share_one_buffer(tiny_llama, tmp_path, double_quant):
    import bitsandbytes.functional as F

    model = _qlora(tiny_llama, tmp_path, double_quant=double_quant)
    layers = _layers(model)
    assert all(m.weight.quant_state.nested == double_quant for m in layers)
    biggest = max(m.weight.quant_state.shape.numel() for m in layers)
    cpu_nf4.release()
    views = []
    for m in sorted(layers, key=lambda m: -m.weight.quant_state.shape.numel()):  # the buffer grows only once
        qs = m.weight.quant_state
        w = cpu_nf4.dequantize(m.weight, qs, torch.float32)
        assert torch.equal(w, F.dequantize_4bit(m.weight, qs)), m
        views.append(w.data_ptr())
    assert len(set(views)) == 1  # every layer's weight lands in the same place: one buffer
    _step(model, torch.randint(3, 200, (2, 8)))
    absmax = max(m.weight.quant_state.absmax.numel() for m in layers) if double_quant else 0
    assert cpu_nf4.pooled_bytes(torch.float32) == 4 * (biggest + absmax)  # one weight-sized buffer (+ the scales'), not one per call
