"""Formats: exact rendering bytes, detection, field mapping, and the reason of each bad record."""

from __future__ import annotations

import pytest

from loraflow.core.config import load_config
from loraflow.core.errors import ConfigError, DataError
from loraflow.core.paths import Paths
from loraflow.data.formats import (
    BadRecord,
    check_fields,
    detect_format,
    render,
    render_prompt,
)
from loraflow.model.loading import load_tokenizer


@pytest.fixture
def tokenizer(tiny_llama, tmp_path):
    return load_tokenizer(load_config(None, [f"model.base={tiny_llama}"]), Paths.at(tmp_path))


def test_alpaca_renders_exact_bytes():
    with_input = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    assert render(with_input, "alpaca", {}, None) == (
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n",
        "5",
    )
    for no_input in ({"instruction": "Add.", "output": "5"}, {"instruction": "Add.", "input": "", "output": "5"},
                     {"instruction": "Add.", "input": None, "output": "5"}):
        assert render(no_input, "alpaca", {}, None) == ("### Instruction:\nAdd.\n\n### Response:\n", "5")


def test_completion_and_text():
    assert render({"prompt": "Q: hi\nA:", "completion": " hello"}, "completion", {}, None) == ("Q: hi\nA:", " hello")
    assert render({"text": "Paris is in France."}, "text", {}, None) == ("", "Paris is in France.")


def test_field_mapping():
    fields = {"prompt": "question", "completion": "answer"}
    record = {"question": "2+2?", "answer": "4"}
    assert detect_format(record, fields) == "completion"
    assert render(record, "completion", fields, None) == ("2+2?", "4")
    alpaca = {"task": "Say hi.", "output": "hi"}
    assert render(alpaca, "alpaca", {"instruction": "task"}, None)[0] == "### Instruction:\nSay hi.\n\n### Response:\n"


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"messages": [], "instruction": "x", "output": "y"}, "chat"),
        ({"instruction": "x", "input": "", "output": "y"}, "alpaca"),
        ({"prompt": "x", "completion": "y"}, "completion"),
        ({"text": "x", "meta": 1}, "text"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record, {}) == fmt


def test_detect_format_lists_fields_seen():
    with pytest.raises(DataError, match=r"fields \[answer, question\]"):
        detect_format({"question": "q", "answer": "a"}, {})


def test_check_fields_rejects_unknown_canonical_name():
    check_fields({"prompt": "question"})
    with pytest.raises(ConfigError, match="data.fields.answer: unknown field"):
        check_fields({"answer": "a"})


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"output": "y"}, "missing_field"),
        ({"instruction": None, "output": "y"}, "missing_field"),
        ({"instruction": "  ", "output": "y"}, "empty_field"),
        ({"instruction": "x", "output": ["y"]}, "wrong_type"),
        ({"instruction": "x", "output": 4}, "wrong_type"),
        ({"instruction": "x", "input": {"a": 1}, "output": "y"}, "wrong_type"),
    ],
)
def test_alpaca_bad_records(record, reason):
    with pytest.raises(BadRecord) as err:
        render(record, "alpaca", {}, None)
    assert err.value.reason == reason


def test_missing_field_message_names_mapping_and_fix():
    with pytest.raises(BadRecord, match=r"missing field 'answer' \(mapped from completion\); fields present: prompt") as e:
        render({"prompt": "p"}, "completion", {"completion": "answer"}, None)
    assert "data.fields.completion=<column>" in e.value.fix


def test_chat_uses_the_tokenizer_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris", "tool_calls": None},
    ]
    prompt, completion = render({"messages": messages}, "chat", {}, tokenizer)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt == tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    assert completion == "Paris"
    # Inference: the conversation so far is the prompt.
    assert render_prompt({"messages": messages[:2]}, "chat", {}, tokenizer) == prompt
    assert render_prompt({"messages": messages}, "chat", {}, tokenizer) == prompt


@pytest.mark.parametrize(
    "messages, reason",
    [
        ("hello", "wrong_type"),
        ([], "empty_field"),
        ([{"role": "user", "content": "hi"}], "invalid_chat"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "invalid_chat"),
        (["hi", {"role": "assistant", "content": "x"}], "invalid_chat"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "empty_field"),
    ],
)
def test_chat_bad_records(tokenizer, messages, reason):
    with pytest.raises(BadRecord) as err:
        render({"messages": messages}, "chat", {}, tokenizer)
    assert err.value.reason == reason


def test_chat_without_template_is_a_clear_error(tokenizer):
    tokenizer.chat_template = None
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(DataError, match="has no chat template"):
        render(record, "chat", {}, tokenizer)


def test_render_prompt_without_answer():
    assert render_prompt({"instruction": "Add.", "input": "1, 2"}, "alpaca", {}, None) == (
        "### Instruction:\nAdd.\n\n### Input:\n1, 2\n\n### Response:\n"
    )
    assert render_prompt({"q": "hi"}, "completion", {"prompt": "q"}, None) == "hi"
