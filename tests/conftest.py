"""Shared fixtures: tiny models built once per session, fresh project roots per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import make_model

# Set before torch loads: spinning OpenMP threads collapse on a shared 2-core box (see loraflow/cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Never reach a hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# compute_dtype auto is bf16 on a CPU with AVX512-BF16 or AMX, fp32 elsewhere: CI machines differ, so the
# suite computes in fp32 everywhere (subprocesses inherit it); tests of the bf16 path ask for it themselves.
os.environ.setdefault("LORAFLOW_CPU_BF16", "0")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and on shared cores extra OpenMP threads spin (10x slower here).

    Modules of tiny-model training ask for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Lazily built tiny models by architecture: ``tiny_models["llama"]`` is a folder."""

    class Lazy(dict):
        def __missing__(self, arch: str) -> Path:
            path = make_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
            self[arch] = path
            return path

    return Lazy()


@pytest.fixture
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]
