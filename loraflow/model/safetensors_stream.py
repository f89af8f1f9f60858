"""Write safetensors checkpoints one tensor at a time: no shard is ever held in memory whole.

``safetensors.torch.save_file`` takes a dict of every tensor of a file, so writing a 5 GB shard costs
5 GB of RAM, and a merge that should need a few tensors' worth would need a shard's. The format is
small and documented (https://github.com/huggingface/safetensors#format): an 8-byte little-endian
header length, a JSON header giving each tensor's dtype, shape and byte offsets, then the raw bytes
in that order. With every name, dtype and shape known up front (a base checkpoint's own headers
say them), the header is written first and each tensor's bytes as the tensor is produced.
safetensors' own ``safe_open`` reads the files back (tests/unit/test_safetensors_stream.py).

    entries = [Entry("lm_head.weight", torch.bfloat16, (32000, 4096)), ...]
    with ShardedWriter(out_dir, entries, max_shard_size=2 * 2**30) as out:
        for e in entries:
            out.write(e.name, make(e))          # in the order of ``entries``
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _dtype_names() -> dict["torch.dtype", str]:
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: "torch.dtype"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        import torch

        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Entries split in order into files of at most ``max_shard_size`` bytes (a larger tensor gets a file
    of its own), as transformers' ``save_pretrained`` shards."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


class FileWriter:
    """One safetensors file: the header at once, then each tensor's bytes, in the order of ``entries``."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        names = _dtype_names()
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for e in entries:
            if e.dtype not in names:
                raise ValueError(f"{e.name}: safetensors has no dtype {e.dtype}")
            header[e.name] = {"dtype": names[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path, self._pending = path, list(reversed(entries))
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._fh.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        import torch

        want = self._pending.pop() if self._pending else None
        if want is None or want.name != name:
            raise ValueError(f"{self.path.name}: expected {want.name if want else 'no more tensors'}, got {name}")
        if tensor.dtype != want.dtype or tuple(tensor.shape) != want.shape:
            raise ValueError(f"{self.path.name}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"declared {want.dtype} {want.shape}")
        # The raw bytes, little-endian as on every platform torch runs on here; a 0-d tensor too.
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))

    def close(self) -> None:
        self._fh.close()
        if self._pending:
            raise ValueError(f"{self.path.name}: {len(self._pending)} tensors never written "
                             f"(first: {self._pending[-1].name})")


class ShardedWriter:
    """A checkpoint folder as the Hub lays it out: ``model.safetensors`` when it fits one file, else
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (total size, weight map)."""

    def __init__(self, folder: Path, entries: list[Entry], max_shard_size: int):
        self.folder = Path(folder)
        self.shards = plan_shards(entries, max_shard_size)
        n = len(self.shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_size = sum(e.nbytes for e in entries)
        self._shard, self._writer = -1, None
        self._left = 0

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if self._writer is not None:
            if kind is None:
                self._writer.close()
            else:
                self._writer._fh.close()
        if kind is None:
            if self._shard != len(self.shards) - 1 or self._left:
                raise ValueError(f"{self.folder}: not every tensor was written")
            if len(self.files) > 1:
                weight_map = {e.name: f for f, shard in zip(self.files, self.shards) for e in shard}
                (self.folder / INDEX_FILE).write_text(
                    json.dumps({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, indent=2)
                    + "\n", encoding="utf-8")

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        if not self._left:  # the next file
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            if self._shard >= len(self.shards):
                raise ValueError(f"{self.folder}: {name} was not declared")
            self._writer = FileWriter(self.folder / self.files[self._shard], self.shards[self._shard])
            self._left = len(self.shards[self._shard])
        self._writer.write(name, tensor)
        self._left -= 1
