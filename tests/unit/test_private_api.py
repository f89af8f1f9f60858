"""loraflow/core/private_api.py: the private names loraflow uses still exist, in the versions they were read in.

A failure here is not a bug: a library moved. Re-read the use in loraflow/core/private_api.py against the
new version, then update CHECKED_AGAINST."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys

from loraflow.core import private_api


def test_installed_versions_are_the_ones_the_private_uses_were_checked_against():
    installed = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    installed |= {name: ".".join(md.version(name).split(".")[:2]) for name in private_api.CHECKED_AGAINST
                  if name != "python"}
    assert installed == private_api.CHECKED_AGAINST


def test_every_private_name_is_still_there():
    import atexit
    import threading

    from transformers import Trainer

    assert callable(threading._shutdown) and callable(atexit._run_exitfuncs)
    assert callable(importlib.import_module("mlflow.store.db.utils")._initialize_tables)
    for module, name in (("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
                         ("mlflow.tracking._model_registry.utils", "_registry_uri")):
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
    assert callable(getattr(Trainer, private_api.TRAINER_SAVE_CHECKPOINT))
    server = importlib.import_module("prefect.server.api.server")
    assert callable(server.create_app) and hasattr(server, "SubprocessASGIServer")
    from transformers import PreTrainedModel
    from transformers.quantizers.auto import AutoHfQuantizer
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    assert callable(AutoHfQuantizer.from_config) and callable(HfQuantizer.preprocess_model)
    assert callable(Bnb4BitHfQuantizer.param_needs_quantization)
    assert hasattr(PreTrainedModel, "_keep_in_fp32_modules_strict")


def test_the_4bit_skeleton_is_what_a_4bit_load_builds():
    """What the streaming merge reads off transformers' 4-bit load, on a tiny GPT-2 (Conv1D, tied head) built on
    the meta device: the replaced class, the quantized weights, the tied pair, the strict fp32 modules."""
    import torch
    import transformers as tf
    from transformers.pytorch_utils import Conv1D

    from loraflow.core.config import QuantizationSection
    from loraflow.model.loading import quantized_load_dtypes
    from loraflow.model.quant import bnb_config

    config = tf.GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=16, vocab_size=128)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    assert private_api.hf_tied_weights(model) == {"lm_head.weight", "transformer.wte.weight"}
    assert private_api.hf_replaced_class(model.transformer.h[0].attn.c_attn) is None  # not replaced yet
    compute, load = quantized_load_dtypes(QuantizationSection())
    quantizer = private_api.hf_prepare_4bit_skeleton(model, bnb_config(QuantizationSection(), compute), load)
    layer = model.transformer.h[0].attn.c_attn
    assert type(layer).__name__ == "Linear4bit" and private_api.hf_replaced_class(layer) is Conv1D
    assert private_api.hf_param_needs_quantization(quantizer, model, "transformer.h.0.attn.c_attn.weight")
    assert not private_api.hf_param_needs_quantization(quantizer, model, "transformer.h.0.attn.c_attn.bias")
    assert not private_api.hf_param_needs_quantization(quantizer, model, "transformer.wte.weight")
    assert set(private_api.hf_keep_in_fp32_strict(model)) == set(type(model)._keep_in_fp32_modules_strict or ())


def test_the_fluent_uri_is_put_back(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    with private_api.mlflow_fluent_uri(f"sqlite:///{tmp_path / 'x.db'}"):
        assert mlflow.get_tracking_uri().endswith("x.db")
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in __import__("os").environ
