"""Config: typed, validated at load, one-line errors that name the file:line or -s key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.core.config import Config, load_config
from loraflow.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_params_yaml_is_valid_and_matches_schema_keys():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.method == "qlora"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.scale) == (16, 32, 2.0)  # params.yaml: "scale alpha/r = 2.0"
    # Every schema key appears in params.yaml, so the file documents every knob.
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    flat_file = {k for k in Config.model_validate(raw).flat()}
    for key in Config().flat():
        section = key.split(".")[0]
        assert section in raw, key
    assert flat_file == set(Config().flat())


@pytest.mark.parametrize(
    "override, expected",
    [
        (["lora.r=32"], ("lora", "r", 32)),
        (["train.max_steps=50"], ("train", "max_steps", 50)),
        (["lora.target_modules=[q_proj, k_proj]"], ("lora", "target_modules", ["q_proj", "k_proj"])),
        (["data.fields.prompt=question"], ("data", "fields", {"prompt": "question"})),
        (["method=lora"], (None, "method", "lora")),
    ],
)
def test_overrides_are_dotted_and_parsed_as_yaml(override, expected):
    cfg = load_config(ROOT / "params.yaml", override)
    section, key, value = expected
    obj = getattr(cfg, section) if section else cfg
    assert getattr(obj, key) == value


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["lora.r=0"], "lora.r: must be a positive integer"),
        (["lora.r=-3"], "lora.r: must be a positive integer"),
        (["lora.alpha=0"], "lora.alpha: must be > 0"),
        (["lora.dropout=1"], "lora.dropout: must be in [0, 1)"),
        (["data.val_fraction=1.5"], "data.val_fraction: must be a fraction in (0, 1)"),
        (["data.test_fraction=0"], "data.test_fraction: must be a fraction in (0, 1)"),
        (["data.format=xml"], "data.format: must be one of"),
        (["method=full"], "method: must be one of"),
        (["lora.rank=8"], "unknown key lora.rank; did you mean lora.r?"),
        (["lora.alhpa=8"], "did you mean lora.alpha?"),
        (["trian.epochs=1"], "did you mean train?"),
        (["lora.r"], "expected KEY=VALUE"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "params.yaml", override)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg


def test_errors_in_file_name_file_and_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("model:\n  base: x\nlora:\n  r: 8\n  rank: 4\n")
    with pytest.raises(ConfigError, match=r"params.yaml:5: unknown key lora.rank; did you mean lora.r\?"):
        load_config(p)
    p.write_text("lora:\n  r: -1\n")
    with pytest.raises(ConfigError, match=r"params.yaml:2: lora.r: must be a positive integer"):
        load_config(p)
    p.write_text("lora: [\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: not valid YAML"):
        load_config(p)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_prints_one_line_and_exit_code_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "loraflow.cli", "plan", "-c", str(ROOT / "params.yaml"), "-s", "lora.rank=8"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "did you mean lora.r?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_readme_config_reference_is_generated_from_the_schema():
    from loraflow.readme import render

    readme = (ROOT / "README.md").read_text()
    assert render(readme, ROOT / "params.yaml") == readme, "README config reference is stale: run `make docs`"
    for key in Config().flat():
        assert f"`{key}`" in readme
