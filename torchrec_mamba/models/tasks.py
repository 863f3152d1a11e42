"""Prediction tasks: each owns its loss, its candidates, its metric names and its loss weight.

Shape letters: B batch, L sequence length, D width, T targets in a batch, K ids of the task's
table (items I or categories C), S sampled negatives.

A task predicts the next event's id in one table (``key``) with a *tied* softmax: the candidates
are rows of that table, looked up through the model's ``EmbeddingCollection`` under the feature
``"{key}_candidates"`` (see :mod:`torchrec_mamba.models.tables`). The model asks every task for
its candidate ids before the lookup (:meth:`TiedSoftmaxTask.candidate_ids`) and gives it back
the looked-up rows with the encoder's states (:meth:`TiedSoftmaxTask.loss`), so one code path
serves sharded and unsharded tables.

Candidates are the full table (ids ``1..K``) or, with a :class:`SampledSoftmaxConfig`, the
batch's positives followed by ``S`` negatives drawn from a proposal ``q`` (log-Q corrected).

Loss positions: ``"all"`` trains on every position with a label (label 0 is ignored), like
RecBole's prefix augmentation; ``"last"`` only on each row's final target (the paper's loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from torchrec_mamba.models.heads import (
    FullSoftmaxHead,
    SampledSoftmaxConfig,
    SampledSoftmaxHead,
    check_label_smoothing,
)
from torchrec_mamba.models.tables import CATEGORY, ITEM, SequenceTables, candidate_key
from torchrec_mamba.modules.sequence import gather_last, padding_mask

__all__ = [
    "LossPositions",
    "NextCategoryTask",
    "NextItemTask",
    "TiedSoftmaxTask",
    "check_tasks",
    "last_label",
    "proposal_log_q",
    "select_targets",
]

LossPositions = Literal["all", "last"]


def last_label(values: Tensor, lengths: Tensor) -> Tensor:
    """(T,) jagged labels and (B,) lengths -> (B,) last label of each row (0 for empty rows).

    Example::

        >>> last_label(torch.tensor([4, 5, 6]), torch.tensor([2, 0, 1])).tolist()
        [5, 0, 6]
    """
    lengths = lengths.long()
    out = torch.zeros_like(lengths)  # (B,)
    nonempty = lengths > 0
    last = torch.cumsum(lengths, 0) - 1  # (B,)
    out[nonempty] = values[last[nonempty]].long()
    return out


def loss_targets(label_values: Tensor, lengths: Tensor, positions: LossPositions) -> Tensor:
    """Every target in loss order, 0 where there is none: (T_all,) for "all", (B,) for "last"."""
    if positions == "last":
        return last_label(label_values, lengths)  # (B,)
    return label_values.long()  # (T_all,) row-major, the order of the jagged labels


def select_targets(
    h: Tensor, lengths: Tensor, label_values: Tensor, positions: LossPositions
) -> tuple[Tensor, Tensor]:
    """User vectors and targets of the loss, label 0 dropped.

    Args:
        h (Tensor): (B, L, D) encoder states.
        lengths (Tensor): (B,) int64 lengths.
        label_values (Tensor): (T_all,) jagged labels (same lengths as the inputs).
        positions (str): ``"all"`` or ``"last"``.

    Returns:
        tuple[Tensor, Tensor]: (T, D) users and (T,) targets.
    """
    targets = loss_targets(label_values, lengths, positions)
    if positions == "last":
        user = gather_last(h, lengths)  # (B, D)
    else:
        user = h[padding_mask(lengths, h.shape[1])]  # (T_all, D) row-major, as the labels
    keep = targets > 0
    return user[keep], targets[keep]


def proposal_log_q(num_ids: int, counts: Tensor | None, alpha: float) -> Tensor:
    """(K + 1,) log q with ``q(i) ∝ count(i) ** alpha`` (uniform without counts); q(0) = 0.

    Example::

        >>> [round(p, 4) for p in proposal_log_q(3, torch.tensor([0.0, 1, 1, 2]), 1.0).exp().tolist()]
        [0.0, 0.25, 0.25, 0.5]
    """
    if counts is None:
        q = torch.ones(num_ids + 1, dtype=torch.float64)
    else:
        if counts.shape != (num_ids + 1,):
            raise ValueError(
                f"item_counts must have shape ({num_ids + 1},) (entry 0 = padding), "
                f"got {tuple(counts.shape)}"
            )
        q = counts.double().clamp(min=0) ** alpha
        q = torch.where(q > 0, q, torch.ones_like(q))  # ids never seen keep a little mass
    q[0] = 0.0
    q = q / q.sum()
    return torch.log(q).float()  # (K + 1,), -inf at 0


class TiedSoftmaxTask(nn.Module):
    """Next-event prediction over one table with a tied full or sampled softmax.

    Owns no parameters (the candidates are table rows), so it adds nothing to the state dict.

    Args:
        key (str): the table, feature and label key (``"item"`` or ``"category"``).
        name (str): the task's name, the prefix of its metric names (``"next_item"``).
        num_ids (int): real ids K of the table.
        loss_weight (float): weight of this loss in the model's total loss. Default: 1.0.
        loss_positions (str): ``"all"`` or ``"last"``. Default: ``"all"``.
        sampled_softmax (SampledSoftmaxConfig | None): sampled candidates; None means the full
            softmax over all K ids. Default: None.
        counts (Tensor | None): (K + 1,) training frequency of each id, for the popularity
            proposal of the sampled softmax; None means uniform. Default: None.
        logits_dtype (torch.dtype | None): dtype of the full softmax's training product (see
            :class:`~torchrec_mamba.models.heads.FullSoftmaxHead`). Default: None.
        targets_per_row (float | None): None averages the loss over the batch's targets
            ("batch" normalisation). A number N divides the summed loss by ``rows * N``
            instead ("global"): with N the mean targets per training row, every target weighs
            the same whatever the batch's mix of lengths, as in a randomly batched epoch, also
            when length-bucketed batches hold 20x more targets than others. Default: None.
        label_smoothing (float): label smoothing of the full softmax (see
            :class:`~torchrec_mamba.models.heads.FullSoftmaxHead`); must be 0 with a sampled
            softmax. Default: 0.0.
    """

    def __init__(
        self,
        key: str,
        name: str,
        num_ids: int,
        loss_weight: float = 1.0,
        loss_positions: LossPositions = "all",
        sampled_softmax: SampledSoftmaxConfig | None = None,
        counts: Tensor | None = None,
        logits_dtype: torch.dtype | None = None,
        targets_per_row: float | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_label_smoothing(label_smoothing)
        if label_smoothing > 0 and sampled_softmax is not None:
            raise ValueError(f"{name}: label_smoothing={label_smoothing} needs the full softmax "
                             "(it is not defined over sampled negatives); set it to 0 or drop "
                             "sampled_softmax")
        if targets_per_row is not None and not (
            isinstance(targets_per_row, (int, float)) and math.isfinite(targets_per_row)
            and targets_per_row > 0
        ):
            raise ValueError(f"{name}: targets_per_row must be finite and > 0, got {targets_per_row!r}")
        if not isinstance(num_ids, int) or isinstance(num_ids, bool) or num_ids < 1:
            raise ValueError(f"{name}: num_ids must be an int >= 1, got {num_ids!r}")
        if not isinstance(loss_weight, (int, float)) or not math.isfinite(loss_weight) or loss_weight < 0:
            raise ValueError(f"{name}: loss_weight must be finite and >= 0, got {loss_weight!r}")
        if loss_positions not in ("all", "last"):
            raise ValueError(f"{name}: loss_positions must be 'all' or 'last', got {loss_positions!r}")
        self.key = key
        self.candidate_key = candidate_key(key)
        self.name = name
        self.num_ids = num_ids
        self.loss_weight = float(loss_weight)
        self.loss_positions: LossPositions = loss_positions
        self.sampled_softmax = sampled_softmax
        self.targets_per_row = None if targets_per_row is None else float(targets_per_row)
        self.head: nn.Module = (
            FullSoftmaxHead(logits_dtype, label_smoothing)
            if sampled_softmax is None
            else SampledSoftmaxHead(sampled_softmax)
        )
        # plain attribute: derived from data, not a learnt state
        self.log_q: Tensor | None = (
            None
            if sampled_softmax is None
            else proposal_log_q(num_ids, counts, sampled_softmax.proposal_alpha)
        )

    def metric_names(self, ks: tuple[int, ...] = (5, 10, 20)) -> list[str]:
        """``"{name}/{hr|ndcg|mrr}@K"`` for every K, the keys of this task's metrics."""
        return [f"{self.name}/{m}@{k}" for k in ks for m in ("hr", "ndcg", "mrr")]

    def candidate_ids(self, label_values: Tensor, lengths: Tensor, device: torch.device) -> Tensor:
        """Ids to look up under :attr:`candidate_key` for one batch.

        Args:
            label_values (Tensor): (T_all,) this task's jagged labels.
            lengths (Tensor): (B,) their lengths.
            device (torch.device): where the ids go.

        Returns:
            Tensor: (K,) ids ``1..K`` (full softmax) or (T + S,) positives then negatives.
        """
        if self.sampled_softmax is None:
            return torch.arange(1, self.num_ids + 1, device=device)  # (K,)
        targets = loss_targets(label_values, lengths, self.loss_positions)
        positives = targets[targets > 0]  # (T,) the order of select_targets
        q = self._log_q().double().exp()  # (K + 1,)
        negatives = torch.multinomial(q, self.sampled_softmax.num_negatives, replacement=True)
        return torch.cat([positives, negatives.to(device)])  # (T + S,)

    def _log_q(self) -> Tensor:
        if self.log_q is None:
            raise RuntimeError(f"{self.name}: sampled softmax without a proposal (log_q)")
        return self.log_q

    def loss(
        self,
        user: Tensor,
        targets: Tensor,
        candidates: Tensor,
        ids: Tensor,
        num_rows: int | None = None,
    ) -> Tensor:
        """Loss of the targets against the looked-up candidates (normalised as configured).

        Args:
            user (Tensor): (T, D) from :func:`select_targets`.
            targets (Tensor): (T,) ids in ``1..K``.
            candidates (Tensor): (K, D) or (T + S, D) rows of :meth:`candidate_ids`.
            ids (Tensor): the ids that were looked up, as :meth:`candidate_ids` gave them.
            num_rows (int | None): rows B of the batch, needed with ``targets_per_row``.
                Default: None.

        Returns:
            Tensor: scalar (0 when T == 0, still differentiable).
        """
        mean = self._mean_loss(user, targets, candidates, ids)
        if self.targets_per_row is None:
            return mean
        if num_rows is None:
            raise ValueError(f"{self.name}: targets_per_row normalisation needs num_rows")
        # mean * T / (B * N) == sum / (B * N): each target has the same weight in every batch
        return mean * (targets.numel() / (max(num_rows, 1) * self.targets_per_row))

    def _mean_loss(self, user: Tensor, targets: Tensor, candidates: Tensor, ids: Tensor) -> Tensor:
        if self.sampled_softmax is None:
            return self.head(user, candidates, targets)
        num_pos = targets.numel()
        return self.head(
            user,
            candidates[:num_pos],  # (T, D)
            candidates[num_pos:],  # (S, D)
            targets,
            ids[num_pos:],  # (S,)
            self._log_q().to(user.device),
        )

    @staticmethod
    def scores(user: Tensor, candidates: Tensor) -> Tensor:
        """Full-ranking scores (B, K + 1), column 0 (padding) ``-inf`` (see ``FullSoftmaxHead``)."""
        return FullSoftmaxHead.scores(user, candidates.to(user.device))

    def extra_repr(self) -> str:
        kind = "full" if self.sampled_softmax is None else f"sampled({self.sampled_softmax.num_negatives})"
        return (f"key={self.key!r}, num_ids={self.num_ids}, loss_weight={self.loss_weight}, "
                f"loss_positions={self.loss_positions!r}, softmax={kind}")


class NextItemTask(TiedSoftmaxTask):
    """Next item over the item table; metrics ``next_item/...``.

    Args:
        num_items (int): number of items I.
        loss_weight (float): Default: 1.0.
        loss_positions (str): ``"all"`` or ``"last"``. Default: ``"all"``.
        sampled_softmax (SampledSoftmaxConfig | None): Default: None (full softmax).
        item_counts (Tensor | None): (I + 1,) training counts for the proposal. Default: None.
        logits_dtype (torch.dtype | None): see :class:`TiedSoftmaxTask`. Default: None.
        targets_per_row (float | None): see :class:`TiedSoftmaxTask`. Default: None.
        label_smoothing (float): see :class:`TiedSoftmaxTask`. Default: 0.0.

    Example::

        >>> task = NextItemTask(num_items=5)
        >>> task.candidate_ids(torch.tensor([2, 3]), torch.tensor([2]), torch.device("cpu")).tolist()
        [1, 2, 3, 4, 5]
        >>> task.metric_names((10,))
        ['next_item/hr@10', 'next_item/ndcg@10', 'next_item/mrr@10']
    """

    def __init__(
        self,
        num_items: int,
        loss_weight: float = 1.0,
        loss_positions: LossPositions = "all",
        sampled_softmax: SampledSoftmaxConfig | None = None,
        item_counts: Tensor | None = None,
        logits_dtype: torch.dtype | None = None,
        targets_per_row: float | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            ITEM, "next_item", num_items, loss_weight, loss_positions, sampled_softmax, item_counts,
            logits_dtype, targets_per_row, label_smoothing,
        )


class NextCategoryTask(TiedSoftmaxTask):
    """Next category over the category table (full softmax); metrics ``next_category/...``.

    Args:
        num_categories (int): number of categories C.
        loss_weight (float): Default: 1.0.
        loss_positions (str): ``"all"`` or ``"last"``. Default: ``"all"``.
        targets_per_row (float | None): see :class:`TiedSoftmaxTask`. Default: None.

    Example::

        >>> NextCategoryTask(num_categories=4, loss_weight=0.5).candidate_key
        'category_candidates'
    """

    def __init__(
        self,
        num_categories: int,
        loss_weight: float = 1.0,
        loss_positions: LossPositions = "all",
        targets_per_row: float | None = None,
    ) -> None:
        super().__init__(CATEGORY, "next_category", num_categories, loss_weight, loss_positions,
                         targets_per_row=targets_per_row)


def check_tasks(tables: SequenceTables, tasks: Sequence[TiedSoftmaxTask]) -> None:
    """Raise ``ValueError`` unless the tasks fit the tables and something is trained."""
    if not tasks:
        raise ValueError("a SequentialRecommender needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names: {names}")
    for t in tasks:
        if not isinstance(t, TiedSoftmaxTask):
            raise TypeError(f"tasks must be TiedSoftmaxTask, got {type(t).__name__}")
        if t.key not in tables.keys:
            raise ValueError(f"task {t.name!r} needs table {t.key!r}; the tables are {tables.keys}")
        if t.num_ids != tables.num_ids(t.key):
            raise ValueError(
                f"task {t.name!r} has num_ids={t.num_ids} but table {t.key!r} has "
                f"{tables.num_ids(t.key)} ids"
            )
    if all(t.loss_weight == 0 for t in tasks):
        raise ValueError("every task has loss_weight 0: nothing to train")
