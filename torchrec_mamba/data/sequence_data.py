"""The :class:`SequenceData` container and the dense re-indexing every reader ends with.

Item ids are re-indexed densely to ``1..num_items`` in increasing order of the raw id (``0`` is
reserved for padding); see :mod:`torchrec_mamba.data.readers` for the readers that build it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SequenceData"]

logger = logging.getLogger(__name__)


@dataclass
class SequenceData:
    """Time-ordered item sequences, one per user, with dense item ids.

    Args:
        sequences (list[np.ndarray]): one int64 array per user, oldest first, ids in
            ``1..num_items``.
        num_items (int): number of distinct items (the largest dense id).
        user_ids (np.ndarray): ``(U,)`` int64 raw user id of each sequence.
        raw_item_ids (np.ndarray): ``(num_items + 1,)`` int64 raw id of each dense id; entry 0
            (padding) is ``-1``.
        item_category (np.ndarray | None): ``(num_items + 1,)`` int64 dense category id of each
            dense item id (entry 0 is 0), when the source had categories. Default: None.
        num_categories (int): number of distinct categories (0 when there are none). Default: 0.
        source (str): where the data came from, for messages. Default: ``""``.
        stats (dict[str, int]): counts of what the reader saw and skipped. Default: empty.

    Example::

        >>> data = SequenceData.from_lists([[10, 30], [30, 20, 20]])
        >>> data.num_items, [s.tolist() for s in data.sequences]
        (3, [[1, 3], [3, 2, 2]])
        >>> data.item_map[30], data.raw_item_ids.tolist()
        (3, [-1, 10, 20, 30])
    """

    sequences: list[np.ndarray]
    num_items: int
    user_ids: np.ndarray
    raw_item_ids: np.ndarray
    item_category: np.ndarray | None = None
    num_categories: int = 0
    source: str = ""
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.user_ids):
            raise ValueError(
                f"{len(self.sequences)} sequences but {len(self.user_ids)} user ids ({self.source})"
            )
        if self.raw_item_ids.shape != (self.num_items + 1,):
            raise ValueError(
                f"raw_item_ids has shape {self.raw_item_ids.shape}, expected ({self.num_items + 1},)"
            )
        if self.item_category is not None and self.item_category.shape != (self.num_items + 1,):
            raise ValueError(
                f"item_category has shape {self.item_category.shape}, "
                f"expected ({self.num_items + 1},)"
            )

    @property
    def num_users(self) -> int:
        """Number of sequences ``U``."""
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        """Total number of events over all sequences."""
        return int(sum(len(s) for s in self.sequences))

    @property
    def item_map(self) -> dict[int, int]:
        """Raw item id -> dense id (built on each call; use :meth:`encode_items` for arrays)."""
        return {int(r): i + 1 for i, r in enumerate(self.raw_item_ids[1:])}

    @property
    def user_map(self) -> dict[int, int]:
        """Raw user id -> row index in :attr:`sequences`."""
        return {int(u): i for i, u in enumerate(self.user_ids)}

    def encode_items(self, raw: np.ndarray) -> np.ndarray:
        """Map raw item ids to dense ids; raise ``ValueError`` naming the first unknown raw id.

        Args:
            raw (np.ndarray): raw ids, any shape.

        Returns:
            np.ndarray: int64 dense ids, same shape.
        """
        raw = np.asarray(raw, dtype=np.int64)
        known = self.raw_item_ids[1:]  # sorted
        pos = np.searchsorted(known, raw)
        ok = (pos < len(known)) & (known[np.minimum(pos, len(known) - 1)] == raw)
        if not ok.all():
            bad = raw[~ok].ravel()[0]
            raise ValueError(f"unknown raw item id {int(bad)} ({self.source})")
        return pos + 1

    @classmethod
    def from_lists(
        cls,
        sequences: Iterable[Iterable[int]],
        user_ids: Iterable[int] | None = None,
        source: str = "<lists>",
    ) -> SequenceData:
        """Build from raw (not yet dense) item-id lists, one per user, already in time order.

        Args:
            sequences (Iterable[Iterable[int]]): raw item ids per user, non-negative.
            user_ids (Iterable[int] | None): raw user ids. Default: ``0..U-1``.
            source (str): name used in messages. Default: ``"<lists>"``.

        Returns:
            SequenceData: with dense ids; empty sequences raise ``ValueError``.
        """
        seqs = [np.asarray(list(s), dtype=np.int64) for s in sequences]
        users = (
            np.arange(len(seqs), dtype=np.int64)
            if user_ids is None
            else np.asarray(list(user_ids), dtype=np.int64)
        )
        for i, s in enumerate(seqs):
            if s.size == 0:
                raise ValueError(f"{source}: sequence {i} is empty")
            if s.min() < 0:
                raise ValueError(f"{source}: sequence {i} has negative item id {int(s.min())}")
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        return _assemble(users, flat, lengths, source, {})


# --- assembly from concatenated events --------------------------------------------------------
def _assemble(
    users: np.ndarray,
    flat_raw_items: np.ndarray,
    lengths: np.ndarray,
    source: str,
    stats: dict[str, int],
    flat_categories: np.ndarray | None = None,
) -> SequenceData:
    """Dense re-indexing and splitting of concatenated per-user sequences."""
    raw_items, dense = np.unique(flat_raw_items, return_inverse=True)  # sorted raw ids
    dense = (dense.reshape(-1) + 1).astype(np.int64)
    raw_item_ids = np.concatenate([np.array([-1], dtype=np.int64), raw_items.astype(np.int64)])
    sequences = np.split(dense, np.cumsum(lengths)[:-1]) if len(lengths) else []
    item_category = None
    num_categories = 0
    if flat_categories is not None:
        raw_cats, dense_cats = np.unique(flat_categories, return_inverse=True)
        dense_cats = dense_cats.reshape(-1) + 1
        num_categories = len(raw_cats)
        # one category per item: the one of its first event in (user, time) order
        first_dense, first_pos = np.unique(dense, return_index=True)
        item_category = np.zeros(len(raw_items) + 1, dtype=np.int64)
        item_category[first_dense] = dense_cats[first_pos]
        conflicts = int((item_category[dense] != dense_cats).sum())
        stats["category_conflicts"] = conflicts
        if conflicts:
            logger.warning(
                "%s: %d events carry a category different from their item's first category; "
                "each item keeps the category of its first event",
                source,
                conflicts,
            )
    stats.setdefault("users", len(sequences))
    stats.setdefault("items", len(raw_items))
    stats.setdefault("interactions", int(len(flat_raw_items)))
    logger.info(
        "%s: %d users, %d items, %d interactions",
        source,
        len(sequences),
        len(raw_items),
        len(flat_raw_items),
    )
    return SequenceData(
        sequences=list(sequences),
        num_items=int(len(raw_items)),
        user_ids=users.astype(np.int64),
        raw_item_ids=raw_item_ids,
        item_category=item_category,
        num_categories=num_categories,
        source=source,
        stats=stats,
    )


def _group_events(
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray | None,
    source: str,
    stats: dict[str, int],
    categories: np.ndarray | None = None,
) -> SequenceData:
    """Sort events by (user, time), stable in file order for ties, and build sequences."""
    if times is None:
        order = np.argsort(users, kind="stable")
    else:
        order = np.argsort(times, kind="stable")
        order = order[np.argsort(users[order], kind="stable")]
    users_sorted = users[order]
    uniq, starts = np.unique(users_sorted, return_index=True)
    lengths = np.diff(np.append(starts, len(users_sorted)))
    cats = None if categories is None else categories[order]
    return _assemble(uniq, items[order], lengths, source, stats, cats)
