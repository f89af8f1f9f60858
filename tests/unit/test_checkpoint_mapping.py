"""A 4-bit CPU load drops its memory-mapped checkpoint (docs/traps.md §5); a full-precision load keeps it on purpose."""

from __future__ import annotations

import gc
import sys

import pytest

from loraflow.core.config import load_config
from loraflow.core.paths import Paths
from loraflow.model import loading, quant

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _aliasing(model) -> list[str]:
    """Names of the tensors that point into a mapped *.safetensors file."""
    ranges = quant._weight_file_mappings()
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]


def test_4bit_load_keeps_no_view_of_the_checkpoint(tiny_llama, tmp_path):
    import torch

    cfg = load_config(None, [f"model.base={tiny_llama}", "quantization.compute_dtype=float32"])
    paths = Paths.at(tmp_path)
    full = loading.load_model(cfg, paths, quantized=False)
    # fp32 from an fp32 checkpoint: every parameter is the mapped file itself (why LoRA keeps it)
    assert len(_aliasing(full)) == len(list(full.parameters())) > 0
    reference = {n: p.detach().clone() for n, p in full.named_parameters()}
    del full
    gc.collect()
    # mappings of the same file that other tests of this process left alive are not this load's
    before = {(lo, hi) for lo, hi, _, path in quant._weight_file_mappings(detail=True) if str(tiny_llama) in path}

    q = loading.load_model(cfg, paths, quantized=True)
    emb = q.get_input_embeddings().weight
    emb_name = next(n for n, p in q.named_parameters() if p is emb)
    # only the input embedding still views the file (a lookup reads only its batch's rows), through a
    # mapping of its own bytes: the rest of the checkpoint, read to quantize, is no longer mapped
    assert quant.count_4bit_layers(q) == 14 and _aliasing(q) == [emb_name]
    mapped = sum(hi - lo for lo, hi, _, path in quant._weight_file_mappings(detail=True)
                 if str(tiny_llama) in path and (lo, hi) not in before)
    emb_bytes = emb.numel() * emb.element_size()
    assert emb_bytes <= mapped < emb_bytes + 2 * 65536
    checkpoint = tiny_llama / "model.safetensors"
    file_bytes, first = checkpoint.read_bytes(), emb.data[0, 0].clone()
    emb.data[0, 0] = first + 1  # copy-on-write: the process's page changes, never the file
    assert checkpoint.read_bytes() == file_bytes and emb.data[0, 0] == first + 1
    emb.data[0, 0] = first
    # the copies are the same numbers, and a tied head stays tied to its embedding
    for name, p in q.named_parameters():
        if p.dtype == torch.float32 and name in reference:
            assert torch.equal(p, reference[name]), name
    out_emb, in_emb = q.get_output_embeddings(), q.get_input_embeddings()
    assert (out_emb.weight is in_emb.weight) == bool(q.config.tie_word_embeddings)
