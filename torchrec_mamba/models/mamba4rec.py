"""Mamba4Rec as a TorchRec model: EmbeddingCollection -> sequence encoder -> tied heads.

Shape letters: B batch, L sequence length, D width, T number of training targets in a batch,
I number of items, C number of categories, S sampled negatives.

Layout (the split TorchRec's ``TrainPipelineSparseDist`` needs)::

    Mamba4Rec
      ec     EmbeddingCollection   tables "item" (features "item", "item_candidates") and,
                                   optionally, "category" (features "category", "category_candidates")
      ebc    EmbeddingBagCollection optional pooled side features (e.g. "user")
      tower  SequenceTower         encoder + heads; no sharded child, so the pipeline's FX tracer
                                   treats it as one leaf and never traces into the encoder

``forward(batch)`` calls ``self.ec(batch.features)`` straight on the batch so the pipeline can
run the embedding input-dist of batch ``i + 1`` while batch ``i`` computes.

Design choices (documented here because they are visible in results):

* **Tied head through the lookup.** A sharded table has no usable ``.weight`` (it is split over
  ranks, and its fused optimizer only updates rows that went through a lookup), so the candidate
  embeddings of the softmax are looked up through the same ``EmbeddingCollection``: a second
  feature ``"item_candidates"`` of table ``"item"`` holding ids ``1..I`` (full softmax) or the
  batch's positives plus ``S`` sampled negatives (sampled softmax). :meth:`Mamba4Rec.prepare_batch`
  adds it; the training loop calls that before the pipeline sees a batch, and ``forward`` calls it
  itself for a raw batch. The candidate ids sit in row 0 of the KJT (lengths ``[n, 0, ..., 0]``).
* **Category fusion.** With ``num_categories > 0`` each position's input is
  ``item_embedding + category_embedding`` (same width D), and with ``category_loss_weight > 0`` a
  next-category softmax tied to the category table is trained next to the item head:
  ``loss = item_loss_weight * item_loss + category_loss_weight * category_loss``.
* **Side features** (pooled, e.g. a user-id table) are summed into one (B, D) vector that is added
  to the user representation at every position, after the encoder, so the encoder stays a pure
  sequence model and its streaming ``step`` state is unaffected.
* **Loss positions.** ``"all"``: cross-entropy at every position with a label (label 0 is
  ignored), which over the loader's windows trains on every (prefix, next item) pair, like
  RecBole's prefix augmentation; ``"last"``: only each row's final target (the paper's loss, per
  row). Default ``"all"``.
* **Ids** are checked before any lookup: features in ``[0, rows)`` of their table, labels in
  ``[0, I]`` / ``[0, C]``; anything else raises ``ValueError`` naming the id and the table size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.models.heads import FullSoftmaxHead, SampledSoftmaxConfig, SampledSoftmaxHead

__all__ = [
    "CATEGORY",
    "CATEGORY_CANDIDATES",
    "ITEM",
    "ITEM_CANDIDATES",
    "Mamba4Rec",
    "Mamba4RecConfig",
    "Mamba4RecOutput",
    "SequenceTower",
    "SideFeature",
]

logger = logging.getLogger(__name__)

ITEM = "item"
CATEGORY = "category"
ITEM_CANDIDATES = "item_candidates"
CATEGORY_CANDIDATES = "category_candidates"

LossPositions = Literal["all", "last"]


@dataclass(frozen=True)
class SideFeature:
    """A pooled side feature looked up through the model's ``EmbeddingBagCollection``.

    Args:
        name (str): KJT key in ``SequenceBatch.side`` and name of its table.
        num_embeddings (int): rows of the table; ids must be in ``[0, num_embeddings)``.

    Example::

        >>> SideFeature("user", num_embeddings=100).name
        'user'
    """

    name: str
    num_embeddings: int

    def __post_init__(self) -> None:
        if not self.name or self.name in (ITEM, CATEGORY, ITEM_CANDIDATES, CATEGORY_CANDIDATES):
            raise ValueError(f"side feature name {self.name!r} is empty or reserved")
        if not isinstance(self.num_embeddings, int) or self.num_embeddings < 1:
            raise ValueError(
                f"side feature {self.name!r}: num_embeddings must be an int >= 1, "
                f"got {self.num_embeddings!r}"
            )


@dataclass(frozen=True)
class Mamba4RecConfig:
    """Tables, heads and loss of :class:`Mamba4Rec` (the encoder is passed in already built).

    Args:
        num_items (int): number of items I; table ``"item"`` has ``I + 1`` rows (0 = padding).
        embedding_dim (int): width D of every table; must equal the encoder's ``d_model``.
            Default: 64.
        num_categories (int): number of categories C; 0 means no category table. Default: 0.
        category_loss_weight (float): weight of the next-category loss; 0 disables the category
            head (categories are then only an input). Default: 0.0.
        item_loss_weight (float): weight of the next-item loss. Default: 1.0.
        loss_positions (str): ``"all"`` or ``"last"``, see the module docstring. Default: ``"all"``.
        sampled_softmax (SampledSoftmaxConfig | None): use a sampled softmax for the item head;
            None means the full softmax over all I items. Default: None.
        side_features (tuple[SideFeature, ...]): pooled side features. Default: ().
        init_std (float): std of the embedding init (uniform with that std, the paper's
            N(0, 0.02) scale; uniform because TorchRec's sharded kernels initialise uniformly, so
            sharded and unsharded tables draw from the same law). Default: 0.02.
        candidate_chunk_size (int): ids per lookup when :meth:`Mamba4Rec.item_embeddings` reads
            the whole item table for evaluation. Default: 65536.

    Example::

        >>> Mamba4RecConfig(num_items=10, embedding_dim=8).loss_positions
        'all'
    """

    num_items: int
    embedding_dim: int = 64
    num_categories: int = 0
    category_loss_weight: float = 0.0
    item_loss_weight: float = 1.0
    loss_positions: LossPositions = "all"
    sampled_softmax: SampledSoftmaxConfig | None = None
    side_features: tuple[SideFeature, ...] = ()
    init_std: float = 0.02
    candidate_chunk_size: int = 65536

    def __post_init__(self) -> None:
        for name in ("num_items", "embedding_dim", "candidate_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Mamba4RecConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.num_categories, int) or self.num_categories < 0:
            raise ValueError(
                f"Mamba4RecConfig.num_categories must be an int >= 0, got {self.num_categories!r}"
            )
        if self.loss_positions not in ("all", "last"):
            raise ValueError(
                f"Mamba4RecConfig.loss_positions must be 'all' or 'last', got {self.loss_positions!r}"
            )
        for name in ("item_loss_weight", "category_loss_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Mamba4RecConfig.{name} must be finite and >= 0, got {value}")
        if self.category_loss_weight > 0 and self.num_categories == 0:
            raise ValueError("category_loss_weight > 0 needs num_categories > 0 (a category table)")
        if self.item_loss_weight == 0 and self.category_loss_weight == 0:
            raise ValueError("item_loss_weight and category_loss_weight are both 0: nothing to train")
        if not self.init_std > 0:
            raise ValueError(f"Mamba4RecConfig.init_std must be > 0, got {self.init_std}")
        names = [f.name for f in self.side_features]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate side feature names: {names}")

    @property
    def category_head(self) -> bool:
        """Whether a next-category head is trained."""
        return self.category_loss_weight > 0


class Mamba4RecOutput(NamedTuple):
    """Small, detached per-batch results returned next to the loss (no per-item logits).

    Attributes:
        loss (Tensor): scalar total loss.
        item_loss (Tensor): scalar next-item loss.
        category_loss (Tensor): scalar next-category loss (0 without a category head).
        num_targets (Tensor): scalar count of item targets that entered the loss.
    """

    loss: Tensor
    item_loss: Tensor
    category_loss: Tensor
    num_targets: Tensor


def _last_label(values: Tensor, lengths: Tensor) -> Tensor:
    """(T,) jagged labels and (B,) lengths -> (B,) last label of each row (0 for empty rows)."""
    lengths = lengths.long()
    out = torch.zeros_like(lengths)  # (B,)
    nonempty = lengths > 0
    last = torch.cumsum(lengths, 0) - 1  # (B,)
    out[nonempty] = values[last[nonempty]].long()
    return out


def _padded(jt: JaggedTensor, max_len: int) -> Tensor:
    """(T, D) jagged embeddings -> (B, L, D) right-padded with zeros."""
    return torch.ops.fbgemm.jagged_to_padded_dense(jt.values(), [jt.offsets()], [max_len], 0.0)


class SequenceTower(nn.Module):
    """The dense part of :class:`Mamba4Rec`: jagged embeddings -> encoder -> heads -> loss.

    Args:
        config (Mamba4RecConfig): tables, heads and loss settings.
        encoder (nn.Module): causal sequence encoder with ``forward(x (B, L, D), lengths (B,))
            -> (B, L, D)`` (e.g. ``MambaSequenceEncoder`` or ``SASRecEncoder``).
        log_q (Tensor | None): (I + 1,) log proposal probabilities for the sampled softmax.
    """

    def __init__(self, config: Mamba4RecConfig, encoder: nn.Module, log_q: Tensor | None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.item_head: nn.Module = (
            SampledSoftmaxHead(config.sampled_softmax)
            if config.sampled_softmax is not None
            else FullSoftmaxHead()
        )
        self.category_head: FullSoftmaxHead | None = (
            FullSoftmaxHead() if config.category_head else None
        )
        self.log_q = log_q  # plain attribute: derived from data, not a learnt state

    def encode(
        self, embeddings: dict[str, JaggedTensor], side: KeyedTensor | None
    ) -> tuple[Tensor, Tensor]:
        """Per-position user representations.

        Args:
            embeddings (dict[str, JaggedTensor]): EC output; ``"item"`` (and ``"category"``)
                hold (T_all, D) values with B lengths.
            side (KeyedTensor | None): EBC output, (B, F * D) pooled side embeddings.

        Returns:
            tuple[Tensor, Tensor]: h (B, L, D) (zero at padded positions before the side term)
            and lengths (B,) int64.
        """
        item = embeddings[ITEM]
        lengths = item.lengths().long()  # (B,)
        max_len = max(int(lengths.max()), 1) if lengths.numel() else 1
        x = _padded(item, max_len)  # (B, L, D)
        if self.config.num_categories > 0:
            x = x + _padded(embeddings[CATEGORY], max_len)  # (B, L, D) fused input
        h = self.encoder(x, lengths)  # (B, L, D)
        if side is not None:
            width = self.config.embedding_dim
            pooled = side.values().view(h.shape[0], -1, width).sum(1)  # (B, D)
            h = h + pooled[:, None, :]  # (B, L, D)
        return h, lengths

    def _select(
        self, h: Tensor, lengths: Tensor, label_values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """User vectors and targets for the loss: ((T, D), (T,)) with label 0 dropped."""
        if self.config.loss_positions == "last":
            user = h[torch.arange(h.shape[0], device=h.device), (lengths - 1).clamp(min=0)]  # (B, D)
            targets = _last_label(label_values, lengths)  # (B,)
        else:
            real = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]  # (B, L)
            user = h[real]  # (T_all, D) row-major, the order of the jagged labels
            targets = label_values.long()  # (T_all,)
        keep = targets > 0
        return user[keep], targets[keep]

    def forward(
        self,
        embeddings: dict[str, JaggedTensor],
        side: KeyedTensor | None,
        labels: KeyedJaggedTensor,
        features: KeyedJaggedTensor,
    ) -> tuple[Tensor, Mamba4RecOutput]:
        """Training loss.

        Args:
            embeddings (dict[str, JaggedTensor]): EC output for the prepared features.
            side (KeyedTensor | None): EBC output.
            labels (KeyedJaggedTensor): next-event labels, same lengths as the inputs.
            features (KeyedJaggedTensor): the prepared features (for the sampled ids).

        Returns:
            tuple[Tensor, Mamba4RecOutput]: scalar loss and detached summaries.
        """
        cfg = self.config
        h, lengths = self.encode(embeddings, side)  # (B, L, D)
        user, targets = self._select(h, lengths, labels[ITEM].values())  # (T, D), (T,)
        candidates = embeddings[ITEM_CANDIDATES].values()  # (I, D) or (T + S, D)
        if cfg.sampled_softmax is None:
            item_loss = self.item_head(user, candidates, targets)
        else:
            num_pos = targets.numel()
            sampled_ids = features[ITEM_CANDIDATES].values()[num_pos:]  # (S,)
            if self.log_q is None:
                raise RuntimeError("sampled softmax without a proposal (log_q)")
            item_loss = self.item_head(
                user,
                candidates[:num_pos],
                candidates[num_pos:],
                targets,
                sampled_ids,
                self.log_q.to(user.device),
            )
        loss = cfg.item_loss_weight * item_loss if cfg.item_loss_weight > 0 else 0.0 * item_loss
        category_loss = torch.zeros((), device=h.device)
        if self.category_head is not None:
            c_user, c_targets = self._select(h, lengths, labels[CATEGORY].values())  # (T', D)
            c_candidates = embeddings[CATEGORY_CANDIDATES].values()  # (C, D)
            category_loss = self.category_head(c_user, c_candidates, c_targets)
            loss = loss + cfg.category_loss_weight * category_loss
        out = Mamba4RecOutput(
            loss=loss.detach(),
            item_loss=item_loss.detach(),
            category_loss=category_loss.detach(),
            num_targets=torch.tensor(targets.numel()),
        )
        return loss, out

    def user_representation(
        self, embeddings: dict[str, JaggedTensor], side: KeyedTensor | None
    ) -> Tensor:
        """(B, D) representation at each row's last real position (zeros for empty rows)."""
        h, lengths = self.encode(embeddings, side)  # (B, L, D)
        last = h[torch.arange(h.shape[0], device=h.device), (lengths - 1).clamp(min=0)]  # (B, D)
        return last * (lengths > 0).to(last.dtype)[:, None]


class Mamba4Rec(nn.Module):
    """Sequential recommender on TorchRec: EC/EBC lookups, a causal encoder, tied softmax heads.

    Works unsharded and wrapped in ``DistributedModelParallel`` (tables sharded table-, row- or
    column-wise). See the module docstring for the layout and the design choices.

    Args:
        config (Mamba4RecConfig): tables, heads and loss.
        encoder (nn.Module): an already built encoder whose ``d_model`` is
            ``config.embedding_dim``; ``MambaSequenceEncoder`` (Mamba4Rec) or ``SASRecEncoder``
            (the baseline). Its embedding dropout and LayerNorm are its own.
        item_counts (Tensor | None): (I + 1,) training frequency of each item, for the
            popularity proposal of the sampled softmax; None means a uniform proposal.
            Default: None.
        device (torch.device | str | None): device of the tables (``"meta"`` works; DMP
            materialises sharded tables from meta). Default: None (CPU).

    Example::

        >>> from torchrec_mamba.modules import MambaSequenceEncoder
        >>> from torchrec_mamba.data import SequenceBatch
        >>> torch.manual_seed(0) and None
        >>> enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
        >>> model = Mamba4Rec(Mamba4RecConfig(num_items=20, embedding_dim=8), enc)
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
        config: Mamba4RecConfig,
        encoder: nn.Module,
        item_counts: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        d_model = getattr(encoder, "d_model", config.embedding_dim)
        if d_model != config.embedding_dim:
            raise ValueError(
                f"encoder d_model={d_model} differs from embedding_dim={config.embedding_dim}"
            )
        self.config = config
        bound = config.init_std * math.sqrt(3.0)  # uniform(-b, b) has std init_std
        tables = [
            EmbeddingConfig(
                name=ITEM,
                num_embeddings=config.num_items + 1,
                embedding_dim=config.embedding_dim,
                feature_names=[ITEM, ITEM_CANDIDATES],
                weight_init_min=-bound,
                weight_init_max=bound,
            )
        ]
        self.sequence_keys: list[str] = [ITEM]
        self.candidate_keys: list[str] = [ITEM_CANDIDATES]
        if config.num_categories > 0:
            tables.append(
                EmbeddingConfig(
                    name=CATEGORY,
                    num_embeddings=config.num_categories + 1,
                    embedding_dim=config.embedding_dim,
                    feature_names=[CATEGORY, CATEGORY_CANDIDATES],
                    weight_init_min=-bound,
                    weight_init_max=bound,
                )
            )
            self.sequence_keys.append(CATEGORY)
            # an EC needs every feature of its tables in each call; empty without a category head
            self.candidate_keys.append(CATEGORY_CANDIDATES)
        # Every call of the EC gets these keys in this order (a sharded EC fixes its feature
        # permutation on the first call).
        self.feature_keys: list[str] = self.sequence_keys + self.candidate_keys
        self.ec = EmbeddingCollection(tables=tables, device=torch.device(device or "cpu"))
        self.ebc: EmbeddingBagCollection | None = None
        if config.side_features:
            self.ebc = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=f.name,
                        num_embeddings=f.num_embeddings,
                        embedding_dim=config.embedding_dim,
                        feature_names=[f.name],
                        pooling=PoolingType.SUM,
                        weight_init_min=-bound,
                        weight_init_max=bound,
                    )
                    for f in config.side_features
                ],
                device=torch.device(device or "cpu"),
            )
        log_q: Tensor | None = None
        if config.sampled_softmax is not None:
            log_q = self._proposal_log_q(config, item_counts)
        self.tower = SequenceTower(config, encoder, log_q)

    # --- proposal of the sampled softmax ---------------------------------------------------------
    @staticmethod
    def _proposal_log_q(config: Mamba4RecConfig, item_counts: Tensor | None) -> Tensor:
        """(I + 1,) float64 log q; q(0) = 0 (padding is never drawn)."""
        n = config.num_items
        alpha = config.sampled_softmax.proposal_alpha if config.sampled_softmax else 1.0
        if item_counts is None:
            q = torch.ones(n + 1, dtype=torch.float64)
        else:
            if item_counts.shape != (n + 1,):
                raise ValueError(
                    f"item_counts must have shape ({n + 1},) (entry 0 = padding), "
                    f"got {tuple(item_counts.shape)}"
                )
            q = item_counts.double().clamp(min=0) ** alpha
            q = torch.where(q > 0, q, torch.ones_like(q))  # items never seen keep a little mass
        q[0] = 0.0
        q = q / q.sum()
        return torch.log(q).float()  # (I + 1,), -inf at 0

    @property
    def encoder(self) -> nn.Module:
        """The sequence encoder."""
        return self.tower.encoder

    # --- batch preparation ---------------------------------------------------------------------
    def check_ids(self, batch: SequenceBatch) -> None:
        """Raise ``ValueError`` for a missing key or an id outside its table, before any lookup.

        Args:
            batch (SequenceBatch): a raw batch.
        """
        if not isinstance(batch, SequenceBatch):
            raise TypeError(f"expected a SequenceBatch, got {type(batch).__name__}")
        cfg = self.config
        sizes = {ITEM: cfg.num_items + 1, CATEGORY: cfg.num_categories + 1}
        feature_keys = batch.features.keys()
        for key in self.sequence_keys:
            if key not in feature_keys:
                raise ValueError(f"batch.features lacks key {key!r} (has {feature_keys})")
            _check_range(batch.features[key].values(), sizes[key], f"features[{key!r}]", key)
        label_keys = batch.labels.keys()
        needed = [ITEM] + ([CATEGORY] if cfg.category_head else [])
        for key in needed:
            if key not in label_keys:
                raise ValueError(f"batch.labels lacks key {key!r} (has {label_keys})")
            _check_range(batch.labels[key].values(), sizes[key], f"labels[{key!r}]", key)
        if self.ebc is not None:
            if batch.side is None:
                names = [f.name for f in cfg.side_features]
                raise ValueError(f"the model has side features {names} but batch.side is None")
            side_keys = batch.side.keys()
            for f in cfg.side_features:
                if f.name not in side_keys:
                    raise ValueError(f"batch.side lacks key {f.name!r} (has {side_keys})")
                _check_range(batch.side[f.name].values(), f.num_embeddings, f"side[{f.name!r}]", f.name)

    def _candidate_ids(self, batch: SequenceBatch) -> dict[str, Tensor]:
        """Ids of the candidate features for this batch (see the module docstring)."""
        cfg = self.config
        device = batch.features.values().device
        out: dict[str, Tensor] = {}
        if cfg.sampled_softmax is None:
            out[ITEM_CANDIDATES] = torch.arange(1, cfg.num_items + 1, device=device)  # (I,)
        else:
            labels = batch.labels[ITEM]
            if cfg.loss_positions == "last":
                targets = _last_label(labels.values(), labels.lengths())  # (B,)
            else:
                targets = labels.values().long()  # (T_all,)
            positives = targets[targets > 0]  # (T,) same order as SequenceTower._select
            if self.tower.log_q is None:
                raise RuntimeError("sampled softmax without a proposal (log_q)")
            q = self.tower.log_q.double().exp()  # (I + 1,)
            negatives = torch.multinomial(q, cfg.sampled_softmax.num_negatives, replacement=True)
            out[ITEM_CANDIDATES] = torch.cat([positives, negatives.to(device)])  # (T + S,)
        if cfg.category_head:
            out[CATEGORY_CANDIDATES] = torch.arange(1, cfg.num_categories + 1, device=device)
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
        """Check the ids and add the candidate features for the tied head.

        Args:
            batch (SequenceBatch): a raw batch (keys ``"item"`` [+ ``"category"``]).

        Returns:
            SequenceBatch: the same batch with ``features`` holding :attr:`feature_keys`.
        """
        if isinstance(batch, SequenceBatch) and self.is_prepared(batch):
            return batch
        self.check_ids(batch)
        return dataclasses.replace(batch, features=self._features(batch, self._candidate_ids(batch)))

    # --- forward / inference -----------------------------------------------------------------------
    def forward(self, batch: SequenceBatch) -> tuple[Tensor, Mamba4RecOutput]:
        """Training step: ``(loss, output)``, the contract of TorchRec's train pipelines.

        Args:
            batch (SequenceBatch): raw or prepared (:meth:`prepare_batch`) batch.

        Returns:
            tuple[Tensor, Mamba4RecOutput]: scalar loss and small detached summaries.
        """
        if not isinstance(batch, torch.fx.Proxy):  # the pipeline's FX trace skips this
            batch = self.prepare_batch(batch)
        embeddings = self.ec(batch.features)
        side = self.ebc(batch.side) if self.ebc is not None else None
        return self.tower(embeddings, side, batch.labels, batch.features)

    def user_representation(self, batch: SequenceBatch) -> Tensor:
        """The (B, D) user vectors at each row's last position (call in eval mode).

        Args:
            batch (SequenceBatch): a raw batch.

        Returns:
            Tensor: (B, D).
        """
        self.check_ids(batch)
        embeddings = self.ec(self._features(batch, {}))
        side = self.ebc(batch.side) if self.ebc is not None else None
        return self.tower.user_representation(embeddings, side)

    def item_embeddings(self) -> Tensor:
        """(I, D) embeddings of items 1..I, looked up through the EC in chunks (works sharded).

        Returns:
            Tensor: (I, D), row ``j`` is item ``j + 1``.
        """
        return self._table_embeddings(ITEM_CANDIDATES, self.config.num_items)

    def category_embeddings(self) -> Tensor:
        """(C, D) embeddings of categories 1..C, through the EC like :meth:`item_embeddings`.

        These are the candidates of the tied next-category head (the category table also feeds
        the input fusion, so they exist with or without ``category_loss_weight``).

        Example::

            >>> from torchrec_mamba.modules import MambaSequenceEncoder
            >>> enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
            >>> cfg = Mamba4RecConfig(num_items=20, embedding_dim=8, num_categories=5)
            >>> Mamba4Rec(cfg, enc).category_embeddings().shape
            torch.Size([5, 8])

        Returns:
            Tensor: (C, D), row ``j`` is category ``j + 1``.
        """
        self._require_categories("category_embeddings")
        return self._table_embeddings(CATEGORY_CANDIDATES, self.config.num_categories)

    def _require_categories(self, what: str) -> None:
        if self.config.num_categories == 0:
            raise ValueError(
                f"{what}() needs a category table, but this model has num_categories=0 "
                "(build it with Mamba4RecConfig(num_categories=C))"
            )

    def _table_embeddings(self, key: str, count: int) -> Tensor:
        """(count, D) embeddings of ids 1..count under candidate ``key``, in chunks."""
        chunk = self.config.candidate_chunk_size
        chunks = []
        for start in range(1, count + 1, chunk):
            ids = torch.arange(start, min(start + chunk, count + 1))
            chunks.append(self._lookup(key, ids))  # (chunk, D)
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

    def score(self, batch: SequenceBatch, item_embeddings: Tensor | None = None) -> Tensor:
        """Full-ranking scores of every item for every row (call in eval mode, under no_grad).

        Args:
            batch (SequenceBatch): a raw batch.
            item_embeddings (Tensor | None): (I, D) from :meth:`item_embeddings`, to reuse one
                table read over a whole evaluation. Default: None (read it now).

        Returns:
            Tensor: (B, I + 1) dot-product scores; column 0 (padding) is ``-inf``.
        """
        user = self.user_representation(batch)  # (B, D)
        cand = self.item_embeddings() if item_embeddings is None else item_embeddings  # (I, D)
        return FullSoftmaxHead.scores(user, cand.to(user.device))

    def category_scores(
        self, batch: SequenceBatch, category_embeddings: Tensor | None = None
    ) -> Tensor:
        """Full-ranking scores of every category for every row (eval mode, under no_grad).

        The next-category counterpart of :meth:`score`: the same user vectors, ranked against
        the category table (the tied category head).

        Args:
            batch (SequenceBatch): a raw batch with feature key ``"category"``.
            category_embeddings (Tensor | None): (C, D) from :meth:`category_embeddings`, to
                reuse one table read over a whole evaluation. Default: None (read it now).

        Example::

            >>> from torchrec_mamba.modules import MambaSequenceEncoder
            >>> from torchrec_mamba.data import SequenceBatch
            >>> enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
            >>> cfg = Mamba4RecConfig(num_items=20, embedding_dim=8, num_categories=5)
            >>> model = Mamba4Rec(cfg, enc).eval()
            >>> kjt = KeyedJaggedTensor.from_lengths_sync(
            ...     ["item", "category"], torch.tensor([1, 2, 3, 4, 1, 1, 2, 3]),
            ...     torch.tensor([3, 1, 3, 1], dtype=torch.int32))
            >>> scores = model.category_scores(SequenceBatch(features=kjt, labels=kjt))
            >>> scores.shape, bool(torch.isneginf(scores[:, 0]).all())
            (torch.Size([2, 6]), True)

        Returns:
            Tensor: (B, C + 1) dot-product scores; column 0 (padding) is ``-inf``.
        """
        self._require_categories("category_scores")
        user = self.user_representation(batch)  # (B, D)
        cand = (  # (C, D)
            self.category_embeddings() if category_embeddings is None else category_embeddings
        )
        return FullSoftmaxHead.scores(user, cand.to(user.device))


def _check_range(values: Tensor, size: int, where: str, table: str) -> None:
    """Raise ``ValueError`` if any id is outside ``[0, size)``."""
    if values.numel() == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{where} has id {bad} outside [0, {size}): table {table!r} has {size} rows "
            f"(0 = padding, ids 1..{size - 1})"
        )
