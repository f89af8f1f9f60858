"""Effective rank of LoRA updates: planted matrices of known rank, energy edges, plateau windows."""

from __future__ import annotations

import pytest
import torch

from loraflow.train import rankcheck
from loraflow.train.rankcheck import effective_rank, module_ranks, plateau, singular_values, summarise


def planted(out: int, inp: int, r: int, true_rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out×r), A (r×in) whose product has exactly ``true_rank`` (B's columns beyond it are zero)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(out, r, generator=g)
    b[:, true_rank:] = 0
    a = torch.randn(r, inp, generator=g)
    return b, a


def test_core_svd_matches_the_full_product():
    b, a = planted(96, 80, 16, 16, seed=1)
    full = torch.linalg.svdvals(b.double() @ a.double())
    core = singular_values(b, a)
    assert core.shape == (16,)
    assert torch.allclose(core, full[:16], rtol=1e-9, atol=1e-9)
    assert full[16:].abs().max() < 1e-9 * full[0]  # the product of rank-16 factors has rank 16


def test_out_narrower_than_r():
    """A 4-wide output (out < r): at most 4 singular values, as the full product has."""
    b, a = planted(4, 50, 16, 16, seed=2)
    core = singular_values(b, a)
    assert core.shape == (4,)
    assert torch.allclose(core, torch.linalg.svdvals(b.double() @ a.double()), rtol=1e-9)


def test_planted_rank_3_in_r16_reads_3():
    # equal singular values make the 90% cut exact: 3 of 3 directions needed, not fewer
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(64, 3, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(48, 3, generator=g, dtype=torch.float64))
    b = torch.zeros(64, 16, dtype=torch.float64)
    a = torch.randn(16, 48, generator=g, dtype=torch.float64) * 1e-3
    b[:, :3] = u * 5.0
    a[:3] = v.T
    sigma = singular_values(b, a)
    assert sigma[:3].tolist() == pytest.approx([5.0, 5.0, 5.0], rel=1e-9)
    assert sigma[3:].abs().max() < 1e-9
    assert effective_rank(sigma) == 3


def test_planted_random_rank_3_reads_at_most_3():
    """Random B·A of rank 3: never more than 3; unequal σ may need only 2 for 90%."""
    b, a = planted(128, 96, 16, 3, seed=4)
    sigma = singular_values(b, a)
    k = effective_rank(sigma)
    assert 2 <= k <= 3
    assert effective_rank(sigma, energy=1.0) == 3  # every non-zero direction
    assert effective_rank(sigma, energy=0.999) == 3


def test_full_rank_random_is_near_r():
    b, a = planted(512, 512, 16, 16, seed=5)
    k = effective_rank(singular_values(b, a))
    # a Gaussian 512×16 · 16×512 has σ within ~2× of each other: 90% needs most of the 16
    assert 12 <= k <= 16, k


def test_energy_threshold_edges():
    assert effective_rank([3.0, 1.0]) == 1  # σ² = 9, 1: exactly 90% with one value
    assert effective_rank([3.0, 1.0001]) == 2  # just under 90% with one
    assert effective_rank([1.0, 3.0]) == 1  # order does not matter
    assert effective_rank([1.0] * 10, energy=0.9) == 9
    assert effective_rank([1.0] * 10, energy=0.91) == 10
    assert effective_rank([0.0, 0.0, 0.0]) == 0  # B still at its zero init
    assert effective_rank([]) == 0
    assert effective_rank([2.0, 0.0, 0.0], energy=1.0) == 1
    with pytest.raises(ValueError):
        effective_rank([1.0], energy=0.0)
    with pytest.raises(ValueError):
        effective_rank([1.0], energy=1.5)


def test_scale_does_not_change_effective_rank():
    b, a = planted(64, 64, 8, 8, seed=6)
    assert effective_rank(singular_values(b, a)) == effective_rank(singular_values(b * 2.0, a * 8.0))


def test_state_dict_names_saved_and_live():
    b1, a1 = planted(32, 32, 8, 2, seed=7)
    b2, a2 = planted(32, 32, 8, 8, seed=8)
    saved = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a1,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b1,
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight": a2,
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight": b2,
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 32),  # not a linear's A/B
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": a2,  # no B: skipped
    }
    ranks = {m.name: m for m in module_ranks(saved)}
    assert sorted(ranks) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert ranks["model.layers.0.self_attn.q_proj"].effective_rank <= 2
    assert ranks["model.layers.0.self_attn.q_proj"].r == 8
    assert ranks["model.layers.0.self_attn.v_proj"].effective_rank >= 5


def log(losses: list[tuple[int, float]]) -> list[dict]:
    return [{"step": s, "loss": x} for s, x in losses]


def test_plateau_from_train_windows():
    # 100 steps logged every 10: the last fifth (81-100) against 61-80
    falling = log([(s, 5.0 - s / 25) for s in range(10, 101, 10)])
    p = plateau(falling)
    assert p.source == "train_loss" and p.window_steps == 20
    assert p.previous == pytest.approx((5 - 70 / 25 + 5 - 80 / 25) / 2)
    assert p.last == pytest.approx((5 - 90 / 25 + 5 - 100 / 25) / 2)
    assert not p.plateaued  # 2.0 -> 1.2: still falling fast

    flat = log([(s, 5.0 - s / 25) for s in range(10, 61, 10)] + [(s, 2.6 - s / 10000) for s in range(70, 101, 10)])
    p = plateau(flat)
    assert p.plateaued and 0 <= p.improvement < rankcheck.PLATEAU_REL


def test_plateau_weights_a_short_last_log_by_its_steps():
    # the log at step 41 covers one step; a window of 5 over (36, 41] is 4 steps of 3.0 and 1 of 8.0
    history = log([(5, 9.0), (10, 8.0), (15, 7.0), (20, 6.0), (25, 5.0), (30, 4.0), (35, 3.5), (40, 3.0), (41, 8.0)])
    p = plateau(history, window=5)
    assert p.last == pytest.approx((3.0 * 4 + 8.0) / 5)
    assert p.previous == pytest.approx((3.5 * 4 + 3.0) / 5)
    assert p.plateaued  # the loss rose


def test_plateau_prefers_evaluations_and_needs_two_windows():
    history = log([(10, 3.0), (20, 2.0)]) + [{"step": 10, "eval_loss": 2.5}, {"step": 20, "eval_loss": 2.49}]
    p = plateau(history)
    assert p.source == "eval_loss" and p.previous == 2.5 and p.last == 2.49 and p.plateaued
    assert plateau(log([(1, 3.0)])) is None
    assert plateau([]) is None
    assert plateau(log([(1, 3.0), (2, 2.0)]), window=5) is None  # 2 steps < two windows of 5


def _modules(rank: int, r: int, n: int = 3) -> list:
    out = []
    for i in range(n):
        b, a = planted(256, 256, r, rank, seed=10 + i)
        out += module_ranks({f"m{i}.lora_A.weight": a, f"m{i}.lora_B.weight": b})
    return out


def test_summary_suggests_a_higher_rank_only_when_saturated_and_flat():
    flat = log([(s, 2.0) for s in range(5, 101, 5)])
    falling = log([(s, 5.0 - s / 25) for s in range(5, 101, 5)])
    # saturated: effective rank 4 of r=4 everywhere (Gaussian 4-wide factors in 256 dims: σ within ~1.7×)
    full = _modules(4, 4)
    assert all(m.effective_rank == 4 for m in full), [m.effective_rank for m in full]
    report = summarise(full, flat, r=4, alpha=8)
    assert report.rank_utilisation == 1.0 and report.effective_rank_mean == 4.0
    assert "lora.r=8" in report.suggestion and "lora.alpha=16" in report.suggestion and "alpha/r = 2" in report.suggestion
    assert summarise(full, falling, r=4, alpha=8).suggestion is None  # still learning: more steps first
    assert summarise(full, [], r=4, alpha=8).suggestion is None  # unknown: no advice

    # a rank-2 update inside r=16 leaves room: no suggestion however flat the loss
    low = _modules(2, 16)
    report = summarise(low, flat, r=16, alpha=32)
    assert report.rank_utilisation <= 2 / 16 and report.suggestion is None

    d = summarise(full, flat, r=4, alpha=8).to_dict()
    assert {"effective_rank_mean", "rank_utilisation", "suggestion", "modules", "plateau"} <= d.keys()
    assert d["modules"][0]["effective_rank"] == 4 and len(d["modules"][0]["singular_values"]) == 4
    assert summarise(full, flat, r=4, alpha=8).metrics() == {
        "adapter_effective_rank_mean": 4.0, "adapter_rank_utilisation": 1.0}


def test_detail_is_left_out_for_many_modules():
    b, a = planted(8, 8, 2, 2)
    many = module_ranks({f"m{i}.lora_{x}.weight": t for i in range(rankcheck.DETAIL_MAX_MODULES + 1)
                         for x, t in (("A", a), ("B", b))})
    d = summarise(many, [], r=2, alpha=4).to_dict()
    assert d["modules_count"] == rankcheck.DETAIL_MAX_MODULES + 1 and "modules" not in d


def test_big_module_never_forms_the_product():
    """A 7B-sized q_proj (4096×4096, r=64): the core SVD is r×r, quick and equal to the planted rank."""
    import time

    b, a = planted(4096, 4096, 64, 10, seed=11)
    t = time.perf_counter()
    k = effective_rank(singular_values(b, a), energy=1.0 - 1e-12)
    assert k == 10
    assert time.perf_counter() - t < 5.0
