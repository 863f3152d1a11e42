"""Leave-one-out train / valid / test split of per-user sequences (the SASRec / RecBole protocol).

For a user with sequence ``s`` of length ``n >= 3``:

* test: history ``s[:-1]``, target ``s[-1]``;
* valid: history ``s[:-2]``, target ``s[-2]``;
* train: the sequence ``s[:-2]``; with the all-position loss, input ``s[:-3]`` and at every
  position the next item as label (``s[1:-2]``). This trains on every prefix of ``s[:-2]``, which
  for a causal encoder is the same set of (prefix, next item) pairs as RecBole's prefix
  augmentation.

Users with ``n < 3`` cannot give both a validation and a test target. They are used for training
only, with their whole sequence (``n == 2`` gives one training pair, ``n == 1`` none), and are
counted in ``SplitData.stats["short_users"]``.

Every row of every part is stored as a *window* ``w``: the model input is ``w[:-1]`` and the labels
are ``w[1:]``, so the last label is the row's target. Windows keep the last ``max_len + 1`` ids of
the sequence, so inputs hold at most ``max_len`` ids (the most recent ones, as SASRec and
Mamba4Rec truncate); how many rows were truncated is counted in ``stats``. Training rows with
fewer than 2 ids (no pair) are left out and counted in ``stats["train_rows_without_pairs"]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from torchrec_mamba.data.readers import SequenceData

__all__ = ["SplitPart", "SplitData", "leave_one_out", "windows_from_sequences"]

logger = logging.getLogger(__name__)


@dataclass
class SplitPart:
    """One part of a split: windows stored flat (CSR), ready for fast batching.

    Row ``r`` is ``values[offsets[r]:offsets[r + 1]]``: input ``w[:-1]``, labels ``w[1:]``.

    Args:
        name (str): ``"train"``, ``"valid"`` or ``"test"`` (or any name; only ``"train"``
            marks a training part).
        values (np.ndarray): ``(T,)`` int64 concatenated windows, ids in ``1..num_items``.
        offsets (np.ndarray): ``(R + 1,)`` int64 row starts, ``offsets[0] == 0``.
        user_index (np.ndarray): ``(R,)`` int64 row of each window in ``SequenceData.sequences``.
        num_items (int): number of items (largest valid id).
        max_len (int): the largest input length.
        item_category (np.ndarray | None): ``(num_items + 1,)`` dense category of each item.
            Default: None.
        num_categories (int): number of categories. Default: 0.

    Example::

        >>> part = windows_from_sequences("test", [np.array([1, 2, 3]), np.array([4, 5])],
        ...                               num_items=5, max_len=1)
        >>> len(part), part.row(0).tolist(), part.targets().tolist()
        (2, [2, 3], [3, 5])
    """

    name: str
    values: np.ndarray
    offsets: np.ndarray
    user_index: np.ndarray
    num_items: int
    max_len: int
    item_category: np.ndarray | None = None
    num_categories: int = 0

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0:
            raise ValueError(f"{self.name}: offsets must be 1-D and start at 0")
        if int(self.offsets[-1]) != len(self.values):
            raise ValueError(
                f"{self.name}: offsets end at {int(self.offsets[-1])} but there are "
                f"{len(self.values)} values"
            )
        if len(self.user_index) != len(self):
            raise ValueError(f"{self.name}: {len(self.user_index)} user ids for {len(self)} rows")
        lengths = np.diff(self.offsets)
        if len(lengths) and (lengths.min() < 2 or lengths.max() > self.max_len + 1):
            raise ValueError(
                f"{self.name}: window lengths must be in [2, max_len + 1 = {self.max_len + 1}], "
                f"got [{int(lengths.min())}, {int(lengths.max())}]"
            )
        if len(self.values) and (self.values.min() < 1 or self.values.max() > self.num_items):
            raise ValueError(
                f"{self.name}: ids must be in [1, {self.num_items}], got "
                f"[{int(self.values.min())}, {int(self.values.max())}]"
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def is_train(self) -> bool:
        """Whether this is a training part (rows are shuffled there; labels are all used)."""
        return self.name == "train"

    @property
    def lengths(self) -> np.ndarray:
        """``(R,)`` window lengths (input length + 1)."""
        return np.diff(self.offsets)

    def row(self, r: int) -> np.ndarray:
        """Window ``r``: ids ``(len,)``, input ``[:-1]``, labels ``[1:]``."""
        return self.values[self.offsets[r] : self.offsets[r + 1]]

    def targets(self) -> np.ndarray:
        """``(R,)`` the last id of every window: the item to predict after the input."""
        return self.values[self.offsets[1:] - 1]

    @property
    def num_pairs(self) -> int:
        """Number of (input position, label) pairs: ``sum(lengths - 1)``."""
        return int(self.offsets[-1] - len(self))


@dataclass
class SplitData:
    """Result of :func:`leave_one_out`.

    Args:
        train (SplitPart): training windows.
        valid (SplitPart): validation windows (one per user with ``n >= 3``).
        test (SplitPart): test windows (the same users as ``valid``).
        num_items (int): number of items.
        max_len (int): the largest input length.
        stats (dict[str, int]): counts, see :func:`leave_one_out`.
    """

    train: SplitPart
    valid: SplitPart
    test: SplitPart
    num_items: int
    max_len: int
    stats: dict[str, int] = field(default_factory=dict)


def windows_from_sequences(
    name: str,
    sequences: list[np.ndarray],
    num_items: int,
    max_len: int,
    user_index: np.ndarray | None = None,
    item_category: np.ndarray | None = None,
    num_categories: int = 0,
) -> SplitPart:
    """Make a part from sequences: each becomes its last ``max_len + 1`` ids; rows shorter than 2 are dropped.

    Args:
        name (str): part name.
        sequences (list[np.ndarray]): int64 id arrays in ``1..num_items``.
        num_items (int): number of items.
        max_len (int): the largest input length, ``>= 1``.
        user_index (np.ndarray | None): ``(len(sequences),)`` user row of each sequence.
            Default: ``0..len(sequences)-1``.
        item_category (np.ndarray | None): see :class:`SplitPart`. Default: None.
        num_categories (int): see :class:`SplitPart`. Default: 0.

    Returns:
        SplitPart: with ``len <= len(sequences)`` rows (the dropped ones had no pair).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if user_index is None:
        user_index = np.arange(len(sequences), dtype=np.int64)
    full = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    keep = full >= 2
    lengths = np.minimum(full[keep], max_len + 1)
    kept = [s for s, k in zip(sequences, keep, strict=True) if k]
    values = (
        np.concatenate(
            [s[len(s) - n :] for s, n in zip(kept, lengths.tolist(), strict=True)]
        ).astype(np.int64)
        if kept
        else np.zeros(0, dtype=np.int64)
    )
    offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
    return SplitPart(
        name=name,
        values=values,
        offsets=offsets,
        user_index=np.asarray(user_index, dtype=np.int64)[keep],
        num_items=num_items,
        max_len=max_len,
        item_category=item_category,
        num_categories=num_categories,
    )


def leave_one_out(data: SequenceData, max_len: int, require_eval: bool = True) -> SplitData:
    """Split each user's sequence into train / valid / test by leave-one-out in time order.

    Args:
        data (SequenceData): the sequences (no empty ones).
        max_len (int): the largest input length (history length), ``>= 1``.
        require_eval (bool): raise ``ValueError`` when no user has 3 events (nothing would be
            left to validate or test), saying how many users were too short. Default: True.

    Example::

        >>> data = SequenceData.from_lists([[1, 2, 3, 4, 5], [6, 7]])
        >>> split = leave_one_out(data, max_len=2)
        >>> [split.train.row(r).tolist() for r in range(len(split.train))]
        [[1, 2, 3], [6, 7]]
        >>> split.valid.row(0).tolist(), split.test.row(0).tolist()
        ([2, 3, 4], [3, 4, 5])
        >>> split.stats["short_users"]
        1
        >>> leave_one_out(SequenceData.from_lists([[1, 2], [3]], source="tiny.txt"), max_len=2)
        Traceback (most recent call last):
        ...
        ValueError: tiny.txt: nothing left to evaluate: all 2 users have fewer than 3 events (1 with 2, 1 with 1); leave-one-out needs 3 per user (train, valid, test targets)

    Returns:
        SplitData: ``stats`` holds ``users``, ``eval_users`` (users with ``n >= 3``),
        ``short_users`` (``n < 3``, training only), ``train_rows_without_pairs``,
        ``truncated_train`` / ``truncated_valid`` / ``truncated_test`` (rows whose window lost
        older ids to ``max_len``).
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    lengths = np.fromiter((len(s) for s in data.sequences), dtype=np.int64, count=data.num_users)
    if (lengths == 0).any():
        r = int(np.flatnonzero(lengths == 0)[0])
        raise ValueError(
            f"{data.source}: user row {r} (raw id {int(data.user_ids[r])}) has an empty sequence"
        )
    long_enough = lengths >= 3
    if require_eval and not long_enough.any():
        raise ValueError(_nothing_to_evaluate(data.source, lengths))
    eval_rows = np.flatnonzero(long_enough)
    seqs = data.sequences
    train_seqs = [s[:-2] if n >= 3 else s for s, n in zip(seqs, lengths.tolist(), strict=True)]
    kw = dict(
        num_items=data.num_items,
        max_len=max_len,
        item_category=data.item_category,
        num_categories=data.num_categories,
    )
    train = windows_from_sequences("train", train_seqs, user_index=None, **kw)  # type: ignore[arg-type]
    valid = windows_from_sequences(
        "valid",
        [seqs[r][:-1] for r in eval_rows],
        user_index=eval_rows,
        **kw,  # type: ignore[arg-type]
    )
    test = windows_from_sequences(
        "test",
        [seqs[r] for r in eval_rows],
        user_index=eval_rows,
        **kw,  # type: ignore[arg-type]
    )
    train_full = np.where(long_enough, lengths - 2, lengths)
    stats = {
        "users": data.num_users,
        "eval_users": int(long_enough.sum()),
        "short_users": int((~long_enough).sum()),
        "train_rows_without_pairs": int((train_full < 2).sum()),
        "truncated_train": int((train_full > max_len + 1).sum()),
        "truncated_valid": int((lengths[long_enough] - 1 > max_len + 1).sum()),
        "truncated_test": int((lengths[long_enough] > max_len + 1).sum()),
    }
    if stats["short_users"]:
        logger.info(
            "%s: %d users have fewer than 3 items and are used for training only",
            data.source,
            stats["short_users"],
        )
    return SplitData(
        train=train, valid=valid, test=test, num_items=data.num_items, max_len=max_len, stats=stats
    )


def _nothing_to_evaluate(source: str, lengths: np.ndarray) -> str:
    n2, n1 = int((lengths == 2).sum()), int((lengths == 1).sum())
    return (
        f"{source}: nothing left to evaluate: all {len(lengths)} users have fewer than 3 events "
        f"({n2} with 2, {n1} with 1); leave-one-out needs 3 per user (train, valid, test targets)"
    )
