"""Chunked top-K and chunked ranks against the full (B, I + 1) score matrix."""

from __future__ import annotations

import pytest
import torch

from torchrec_mamba.serving.topk import ItemSource, chunked_topk
from torchrec_mamba.train.metrics import RankingMetrics, combine_ties, target_ranks


def _full_scores(user: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    scores = user @ table.t()  # (B, I + 1)
    scores[:, 0] = float("-inf")
    return scores


def _case(seed: int, batch: int = 7, items: int = 53, dim: int = 6, integer: bool = False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: exact dot products and many ties
        user = torch.randint(-2, 3, (batch, dim), generator=g).float()
        table = torch.randint(-1, 2, (items + 1, dim), generator=g).float()
    else:
        user = torch.randn(batch, dim, generator=g)
        table = torch.randn(items + 1, dim, generator=g)
    targets = torch.randint(1, items + 1, (batch,), generator=g)
    history = torch.randint(0, items + 1, (batch, 9), generator=g)
    history[0, 3] = targets[0]  # a target that is also in the history stays rankable
    return user, table, targets, history


@pytest.mark.parametrize("chunk", [1, 5, 17, 53, 1000])
@pytest.mark.parametrize("mask_seen", [False, True])
def test_ranks_and_metrics_equal_full_matrix(chunk: int, mask_seen: bool) -> None:
    """Exact scores (integer embeddings, many ties): every rank and metric equals bit for bit."""
    user, table, targets, history = _case(chunk, integer=True)
    out = chunked_topk(
        user, table, k=5, targets=targets, exclude=history if mask_seen else None, chunk_size=chunk
    )
    scores = _full_scores(user, table)
    for ties in ("optimistic", "pessimistic", "average"):
        full = RankingMetrics(ks=(1, 5, 10), mask_seen=mask_seen, ties=ties)
        full.update(scores, targets, history=history)
        chunked = RankingMetrics(ks=(1, 5, 10), ties=ties)
        chunked.update_counts(out.above, out.tied, out.nan)
        assert chunked.compute() == full.compute()
        want = target_ranks(scores, targets, history, mask_seen, ties)
        got = combine_ties(out.above, out.tied, out.nan, ties)
        assert torch.equal(got, want)
    assert int(out.tied.sum()) > 0  # the case really exercises ties


@pytest.mark.parametrize("chunk", [1, 5, 17, 1000])
@pytest.mark.parametrize("mask_seen", [False, True])
def test_float_ranks_match_up_to_rounding(chunk: int, mask_seen: bool) -> None:
    """Float scores: ranks differ from the full matrix only by items within rounding of the target."""
    user, table, targets, history = _case(chunk, batch=64, items=500, dim=16)
    out = chunked_topk(
        user, table, k=5, targets=targets, exclude=history if mask_seen else None, chunk_size=chunk
    )
    scores = _full_scores(user, table)
    want = target_ranks(scores, targets, history, mask_seen)
    got = combine_ties(out.above, out.tied, out.nan)
    t_score = scores.gather(1, targets[:, None])  # (B, 1)
    near = ((scores[:, 1:] - t_score).abs() <= 1e-5 * t_score.abs().clamp(min=1)).sum(1) - 1
    assert ((got - want).abs() <= near).all()
    assert (got == want).double().mean() > 0.9


@pytest.mark.parametrize("chunk", [3, 64])
def test_topk_equals_full_topk(chunk: int) -> None:
    user, table, _, history = _case(1, batch=5, items=200)
    out = chunked_topk(user, table, k=10, chunk_size=chunk)
    want_s, want_i = _full_scores(user, table).topk(10, dim=1)
    assert torch.equal(out.ids, want_i)
    torch.testing.assert_close(out.scores, want_s)
    masked = _full_scores(user, table).scatter(1, history, float("-inf"))
    out = chunked_topk(user, table, k=10, exclude=history, chunk_size=chunk)
    assert torch.equal(out.ids, masked.topk(10, dim=1).indices)
    assert not (out.ids[:, :, None] == history[:, None, :]).any()


def test_fewer_items_than_k_pads_with_id_zero() -> None:
    table = torch.tensor([[5.0], [1.0], [2.0], [3.0]])
    out = chunked_topk(torch.ones(1, 1), table, k=5, exclude=torch.tensor([[2]]))
    assert out.ids.tolist() == [[3, 1, 0, 0, 0]]
    assert torch.isneginf(out.scores[0, 2:]).all()


def test_source_with_padding_row_and_shuffled_ids() -> None:
    """A source may yield id 0 and ids in any order (e.g. the local rows of a shard)."""
    user, table, targets, history = _case(3, items=30)
    perm = torch.randperm(31, generator=torch.Generator().manual_seed(0))  # includes id 0

    def chunks(size: int):
        for start in range(0, 31, size):
            ids = perm[start : start + size]
            yield ids, table[ids]

    src = ItemSource(chunks, lambda ids: table[ids], num_items=30)
    out = chunked_topk(user, src, k=4, targets=targets, exclude=history, chunk_size=7)
    want = target_ranks(_full_scores(user, table), targets, history, mask_seen=True)
    assert torch.equal(out.above.double(), want)
    assert not (out.ids == 0).any()


def test_nan_target_is_a_miss() -> None:
    table = torch.tensor([[0.0], [1.0], [float("nan")], [3.0]])
    out = chunked_topk(torch.ones(1, 1), table, k=1, targets=torch.tensor([2]))
    assert out.nan.tolist() == [True]
    m = RankingMetrics(ks=(10,))
    m.update_counts(out.above, out.tied, out.nan)
    assert m.compute()["hr@10"] == 0.0


def test_from_lookup_reads_every_item_once() -> None:
    table = torch.randn(11, 3)
    seen: list[int] = []

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        seen.extend(ids.tolist())
        return table[ids]

    src = ItemSource.from_lookup(lookup, num_items=10)
    out = chunked_topk(torch.randn(2, 3), src, k=3, chunk_size=4)
    assert sorted(seen) == list(range(1, 11))
    assert out.ids.shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be an int >= 1"),
        ({"chunk_size": 0}, "chunk_size must be an int >= 1"),
        ({"targets": torch.tensor([1, 2, 3])}, r"targets must have shape \(2,\)"),
        ({"targets": torch.tensor([1, 11])}, r"target id 11 out of range \[1, 10\]"),
        ({"targets": torch.tensor([0, 1])}, "target id 0 out of range"),
        ({"exclude": torch.tensor([1, 2])}, r"exclude must be \(2, L\)"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        chunked_topk(torch.randn(2, 3), torch.randn(11, 3), **kwargs)


def test_bad_user_and_table() -> None:
    with pytest.raises(ValueError, match="user must be a floating"):
        chunked_topk(torch.ones(2, 3, dtype=torch.long), torch.randn(11, 3))
    with pytest.raises(ValueError, match="table must be"):
        chunked_topk(torch.randn(2, 3), torch.randn(1, 3))


def test_update_counts_shape_error() -> None:
    with pytest.raises(ValueError, match="above, tied and nan"):
        RankingMetrics().update_counts(torch.zeros(2), torch.zeros(3), torch.zeros(2))
