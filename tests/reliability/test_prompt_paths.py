"""The prompt a record becomes is byte-identical in training, evaluation and the registered model's inference.

Training and evaluation both read the prompt that prepare rendered into data/prepared (through
loraflow.data.formats); the registered model renders a request itself (loraflow/pyfunc_model.py, which
imports nothing from loraflow). Each record goes through all three, and the token ids agree too:
what TRL tokenized for training, what evaluation's generation feeds the model, what inference feeds it.
"""

from __future__ import annotations

import json

import pytest

from loraflow.core.config import load_config
from loraflow.core.paths import Paths
from loraflow.data.splits import load_split
from tests.reliability.conftest import alpaca, cli_in_process, write_params, write_raw

pyfunc_model = pytest.importorskip("loraflow.track.pyfunc_model")

CASES = {
    "alpaca": ({"instruction": "What is the opposite of hot?", "input": "", "output": "cold"},
               {"prompt": "What is the opposite of hot?"}),
    "alpaca_with_input": ({"instruction": "Is the number even or odd?", "input": "37", "output": "odd"},
                          {"prompt": "Is the number even or odd?", "input": "37"}),
    "completion": ({"prompt": "Q: capital of France?\nA:", "completion": " Paris"},
                   {"prompt": "Q: capital of France?\nA:"}),
    "chat": ({"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
             {"prompt": "Say hi"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_record_renders_to_the_same_bytes_and_tokens_everywhere(case, tiny_llama, tmp_path):
    from loraflow.tasks.prepare import content_key

    from loraflow.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
    from loraflow.model import loading
    from loraflow.train import lora, sft

    record, request = CASES[case]
    filler = [alpaca(i) for i in range(30)] if case.startswith("alpaca") else [
        {k: (f"{v} {i}" if isinstance(v, str) else v) for k, v in record.items()} if case == "completion" else
        {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
        for i in range(30)
    ]
    write_raw(tmp_path, [record] + filler)
    params = write_params(tmp_path, tiny_llama, method="lora")
    with cli_in_process(tmp_path) as cli:
        rc, err = cli("stage", "prepare")
    assert rc == 0, err
    cfg, paths = load_config(params), Paths.at(tmp_path)
    fmt = json.loads(paths.report("prepare").read_text())["format"]
    rows = [r for name in ("train", "val", "test") for r in load_split(paths, name)]
    row = next(r for r in rows if r["completion"] == (record.get("output") or record.get("completion")
                                                      or record.get("messages", [{}])[-1].get("content")))
    assert row["id"] == content_key(row["prompt"], row["completion"])[:16]

    # 1. training: the prompt TRL tokenized (its masked tokens) is the prepared prompt
    tok = loading.load_tokenizer(cfg, paths)
    model = loading.load_model(cfg, paths, quantized=False)
    from loraflow.model.targets import resolve_targets

    model = lora.attach_lora(model, cfg, resolve_targets(model, "attention-qv"), quantized=False)
    trainer = sft.build_trainer(cfg, paths, model, tok, [row])
    ids, labels = trainer.train_dataset[0]["input_ids"], trainer.train_dataset[0]["labels"]
    n_prompt = sum(lab == sft.IGNORE for lab in labels)
    train_prompt_ids = ids[:n_prompt]

    # 2. evaluation: generation feeds tokenizer(prompt) of the prepared row (loraflow.model.generation.greedy_generate)
    eval_ids = tok([row["prompt"]], padding=True)["input_ids"][0]

    # 3. the registered model: a request rendered by the logged pyfunc, with the config register logs
    served = pyfunc_model.LoraflowTextModel()
    served.config = {"format": fmt, "templates": {"with_input": ALPACA_WITH_INPUT, "no_input": ALPACA_NO_INPUT}}
    served.tokenizer = tok
    served_prompt = served.render(request)
    served_ids = tok([served_prompt], padding=True)["input_ids"][0]

    assert served_prompt.encode("utf-8") == row["prompt"].encode("utf-8")
    assert train_prompt_ids == eval_ids == served_ids
