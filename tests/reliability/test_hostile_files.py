"""Hostile files: pickle weights are refused unless model.allow_pickle; code shipped with a model
runs only with model.trust_remote_code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loraflow.core.config import load_config
from loraflow.core.errors import ModelError
from loraflow.core.paths import Paths
from tests.reliability.conftest import (
    cli_in_process,
    error_line,
    write_params,
    write_prepared,
)


def pickle_only_base(tiny: Path, dest: Path) -> Path:
    """The tiny model with its weights as pytorch_model.bin (torch.save: a pickle) and no safetensors."""
    from safetensors.torch import load_file

    dest.mkdir()
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dest / f.name)
    torch.save(load_file(tiny / "model.safetensors"), dest / "pytorch_model.bin")
    return dest


@pytest.mark.slow
def test_a_base_with_only_pickle_weights_is_refused_unless_allowed(tiny_llama, tmp_path):
    from loraflow.model import loading

    base = pickle_only_base(tiny_llama, tmp_path / "pickled")
    write_prepared(tmp_path / "p")
    write_params(tmp_path / "p", base)
    with cli_in_process(tmp_path / "p") as cli:
        rc, err = cli("stage", "train", "-s", f"register.model_name=pickle-{tmp_path.name}")
    assert rc == 2
    msg = error_line(err)
    assert f"model.base: {base} has only pickle weights (pytorch_model.bin), which can run code when loaded" in msg
    assert "set model.allow_pickle: true if you trust the file" in msg
    assert not Paths.at(tmp_path / "p").adapter.exists()

    # allowed on purpose: the same weights as the safetensors original
    paths = Paths.at(tmp_path / "p")
    allowed = load_config(None, [f"model.base={base}", "model.allow_pickle=true"])
    model = loading.load_model(allowed, paths, quantized=False)
    reference = loading.load_model(load_config(None, [f"model.base={tiny_llama}"]), paths, quantized=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    # safetensors next to a pickle: the safetensors are used, nothing is refused
    shutil.copy(tiny_llama / "model.safetensors", base / "model.safetensors")
    loading.load_model(load_config(None, [f"model.base={base}"]), paths, quantized=False)


def test_an_adapter_with_only_a_pickle_is_refused_unless_allowed(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraflow.model.adapters import load_tuned

    root = tmp_path / "p"
    write_prepared(root, n_train=8, n_test=4)
    write_params(root, tiny_llama, method="lora")
    paths = Paths.at(root)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(paths.adapter, safe_serialization=False)
    assert sorted(p.name for p in paths.adapter.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]

    with cli_in_process(root) as cli:
        rc, err = cli("stage", "evaluate")
    assert rc == 2
    msg = error_line(err)
    assert f"adapter: {paths.adapter} has only pickle weights (adapter_model.bin)" in msg
    assert not paths.report("evaluate").exists()

    cfg = load_config(root / "params.yaml", ["model.allow_pickle=true"])
    tuned = load_tuned(cfg, paths)
    assert sum("lora_A" in n for n, _ in tuned.named_parameters()) == 4
    with pytest.raises(ModelError, match="has only pickle weights"):
        load_tuned(load_config(root / "params.yaml"), paths)


def remote_code_base(tiny: Path, dest: Path, marker: Path) -> Path:
    """A model folder whose config points at Python shipped with it; importing that file writes ``marker``."""
    shutil.copytree(tiny, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                    "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the shipped code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil-llama'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    return dest


@pytest.mark.slow
def test_code_shipped_with_a_model_never_runs_without_trust_remote_code(tiny_llama, tmp_path):
    from loraflow.model import loading

    marker = tmp_path / "EXECUTED"
    base = remote_code_base(tiny_llama, tmp_path / "custom", marker)
    root = tmp_path / "p"
    write_prepared(root)
    write_params(root, base)
    with cli_in_process(root) as cli:
        rc, err = cli("stage", "train", "-s", f"register.model_name=remote-{tmp_path.name}")
    assert rc == 2
    msg = error_line(err)
    assert f"model.base: the model at {base} ships its own Python code" in msg
    assert "model.trust_remote_code: true" in msg
    assert not marker.exists()  # refused before a line of it ran

    # the control: with trust_remote_code the same folder does run its code (so the test above means something)
    trusted = load_config(None, [f"model.base={base}", "model.trust_remote_code=true"])
    model = loading.load_model(trusted, Paths.at(root), quantized=False)
    assert marker.exists() and type(model).__name__ == "EvilForCausalLM"


def test_a_tokenizer_that_ships_code_never_runs_it_without_trust_remote_code(tiny_llama, tmp_path):
    from loraflow.model import loading
    from tests.reliability.conftest import alpaca, write_raw

    marker = tmp_path / "EXECUTED"
    base = tmp_path / "custom-tokenizer"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]})
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "evil_tok.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('the shipped code ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    root = tmp_path / "p"
    write_raw(root, [alpaca(i) for i in range(20)])
    write_params(root, base)
    with cli_in_process(root) as cli:
        rc, err = cli("stage", "prepare")  # prepare loads only the tokenizer
    assert rc == 2
    assert f"model.base: the tokenizer at {base} ships its own Python code" in error_line(err)
    assert not marker.exists() and not Paths.at(root).prepared.exists()

    trusted = load_config(None, [f"model.base={base}", "model.trust_remote_code=true"])
    assert type(loading.load_tokenizer(trusted, Paths.at(root))).__name__ == "EvilTokenizer" and marker.exists()


def test_a_params_file_with_a_python_tag_is_refused_without_running_it(tmp_path):
    """params.yaml is parsed with yaml.safe_load: a !!python tag is a config error, never a constructor call."""
    marker = tmp_path / "EXECUTED"
    (tmp_path / "params.yaml").write_text(
        f"model:\n  base: !!python/object/apply:os.system [\"touch {marker}\"]\n", encoding="utf-8")
    with cli_in_process(tmp_path) as cli:
        rc, err = cli("stage", "prepare")
    assert rc == 2
    assert "params.yaml:2: not valid YAML (could not determine a constructor for the tag" in error_line(err)
    assert not marker.exists()


def test_secret_values_travel_as_environment_references_and_an_unset_one_is_one_line(monkeypatch):
    """What `loraflow run` hands a flow (loraflow.track.secretref): each secret-looking value becomes
    ${env:LORAFLOW_SECRET_<KEY>} with the value in the environment; the flow's as_config reads it back;
    a reference to an unset variable (a deployment's worker without it) is one ConfigError line."""
    import os

    from loraflow.flows.common import as_config

    from loraflow.core.config import load_config
    from loraflow.core.errors import ConfigError
    from loraflow.track.secretref import externalize

    cfg = load_config(None, ["data.fields.prompt=postgresql://u:pw9@db/x", "data.fields.hf_token=hf_abc",
                             "data.path=data/raw/x.jsonl", "lora.r=4"])
    environ: dict[str, str] = {}
    sent = externalize(cfg.model_dump(mode="json"), environ)
    assert sent["data"]["fields"] == {"prompt": "${env:LORAFLOW_SECRET_DATA_FIELDS_PROMPT}",
                                      "hf_token": "${env:LORAFLOW_SECRET_DATA_FIELDS_HF_TOKEN}"}
    assert environ == {"LORAFLOW_SECRET_DATA_FIELDS_PROMPT": "postgresql://u:pw9@db/x",
                       "LORAFLOW_SECRET_DATA_FIELDS_HF_TOKEN": "hf_abc"}
    assert "pw9" not in json.dumps(sent) and "hf_abc" not in json.dumps(sent)
    assert sent["data"]["path"] == "data/raw/x.jsonl" and sent["lora"]["r"] == 4  # the rest as it was
    assert externalize(sent, environ) == sent  # a reference is left as it is

    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert as_config(sent) == cfg
    monkeypatch.delenv("LORAFLOW_SECRET_DATA_FIELDS_HF_TOKEN")
    with pytest.raises(ConfigError) as e:
        as_config(sent)
    assert str(e.value) == (
        "data.fields.hf_token: refers to ${env:LORAFLOW_SECRET_DATA_FIELDS_HF_TOKEN}, which is not set in this "
        "process's environment; set LORAFLOW_SECRET_DATA_FIELDS_HF_TOKEN where the flow runs (for a deployment: "
        "in its worker's environment)")
    assert os.environ.get("LORAFLOW_SECRET_DATA_FIELDS_HF_TOKEN") is None
