"""Full-ranking next-item metrics: HR@K, NDCG@K and MRR@K over all items.

Scores come as ``(B, num_items + 1)``: column 0 is the padding id and is never ranked. The rank of
a target is the number of real items ranked above it (0 = best):

* ``ties="optimistic"`` (default): ``rank = #(score > target score)``, the rule of RecBole-style
  full-sort evaluation as used for the published Mamba4Rec / SASRec numbers;
* ``ties="pessimistic"``: every item tied with the target counts as above it;
* ``ties="average"``: half of the tied items count as above it (the expected rank under a random
  tie-break; the rank may then be fractional).

With real-valued scores from a trained model ties almost never happen and the three rules agree.
They matter for degenerate models: with ``"optimistic"`` a model that gives every item the same
score gets rank 0 everywhere. :class:`RankingMetrics` therefore counts targets that are tied with
another item and logs a warning from ``compute()`` when there are any. A NaN target score is
always a miss.

From the rank ``r``: ``HR@K = [r < K]``, ``NDCG@K = [r < K] / log2(r + 2)`` (one relevant item, so
the ideal DCG is 1), ``MRR@K = [r < K] / (r + 1)``; each is averaged over rows.

Items the user has already seen are NOT masked unless ``mask_seen=True`` (the published protocol
ranks them too); when masking, the target itself always stays rankable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist

__all__ = [
    "RankingMetrics",
    "Ties",
    "combine_ties",
    "metrics_from_ranks",
    "ranking_metrics",
    "target_ranks",
]

logger = logging.getLogger(__name__)

Ties = Literal["optimistic", "pessimistic", "average"]
_TIES = ("optimistic", "pessimistic", "average")
_NAMES = ("hr", "ndcg", "mrr")


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(sorted(set(ks)))
    if not out or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in out):
        raise ValueError(f"ks must be positive ints, got {tuple(ks)!r}")
    return out


def _rank_parts(
    scores: torch.Tensor,
    targets: torch.Tensor,
    history: torch.Tensor | None,
    mask_seen: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, then count items strictly above and tied with the target.

    Returns ``(above, tied, nan)``, each ``(B,)``: int64, int64 and bool.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, num_items + 1), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    batch, width = scores.shape
    if width < 2:
        raise ValueError(
            f"scores need column 0 (padding) plus at least one item, got width {width}"
        )
    if targets.shape != (batch,):
        raise ValueError(f"targets must have shape ({batch},), got {tuple(targets.shape)}")
    targets = targets.to(device=scores.device, dtype=torch.long)  # (B,)
    if batch and (int(targets.min()) < 1 or int(targets.max()) >= width):
        bad = targets[(targets < 1) | (targets >= width)][0]
        raise ValueError(
            f"target id {int(bad)} out of range [1, {width - 1}] (0 is padding; scores have "
            f"{width} columns)"
        )
    if mask_seen:
        if history is None:
            raise ValueError("mask_seen=True needs the history ids (B, L), got None")
        if history.dim() != 2 or history.shape[0] != batch:
            raise ValueError(f"history must be ({batch}, L), got shape {tuple(history.shape)}")
        history = history.to(device=scores.device, dtype=torch.long)  # (B, L)
        if history.numel() and (int(history.min()) < 0 or int(history.max()) >= width):
            raise ValueError(
                f"history ids must be in [0, {width - 1}] (0 = padding), got "
                f"[{int(history.min())}, {int(history.max())}]"
            )
        t_col = targets[:, None]  # (B, 1)
        target_score = scores.gather(1, t_col)  # (B, 1)
        scores = scores.clone().scatter_(1, history, float("-inf"))  # (B, I + 1)
        scores.scatter_(1, t_col, target_score)  # the target stays rankable even if seen
    items = scores[:, 1:]  # (B, I) column 0 (padding) never ranks
    target_score = items.gather(1, (targets - 1)[:, None])  # (B, 1)
    above = (items > target_score).sum(1)  # (B,)
    tied = ((items == target_score).sum(1) - 1).clamp(min=0)  # (B,) not counting the target
    nan = torch.isnan(target_score[:, 0])  # (B,)
    return above, tied, nan


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    history: torch.Tensor | None = None,
    mask_seen: bool = False,
    ties: Ties = "optimistic",
) -> torch.Tensor:
    """0-based rank of each target among all items (column 0 excluded).

    Args:
        scores (torch.Tensor): ``(B, num_items + 1)`` floating scores; column 0 is padding.
        targets (torch.Tensor): ``(B,)`` target ids in ``1..num_items``.
        history (torch.Tensor | None): ``(B, L)`` seen ids, 0-padded; used only with
            ``mask_seen``. Default: None.
        mask_seen (bool): exclude seen items (except the target) from the ranking. Default: False.
        ties (str): ``"optimistic"``, ``"pessimistic"`` or ``"average"``. Default: ``"optimistic"``.

    Example::

        >>> scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.5]])
        >>> target_ranks(scores, torch.tensor([3])).tolist()
        [2.0]
        >>> rules = ("optimistic", "average", "pessimistic")
        >>> [target_ranks(scores, torch.tensor([2]), ties=t).item() for t in rules]
        [0.0, 0.5, 1.0]

    Returns:
        torch.Tensor: ``(B,)`` float64 ranks; ``inf`` (a miss at every K) where the target score
        is NaN.
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    above, tied, nan = _rank_parts(scores, targets, history, mask_seen)
    return combine_ties(above, tied, nan, ties)


def combine_ties(
    above: torch.Tensor, tied: torch.Tensor, nan: torch.Tensor, ties: Ties = "optimistic"
) -> torch.Tensor:
    """0-based ranks from the counts of items above / tied with the target, under a tie rule.

    The counts come from a full score matrix (:func:`target_ranks`) or from a chunked pass over
    the catalogue (:func:`torchrec_mamba.serving.chunked_topk`).

    Args:
        above (torch.Tensor): (B,) items scoring strictly above the target.
        tied (torch.Tensor): (B,) other items scoring equal to the target.
        nan (torch.Tensor): (B,) bool, the target score is NaN.
        ties (str): ``"optimistic"``, ``"pessimistic"`` or ``"average"``. Default: ``"optimistic"``.

    Example::

        >>> combine_ties(torch.tensor([2, 0]), torch.tensor([1, 0]), torch.tensor([False, True]),
        ...              ties="average").tolist()
        [2.5, inf]

    Returns:
        torch.Tensor: (B,) float64 ranks, ``inf`` where ``nan``.
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    rank = above.double()  # (B,)
    if ties == "pessimistic":
        rank = rank + tied
    elif ties == "average":
        rank = rank + 0.5 * tied
    return torch.where(nan, torch.full_like(rank, float("inf")), rank)  # a miss at every K


def metrics_from_ranks(
    ranks: torch.Tensor, ks: Iterable[int] = (5, 10, 20)
) -> dict[str, torch.Tensor]:
    """Per-row HR@K, NDCG@K and MRR@K from 0-based ranks.

    Args:
        ranks (torch.Tensor): ``(B,)`` ranks (0 = best).
        ks (Iterable[int]): cut-offs, each ``>= 1``. Default: ``(5, 10, 20)``.

    Example::

        >>> m = metrics_from_ranks(torch.tensor([0.0, 2.0]), ks=(1, 5))
        >>> [round(v, 4) for v in m["ndcg@5"].tolist()], m["hr@1"].tolist()
        ([1.0, 0.5], [1.0, 0.0])

    Returns:
        dict[str, torch.Tensor]: ``"hr@K"``, ``"ndcg@K"``, ``"mrr@K"`` -> ``(B,)`` float64.
    """
    ranks = ranks.double()  # (B,)
    out: dict[str, torch.Tensor] = {}
    ndcg_all = 1.0 / torch.log2(ranks + 2.0)  # (B,)
    mrr_all = 1.0 / (ranks + 1.0)  # (B,)
    for k in _check_ks(ks):
        hit = (ranks < k).double()  # (B,)
        out[f"hr@{k}"] = hit
        out[f"ndcg@{k}"] = hit * ndcg_all
        out[f"mrr@{k}"] = hit * mrr_all
    return out


def ranking_metrics(
    scores: torch.Tensor,
    targets: torch.Tensor,
    ks: Iterable[int] = (5, 10, 20),
    history: torch.Tensor | None = None,
    mask_seen: bool = False,
    ties: Ties = "optimistic",
) -> dict[str, float]:
    """Mean HR@K / NDCG@K / MRR@K of one batch of full-ranking scores.

    Args:
        scores (torch.Tensor): ``(B, num_items + 1)``; column 0 is padding.
        targets (torch.Tensor): ``(B,)`` target ids.
        ks (Iterable[int]): cut-offs. Default: ``(5, 10, 20)``.
        history (torch.Tensor | None): ``(B, L)`` seen ids for ``mask_seen``. Default: None.
        mask_seen (bool): see :func:`target_ranks`. Default: False.
        ties (str): see :func:`target_ranks`. Default: ``"optimistic"``.

    Example::

        >>> scores = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 3.0, 1.0, 2.0]])
        >>> m = ranking_metrics(scores, torch.tensor([1, 2]), ks=(1,))
        >>> m["hr@1"], m["mrr@1"]
        (0.5, 0.5)

    Returns:
        dict[str, float]: ``"hr@K"``, ``"ndcg@K"``, ``"mrr@K"`` for each K.
    """
    ranks = target_ranks(scores, targets, history, mask_seen, ties)
    return {k: float(v.mean()) for k, v in metrics_from_ranks(ranks, ks).items()}


class RankingMetrics:
    """Accumulate full-ranking metrics over batches; all-reduce the sums across ranks on compute.

    Only sums and counts are kept, so any number of batches can be added with one batch of scores
    in memory at a time. Rows whose ``mask`` is False (rows a distributed loader repeated) are
    not counted.

    Args:
        ks (Iterable[int]): cut-offs. Default: ``(5, 10, 20)``.
        mask_seen (bool): rank only unseen items (plus the target); needs ``history`` in
            :meth:`update`. Default: False.
        ties (str): ``"optimistic"``, ``"pessimistic"`` or ``"average"``; see the module
            docstring. Default: ``"optimistic"``.
        device (torch.device | str | None): where the sums live; default: the device of the
            first scores. Give it when some rank may see no batch before a distributed
            ``compute``. Default: None.

    Example::

        >>> metrics = RankingMetrics(ks=(1, 2))
        >>> metrics.update(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), torch.tensor([3]))
        >>> metrics.update(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), torch.tensor([1]))
        >>> {k: round(v, 4) for k, v in metrics.compute().items()}
        {'hr@1': 0.5, 'ndcg@1': 0.5, 'mrr@1': 0.5, 'hr@2': 1.0, 'ndcg@2': 0.8155, 'mrr@2': 0.75}
    """

    def __init__(
        self,
        ks: Iterable[int] = (5, 10, 20),
        mask_seen: bool = False,
        ties: Ties = "optimistic",
        device: torch.device | str | None = None,
    ) -> None:
        if ties not in _TIES:
            raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
        self.ks = _check_ks(ks)
        self.mask_seen = mask_seen
        self.ties = ties
        self.device = None if device is None else torch.device(device)
        self.keys = [f"{name}@{k}" for k in self.ks for name in _NAMES]
        self._sums: torch.Tensor | None = None  # (len(keys) + 3,): metrics, count, tied, nan

    def reset(self) -> None:
        """Forget every added batch."""
        self._sums = None

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if self._sums is None:
            self._sums = torch.zeros(len(self.keys) + 3, dtype=torch.float64, device=device)
        return self._sums

    @torch.no_grad()
    def update(
        self,
        scores: torch.Tensor,
        targets: torch.Tensor,
        history: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            scores (torch.Tensor): ``(B, num_items + 1)`` floating scores; column 0 is padding.
            targets (torch.Tensor): ``(B,)`` target ids in ``1..num_items``.
            history (torch.Tensor | None): ``(B, L)`` seen ids, 0-padded (e.g.
                ``batch.padded()[0]``); required when ``mask_seen``. Default: None.
            mask (torch.Tensor | None): ``(B,)`` bool, False rows are skipped (``batch.mask``).
                Default: None (all rows count).
        """
        above, tied, nan = _rank_parts(scores, targets, history, self.mask_seen)
        device = self.device if self.device is not None else scores.device
        self._add(above, tied, nan, mask, device)

    @torch.no_grad()
    def update_counts(
        self,
        above: torch.Tensor,
        tied: torch.Tensor,
        nan: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add one batch from rank counts instead of scores (the chunked evaluation path).

        ``mask_seen`` is then the producer's business: pass the history as ``exclude`` to
        :func:`torchrec_mamba.serving.chunked_topk`, whose ``above`` / ``tied`` / ``nan`` this
        takes. The result equals :meth:`update` on the full score matrix.

        Args:
            above (torch.Tensor): (B,) items scoring strictly above the target.
            tied (torch.Tensor): (B,) other items tied with the target.
            nan (torch.Tensor): (B,) bool, NaN target score.
            mask (torch.Tensor | None): (B,) bool, False rows are skipped. Default: None.

        Example::

            >>> m = RankingMetrics(ks=(1,))
            >>> m.update_counts(torch.tensor([0, 3]), torch.tensor([0, 0]), torch.tensor([False, False]))
            >>> m.compute()["hr@1"]
            0.5
        """
        if above.dim() != 1 or tied.shape != above.shape or nan.shape != above.shape:
            raise ValueError(
                "above, tied and nan must be (B,) tensors of one shape, got "
                f"{tuple(above.shape)}, {tuple(tied.shape)}, {tuple(nan.shape)}"
            )
        device = self.device if self.device is not None else above.device
        self._add(above, tied, nan.bool(), mask, device)

    def _add(
        self,
        above: torch.Tensor,
        tied: torch.Tensor,
        nan: torch.Tensor,
        mask: torch.Tensor | None,
        device: torch.device,
    ) -> None:
        ranks = combine_ties(above, tied, nan, self.ties)  # (B,)
        weight = torch.ones_like(ranks)  # (B,)
        if mask is not None:
            if mask.shape != ranks.shape:
                raise ValueError(
                    f"mask must have shape {tuple(ranks.shape)}, got {tuple(mask.shape)}"
                )
            weight = mask.to(device=ranks.device, dtype=torch.float64)
        per_row = metrics_from_ranks(ranks, self.ks)
        rows = torch.stack(
            [per_row[k] for k in self.keys]
            + [torch.ones_like(ranks), (tied > 0).double(), nan.double()]
        )  # (len(keys) + 3, B)
        buf = self._buffer(device)
        buf += (rows * weight).sum(1).to(buf.device)

    @property
    def count(self) -> int:
        """Rows added on this rank (not reduced)."""
        return 0 if self._sums is None else int(self._sums[len(self.keys)])

    def compute(self, process_group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Mean of every metric over all added rows, summed over ranks when distributed.

        When ``torch.distributed`` is initialised this is a collective: every rank of
        ``process_group`` (default: the world) must call it.

        Args:
            process_group (dist.ProcessGroup | None): group to reduce over. Default: None (world).

        Returns:
            dict[str, float]: ``"hr@K"``, ``"ndcg@K"``, ``"mrr@K"`` for each K, in K order.
        """
        distributed = dist.is_available() and dist.is_initialized()
        if self._sums is None:
            device = self.device
            if device is None:
                on_nccl = distributed and dist.get_backend(process_group) == "nccl"
                device = (
                    torch.device("cuda", torch.cuda.current_device())
                    if on_nccl
                    else torch.device("cpu")
                )
            sums = torch.zeros(len(self.keys) + 3, dtype=torch.float64, device=device)
        else:
            sums = self._sums.clone()
        if distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
        values = sums.tolist()
        count, tied, nan = values[len(self.keys) :]
        if count == 0:
            raise ValueError("RankingMetrics.compute() called before any row was added")
        if tied:
            logger.warning(
                "%d of %d targets are tied with another item's score; ties are ranked %s",
                int(tied),
                int(count),
                self.ties,
            )
        if nan:
            logger.warning(
                "%d of %d target scores are NaN (counted as misses)", int(nan), int(count)
            )
        return {k: v / count for k, v in zip(self.keys, values[: len(self.keys)], strict=True)}
