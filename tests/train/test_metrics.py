"""Full-ranking metrics against hand-computed and plain-Python rankings."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchrec_mamba.train.metrics import (
    RankingMetrics,
    metrics_from_ranks,
    ranking_metrics,
    target_ranks,
)


def _python_rank(row: list[float], target: int, ties: str, seen: set[int] = frozenset()) -> float:  # type: ignore[assignment]
    """Rank among columns 1.. of ``row``, skipping seen items other than the target."""
    t = row[target]
    if math.isnan(t):
        return math.inf
    others = [s for j, s in enumerate(row) if j >= 1 and j != target and j not in seen]
    above = sum(s > t for s in others)
    tied = sum(s == t for s in others)
    return above + {"optimistic": 0.0, "pessimistic": tied, "average": tied / 2}[ties]


def _python_metrics(ranks: list[float], ks: tuple[int, ...]) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"hr@{k}"] = sum(r < k for r in ranks) / len(ranks)
        out[f"ndcg@{k}"] = sum(1 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
        out[f"mrr@{k}"] = sum(1 / (r + 1) for r in ranks if r < k) / len(ranks)
    return out


def test_hand_computed_example() -> None:
    # 6 items; column 0 (padding) has the largest score and must not count
    scores = torch.tensor(
        [
            [100.0, 0.9, 0.1, 0.8, 0.7, 0.2, 0.3],  # target 1: best -> rank 0
            [100.0, 0.9, 0.1, 0.8, 0.7, 0.2, 0.3],  # target 4 (0.7): 0.9, 0.8 above -> rank 2
            [100.0, 0.9, 0.1, 0.8, 0.7, 0.2, 0.3],  # target 2 (0.1): worst -> rank 5
        ]
    )
    targets = torch.tensor([1, 4, 2])
    torch.testing.assert_close(
        target_ranks(scores, targets), torch.tensor([0.0, 2.0, 5.0], dtype=torch.float64)
    )
    m = ranking_metrics(scores, targets, ks=(1, 5, 10))
    expected = {
        "hr@1": 1 / 3,
        "ndcg@1": 1 / 3,
        "mrr@1": 1 / 3,
        "hr@5": 2 / 3,
        "ndcg@5": (1 + 1 / math.log2(4)) / 3,  # = 0.5
        "mrr@5": (1 + 1 / 3) / 3,
        "hr@10": 1.0,
        "ndcg@10": (1 + 0.5 + 1 / math.log2(7)) / 3,
        "mrr@10": (1 + 1 / 3 + 1 / 6) / 3,
    }
    assert m.keys() == expected.keys()
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_ties_rules() -> None:
    # target 2 (0.5) ties with items 3 and 5; item 1 is above
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.5, 0.1, 0.5]])
    t = torch.tensor([2])
    assert target_ranks(scores, t, ties="optimistic").item() == 1.0
    assert target_ranks(scores, t, ties="average").item() == 2.0
    assert target_ranks(scores, t, ties="pessimistic").item() == 3.0
    constant = torch.zeros(2, 6)
    # a constant model is perfect under the optimistic rule and worst under the pessimistic one
    assert ranking_metrics(constant, torch.tensor([1, 5]), ks=(1,))["hr@1"] == 1.0
    assert (
        ranking_metrics(constant, torch.tensor([1, 5]), ks=(1,), ties="pessimistic")["hr@1"] == 0.0
    )


def test_column_zero_never_counts() -> None:
    base = torch.tensor([[0.0, 0.2, 0.4, 0.1]])
    big = base.clone()
    big[0, 0] = 1e9
    for t in (1, 2, 3):
        target = torch.tensor([t])
        assert target_ranks(base, target).item() == target_ranks(big, target).item()
    # a target equal to the padding score is not tied with it
    tie_pad = torch.tensor([[0.4, 0.2, 0.4, 0.1]])
    assert target_ranks(tie_pad, torch.tensor([2]), ties="pessimistic").item() == 0.0


def test_mask_seen() -> None:
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    history = torch.tensor([[1, 3, 0, 0]])  # 0 = padding
    t = torch.tensor([4])
    assert target_ranks(scores, t).item() == 3.0  # 1, 2, 3 above
    assert target_ranks(scores, t, history, mask_seen=True).item() == 1.0  # only 2 above
    # the target itself stays rankable even if it is in the history
    seen_target = torch.tensor([[4, 1, 2, 3]])
    assert target_ranks(scores, t, seen_target, mask_seen=True).item() == 0.0
    # scores are not modified in place
    torch.testing.assert_close(scores, torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.5]]))


def test_nan_target_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    scores = torch.tensor([[0.0, float("nan"), 0.2], [0.0, 0.1, 0.2]])
    ranks = target_ranks(scores, torch.tensor([1, 2]))
    torch.testing.assert_close(ranks, torch.tensor([math.inf, 0.0], dtype=torch.float64))
    metrics = RankingMetrics(ks=(5,))
    metrics.update(scores, torch.tensor([1, 2]))
    with caplog.at_level(logging.WARNING):
        assert metrics.compute()["hr@5"] == 0.5
    assert "1 of 2 target scores are NaN" in caplog.text


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic", "average"])
@pytest.mark.parametrize("mask_seen", [False, True])
def test_random_against_python_reference(ties: str, mask_seen: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, items = 40, 30
    # few distinct values so that ties are frequent
    scores = torch.randint(0, 6, (batch, items + 1), generator=gen).float()
    targets = torch.randint(1, items + 1, (batch,), generator=gen)
    history = torch.randint(0, items + 1, (batch, 7), generator=gen)
    ranks = target_ranks(scores, targets, history, mask_seen=mask_seen, ties=ties)  # type: ignore[arg-type]
    expected = [
        _python_rank(
            scores[b].tolist(),
            int(targets[b]),
            ties,
            set(history[b].tolist()) - {0} if mask_seen else set(),
        )
        for b in range(batch)
    ]
    torch.testing.assert_close(ranks, torch.tensor(expected, dtype=torch.float64))
    ks = (1, 5, 10, 20)
    got = ranking_metrics(scores, targets, ks, history, mask_seen, ties)  # type: ignore[arg-type]
    want = _python_metrics(expected, ks)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_accumulator_equals_one_shot_and_honours_mask(caplog: pytest.LogCaptureFixture) -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(50, 21, generator=gen)
    targets = torch.randint(1, 21, (50,), generator=gen)
    metrics = RankingMetrics(ks=(1, 5, 10))
    for start in range(0, 50, 16):  # chunks of 16, 16, 16, 2
        metrics.update(scores[start : start + 16], targets[start : start + 16])
    assert metrics.count == 50
    one_shot = ranking_metrics(scores, targets, ks=(1, 5, 10))
    got = metrics.compute()
    assert list(got) == [
        "hr@1",
        "ndcg@1",
        "mrr@1",
        "hr@5",
        "ndcg@5",
        "mrr@5",
        "hr@10",
        "ndcg@10",
        "mrr@10",
    ]
    for key in one_shot:
        assert got[key] == pytest.approx(one_shot[key], abs=1e-12)
    # repeated rows (mask False) are ignored: adding a masked copy changes nothing
    metrics.update(scores[:10], targets[:10], mask=torch.zeros(10, dtype=torch.bool))
    assert metrics.compute() == pytest.approx(got)
    metrics.reset()
    with pytest.raises(ValueError, match="before any row was added"):
        metrics.compute()
    tied = RankingMetrics(ks=(1,))
    tied.update(torch.zeros(3, 4), torch.tensor([1, 2, 3]))
    with caplog.at_level(logging.WARNING):
        tied.compute()
    assert "3 of 3 targets are tied" in caplog.text


def test_metrics_from_ranks_k1() -> None:
    m = metrics_from_ranks(torch.tensor([0.0, 1.0, 0.0]), ks=(1,))
    torch.testing.assert_close(m["hr@1"], torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(m["ndcg@1"], m["hr@1"])


def test_errors() -> None:
    scores = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"target id 0 out of range \[1, 4\]"):
        target_ranks(scores, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"target id 5 out of range \[1, 4\]"):
        target_ranks(scores, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\)"):
        target_ranks(scores, torch.tensor([1]))
    with pytest.raises(ValueError, match="scores must be"):
        target_ranks(torch.zeros(5), torch.tensor([1]))
    with pytest.raises(TypeError, match="scores must be floating point, got torch.int64"):
        target_ranks(torch.zeros(2, 5, dtype=torch.long), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="mask_seen=True needs the history"):
        target_ranks(scores, torch.tensor([1, 1]), mask_seen=True)
    with pytest.raises(ValueError, match=r"history ids must be in \[0, 4\]"):
        target_ranks(scores, torch.tensor([1, 1]), torch.tensor([[9], [1]]), mask_seen=True)
    with pytest.raises(ValueError, match="ties must be one of"):
        target_ranks(scores, torch.tensor([1, 1]), ties="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ks must be positive ints"):
        RankingMetrics(ks=(0, 5))
    with pytest.raises(ValueError, match=r"mask must have shape \(2,\)"):
        RankingMetrics().update(scores, torch.tensor([1, 1]), mask=torch.ones(3, dtype=torch.bool))


def _worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        gen = torch.Generator().manual_seed(7)
        scores = torch.randn(12, 9, generator=gen)
        targets = torch.randint(1, 9, (12,), generator=gen)
        metrics = RankingMetrics(ks=(1, 3))
        mine = slice(0, 7) if rank == 0 else slice(7, 12)  # uneven shares
        metrics.update(scores[mine], targets[mine])
        got = metrics.compute()
        if rank == 0:
            torch.save(got, result_file)
    finally:
        dist.destroy_process_group()


def test_distributed_compute_sums_over_ranks(tmp_path: Path) -> None:
    result = tmp_path / "result.pt"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2, join=True)
    got = torch.load(result)
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(12, 9, generator=gen)
    targets = torch.randint(1, 9, (12,), generator=gen)
    expected = ranking_metrics(scores, targets, ks=(1, 3))
    assert got == pytest.approx(expected)
