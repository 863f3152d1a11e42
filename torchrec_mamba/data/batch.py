"""`SequenceBatch`: one batch of item sequences, in the form TorchRec's train pipelines move around.

Shape letters: B batch (rows, usually users), L sequence length, T total number of ids in a
jagged tensor (the sum of the row lengths).

Ids follow one rule everywhere in this package: real ids are ``>= 1``; ``0`` means padding and is
never stored in a jagged tensor, it only appears in the padded views made by
:meth:`SequenceBatch.padded`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

__all__ = ["SequenceBatch", "jagged_to_padded"]


def jagged_to_padded(
    values: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None
) -> torch.Tensor:
    """Right-pad jagged rows with 0 into a dense ``(B, L)`` matrix, keeping the most recent ids.

    Rows longer than ``max_len`` keep their LAST ``max_len`` ids, because in a time-ordered
    sequence those are the ones a next-item model needs.

    Args:
        values (torch.Tensor): the concatenated rows, shape ``(T,)``.
        lengths (torch.Tensor): row lengths, shape ``(B,)``, any integer dtype.
        max_len (int | None): width ``L`` of the result. Default: the longest row
            (at least 1, so that an all-empty batch still gives a ``(B, 1)`` matrix).

    Example::

        >>> jagged_to_padded(torch.tensor([1, 2, 3, 4]), torch.tensor([3, 1]))
        tensor([[1, 2, 3],
                [4, 0, 0]])
        >>> jagged_to_padded(torch.tensor([1, 2, 3, 4]), torch.tensor([3, 1]), max_len=2)
        tensor([[2, 3],
                [4, 0]])

    Returns:
        torch.Tensor: ``(B, L)`` with the dtype and device of ``values``.
    """
    lengths = lengths.to(device=values.device, dtype=torch.long)  # (B,)
    batch_size = lengths.numel()
    if max_len is None:
        max_len = max(int(lengths.max()), 1) if batch_size > 0 else 1
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = values.new_zeros(batch_size, max_len)  # (B, L)
    if values.numel() == 0:
        return out
    row = torch.repeat_interleave(torch.arange(batch_size, device=values.device), lengths)  # (T,)
    starts = torch.cumsum(lengths, 0) - lengths  # (B,)
    # position counted from the end of the row: 0 = most recent id
    from_end = lengths[row] - 1 - (torch.arange(values.numel(), device=values.device) - starts[row])
    keep = from_end < max_len  # (T,) drops the oldest ids of over-long rows
    col = lengths.clamp(max=max_len)[row] - 1 - from_end  # (T,)
    out[row[keep], col[keep]] = values[keep]
    return out


@dataclass
class SequenceBatch(Pipelineable):
    """A batch of time-ordered id sequences with next-event labels (``torchrec.streamable.Pipelineable``).

    Row ``b`` of ``features`` holds the input sequence of one user (oldest first); row ``b`` of
    ``labels`` has the same length and holds, at each position, the id of the NEXT event. The last
    label of a row is therefore the row's target (the item to predict after the whole input).

    Args:
        features (KeyedJaggedTensor): input sequences. Key ``"item"`` and optionally
            ``"category"``; every key has the same lengths per row. Ids ``>= 1``.
        labels (KeyedJaggedTensor): next-event ids, same keys and lengths as ``features``.
        side (KeyedJaggedTensor | None): optional pooled side features (e.g. key ``"user"``) for an
            ``EmbeddingBagCollection``. Default: None.
        user (torch.Tensor | None): ``(B,)`` int64 row/user ids, for bookkeeping. Default: None.
        mask (torch.Tensor | None): ``(B,)`` bool, ``False`` for rows that a distributed loader
            repeated only so that every rank gets the same number of batches. Evaluation must drop
            those rows (``RankingMetrics.update(..., mask=batch.mask)``); training may keep them.
            None means every row is real. Default: None.

    Example::

        >>> f = KeyedJaggedTensor.from_lengths_sync(
        ...     ["item"], torch.tensor([1, 2, 3, 4]), torch.tensor([3, 1], dtype=torch.int32))
        >>> y = KeyedJaggedTensor.from_lengths_sync(
        ...     ["item"], torch.tensor([2, 3, 5, 6]), torch.tensor([3, 1], dtype=torch.int32))
        >>> batch = SequenceBatch(features=f, labels=y)
        >>> batch.batch_size, batch.targets().tolist()
        (2, [5, 6])
        >>> ids, lengths = batch.padded()
        >>> ids.tolist(), lengths.tolist()
        ([[1, 2, 3], [4, 0, 0]], [3, 1])
    """

    features: KeyedJaggedTensor
    labels: KeyedJaggedTensor
    side: KeyedJaggedTensor | None = None
    user: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    # --- Pipelineable -------------------------------------------------------------------------
    def to(self, device: torch.device | str, non_blocking: bool = False) -> SequenceBatch:
        """Copy every tensor to ``device`` (TorchRec pipelines call this on a side stream).

        Args:
            device (torch.device | str): target device.
            non_blocking (bool): asynchronous copy from pinned memory. Default: False.

        Returns:
            SequenceBatch: a new batch; ``self`` is left unchanged.
        """
        device = torch.device(device)
        return SequenceBatch(
            features=self.features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            side=None
            if self.side is None
            else self.side.to(device=device, non_blocking=non_blocking),
            user=None
            if self.user is None
            else self.user.to(device=device, non_blocking=non_blocking),
            mask=None
            if self.mask is None
            else self.mask.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        """Mark every tensor as used by ``stream`` (see ``torch.Tensor.record_stream``).

        Args:
            stream (torch.Stream): the stream that consumes this batch.
        """
        self.features.record_stream(stream)  # type: ignore[arg-type]
        self.labels.record_stream(stream)  # type: ignore[arg-type]
        if self.side is not None:
            self.side.record_stream(stream)  # type: ignore[arg-type]
        if self.user is not None:
            self.user.record_stream(stream)  # type: ignore[arg-type]
        if self.mask is not None:
            self.mask.record_stream(stream)  # type: ignore[arg-type]

    def pin_memory(self) -> SequenceBatch:
        """Copy every tensor into page-locked memory, for fast asynchronous host-to-device copies.

        Raises:
            RuntimeError: from PyTorch, when no accelerator is available to pin memory for.

        Returns:
            SequenceBatch: a new batch in pinned memory.
        """
        return SequenceBatch(
            features=self.features.pin_memory(),
            labels=self.labels.pin_memory(),
            side=None if self.side is None else self.side.pin_memory(),
            user=None if self.user is None else self.user.pin_memory(),
            mask=None if self.mask is None else self.mask.pin_memory(),
        )

    # --- helpers for models -------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Number of rows ``B``."""
        return int(self.features.stride())

    @property
    def device(self) -> torch.device:
        """Device of the feature ids."""
        return self.features.values().device

    def _key_slice(self, kjt: KeyedJaggedTensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Values ``(T,)`` and lengths ``(B,)`` of one key, without building a JaggedTensor dict."""
        keys = kjt.keys()
        if key not in keys:
            raise KeyError(f"key {key!r} not in batch; keys are {keys}")
        k = keys.index(key)
        b = self.batch_size
        lengths = kjt.lengths()[k * b : (k + 1) * b]  # (B,)
        start, end = kjt.offset_per_key()[k], kjt.offset_per_key()[k + 1]
        return kjt.values()[start:end], lengths

    def lengths(self, key: str = "item") -> torch.Tensor:
        """Row lengths of the input sequences.

        Args:
            key (str): feature key. Default: ``"item"``.

        Returns:
            torch.Tensor: ``(B,)`` lengths, in the dtype stored in the KJT (int32 from our loaders).
        """
        return self._key_slice(self.features, key)[1]

    def targets(self, key: str = "item") -> torch.Tensor:
        """The target of each row: its last label.

        Args:
            key (str): label key. Default: ``"item"``.

        Returns:
            torch.Tensor: ``(B,)`` int64 ids; ``0`` for a row of length 0 (no target).
        """
        values, lengths = self._key_slice(self.labels, key)
        lengths = lengths.long()  # (B,)
        last = torch.cumsum(lengths, 0) - 1  # (B,) index of each row's last label
        out = torch.zeros_like(lengths)
        nonempty = lengths > 0
        out[nonempty] = values[last[nonempty]].long()
        return out

    def padded(
        self, key: str = "item", max_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids as a right-padded matrix (0 = padding) plus the lengths.

        Args:
            key (str): feature key. Default: ``"item"``.
            max_len (int | None): width ``L``; longer rows keep their last ``max_len`` ids.
                Default: the longest row.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: ids ``(B, L)`` and lengths ``(B,)`` (int64,
            clamped to ``L``).
        """
        values, lengths = self._key_slice(self.features, key)
        ids = jagged_to_padded(values, lengths, max_len)  # (B, L)
        return ids, lengths.long().clamp(max=ids.shape[1])

    def padded_labels(
        self, key: str = "item", max_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels as a right-padded matrix aligned with :meth:`padded` (0 = padding / no label).

        Args:
            key (str): label key. Default: ``"item"``.
            max_len (int | None): width ``L``, as in :meth:`padded`. Default: the longest row.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: labels ``(B, L)`` and lengths ``(B,)`` (int64).
        """
        values, lengths = self._key_slice(self.labels, key)
        ids = jagged_to_padded(values, lengths, max_len)  # (B, L)
        return ids, lengths.long().clamp(max=ids.shape[1])

    def validate(self, num_items: int | None = None, num_categories: int | None = None) -> None:
        """Check the batch invariants; raise ``ValueError`` naming the first violation.

        Checks that labels have the same keys and lengths as features, ids are ``>= 1``, and
        (when given) ids do not exceed the table sizes. Synchronises with the device; meant for
        tests, debugging and data loaders, not for every training step on a GPU.

        Args:
            num_items (int | None): largest valid item id. Default: None (no upper bound check).
            num_categories (int | None): largest valid category id. Default: None.
        """
        if self.features.keys() != self.labels.keys():
            raise ValueError(
                f"labels keys {self.labels.keys()} differ from features keys {self.features.keys()}"
            )
        if "item" not in self.features.keys():
            raise ValueError(f"features need an 'item' key; got {self.features.keys()}")
        if not torch.equal(self.features.lengths().long(), self.labels.lengths().long()):
            raise ValueError("labels lengths differ from features lengths")
        b = self.batch_size
        for name, t in (("user", self.user), ("mask", self.mask)):
            if t is not None and t.shape != (b,):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({b},)")
        bounds = {"item": num_items, "category": num_categories}
        for kjt_name, kjt in (("features", self.features), ("labels", self.labels)):
            for key in kjt.keys():
                values, _ = self._key_slice(kjt, key)
                if values.numel() == 0:
                    continue
                lo, hi = int(values.min()), int(values.max())
                if lo < 1:
                    raise ValueError(
                        f"{kjt_name}[{key!r}] has id {lo}; ids must be >= 1 (0 is padding)"
                    )
                bound = bounds.get(key)
                if bound is not None and hi > bound:
                    raise ValueError(f"{kjt_name}[{key!r}] has id {hi} > {bound} (out of range)")
