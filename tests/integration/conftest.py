"""Fixtures of the integration tier."""

from __future__ import annotations

import pytest

from tests.tiny import force_cpu_repack


@pytest.fixture
def cpu_repack_forced(monkeypatch):
    """bitsandbytes' 4-bit CPU repack (docs/traps.md §1) enabled as on an AVX512-BF16 CPU, whatever this CPU is."""
    force_cpu_repack(monkeypatch)


@pytest.fixture(scope="session")
def embedded_base(tmp_path_factory):
    """The embedded base (``model.base: models/base``) as ``ensure_base`` builds it, once per session: ~90 s on
    2 cores. Copy it into a project's ``models/base``; never write to it."""
    from loraflow.model.embedded import build_base

    return build_base(tmp_path_factory.mktemp("embedded") / "base")
