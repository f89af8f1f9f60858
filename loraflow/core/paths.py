"""The contract's output paths, derived from one project root.

Stages hand each other these declared paths, never names rebuilt in two places.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "Paths":
        return cls(Path(root).resolve())

    # data
    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    def split(self, name: str) -> Path:
        """A prepared split: ``train``, ``val`` or ``test`` (JSONL of id/prompt/completion)."""
        return self.prepared / f"{name}.jsonl"

    # models
    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def adapter(self) -> Path:
        return self.outputs / "adapter"

    @property
    def merged(self) -> Path:
        return self.outputs / "merged"

    @property
    def checkpoints(self) -> Path:
        return self.outputs / "checkpoints"

    # reports
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report(self, stage: str) -> Path:
        """``reports/<stage>.json``: the one metrics file each stage owns."""
        return self.reports / f"{stage}.json"

    @property
    def train_log(self) -> Path:
        return self.reports / "train_log.csv"

    @property
    def samples(self) -> Path:
        return self.reports / "samples.jsonl"

    @property
    def label_audit(self) -> Path:
        return self.reports / "label_audit.txt"

    # tracking
    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"
