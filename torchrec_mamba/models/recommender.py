"""`SequentialRecommender`: tables + a sequence encoder + tasks, as one TorchRec model.

Shape letters: B batch, L sequence length, D width, T training targets, K ids of a task's table.

Layout (the split TorchRec's ``TrainPipelineSparseDist`` needs)::

    SequentialRecommender
      ec     EmbeddingCollection    per-position tables (models.tables.SequenceTables)
      ebc    EmbeddingBagCollection optional pooled side features (models.side)
      tower  SequenceTower          encoder + tasks; no sharded child, so the pipeline's FX tracer
                                    treats it as one leaf and never traces into the encoder

``forward(batch)`` calls ``self.ec(batch.features)`` straight on the batch so the pipeline can
run the embedding input-dist of batch ``i + 1`` while batch ``i`` computes, and returns
``(loss, output)``, the pipelines' contract.

Tied candidates go through the lookup: a sharded table has no usable ``.weight`` (it is split
over ranks, and its fused optimizer only updates rows that went through a lookup), so each task's
candidates are looked up through the same ``EmbeddingCollection`` under ``"{key}_candidates"``;
:meth:`SequentialRecommender.prepare_batch` adds those ids (row 0 of the KJT holds all of them,
lengths ``[n, 0, ..., 0]``). The training loop calls it before the pipeline sees a batch;
``forward`` calls it itself for a raw batch. Ids are checked before any lookup.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.models.side import SideFeature, add_side, build_side_tables, check_side_ids
from torchrec_mamba.models.tables import CATEGORY, ITEM, SequenceTables, candidate_key, check_range
from torchrec_mamba.models.tasks import TiedSoftmaxTask, check_tasks, select_targets
from torchrec_mamba.modules.sequence import gather_last, jagged_to_padded_dense

__all__ = ["RecommenderOutput", "SequenceTower", "SequentialRecommender"]


class RecommenderOutput(NamedTuple):
    """Small, detached per-batch results returned next to the loss (no per-item logits).

    Attributes:
        loss (Tensor): scalar total loss (sum of weighted task losses).
        item_loss (Tensor): scalar loss of the task on table ``"item"`` (0 without one).
        category_loss (Tensor): scalar loss of the task on table ``"category"`` (0 without one).
        num_targets (Tensor): scalar count of targets of the first task that entered the loss.
    """

    loss: Tensor
    item_loss: Tensor
    category_loss: Tensor
    num_targets: Tensor


class SequenceTower(nn.Module):
    """The dense part: jagged embeddings -> fused padded input -> encoder (+ side) -> task losses.

    Args:
        encoder (nn.Module): a :class:`~torchrec_mamba.modules.SequenceEncoder`.
        tasks (Sequence[TiedSoftmaxTask]): the tasks, first one primary.
        sequence_keys (Sequence[str]): EC outputs summed into the encoder input.
        embedding_dim (int): width D.
        input_scale (float): factor on the fused embeddings before the encoder (SASRec's
            ``sqrt(D)``; the tied output keeps the unscaled rows). Default: 1.0.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: Sequence[TiedSoftmaxTask],
        sequence_keys: Sequence[str],
        embedding_dim: int,
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.input_scale = float(input_scale)
        self.encoder = encoder
        self.tasks = nn.ModuleList(tasks)
        self.sequence_keys = list(sequence_keys)
        self.embedding_dim = embedding_dim

    def _tasks(self) -> list[TiedSoftmaxTask]:
        return list(self.tasks)  # type: ignore[arg-type]

    def encode(
        self, embeddings: dict[str, JaggedTensor], side: KeyedTensor | None
    ) -> tuple[Tensor, Tensor]:
        """Per-position user representations: (B, L, D) and lengths (B,) int64."""
        first = embeddings[self.sequence_keys[0]]
        lengths = first.lengths().long()  # (B,)
        max_len = max(int(lengths.max()), 1) if lengths.numel() else 1
        x = jagged_to_padded_dense(first.values(), first.offsets(), max_len)  # (B, L, D)
        for key in self.sequence_keys[1:]:  # category embeddings fused into the input
            jt = embeddings[key]
            x = x + jagged_to_padded_dense(jt.values(), jt.offsets(), max_len)  # (B, L, D)
        if self.input_scale != 1.0:
            x = x * self.input_scale
        h = self.encoder(x, lengths)  # (B, L, D)
        return add_side(h, side, self.embedding_dim), lengths

    def forward(
        self,
        embeddings: dict[str, JaggedTensor],
        side: KeyedTensor | None,
        labels: KeyedJaggedTensor,
        features: KeyedJaggedTensor,
    ) -> tuple[Tensor, RecommenderOutput]:
        """Training loss ``sum_t weight_t * loss_t`` and detached summaries.

        Args:
            embeddings (dict[str, JaggedTensor]): EC output for the prepared features.
            side (KeyedTensor | None): EBC output, (B, F * D).
            labels (KeyedJaggedTensor): next-event labels, same lengths as the inputs.
            features (KeyedJaggedTensor): the prepared features (for the candidate ids).
        """
        h, lengths = self.encode(embeddings, side)  # (B, L, D)
        total: Tensor | None = None
        by_key: dict[str, Tensor] = {}
        num_targets = torch.tensor(0)
        for i, task in enumerate(self._tasks()):
            user, targets = select_targets(h, lengths, labels[task.key].values(), task.loss_positions)
            candidates = embeddings[task.candidate_key].values()  # (K, D) or (T + S, D)
            task_loss = task.loss(user, targets, candidates, features[task.candidate_key].values(),
                                  num_rows=h.shape[0])
            term = task.loss_weight * task_loss
            total = term if total is None else total + term
            by_key[task.key] = task_loss.detach()
            if i == 0:
                num_targets = torch.tensor(targets.numel())
        if total is None:
            raise RuntimeError("SequenceTower has no task")
        zero = torch.zeros((), device=h.device)
        out = RecommenderOutput(
            loss=total.detach(),
            item_loss=by_key.get(ITEM, zero),
            category_loss=by_key.get(CATEGORY, zero),
            num_targets=num_targets,
        )
        return total, out

    def user_representation(
        self, embeddings: dict[str, JaggedTensor], side: KeyedTensor | None
    ) -> Tensor:
        """(B, D) representation at each row's last real position (zeros for empty rows)."""
        h, lengths = self.encode(embeddings, side)  # (B, L, D)
        return gather_last(h, lengths)


class SequentialRecommender(nn.Module):
    """Sequential recommender on TorchRec: tables, any sequence encoder, and prediction tasks.

    Works unsharded and wrapped in ``DistributedModelParallel`` (tables sharded table-, row- or
    column-wise). Build one with :func:`~torchrec_mamba.models.mamba4rec` or
    :func:`~torchrec_mamba.models.sasrec`, or from parts as below.

    Args:
        tables (SequenceTables): per-position tables (items, optionally categories).
        encoder (nn.Module): a built :class:`~torchrec_mamba.modules.SequenceEncoder` whose
            ``d_model`` is ``tables.embedding_dim`` (its embedding dropout and LayerNorm are its
            own).
        tasks (Sequence[TiedSoftmaxTask]): at least one; the first is the primary task (early
            stopping, :meth:`score`). Each task's table must exist with the same id count.
        side_features (Sequence[SideFeature]): pooled side features. Default: ().
        device (torch.device | str | None): device of the tables (``"meta"`` works; DMP
            materialises sharded tables from meta). Default: None (CPU).
        input_scale (float): factor on the embeddings entering the encoder. Default: 1.0.

    Example::

        >>> from torchrec_mamba.models import NextItemTask, SequenceTables
        >>> from torchrec_mamba.modules import MambaSequenceEncoder
        >>> torch.manual_seed(0) and None
        >>> enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
        >>> model = SequentialRecommender(SequenceTables(num_items=20, embedding_dim=8), enc,
        ...                               [NextItemTask(num_items=20)])
        >>> f = KeyedJaggedTensor.from_lengths_sync(["item"], torch.tensor([1, 2, 3, 4]),
        ...                                         torch.tensor([3, 1], dtype=torch.int32))
        >>> y = KeyedJaggedTensor.from_lengths_sync(["item"], torch.tensor([2, 3, 5, 6]),
        ...                                         torch.tensor([3, 1], dtype=torch.int32))
        >>> batch = SequenceBatch(features=f, labels=y)
        >>> loss, out = model(batch)
        >>> loss.backward()
        >>> model.eval().score(batch).shape          # column 0 (padding) is -inf
        torch.Size([2, 21])
    """

    def __init__(
        self,
        tables: SequenceTables,
        encoder: nn.Module,
        tasks: Sequence[TiedSoftmaxTask],
        side_features: Sequence[SideFeature] = (),
        device: torch.device | str | None = None,
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be finite and > 0, got {input_scale!r}")
        d_model = getattr(encoder, "d_model", tables.embedding_dim)
        if d_model != tables.embedding_dim:
            raise ValueError(
                f"encoder d_model={d_model} differs from embedding_dim={tables.embedding_dim}"
            )
        check_tasks(tables, tasks)
        self.tables = tables
        self.side_features = tuple(side_features)
        self.sequence_keys: list[str] = tables.keys
        # an EC needs every feature of its tables in each call; a table without a task gets an
        # empty candidate feature
        self.candidate_keys: list[str] = [candidate_key(k) for k in tables.keys]
        # Every call of the EC gets these keys in this order (a sharded EC fixes its feature
        # permutation on the first call).
        self.feature_keys: list[str] = self.sequence_keys + self.candidate_keys
        self.ec = tables.build(device)
        self.ebc = build_side_tables(
            self.side_features, tables.embedding_dim, tables.init_bound, device
        )
        self.tower = SequenceTower(
            encoder, tasks, self.sequence_keys, tables.embedding_dim, input_scale
        )

    @property
    def encoder(self) -> nn.Module:
        """The sequence encoder."""
        return self.tower.encoder

    @property
    def tasks(self) -> list[TiedSoftmaxTask]:
        """The tasks, primary first."""
        return self.tower._tasks()

    def task(self, name: str) -> TiedSoftmaxTask:
        """The task called ``name`` (e.g. ``"next_item"``)."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise ValueError(f"no task {name!r}; this model has {[t.name for t in self.tasks]}")

    # --- batch preparation ---------------------------------------------------------------------
    def check_ids(self, batch: SequenceBatch) -> None:
        """Raise ``ValueError`` for a missing key or an id outside its table, before any lookup."""
        if not isinstance(batch, SequenceBatch):
            raise TypeError(f"expected a SequenceBatch, got {type(batch).__name__}")
        feature_keys = batch.features.keys()
        for key in self.sequence_keys:
            if key not in feature_keys:
                raise ValueError(f"batch.features lacks key {key!r} (has {feature_keys})")
            size = self.tables.num_ids(key) + 1
            check_range(batch.features[key].values(), size, f"features[{key!r}]", key)
        label_keys = batch.labels.keys()
        for key in dict.fromkeys(t.key for t in self.tasks):
            if key not in label_keys:
                raise ValueError(f"batch.labels lacks key {key!r} (has {label_keys})")
            size = self.tables.num_ids(key) + 1
            check_range(batch.labels[key].values(), size, f"labels[{key!r}]", key)
        if self.ebc is not None:
            check_side_ids(batch.side, self.side_features)

    def _candidate_ids(self, batch: SequenceBatch) -> dict[str, Tensor]:
        device = batch.features.values().device
        out: dict[str, Tensor] = {}
        for task in self.tasks:
            labels = batch.labels[task.key]
            out[task.candidate_key] = task.candidate_ids(labels.values(), labels.lengths(), device)
        return out

    def _features(self, batch: SequenceBatch, candidates: dict[str, Tensor]) -> KeyedJaggedTensor:
        """The model's KJT: sequence keys from the batch, then candidate keys (row 0 holds all)."""
        stride = batch.batch_size
        device = batch.features.values().device
        values: list[Tensor] = []
        lengths: list[Tensor] = []
        for key in self.sequence_keys:
            jt = batch.features[key]
            values.append(jt.values().long())
            lengths.append(jt.lengths().int())
        for key in self.candidate_keys:
            ids = candidates.get(key)
            row_lengths = torch.zeros(stride, dtype=torch.int32, device=device)
            if ids is not None and stride > 0:
                values.append(ids.long())
                row_lengths[0] = ids.numel()
            lengths.append(row_lengths)
        return KeyedJaggedTensor(
            keys=list(self.feature_keys), values=torch.cat(values), lengths=torch.cat(lengths)
        )

    def is_prepared(self, batch: SequenceBatch) -> bool:
        """Whether ``batch`` already went through :meth:`prepare_batch`."""
        return batch.features.keys() == self.feature_keys

    def prepare_batch(self, batch: SequenceBatch) -> SequenceBatch:
        """Check the ids and add every task's candidate feature (a no-op when prepared)."""
        if isinstance(batch, SequenceBatch) and self.is_prepared(batch):
            return batch
        self.check_ids(batch)
        return dataclasses.replace(batch, features=self._features(batch, self._candidate_ids(batch)))

    # --- forward / inference -----------------------------------------------------------------------
    def forward(self, batch: SequenceBatch) -> tuple[Tensor, RecommenderOutput]:
        """Training step: ``(loss, output)``, the contract of TorchRec's train pipelines."""
        if not isinstance(batch, torch.fx.Proxy):  # the pipeline's FX trace skips this
            batch = self.prepare_batch(batch)
        embeddings = self.ec(batch.features)
        side = self.ebc(batch.side) if self.ebc is not None else None
        return self.tower(embeddings, side, batch.labels, batch.features)

    def user_representation(self, batch: SequenceBatch) -> Tensor:
        """The (B, D) user vectors at each row's last position (call in eval mode)."""
        self.check_ids(batch)
        embeddings = self.ec(self._features(batch, {}))
        side = self.ebc(batch.side) if self.ebc is not None else None
        return self.tower.user_representation(embeddings, side)

    def table_embeddings(self, key: str) -> Tensor:
        """(K, D) rows 1..K of table ``key``, looked up through the EC in chunks (works sharded).

        Args:
            key (str): ``"item"`` or ``"category"``.

        Returns:
            Tensor: (K, D), row ``j`` is id ``j + 1``.
        """
        if key not in self.sequence_keys:
            raise ValueError(
                f"no table {key!r} in this model (tables {self.sequence_keys}); a category table "
                "needs num_categories > 0"
            )
        count, chunk = self.tables.num_ids(key), self.tables.candidate_chunk_size
        chunks = []
        for start in range(1, count + 1, chunk):
            ids = torch.arange(start, min(start + chunk, count + 1))
            chunks.append(self._lookup(candidate_key(key), ids))  # (chunk, D)
        return torch.cat(chunks)

    def _lookup(self, key: str, ids: Tensor) -> Tensor:
        """Look up ``ids`` under one candidate key with every other key empty; (n, D)."""
        device = self._device()
        values = ids.to(device)
        lengths = torch.zeros(len(self.feature_keys), dtype=torch.int32, device=device)
        lengths[self.feature_keys.index(key)] = values.numel()
        kjt = KeyedJaggedTensor(keys=list(self.feature_keys), values=values, lengths=lengths)
        return self.ec(kjt)[key].values()

    def _device(self) -> torch.device:
        for p in self.tower.parameters():
            return p.device
        return torch.device("cpu")

    def task_scores(
        self, batch: SequenceBatch, key: str = ITEM, candidates: Tensor | None = None
    ) -> Tensor:
        """Full-ranking scores of every id of table ``key`` (eval mode, under no_grad).

        Args:
            batch (SequenceBatch): a raw batch.
            key (str): the table ranked. Default: ``"item"``.
            candidates (Tensor | None): (K, D) from :meth:`table_embeddings`, to reuse one
                table read over a whole evaluation. Default: None (read it now).

        Returns:
            Tensor: (B, K + 1) dot-product scores; column 0 (padding) is ``-inf``.
        """
        if key not in self.sequence_keys:
            self.table_embeddings(key)  # raises the message naming the tables
        user = self.user_representation(batch)  # (B, D)
        cand = self.table_embeddings(key) if candidates is None else candidates  # (K, D)
        return TiedSoftmaxTask.scores(user, cand)

    # --- item / category shorthands (the names users know) ------------------------------------
    def item_embeddings(self) -> Tensor:
        """(I, D) embeddings of items 1..I (see :meth:`table_embeddings`)."""
        return self.table_embeddings(ITEM)

    def category_embeddings(self) -> Tensor:
        """(C, D) embeddings of categories 1..C (needs a category table)."""
        self._require_categories("category_embeddings")
        return self.table_embeddings(CATEGORY)

    def score(self, batch: SequenceBatch, item_embeddings: Tensor | None = None) -> Tensor:
        """(B, I + 1) full-ranking item scores, column 0 ``-inf`` (eval mode, no_grad)."""
        return self.task_scores(batch, ITEM, item_embeddings)

    def category_scores(
        self, batch: SequenceBatch, category_embeddings: Tensor | None = None
    ) -> Tensor:
        """(B, C + 1) full-ranking category scores, column 0 ``-inf`` (eval mode, no_grad)."""
        self._require_categories("category_scores")
        return self.task_scores(batch, CATEGORY, category_embeddings)

    def _require_categories(self, what: str) -> None:
        if self.tables.num_categories == 0:
            raise ValueError(
                f"{what}() needs a category table, but this model has num_categories=0 "
                "(build it with num_categories=C)"
            )

