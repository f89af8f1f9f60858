"""Bad input: one clear line on stderr, a non-zero exit and nothing written (or skip-and-count).

The matrix runs `loraflow.cli.main` in-process (the console script's own function: argument
parsing, the one-line error, the exit code) to stay fast; ``test_console_script_*`` checks the
same through a real `loraflow` process.
"""

from __future__ import annotations

import json
import shutil

import pytest

from loraflow.core.paths import Paths
from tests.reliability.conftest import (
    alpaca,
    cli_in_process,
    error_line,
    run_cli,
    write_params,
    write_raw,
)

GOOD = [json.dumps(alpaca(i)).encode() for i in range(30)]

# name: (the bad line, its reason in reports/prepare.json, what the error line says)
BAD_RECORDS = {
    "broken_json": (b'{"instruction": "x", ', "invalid_json", "not valid JSON"),
    "missing_field": (b'{"instruction": "x"}', "missing_field", "missing field 'output'"),
    "wrong_type": (b'{"instruction": "x", "output": 7}', "wrong_type", "field 'output' is a number, expected a string"),
    "empty_answer": (b'{"instruction": "x", "output": "  "}', "empty_field", "field 'output' is empty"),
    "non_utf8": (b'{"instruction": "caf\xe9", "output": "x"}', "non_utf8", "not valid UTF-8 (byte 0xe9"),
    "lone_surrogate": (b'{"instruction": "bad \\ud800 x", "output": "x"}', "not_unicode",
                       "holds \\ud800, a lone UTF-16 surrogate"),
    "nested_200k_deep": (b"[" * 200_000 + b"]" * 200_000, "invalid_json", "JSON nested too deeply to parse"),
    "50MB_line": (b'{"instruction": "' + b"a" * 50_000_000 + b'", "output": "x"}', "too_long",
                  "the record is 50,000,034 bytes, over data.max_record_bytes"),
    "prompt_over_max_length": (json.dumps({"instruction": "hot cold " * 40, "output": "x"}).encode(),
                               "answer_truncated", "with max_length 64 no answer token is left"),
}


def nothing_written(root) -> bool:
    paths = Paths.at(root)
    return not paths.prepared.exists() and not paths.report("prepare").exists()


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_bad_record_stops_with_its_line_or_is_skipped_and_counted(case, tiny_llama, tmp_path):
    line, reason, says = BAD_RECORDS[case]
    write_raw(tmp_path, b"\n".join(GOOD[:12] + [line] + GOOD[12:]) + b"\n")
    write_params(tmp_path, tiny_llama)
    with cli_in_process(tmp_path) as cli:
        rc, err = cli("stage", "prepare")
        assert rc == 2
        msg = error_line(err)
        assert msg.startswith("loraflow: error: data/raw/x.jsonl:13: ") and says in msg, msg
        assert msg.endswith("or set data.on_bad_record: skip to drop such records"), msg
        assert len(msg) < 400  # one readable line, not a dump of the record
        assert nothing_written(tmp_path)

        rc, err = cli("stage", "prepare", "-s", "data.on_bad_record=skip")
    assert rc == 0, err
    assert "skipped data/raw/x.jsonl:13: " in err
    report = json.loads(Paths.at(tmp_path).report("prepare").read_text())
    assert (report["records_read"], report["records_kept"]) == (31, 30)
    assert report["dropped"][reason] == 1 and sum(report["dropped"].values()) == 1


def test_prompt_longer_than_max_length_is_never_trained_with_zero_supervised_tokens(tiny_llama, tmp_path):
    """Skipped and counted at prepare; what is kept has at least one answer token inside max_length."""
    from loraflow.core.config import load_config
    from loraflow.data.splits import load_split
    from loraflow.model.loading import load_tokenizer

    long_prompts = [{"instruction": f"{i} " + "hot cold " * (25 + i), "output": "x"} for i in range(5)]
    write_raw(tmp_path, [alpaca(i) for i in range(30)] + long_prompts)
    params = write_params(tmp_path, tiny_llama, data={"on_bad_record": "skip"})
    with cli_in_process(tmp_path) as cli:
        rc, err = cli("stage", "prepare")
    assert rc == 0, err
    report = json.loads(Paths.at(tmp_path).report("prepare").read_text())
    assert report["dropped"]["answer_truncated"] == 5 and report["records_kept"] == 30
    cfg = load_config(params)
    tok = load_tokenizer(cfg, Paths.at(tmp_path))
    for name in ("train", "val", "test"):
        for row in load_split(Paths.at(tmp_path), name):
            assert len(tok(row["prompt"])["input_ids"]) < cfg.data.max_length - 1, row


def test_duplicates_are_removed_before_splitting_so_no_record_is_in_two_splits(tiny_llama, tmp_path):
    from loraflow.data.splits import load_split

    records = [alpaca(i) for i in range(200)]
    dups = records[::3] + [dict(r, input="") for r in records[::5]] + [{**records[7], "extra": "x"}]
    write_raw(tmp_path, records + dups)
    write_params(tmp_path, tiny_llama, data={"val_fraction": 0.2, "test_fraction": 0.2})
    with cli_in_process(tmp_path) as cli:
        rc, err = cli("stage", "prepare")
    assert rc == 0, err
    paths = Paths.at(tmp_path)
    report = json.loads(paths.report("prepare").read_text())
    assert report["dropped"]["duplicate"] == len(dups) and report["records_kept"] == 200
    splits = {name: load_split(paths, name) for name in ("train", "val", "test")}
    pairs = {name: {(r["prompt"], r["completion"]) for r in rows} for name, rows in splits.items()}
    assert all(len(pairs[n]) == len(splits[n]) for n in splits)  # no duplicate inside a split either
    assert not (pairs["train"] & pairs["test"] or pairs["train"] & pairs["val"] or pairs["val"] & pairs["test"])
    assert sum(map(len, pairs.values())) == 200


CONFIG_CASES = {
    # name: (-s overrides, what the error line says)
    "unknown_format": (["data.format=jsonlines"],
                       "-s data.format=jsonlines: data.format: must be one of 'alpaca', 'chat', 'completion', 'text' or 'auto'"),
    "base_missing": (["model.base=/nonexistent/model"],
                     "model.base: /nonexistent/model does not exist"),
    "max_length_over_positions": (["data.max_length=4096"],
                                  "data.max_length: 4096 tokens is more than model.base supports "
                                  "(max_position_embeddings = 512"),
    "path_outside_project": (["data.path=../elsewhere/x.jsonl"],
                             "data.path: ../elsewhere/x.jsonl points outside the project"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_bad_setting_is_one_line_and_writes_nothing(case, tiny_llama, tmp_path):
    root = tmp_path / "project"
    write_raw(root, [alpaca(i) for i in range(20)])
    write_raw(tmp_path, [alpaca(i) for i in range(20)], "elsewhere/x.jsonl")  # exists: refused anyway
    write_params(root, tiny_llama)
    overrides, says = CONFIG_CASES[case]
    with cli_in_process(root) as cli:
        rc, err = cli("stage", "prepare", *[a for o in overrides for a in ("-s", o)])
    assert rc == 2
    msg = error_line(err)
    assert says in msg, msg
    assert nothing_written(root)


def test_a_dataset_outside_the_project_is_read_when_named_by_an_absolute_path(tiny_llama, tmp_path):
    outside = write_raw(tmp_path, [alpaca(i) for i in range(20)], "elsewhere/x.jsonl")
    root = tmp_path / "project"
    write_params(root, tiny_llama, data={"path": str(outside)})
    with cli_in_process(root) as cli:
        rc, err = cli("stage", "prepare")
    assert rc == 0, err
    assert json.loads(Paths.at(root).report("prepare").read_text())["records_kept"] == 20
    # `..` that stays inside the project is just a path
    write_raw(root, [alpaca(i) for i in range(20)])
    with cli_in_process(root) as cli:
        rc, err = cli("stage", "prepare", "-s", "data.path=data/../data/raw/x.jsonl")
    assert rc == 0, err


def test_a_base_without_a_tokenizer_is_one_line(tiny_llama, tmp_path):
    base = tmp_path / "no-tokenizer"
    base.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_llama / f, base / f)
    root = tmp_path / "project"
    write_raw(root, [alpaca(i) for i in range(20)])
    write_params(root, base)
    with cli_in_process(root) as cli:
        rc, err = cli("stage", "prepare")
    assert rc == 2
    assert f"model.base: {base} has no tokenizer" in error_line(err)
    assert nothing_written(root)


@pytest.mark.slow
def test_target_modules_that_match_nothing_stop_training_before_it_starts(tiny_llama, tmp_path):
    from tests.reliability.conftest import write_prepared

    write_prepared(tmp_path)
    write_params(tmp_path, tiny_llama, lora={"target_modules": ["query_proj"]})
    with cli_in_process(tmp_path) as cli:
        rc, err = cli("stage", "train", "-s", f"register.model_name=targets-{tmp_path.name}")
    assert rc == 2
    msg = error_line(err)
    assert "lora.target_modules: 'query_proj' in LlamaForCausalLM matches no module" in msg and "q_proj" in msg
    paths = Paths.at(tmp_path)
    assert not paths.adapter.exists() and not paths.report("train").exists() and not paths.checkpoints.exists()


@pytest.mark.slow
def test_console_script_prints_one_line_and_exits_non_zero(tiny_llama, tmp_path):
    """The same through a real `loraflow` process: a bad record, then a missing model, then a run that
    succeeds; secrets planted in the environment appear in none of their output."""
    secrets = {"HF_TOKEN": "hf_PLANTEDsecret0001", "MLFLOW_TRACKING_PASSWORD": "PLANTEDsecret0002",
               "AWS_SECRET_ACCESS_KEY": "PLANTEDsecret0003"}
    write_raw(tmp_path, b"\n".join(GOOD[:3] + [BAD_RECORDS["broken_json"][0]]) + b"\n")
    write_params(tmp_path, tiny_llama)
    runs = [run_cli(tmp_path, "stage", "prepare", extra_env=secrets)]
    assert runs[-1].returncode == 2
    assert error_line(runs[-1].stderr).startswith("loraflow: error: data/raw/x.jsonl:4: not valid JSON")
    runs.append(run_cli(tmp_path, "stage", "prepare", "-s", "model.base=./no/such/model", extra_env=secrets))
    assert runs[-1].returncode == 2 and "model.base: ./no/such/model does not exist" in error_line(runs[-1].stderr)
    assert nothing_written(tmp_path)
    runs.append(run_cli(tmp_path, "stage", "prepare", "-s", "data.on_bad_record=skip", extra_env=secrets))
    assert runs[-1].returncode == 0, runs[-1].stderr[-3000:]
    written = "".join(p.read_text(errors="replace") for p in Paths.at(tmp_path).reports.glob("*"))
    for secret in secrets.values():
        assert all(secret not in r.stdout + r.stderr for r in runs) and secret not in written
