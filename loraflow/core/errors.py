"""User-facing errors: one line that says what, where and how to fix it."""

from __future__ import annotations


class LoraflowError(Exception):
    """An error the user can fix (bad config, bad data, missing model).

    The CLI prints ``str(err)`` as one line on stderr and exits with ``exit_code``,
    without a traceback. Everything else is a bug and keeps its traceback.
    """

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(LoraflowError):
    """params.yaml or a ``-s`` override is invalid."""

    exit_code = 2


class DataError(LoraflowError):
    """The dataset cannot be read or a record is invalid."""

    exit_code = 2


class ModelError(LoraflowError):
    """The base model, tokenizer or adapter is missing or unusable."""

    exit_code = 2


class TrainingError(LoraflowError):
    """Training diverged or a pre-flight check failed."""

    exit_code = 1


class DiskFullError(LoraflowError):
    """An output does not fit where it goes (disk full, quota exceeded, file too large); nothing half-written is left."""

    exit_code = 1
