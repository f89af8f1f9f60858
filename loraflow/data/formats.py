"""Record formats: validate a raw record and render it as (prompt, completion).

This is the one place a record becomes text. Training, evaluation and the registered model's
inference all render through here, so the bytes a model was trained on are the bytes it is asked.

    alpaca      instruction, input (optional), output
    chat        messages: [{role, content}, ...], the last from the assistant (tokenizer's template)
    completion  prompt, completion
    text        text (prompt "", completion = text)

Column names map onto these canonical fields with ``data.fields`` (``{prompt: question}``).
EOS is not added here: the trainer appends it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraflow.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMATS = ("alpaca", "chat", "completion", "text")
# Required and optional canonical fields of each format.
REQUIRED = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL = {"alpaca": ("input",)}
CANONICAL = ("instruction", "input", "output", "messages", "prompt", "completion", "text")
# auto: the first format whose required fields are all present wins, in this order.
DETECT_ORDER = ("chat", "alpaca", "completion", "text")

ALPACA_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class BadRecord(DataError):
    """One record is unusable. ``reason`` is the short key it is counted under when skipped."""

    def __init__(self, reason: str, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.reason = reason
        self.problem = problem
        self.fix = fix


def check_fields(fields: dict[str, str]) -> None:
    """Reject a ``data.fields`` key that is not a canonical field name."""
    for key, column in fields.items():
        if key not in CANONICAL:
            raise ConfigError(
                f"data.fields.{key}: unknown field; map one of {', '.join(CANONICAL)} to your column, "
                f"e.g. -s data.fields.prompt={column}"
            )


def column(canonical: str, fields: dict[str, str]) -> str:
    """The record key that holds ``canonical`` (the mapping, or the canonical name itself)."""
    return fields.get(canonical, canonical)


def detect_format(record: dict, fields: dict[str, str]) -> str:
    """The format whose required fields the record has (after the mapping), else a DataError."""
    present = {k for k, v in record.items() if v is not None}
    for fmt in DETECT_ORDER:
        if all(column(f, fields) in present for f in REQUIRED[fmt]):
            return fmt
    seen = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(
        f"data.format auto: cannot tell the format from the fields [{seen}]; expected alpaca "
        "(instruction, input, output), chat (messages), completion (prompt, completion) or text (text); "
        "set -s data.format=... and map your columns with -s data.fields.<field>=<column>"
    )


def render(
    record: dict, fmt: str, fields: dict[str, str], tokenizer: "PreTrainedTokenizerBase | None" = None
) -> tuple[str, str]:
    """Validate ``record`` as ``fmt`` and return ``(prompt, completion)``, EOS not added.

    Raises BadRecord (with a ``reason``) for a missing, empty or mistyped field, and DataError
    when the format cannot be rendered at all (chat without a chat template).
    The tokenizer is needed for ``chat`` only.
    """
    if fmt == "alpaca":
        instruction = _text(record, "instruction", fields)
        output = _text(record, "output", fields)
        return _alpaca_prompt(instruction, _optional_text(record, "input", fields)), output
    if fmt == "completion":
        return _text(record, "prompt", fields), _text(record, "completion", fields)
    if fmt == "text":
        return "", _text(record, "text", fields)
    if fmt == "chat":
        messages = _messages(record, fields)
        last = messages[-1]
        if last["role"] != "assistant":
            raise BadRecord(
                "invalid_chat",
                f"the last message is from {last['role']!r}, not the assistant",
                "end each conversation with the assistant's answer",
            )
        if not last["content"].strip():
            raise BadRecord("empty_field", "the assistant's answer is empty", "give the last message a content")
        return _chat_prompt(messages[:-1], tokenizer), last["content"]
    raise DataError(f"data.format: unknown format {fmt!r}; use one of {', '.join(FORMATS)} or auto")


def render_prompt(
    record: dict, fmt: str, fields: dict[str, str], tokenizer: "PreTrainedTokenizerBase | None" = None
) -> str:
    """The prompt alone, for inference: the answer field may be absent.

    chat: a conversation that already ends with the assistant drops that last message; otherwise
    the whole conversation is the prompt. text: the prompt is always "".
    """
    if fmt == "alpaca":
        return _alpaca_prompt(_text(record, "instruction", fields), _optional_text(record, "input", fields))
    if fmt == "completion":
        return _text(record, "prompt", fields)
    if fmt == "text":
        return ""
    if fmt == "chat":
        messages = _messages(record, fields)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return _chat_prompt(messages, tokenizer)
    raise DataError(f"data.format: unknown format {fmt!r}; use one of {', '.join(FORMATS)} or auto")


# ---------------------------------------------------------------------------------------------


def _alpaca_prompt(instruction: str, input_: str) -> str:
    if input_.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def _chat_prompt(messages: list[dict[str, str]], tokenizer: "PreTrainedTokenizerBase | None") -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "data.format chat: the tokenizer of model.base has no chat template; "
            "use a model that has one, or another data.format (alpaca, completion)"
        )
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template's own checks (e.g. roles must alternate) raise here
        raise BadRecord(
            "invalid_chat",
            f"the chat template rejects the conversation ({_first_line(e)})",
            "fix the conversation's roles and order",
        ) from None


def _missing(record: dict, canonical: str, fields: dict[str, str]) -> BadRecord:
    col = column(canonical, fields)
    name = f"{col!r}" + (f" (mapped from {canonical})" if col != canonical else "")
    seen = ", ".join(sorted(map(str, record))) or "none"
    return BadRecord(
        "missing_field",
        f"missing field {name}; fields present: {seen}",
        f"add it, or map your column with -s data.fields.{canonical}=<column>",
    )


def _text(record: dict, canonical: str, fields: dict[str, str]) -> str:
    col = column(canonical, fields)
    value = record.get(col)
    if value is None:
        raise _missing(record, canonical, fields)
    if not isinstance(value, str):
        raise BadRecord(
            "wrong_type",
            f"field {col!r} is a {type_name(value)}, expected a string",
            "make it a string (quote numbers)",
        )
    if not value.strip():
        raise BadRecord("empty_field", f"field {col!r} is empty", "give it a value or remove the record")
    return value


def _optional_text(record: dict, canonical: str, fields: dict[str, str]) -> str:
    col = column(canonical, fields)
    value = record.get(col)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord(
            "wrong_type",
            f"field {col!r} is a {type_name(value)}, expected a string",
            "make it a string or leave it out",
        )
    return value


def _messages(record: dict, fields: dict[str, str]) -> list[dict[str, str]]:
    col = column("messages", fields)
    value = record.get(col)
    if value is None:
        raise _missing(record, "messages", fields)
    if not isinstance(value, list):
        raise BadRecord(
            "wrong_type",
            f"field {col!r} is a {type_name(value)}, expected a list of {{role, content}} messages",
            "make it a list of messages",
        )
    if not value:
        raise BadRecord("empty_field", f"field {col!r} is an empty list", "give it at least the assistant's answer")
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise BadRecord(
                "invalid_chat", f"message {i} is a {type_name(m)}, expected {{role, content}}", "fix the message"
            )
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise BadRecord("invalid_chat", f"message {i} has no 'role' string", "give each message a role")
        if not isinstance(content, str):
            raise BadRecord("invalid_chat", f"message {i} has no 'content' string", "give each message a content")
        # Only role and content reach the template: extra keys (tool_calls: null) change nothing.
        out.append({"role": role, "content": content})
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def type_name(value: Any) -> str:
    return {dict: "object", list: "list", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )
