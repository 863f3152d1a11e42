"""Chunked top-K retrieval and target ranks: never a (B, all items) score matrix.

Shape letters: B users, D width, C items in one chunk, K retrieved items, L history length,
I catalogue size.

The item table is read as a stream of ``(ids (C,), embeddings (C, D))`` chunks (an
:class:`ItemSource`), so the same code scores a dense tensor, a memory-mapped file or a table
sharded by ``DistributedModelParallel`` read through its ``EmbeddingCollection`` in chunks
(:func:`ItemSource.from_lookup`). Per chunk it keeps

* a running top-K of ``(score, id)`` (merged with the chunk's own top-K), and
* for evaluation, per user the number of items scoring strictly above the target and tied with
  it, the two counts :func:`torchrec_mamba.train.metrics.combine_ties` turns into the rank under
  the same tie rules as :func:`~torchrec_mamba.train.metrics.target_ranks`.

Peak memory is ``O(B * C)`` whatever ``I`` is. The target's own score is computed once, up front
(``user @ targets.T``), and the target's own column never counts against it. Where scores are
exact (e.g. integer embeddings) the ranks equal the full-matrix ones bit for bit, ties and
seen-item masking included (the tests check it). With float scores a GEMM rounds differently per
matrix shape (MKL gives last-bit differences between a (B, C) chunk and the (B, I) matrix), so an
item within one rounding step of the target's score can flip between "above" and "tied"; the
full-matrix path has the same sensitivity to its own BLAS, and the metrics agree to that level.

Excluded items (``exclude``: e.g. each user's history) score ``-inf`` for that user, except the
user's target, which stays rankable, exactly like ``mask_seen`` in the full-matrix metrics.
Id 0 (padding) never ranks and is never retrieved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ChunkedTopK", "ItemSource", "chunked_topk"]

logger = logging.getLogger(__name__)

Chunks = Iterable[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ItemSource:
    """A catalogue read in chunks: ``chunks(chunk_size)`` and ``lookup(ids)``.

    Args:
        chunks (Callable[[int], Iterable[tuple[Tensor, Tensor]]]): ``chunks(c)`` yields
            ``(ids (C,), embeddings (C, D))`` pairs with ``C <= c`` covering the catalogue once.
        lookup (Callable[[Tensor], Tensor]): ``lookup(ids (n,)) -> (n, D)`` embeddings of ids.
        num_items (int): the largest item id I (ids are ``1..I``; 0 is padding).

    Example::

        >>> table = torch.randn(6, 4)              # row 0 is padding, items 1..5
        >>> src = ItemSource.from_table(table)
        >>> [ids.tolist() for ids, _ in src.chunks(2)]
        [[1, 2], [3, 4], [5]]
        >>> torch.equal(src.lookup(torch.tensor([5])), table[5:6])
        True
    """

    chunks: Callable[[int], Chunks]
    lookup: Callable[[Tensor], Tensor]
    num_items: int

    @staticmethod
    def from_table(table: Tensor) -> ItemSource:
        """A dense ``(I + 1, D)`` table whose row ``i`` is item ``i`` (row 0 padding)."""
        if table.dim() != 2 or table.shape[0] < 2:
            raise ValueError(f"table must be (I + 1, D) with I >= 1, got {tuple(table.shape)}")
        num_items = table.shape[0] - 1

        def chunks(size: int) -> Iterator[tuple[Tensor, Tensor]]:
            for start in range(1, num_items + 1, size):
                stop = min(start + size, num_items + 1)
                yield torch.arange(start, stop, device=table.device), table[start:stop]

        return ItemSource(chunks, lambda ids: table[ids.to(table.device).long()], num_items)

    @staticmethod
    def from_lookup(lookup: Callable[[Tensor], Tensor], num_items: int) -> ItemSource:
        """Items ``1..I`` read through ``lookup`` (e.g. a sharded EC), ``chunk_size`` at a time.

        Example::

            >>> table = torch.randn(6, 4)
            >>> src = ItemSource.from_lookup(lambda ids: table[ids], num_items=5)
            >>> torch.equal(torch.cat([e for _, e in src.chunks(4)]), table[1:])
            True
        """
        if not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be an int >= 1, got {num_items!r}")

        def chunks(size: int) -> Iterator[tuple[Tensor, Tensor]]:
            for start in range(1, num_items + 1, size):
                ids = torch.arange(start, min(start + size, num_items + 1))
                yield ids, lookup(ids)

        return ItemSource(chunks, lookup, num_items)


class ChunkedTopK(NamedTuple):
    """Result of :func:`chunked_topk`.

    Attributes:
        ids (Tensor): (B, K) int64 item ids, best first; 0 where fewer than K items were rankable.
        scores (Tensor): (B, K) their scores; ``-inf`` where ``ids`` is 0.
        above (Tensor | None): (B,) int64 items scoring strictly above the target (with targets).
        tied (Tensor | None): (B,) int64 other items tied with the target.
        nan (Tensor | None): (B,) bool, the target's score is NaN (a miss at every K).
    """

    ids: Tensor
    scores: Tensor
    above: Tensor | None
    tied: Tensor | None
    nan: Tensor | None


def _check_inputs(
    user: Tensor, k: int, chunk_size: int, targets: Tensor | None, exclude: Tensor | None
) -> None:
    if not isinstance(user, Tensor) or user.dim() != 2 or not user.is_floating_point():
        shape = tuple(user.shape) if isinstance(user, Tensor) else type(user).__name__
        raise ValueError(f"user must be a floating (B, D) tensor, got {shape}")
    for name, value in (("k", k), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    batch = user.shape[0]
    if targets is not None and tuple(targets.shape) != (batch,):
        raise ValueError(f"targets must have shape ({batch},), got {tuple(targets.shape)}")
    if exclude is not None and (exclude.dim() != 2 or exclude.shape[0] != batch):
        raise ValueError(f"exclude must be ({batch}, L) ids, got shape {tuple(exclude.shape)}")


def _exclude_pairs(ids: Tensor, exclude: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
    """(row, column) positions in a chunk with ``ids`` (C,) of each row's excluded ids (B, L)."""
    order = torch.argsort(ids)  # (C,)
    sorted_ids = ids[order]
    exclude = exclude.contiguous()  # searchsorted copies (and warns about) a strided input
    pos = torch.searchsorted(sorted_ids, exclude).clamp(max=ids.numel() - 1)  # (B, L)
    hit = sorted_ids[pos] == exclude  # (B, L) the excluded id is in this chunk
    hit &= exclude > 0
    if targets is not None:
        hit &= exclude != targets[:, None]  # the target stays rankable
    rows, cols = hit.nonzero(as_tuple=True)
    return rows, order[pos[rows, cols]]


def chunked_topk(
    user: Tensor,
    items: ItemSource | Tensor,
    k: int = 10,
    *,
    targets: Tensor | None = None,
    exclude: Tensor | None = None,
    chunk_size: int = 65536,
) -> ChunkedTopK:
    """Top-K items by dot product, and optionally each target's rank counts, chunk by chunk.

    Args:
        user (Tensor): (B, D) user representations.
        items (ItemSource | Tensor): the catalogue; a tensor is an ``(I + 1, D)`` table.
        k (int): items to retrieve per user. Default: 10.
        targets (Tensor | None): (B,) target ids in ``1..I``; when given, the result carries
            ``above`` / ``tied`` / ``nan`` for the ranks. Default: None.
        exclude (Tensor | None): (B, L) ids each user must not get (0 = padding, ignored), e.g.
            the history; a user's own target is never excluded. Default: None.
        chunk_size (int): items scored at a time (peak extra memory ``B * chunk_size`` scores).
            Default: 65536.

    Example::

        >>> table = torch.tensor([[0.0], [1.0], [3.0], [2.0], [3.0]])   # item 0 is padding
        >>> out = chunked_topk(torch.tensor([[1.0]]), table, k=2, targets=torch.tensor([3]),
        ...                    chunk_size=2)
        >>> out.ids.tolist(), out.above.tolist(), out.tied.tolist()
        ([[2, 4]], [2], [0])
        >>> chunked_topk(torch.tensor([[1.0]]), table, k=1, exclude=torch.tensor([[2]])).ids
        tensor([[4]])

    Returns:
        ChunkedTopK: ids and scores (B, K); above / tied / nan (B,) when ``targets`` is given.
    """
    _check_inputs(user, k, chunk_size, targets, exclude)
    source = items if isinstance(items, ItemSource) else ItemSource.from_table(items)
    batch, device = user.shape[0], user.device
    if targets is not None:
        targets = targets.to(device=device, dtype=torch.long)
        if batch and (int(targets.min()) < 1 or int(targets.max()) > source.num_items):
            bad = targets[(targets < 1) | (targets > source.num_items)][0]
            raise ValueError(
                f"target id {int(bad)} out of range [1, {source.num_items}] (0 is padding)"
            )
        target_emb = source.lookup(targets).to(device=device, dtype=user.dtype)  # (B, D)
        # the same GEMM kind as the chunks, so a tie with the target compares equal bit for bit
        target_score = torch.mm(user, target_emb.t()).diagonal()[:, None]  # (B, 1)
        above = torch.zeros(batch, dtype=torch.long, device=device)
        same = torch.zeros(batch, dtype=torch.long, device=device)
    if exclude is not None:
        exclude = exclude.to(device=device, dtype=torch.long)
    best_scores = user.new_full((batch, k), float("-inf"))  # (B, K)
    best_ids = torch.zeros(batch, k, dtype=torch.long, device=device)  # (B, K)
    for ids, emb in source.chunks(chunk_size):
        ids = ids.to(device=device, dtype=torch.long)  # (C,)
        scores = torch.mm(user, emb.to(device=device, dtype=user.dtype).t())  # (B, C)
        real = ids > 0  # (C,) padding never ranks
        if not bool(real.all()):
            ids, scores = ids[real], scores[:, real]
        if ids.numel() == 0:
            continue
        if exclude is not None:
            rows, cols = _exclude_pairs(ids, exclude, targets)
            scores[rows, cols] = float("-inf")
        if targets is not None:
            other = ids[None, :] != targets[:, None]  # (B, C) the target never ranks against itself
            above += ((scores > target_score) & other).sum(1)
            same += ((scores == target_score) & other).sum(1)
        top_s, top_i = scores.topk(min(k, ids.numel()), dim=1)  # (B, k')
        merged_s = torch.cat([best_scores, top_s], 1)  # (B, K + k')
        merged_i = torch.cat([best_ids, ids[top_i]], 1)
        best_scores, pick = merged_s.topk(k, dim=1)  # (B, K)
        best_ids = merged_i.gather(1, pick)
    best_ids = best_ids.masked_fill(torch.isneginf(best_scores), 0)
    if targets is None:
        return ChunkedTopK(best_ids, best_scores, None, None, None)
    nan = torch.isnan(target_score[:, 0])  # (B,)
    return ChunkedTopK(best_ids, best_scores, above, same, nan)
