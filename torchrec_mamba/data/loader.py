"""`SequenceLoader`: deterministic, resumable, rank-balanced batches of `SequenceBatch`.

Every row of a :class:`~torchrec_mamba.data.split.SplitPart` is a window ``w``; the loader yields
``features = w[:-1]`` and ``labels = w[1:]``. For a training part that is the all-position
next-item objective (input ``s[:-1]``, labels ``s[1:]``); for an evaluation part the last label is
the target and the other labels are the true next items of the history (so an evaluation batch
can also give an all-position loss).

Order and sharding, the same on every rank:

* each epoch's row order is a permutation drawn from ``numpy.random.default_rng((seed, epoch))``
  (identity order when ``shuffle=False``);
* rank ``r`` takes rows ``r, r + W, r + 2W, ...`` of that order (``W = world_size``);
* ``drop_last=False``: the order is first extended by repeating its first rows until its length is
  a multiple of ``W`` (as ``torch.utils.data.DistributedSampler`` does), so every rank has the same
  number of rows and therefore the same number of batches, the last one possibly smaller. A batch
  that holds repeated rows has ``batch.mask`` set (``False`` on the repeats) so that evaluation
  counts every user exactly once; with ``world_size == 1`` nothing is ever repeated;
* ``drop_last=True``: only full batches are kept, ``len(part) // (W * batch_size)`` per rank; the
  rest of the order is dropped for that epoch (different rows each epoch when shuffling).

Resuming: :meth:`SequenceLoader.state_dict` holds the epoch and the number of batches already
handed out in it. An iteration continues from there to the end of that epoch, then moves the
loader on to the next epoch (so a loop without ``set_epoch`` reshuffles every epoch). A state
saved after the last batch of an epoch but before the loop ended gives one empty iteration, which
finishes that epoch. :meth:`SequenceLoader.set_epoch` changes the position only when the epoch
differs from the current one, so the usual
``for epoch in range(loader.epoch, E): loader.set_epoch(epoch); for batch in loader:`` loop resumes
exactly after ``load_state_dict``. Note that pipelines that prefetch (``TrainPipelineSparseDist``
holds up to 2 batches) have taken batches from the loader that were not trained on yet when a
checkpoint is written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.data.split import SplitPart

__all__ = ["Loader", "SequenceLoader", "bucket_by_length", "check_batching_args"]

logger = logging.getLogger(__name__)


@runtime_checkable
class Loader(Protocol):
    """What ``train.fit`` / ``train.evaluate`` need from a data loader, in memory or on parquet.

    An epoch yields ``len(loader)`` :class:`SequenceBatch` es (the same number on every rank);
    ``set_epoch`` selects the epoch (and its shuffle) and keeps the position when the epoch does
    not change; ``state_dict`` / ``load_state_dict`` save and restore the position (epoch and
    batches handed out) so a checkpointed run resumes exactly. Implemented by
    :class:`SequenceLoader` and :class:`~torchrec_mamba.data.parquet.ParquetSequenceLoader`.

    Example::

        >>> from torchrec_mamba.data.split import windows_from_sequences
        >>> part = windows_from_sequences("train", [np.array([1, 2, 3])], num_items=3, max_len=4)
        >>> isinstance(SequenceLoader(part, batch_size=1, shuffle=False, seed=0), Loader)
        True
    """

    def __iter__(self) -> Iterator[SequenceBatch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_resume_state(state: dict[str, Any], mine: dict[str, Any], keys: tuple[str, ...],
                       num_batches: int) -> tuple[int, int]:
    """Check a saved loader state against this loader's settings; return (epoch, batch_index).

    Args:
        state (dict[str, Any]): the saved :meth:`Loader.state_dict`.
        mine (dict[str, Any]): this loader's own state dict.
        keys (tuple[str, ...]): settings that change the order and so must match.
        num_batches (int): batches per epoch, the largest valid ``batch_index``.

    Returns:
        tuple[int, int]: the saved position.
    """
    for key in keys:
        if key not in state:
            raise ValueError(f"loader state lacks {key!r}; got keys {sorted(state)}")
        if state[key] != mine[key]:
            raise ValueError(
                f"cannot resume: saved {key}={state[key]!r} but this loader has {key}={mine[key]!r}"
            )
    epoch, index = int(state["epoch"]), int(state["batch_index"])
    if epoch < 0 or not 0 <= index <= num_batches:
        raise ValueError(f"invalid loader position epoch={epoch}, batch_index={index}")
    return epoch, index


def bucket_by_length(
    rows: np.ndarray,
    real: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    bucket: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Length-bucket an epoch's row order: sort runs of ``bucket`` batches, then shuffle batches.

    Each run of ``bucket * batch_size`` consecutive entries of ``rows`` is sorted by length
    (stable), then the full batches of ``batch_size`` entries are put in a random order drawn from
    ``rng``; a short last batch stays last. The same entries are returned, each with its ``real``
    flag, so rank balance (same count on every rank) and ``batch.mask`` are unchanged. Shared by
    :class:`SequenceLoader` and :class:`~torchrec_mamba.data.parquet.ParquetSequenceLoader`.

    Args:
        rows (np.ndarray): ``(R,)`` row indices in epoch order (already shuffled).
        real (np.ndarray): ``(R,)`` bool, ``False`` on rows repeated for rank balance.
        lengths (np.ndarray): ``(R,)`` length of each entry of ``rows`` (what the batch pads to).
        batch_size (int): entries per batch, ``>= 1``.
        bucket (int): batches per sorted run, ``>= 1``.
        rng (np.random.Generator): draws the batch order (seed it the same way on resume).

    Example::

        >>> lengths = np.array([5, 1, 4, 2, 6, 3])
        >>> rows, real = bucket_by_length(np.arange(6), np.ones(6, dtype=bool), lengths,
        ...                               batch_size=2, bucket=3, rng=np.random.default_rng(0))
        >>> lengths[rows].reshape(3, 2).tolist()  # batches of similar lengths, in random order
        [[5, 6], [1, 2], [3, 4]]

    Returns:
        tuple[np.ndarray, np.ndarray]: the reordered ``rows`` and ``real``, each ``(R,)``.
    """
    bs, span = batch_size, bucket * batch_size
    order = np.concatenate(
        [start + np.argsort(lengths[start : start + span], kind="stable")
         for start in range(0, len(rows), span)]
    ) if len(rows) else np.zeros(0, dtype=np.int64)
    rows, real = rows[order], real[order]
    # Shuffle full batches only; a short last batch stays last so batch sizes keep their order.
    full = len(rows) // bs
    perm = rng.permutation(full)
    idx = np.concatenate(
        [(perm[:, None] * bs + np.arange(bs)).ravel(), np.arange(full * bs, len(rows))]
    )
    return rows[idx], real[idx]



def check_batching_args(batch_size: int, rank: int, world_size: int, bucket: int) -> None:
    """Validate the batching arguments both loaders share; raise a ValueError naming the value.

    Args:
        batch_size (int): rows per batch, ``>= 1``.
        rank (int): this process's rank, in ``[0, world_size)``.
        world_size (int): number of ranks, ``>= 1``.
        bucket (int): length-bucketing span in batches, ``>= 0``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if not isinstance(bucket, int) or bucket < 0:
        raise ValueError(f"bucket must be an int >= 0, got {bucket!r}")

class SequenceLoader:
    """Iterate a split part as :class:`SequenceBatch` es, in a seeded, resumable, rank-balanced order.

    Args:
        split_part (SplitPart): rows to serve (``SplitData.train``, ``.valid`` or ``.test``).
        batch_size (int): rows per batch on this rank.
        shuffle (bool): shuffle rows each epoch (training); False keeps the part's order.
        seed (int): base seed of the shuffle, ``>= 0``; the same on every rank.
        drop_last (bool): keep only full batches. Default: False.
        rank (int): this process's rank. Default: 0.
        world_size (int): number of ranks. Default: 1.
        with_category (bool): add key ``"category"`` (the item's category) to features and
            labels; needs ``split_part.item_category``. Default: False.
        bucket (int): with ``shuffle``, sort each run of ``bucket * batch_size`` shuffled rows by
            length before cutting batches, then shuffle the batch order. Batches then hold rows
            of similar length, so far less padding reaches the encoder (Beauty: mean length 8 in
            a max of 50). 0 turns it off. Default: 0.
        sort_by_length (bool): serve this rank's rows sorted by input length (stable), for
            evaluation: metrics are sums over rows, so their order does not change them, and
            each batch is padded only to its own longest row (Beauty's valid split: about 5x
            fewer padded positions than in the part's order). Not with ``shuffle``. Default:
            False.

    Example::

        >>> from torchrec_mamba.data.split import windows_from_sequences
        >>> part = windows_from_sequences(
        ...     "train", [np.array([1, 2, 3]), np.array([4, 5])], num_items=5, max_len=4)
        >>> loader = SequenceLoader(part, batch_size=2, shuffle=False, seed=0)
        >>> batch = next(iter(loader))
        >>> batch.padded()[0].tolist(), batch.targets().tolist()
        ([[1, 2], [4, 0]], [3, 5])

    Returns:
        Iterator[SequenceBatch]: ``len(loader)`` batches per epoch, the same number on every rank.
    """

    def __init__(
        self,
        split_part: SplitPart,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        with_category: bool = False,
        bucket: int = 0,
        sort_by_length: bool = False,
    ) -> None:
        if not isinstance(split_part, SplitPart):
            raise TypeError(f"split_part must be a SplitPart, got {type(split_part).__name__}")
        check_batching_args(batch_size, rank, world_size, bucket)
        if sort_by_length and shuffle:
            raise ValueError("sort_by_length=True is for evaluation loaders: it needs "
                             "shuffle=False (training batches use bucket=K instead)")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if with_category and split_part.item_category is None:
            raise ValueError(
                f"with_category=True but part {split_part.name!r} has no item categories "
                "(read the data with a category column)"
            )
        self.part = split_part
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.with_category = with_category
        self.bucket = bucket
        self.sort_by_length = bool(sort_by_length)
        self._keys = ["item", "category"] if with_category else ["item"]
        self._item_category = split_part.item_category if with_category else None
        self._epoch = 0
        self._batch_index = 0
        n = len(split_part)
        if drop_last:
            self._rows_per_rank = (n // (world_size * batch_size)) * batch_size
        else:
            self._rows_per_rank = -(-n // world_size)
        if self._rows_per_rank == 0 and n > 0:
            logger.warning(
                "part %r: %d rows give no batch of %d on each of %d ranks with drop_last=True",
                split_part.name,
                n,
                batch_size,
                world_size,
            )

    # --- size and position -----------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return -(-self._rows_per_rank // self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; the position resets to its start only if ``epoch`` changes.

        Args:
            epoch (int): epoch number, ``>= 0``; it seeds the shuffle.
        """
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch = epoch
            self._batch_index = 0

    def state_dict(self) -> dict[str, int]:
        """The position (epoch, batches handed out) plus settings that must match on resume."""
        return {
            "epoch": self._epoch,
            "batch_index": self._batch_index,
            "seed": self.seed,
            "num_rows": len(self.part),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": int(self.shuffle),
            "drop_last": int(self.drop_last),
            "bucket": self.bucket,
            "sort_by_length": int(self.sort_by_length),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a position saved by :meth:`state_dict` (of any rank of the same run).

        Args:
            state (dict[str, int]): a saved state; settings that change the order must match.
        """
        state = {"bucket": 0, "sort_by_length": 0, **state}  # states saved before these existed
        keys = ("seed", "num_rows", "batch_size", "world_size", "shuffle", "drop_last", "bucket",
                "sort_by_length")
        epoch, index = check_resume_state(
            {k: int(v) if k in keys else v for k, v in state.items()}, self.state_dict(), keys,
            len(self),
        )
        self._epoch, self._batch_index = epoch, index

    # --- iteration ---------------------------------------------------------------------------
    def epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of this rank for ``epoch``, in order, and whether each is real (not a repeat).

        Args:
            epoch (int): the epoch.

        Returns:
            tuple[np.ndarray, np.ndarray]: row indices ``(rows_per_rank,)`` into the part and a
            bool array of the same shape, ``False`` where a row was repeated for rank balance.
        """
        n = len(self.part)
        if self.shuffle:
            order = np.random.default_rng((self.seed, epoch)).permutation(n)
        else:
            order = np.arange(n)
        total = self._rows_per_rank * self.world_size
        real = np.ones(total, dtype=bool)
        if total > n:  # only without drop_last: repeat the first rows
            real[n:] = False
            order = np.resize(order, total)
        else:
            order = order[:total]
        rows, real = order[self.rank :: self.world_size], real[self.rank :: self.world_size]
        if self.shuffle and self.bucket > 0:
            rows, real = self._bucketed(rows, real, epoch)
        elif self.sort_by_length:
            by_length = np.argsort(np.diff(self.part.offsets)[rows], kind="stable")
            rows, real = rows[by_length], real[by_length]
        return rows, real

    def _bucketed(self, rows: np.ndarray, real: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Sort runs of ``bucket * batch_size`` rows by length, then shuffle whole batches."""
        lengths = np.diff(self.part.offsets)[rows]  # (R,)
        rng = np.random.default_rng((self.seed, epoch, 1))
        return bucket_by_length(rows, real, lengths, self.batch_size, self.bucket, rng)

    def __iter__(self) -> Iterator[SequenceBatch]:
        rows, real = self.epoch_rows(self._epoch)
        bs = self.batch_size
        while self._batch_index < len(self):
            i = self._batch_index
            self._batch_index += 1
            sel, sel_real = rows[i * bs : (i + 1) * bs], real[i * bs : (i + 1) * bs]
            yield self.make_batch(sel, None if sel_real.all() else sel_real)
        self._epoch += 1
        self._batch_index = 0

    def make_batch(self, rows: np.ndarray, real: np.ndarray | None = None) -> SequenceBatch:
        """Build the batch of the given part rows (input ``w[:-1]``, labels ``w[1:]``).

        Args:
            rows (np.ndarray): ``(B,)`` row indices into the part.
            real (np.ndarray | None): ``(B,)`` bool, becomes ``batch.mask``. Default: None.

        Returns:
            SequenceBatch: on CPU; values int64, lengths int32.
        """
        part = self.part
        rows = np.asarray(rows, dtype=np.int64)
        starts = part.offsets[rows]  # (B,)
        lens = part.offsets[rows + 1] - starts - 1  # (B,) input lengths
        total = int(lens.sum())
        # index of every input id: row start + position within the row
        idx = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total)  # (T,)
        inputs = part.values[idx]  # (T,)
        labels = part.values[idx + 1]  # (T,)
        lengths = lens.astype(np.int32)
        cat = self._item_category
        if cat is not None:
            inputs = np.concatenate([inputs, cat[inputs]])
            labels = np.concatenate([labels, cat[labels]])
            lengths = np.concatenate([lengths, lengths])
        lengths_t = torch.from_numpy(lengths)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=self._keys, values=torch.from_numpy(inputs), lengths=lengths_t
        )
        label_kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self._keys, values=torch.from_numpy(labels), lengths=lengths_t.clone()
        )
        return SequenceBatch(
            features=features,
            labels=label_kjt,
            user=torch.from_numpy(part.user_index[rows]),
            mask=None if real is None else torch.from_numpy(np.ascontiguousarray(real)),
        )
