"""The streaming safetensors writer: files that safetensors and transformers read back bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from loraflow.model.safetensors_stream import INDEX_FILE, SINGLE_FILE, Entry, FileWriter, ShardedWriter, plan_shards


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=g),
        "c.half": torch.randn(2, 3, 4, generator=g).half(),
        "d.ids": torch.arange(6, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
    }


def _entries(tensors: dict[str, torch.Tensor]) -> list[Entry]:
    return [Entry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def _read(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out |= {k: fh.get_tensor(k) for k in fh.keys()}
    return out


def test_one_file_reads_back_bit_for_bit(tmp_path):
    tensors = _tensors()
    with ShardedWriter(tmp_path, _entries(tensors), max_shard_size=2**30) as out:
        for k, v in tensors.items():
            out.write(k, v)
    assert [p.name for p in tmp_path.iterdir()] == [SINGLE_FILE]
    back = _read(tmp_path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_shards_and_index_like_the_hubs(tmp_path):
    tensors = _tensors()
    entries = _entries(tensors)
    with ShardedWriter(tmp_path, entries, max_shard_size=80) as out:
        for k, v in tensors.items():
            out.write(k, v)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == len(plan_shards(entries, 80)) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    for f in files:  # every shard within the limit unless one tensor alone is larger
        with safe_open(str(tmp_path / f), framework="pt") as fh:
            sizes = [fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys()]
        assert sum(sizes) <= 80 or len(sizes) == 1
    back = _read(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_a_tensor_out_of_order_or_of_another_shape_is_refused(tmp_path):
    tensors = _tensors()
    w = FileWriter(tmp_path / "x.safetensors", _entries(tensors))
    with pytest.raises(ValueError, match="expected a.weight, got b.bias"):
        w.write("b.bias", tensors["b.bias"])
    w = FileWriter(tmp_path / "y.safetensors", _entries(tensors))
    with pytest.raises(ValueError, match=r"a.weight is torch.float32 \(7, 5\), declared torch.bfloat16"):
        w.write("a.weight", tensors["a.weight"].float())
    w = FileWriter(tmp_path / "z.safetensors", _entries(tensors))
    w.write("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="5 tensors never written"):
        w.close()
