"""`ParquetSequenceLoader`: the RetailRocket ETL's parquet shards as rank-balanced `SequenceBatch` es.

Reads the list columns written by ``torchrec_mamba_preprocessing.retailrocket`` (``item_list``,
``category_list``, ``top_category_list``, ``event_list``; one row per session or visitor, oldest
event first) and serves every row ``s`` as input ``s[:-1]`` with labels ``s[1:]``:

* ``mode="train"``: all-position next-event labels; shuffled every epoch by default;
* ``mode="eval"``: the same tensors, so the last label of each row is its target ``s[-1]`` (the
  other labels are the true next events of the history); kept in file order by default.

Shape letters: B batch, L length, T total ids in a jagged tensor.

Rank balance, the same on every rank without communication:

* when the number of files is a multiple of ``world_size`` (the ETL guarantees it), rank ``r``
  reads files ``r, r + W, ...``; otherwise every rank reads all files and takes rows
  ``r, r + W, ...``;
* every rank learns all ranks' row counts from the parquet footers and serves
  ``max(rows per rank)`` rows, repeating its first rows to get there; repeated rows have
  ``batch.mask == False`` (evaluation must drop them). So every rank yields the same number of
  batches and no rank ever waits for a batch another rank lacks.

``bucket > 0`` (training) length-buckets the shuffled order of each rank, as
:class:`~torchrec_mamba.data.loader.SequenceLoader` does, with the same shared helper
(:func:`~torchrec_mamba.data.loader.bucket_by_length`); it only reorders a rank's rows, so the
two guarantees above hold unchanged.

Resuming: :meth:`ParquetSequenceLoader.state_dict` holds the epoch and the batches already handed
out in it, with the same semantics as :class:`~torchrec_mamba.data.loader.SequenceLoader` (both
follow :class:`~torchrec_mamba.data.loader.Loader`), so ``train.fit`` checkpoints and resumes a
run on parquet exactly.

Truncation and padding happen here, not in the ETL (NVTabular's CPU ``ListSlice(pad=True)`` fails
silently on rows read back from parquet): rows keep their last ``max_len + 1`` events, so inputs
have at most ``max_len`` ids; batches are jagged and :meth:`SequenceBatch.padded` pads with 0.

:func:`read_vocab_sizes` gives the embedding-table sizes (ids 0 padding, 1 null, 2 OOV included)
from the Merlin schema written next to the shards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.data.loader import bucket_by_length, check_batching_args, check_resume_state
from torchrec_mamba.data.shards import _num_rows, read_vocab_sizes, shard_files

__all__ = ["ParquetSequenceLoader", "read_vocab_sizes", "shard_files"]

logger = logging.getLogger(__name__)

_KEYS = ("item", "category", "top_category", "event")


class ParquetSequenceLoader:
    """Iterate ETL parquet shards as :class:`SequenceBatch` es, the same number on every rank.

    Args:
        path_or_files (str | Path | Sequence[str | Path]): a split folder or its shard files.
        batch_size (int): rows per batch on this rank.
        keys (Sequence[str]): features to serve, ``"item"`` first; any of ``item``,
            ``category``, ``top_category``, ``event``. Default: ``("item", "category")``.
        max_len (int | None): longest input; rows keep their last ``max_len + 1`` events.
            ``None`` keeps whole rows. Default: None.
        rank (int): this process's rank. Default: 0.
        world_size (int): number of ranks. Default: 1.
        shuffle (bool | None): shuffle rows every epoch; ``None`` means ``mode == "train"``.
            Default: None.
        seed (int): shuffle seed, the same on every rank. Default: 0.
        mode (str): ``"train"`` or ``"eval"`` (see the module docstring). Default: ``"train"``.
        bucket (int): with ``shuffle``, sort each run of ``bucket * batch_size`` shuffled rows by
            input length (after ``max_len`` truncation) before cutting batches, then shuffle the
            batch order (:func:`~torchrec_mamba.data.loader.bucket_by_length`, as in
            :class:`~torchrec_mamba.data.loader.SequenceLoader`). Batches then hold rows of
            similar length, so far less padding reaches the encoder. Without ``shuffle`` it has
            no effect. 0 turns it off. Default: 0.
        sort_by_length (bool): serve this rank's rows sorted by input length (stable), for
            evaluation, as :class:`~torchrec_mamba.data.loader.SequenceLoader` does: metrics are
            sums over rows, so the order does not change them, and each batch is padded only to
            its own longest row. Not with ``shuffle``. Default: False.

    Example::

        >>> import tempfile, pandas as pd
        >>> d = tempfile.mkdtemp()
        >>> pd.DataFrame({"item_list": [[3, 4, 5], [6, 3]], "category_list": [[3, 3, 4], [4, 3]],
        ...               "visitorid": [10, 11]}).to_parquet(f"{d}/part_0.parquet")
        >>> loader = ParquetSequenceLoader(d, batch_size=2, mode="eval")
        >>> batch = next(iter(loader))
        >>> batch.padded()[0].tolist(), batch.targets().tolist(), batch.targets("category").tolist()
        ([[3, 4], [6, 0]], [5, 3], [4, 3])
        >>> len(loader), loader.num_rows
        (1, 2)

    Returns:
        Iterator[SequenceBatch]: ``len(loader)`` batches per epoch; values int64, lengths int32.
    """

    def __init__(
        self,
        path_or_files: str | Path | Sequence[str | Path],
        batch_size: int,
        keys: Sequence[str] = ("item", "category"),
        max_len: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool | None = None,
        seed: int = 0,
        mode: str = "train",
        bucket: int = 0,
        sort_by_length: bool = False,
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if sort_by_length and ((mode == "train") if shuffle is None else shuffle):
            raise ValueError("sort_by_length=True is for evaluation loaders: it needs "
                             "shuffle=False (mode='eval'); training batches use bucket=K instead")
        check_batching_args(batch_size, rank, world_size, bucket)
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None, got {max_len}")
        keys = tuple(keys)
        if not keys or keys[0] != "item" or len(set(keys)) != len(keys):
            raise ValueError(f"keys must start with 'item' and not repeat, got {keys}")
        unknown = [k for k in keys if k not in _KEYS]
        if unknown:
            raise ValueError(f"unknown keys {unknown}; choose from {list(_KEYS)}")
        self.files = shard_files(path_or_files)
        self.batch_size = batch_size
        self.keys = keys
        self.max_len = max_len
        self.rank = rank
        self.world_size = world_size
        self.mode = mode
        self.shuffle = (mode == "train") if shuffle is None else bool(shuffle)
        self.seed = seed
        self.bucket = bucket
        self.sort_by_length = bool(sort_by_length)
        self._epoch = 0
        self._batch_index = 0

        counts = [_num_rows(f) for f in self.files]
        if len(self.files) % world_size == 0:
            mine = self.files[rank::world_size]
            per_rank = [sum(counts[r::world_size]) for r in range(world_size)]
            self._stride = 1
        else:
            logger.info(
                "%d files are not a multiple of world_size=%d: every rank reads all files and "
                "takes every %d-th row",
                len(self.files),
                world_size,
                world_size,
            )
            mine = self.files
            total = sum(counts)
            per_rank = [len(range(r, total, world_size)) for r in range(world_size)]
            self._stride = world_size
        self.rank_rows = per_rank
        self._rows_per_rank = max(per_rank)
        self._load(mine)

    # --- data -----------------------------------------------------------------------------------
    def _load(self, files: list[Path]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = [f"{k}_list" for k in self.keys]
        schema_names = pq.read_schema(files[0]).names
        missing = [c for c in cols if c not in schema_names]
        if missing:
            raise ValueError(f"{files[0]}: missing column(s) {missing}; it has {schema_names}")
        user_col = next((c for c in ("visitorid", "session_id") if c in schema_names), None)
        table = pq.read_table(files, columns=cols + ([user_col] if user_col else []))
        if self._stride > 1:
            table = table.take(pa.array(np.arange(self.rank, table.num_rows, self._stride)))
        self._values: dict[str, np.ndarray] = {}
        offsets = np.zeros(1, dtype=np.int64)
        for i, (k, c) in enumerate(zip(self.keys, cols, strict=True)):
            arr = table.column(c).combine_chunks()
            off = arr.offsets.to_numpy().astype(np.int64)
            off = off - off[0]
            if i == 0:
                offsets = off
            elif not np.array_equal(off, offsets):
                raise ValueError(f"{c} has different row lengths than item_list in {files}")
            self._values[k] = arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        lengths = np.diff(offsets)
        if len(lengths) and lengths.min() < 2:
            bad = int(np.flatnonzero(lengths < 2)[0])
            raise ValueError(
                f"row {bad} of {files} has {int(lengths[bad])} event(s); every row needs at least "
                f"2 (input and target)"
            )
        for k, v in self._values.items():
            if len(v) and v.min() < 1:
                raise ValueError(f"{k}_list holds id {int(v.min())} < 1 (0 is padding) in {files}")
        self._offsets = offsets
        self._user = (
            table.column(user_col).to_numpy().astype(np.int64)
            if user_col
            else np.arange(len(lengths), dtype=np.int64)
        )

    @property
    def vocab_sizes(self) -> dict[str, int]:
        """Embedding rows per categorical column, from the Merlin schema beside the shards."""
        return read_vocab_sizes(self.files[0].parent)

    @property
    def num_rows(self) -> int:
        """Rows held by this rank (before repeats for balance)."""
        return len(self._offsets) - 1

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        return -(-self._rows_per_rank // self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (it seeds the shuffle); the position resets only if it changes.

        As in :class:`~torchrec_mamba.data.loader.SequenceLoader`, so that
        ``load_state_dict`` followed by the usual ``set_epoch(e); for batch in loader`` resumes
        mid-epoch.
        """
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch = epoch
            self._batch_index = 0

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, batches handed out) plus settings that must match on resume.

        Example::

            >>> import tempfile, pandas as pd
            >>> d = tempfile.mkdtemp()
            >>> pd.DataFrame({"item_list": [[3, 4], [5, 6], [7, 8]]}).to_parquet(f"{d}/part_0.parquet")
            >>> loader = ParquetSequenceLoader(d, batch_size=1, keys=("item",))
            >>> it = iter(loader); first = next(it)
            >>> resumed = ParquetSequenceLoader(d, batch_size=1, keys=("item",))
            >>> resumed.load_state_dict(loader.state_dict())
            >>> [b.targets().tolist() for b in it] == [b.targets().tolist() for b in resumed]
            True
        """
        return {
            "epoch": self._epoch,
            "batch_index": self._batch_index,
            "seed": self.seed,
            "rank_rows": list(self.rank_rows),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "shuffle": int(self.shuffle),
            "bucket": self.bucket,
            "sort_by_length": int(self.sort_by_length),
            "max_len": self.max_len,
            "keys": list(self.keys),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position saved by :meth:`state_dict` of the same rank of the same run.

        Args:
            state (dict[str, Any]): a saved state; settings that change the order must match.
        """
        keys = ("seed", "rank_rows", "batch_size", "world_size", "rank", "shuffle", "bucket",
                "sort_by_length", "max_len", "keys")
        state = {"sort_by_length": 0, **state}  # states saved before it existed
        state = {k: list(v) if isinstance(v, tuple) else v for k, v in state.items()}
        self._epoch, self._batch_index = check_resume_state(state, self.state_dict(), keys, len(self))

    def epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Row order of this rank for ``epoch`` and whether each entry is real (not a repeat).

        Args:
            epoch (int): the epoch; it seeds the shuffle and the bucketed batch order.

        Returns:
            tuple[np.ndarray, np.ndarray]: ``(max rows per rank,)`` row indices and bool mask.
        """
        n = self.num_rows
        total = self._rows_per_rank
        if n == 0:
            if total == 0:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
            raise ValueError(
                f"rank {self.rank} has no rows but other ranks have {total}; write at least "
                f"world_size non-empty shards ({self.files})"
            )
        order = (
            np.random.default_rng((self.seed, epoch, self.rank)).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        rows, real = np.resize(order, total), np.arange(total) < n
        if self.shuffle and self.bucket > 0:
            rng = np.random.default_rng((self.seed, epoch, self.rank, 1))
            rows, real = bucket_by_length(
                rows, real, self.input_lengths(rows), self.batch_size, self.bucket, rng
            )
        elif self.sort_by_length:
            by_length = np.argsort(self.input_lengths(rows), kind="stable")
            rows, real = rows[by_length], real[by_length]
        return rows, real

    def input_lengths(self, rows: np.ndarray) -> np.ndarray:
        """Input length of each given row after truncation to ``max_len`` (events minus one).

        Args:
            rows (np.ndarray): ``(B,)`` row indices of this rank.

        Returns:
            np.ndarray: ``(B,)`` int64.
        """
        rows = np.asarray(rows, dtype=np.int64)
        full = self._offsets[rows + 1] - self._offsets[rows]  # (B,) events per row
        keep = full if self.max_len is None else np.minimum(full, self.max_len + 1)
        return keep - 1

    def __iter__(self) -> Iterator[SequenceBatch]:
        rows, real = self.epoch_rows(self._epoch)
        bs = self.batch_size
        while self._batch_index < len(self):
            i = self._batch_index
            self._batch_index += 1
            sel, ok = rows[i * bs : (i + 1) * bs], real[i * bs : (i + 1) * bs]
            yield self.make_batch(sel, None if ok.all() else ok)
        self._epoch += 1
        self._batch_index = 0

    def make_batch(self, rows: np.ndarray, real: np.ndarray | None = None) -> SequenceBatch:
        """Batch of the given rows: input ``s[:-1]``, labels ``s[1:]`` (last ``max_len``).

        Args:
            rows (np.ndarray): ``(B,)`` row indices of this rank.
            real (np.ndarray | None): ``(B,)`` bool, becomes ``batch.mask``. Default: None.

        Returns:
            SequenceBatch: on CPU.
        """
        rows = np.asarray(rows, dtype=np.int64)
        end = self._offsets[rows + 1]  # (B,)
        lens = self.input_lengths(rows)  # (B,) input lengths
        start = end - lens - 1  # (B,) first kept event
        total = int(lens.sum())
        idx = np.repeat(start - (np.cumsum(lens) - lens), lens) + np.arange(total)  # (T,)
        inputs = np.concatenate([self._values[k][idx] for k in self.keys])  # (K*T,)
        labels = np.concatenate([self._values[k][idx + 1] for k in self.keys])  # (K*T,)
        lengths = torch.from_numpy(np.tile(lens.astype(np.int32), len(self.keys)))  # (K*B,)
        return SequenceBatch(
            features=KeyedJaggedTensor.from_lengths_sync(
                keys=list(self.keys), values=torch.from_numpy(inputs), lengths=lengths
            ),
            labels=KeyedJaggedTensor.from_lengths_sync(
                keys=list(self.keys), values=torch.from_numpy(labels), lengths=lengths.clone()
            ),
            user=torch.from_numpy(self._user[rows]),
            mask=None if real is None else torch.from_numpy(np.ascontiguousarray(real)),
        )
