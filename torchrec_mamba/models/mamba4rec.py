"""Factories ``mamba4rec(...)`` / ``sasrec(...)``, and the documented ``Mamba4Rec`` constructor.

Both factories return a :class:`~torchrec_mamba.models.recommender.SequentialRecommender`: the
item (and optional category) tables, the encoder, and the tasks (next item; next category when
``category_loss_weight > 0``). With ``num_categories > 0`` each position's input is
``item_embedding + category_embedding``, so categories are an input even without their task.

``Mamba4Rec(Mamba4RecConfig(...), encoder)`` keeps working for code written before the model
was split into parts: it builds the same tables and tasks from the config (same parameters, same
random draws, same losses) and is a ``SequentialRecommender``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchrec_mamba.models.heads import SampledSoftmaxConfig
from torchrec_mamba.models.recommender import (
    RecommenderOutput,
    SequenceTower,
    SequentialRecommender,
)
from torchrec_mamba.models.side import SideFeature
from torchrec_mamba.models.tables import (
    CATEGORY,
    CATEGORY_CANDIDATES,
    ITEM,
    ITEM_CANDIDATES,
    SequenceTables,
)
from torchrec_mamba.models.tasks import (
    LossPositions,
    NextCategoryTask,
    NextItemTask,
    TiedSoftmaxTask,
)
from torchrec_mamba.modules.encoder import MambaSequenceEncoder
from torchrec_mamba.modules.sasrec import SASRecEncoder

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
    "make_tasks",
    "mamba4rec",
    "sasrec",
]

#: The output of ``forward`` (an alias kept for old imports).
Mamba4RecOutput = RecommenderOutput


def make_tasks(
    num_items: int,
    num_categories: int = 0,
    category_loss_weight: float = 0.0,
    item_loss_weight: float = 1.0,
    loss_positions: LossPositions = "all",
    sampled_softmax: SampledSoftmaxConfig | None = None,
    item_counts: Tensor | None = None,
    logits_dtype: torch.dtype | None = None,
    targets_per_row: float | None = None,
    label_smoothing: float = 0.0,
) -> list[TiedSoftmaxTask]:
    """Next item, plus next category when ``category_loss_weight > 0``.

    ``logits_dtype`` and ``label_smoothing`` apply to the item softmax, ``targets_per_row`` to
    both tasks (see
    :class:`~torchrec_mamba.models.tasks.TiedSoftmaxTask`).

    Example::

        >>> [t.name for t in make_tasks(10, num_categories=3, category_loss_weight=0.5)]
        ['next_item', 'next_category']
    """
    if category_loss_weight > 0 and num_categories == 0:
        raise ValueError("category_loss_weight > 0 needs num_categories > 0 (a category table)")
    tasks: list[TiedSoftmaxTask] = [
        NextItemTask(num_items, item_loss_weight, loss_positions, sampled_softmax, item_counts,
                     logits_dtype, targets_per_row, label_smoothing)
    ]
    if category_loss_weight > 0:
        tasks.append(NextCategoryTask(num_categories, category_loss_weight, loss_positions,
                                      targets_per_row))
    return tasks


def _assemble(
    encoder: nn.Module,
    tasks: list[TiedSoftmaxTask],
    num_items: int,
    embedding_dim: int,
    num_categories: int,
    side_features: Sequence[SideFeature],
    device: torch.device | str | None,
    input_scale: float,
) -> SequentialRecommender:
    tables = SequenceTables(num_items, embedding_dim, num_categories)
    return SequentialRecommender(tables, encoder, tasks, side_features, device, input_scale)


def mamba4rec(
    num_items: int,
    embedding_dim: int = 64,
    *,
    num_categories: int = 0,
    category_loss_weight: float = 0.0,
    loss_positions: LossPositions = "all",
    sampled_softmax: SampledSoftmaxConfig | None = None,
    item_counts: Tensor | None = None,
    side_features: Sequence[SideFeature] = (),
    device: torch.device | str | None = None,
    logits_dtype: torch.dtype | None = None,
    targets_per_row: float | None = None,
    input_scale: float = 1.0,
    label_smoothing: float = 0.0,
    **encoder_kwargs: Any,
) -> SequentialRecommender:
    """Mamba4Rec: a :class:`MambaSequenceEncoder` between the tables and the tasks.

    Args:
        num_items (int): number of items I.
        embedding_dim (int): width D of the tables and the encoder. Default: 64.
        num_categories (int): categories C (0: no category table). Default: 0.
        category_loss_weight (float): weight of the next-category task (0: none). Default: 0.0.
        loss_positions (str): ``"all"`` or ``"last"``. Default: ``"all"``.
        sampled_softmax (SampledSoftmaxConfig | None): sampled item softmax. Default: None.
        item_counts (Tensor | None): (I + 1,) training counts for its proposal. Default: None.
        side_features (Sequence[SideFeature]): pooled side features. Default: ().
        device (torch.device | str | None): device of tables and encoder. Default: None.
        logits_dtype (torch.dtype | None): dtype of the item softmax's training product, e.g.
            ``torch.bfloat16`` (:class:`~torchrec_mamba.models.heads.FullSoftmaxHead`).
            Default: None (float32).
        targets_per_row (float | None): "global" loss normalisation constant
            (:class:`~torchrec_mamba.models.tasks.TiedSoftmaxTask`). Default: None (batch mean).
        input_scale (float): factor on the embeddings entering the encoder. Default: 1.0.
        label_smoothing (float): label smoothing of the full item softmax
            (:class:`~torchrec_mamba.models.heads.FullSoftmaxHead`). Default: 0.0.
        **encoder_kwargs: passed to ``MambaSequenceEncoder`` (``num_layers``, ``d_state``,
            ``d_conv``, ``expand``, ``dropout``, ``backend``, ``init``) with its defaults.

    Example::

        >>> model = mamba4rec(num_items=20, embedding_dim=8, d_state=4, backend="reference")
        >>> type(model.encoder).__name__, [t.name for t in model.tasks]
        ('MambaSequenceEncoder', ['next_item'])
    """
    encoder = MambaSequenceEncoder(d_model=embedding_dim, device=device, **encoder_kwargs)
    tasks = make_tasks(num_items, num_categories, category_loss_weight, 1.0, loss_positions,
                       sampled_softmax, item_counts, logits_dtype, targets_per_row,
                       label_smoothing)
    return _assemble(encoder, tasks, num_items, embedding_dim, num_categories, side_features,
                     device, input_scale)


def sasrec(
    num_items: int,
    embedding_dim: int = 64,
    *,
    num_categories: int = 0,
    category_loss_weight: float = 0.0,
    loss_positions: LossPositions = "all",
    sampled_softmax: SampledSoftmaxConfig | None = None,
    item_counts: Tensor | None = None,
    side_features: Sequence[SideFeature] = (),
    device: torch.device | str | None = None,
    logits_dtype: torch.dtype | None = None,
    targets_per_row: float | None = None,
    input_scale: float = 1.0,
    label_smoothing: float = 0.0,
    **encoder_kwargs: Any,
) -> SequentialRecommender:
    """The SASRec baseline: the same tables and tasks with a :class:`SASRecEncoder`.

    Args are those of :func:`mamba4rec`; ``**encoder_kwargs`` go to ``SASRecEncoder``
    (``num_layers``, ``num_heads``, ``max_len``, ``dropout``, ``attn_dropout``).

    Example::

        >>> model = sasrec(num_items=20, embedding_dim=8, max_len=10)
        >>> type(model.encoder).__name__
        'SASRecEncoder'
    """
    encoder = SASRecEncoder(d_model=embedding_dim, device=device, **encoder_kwargs)
    tasks = make_tasks(num_items, num_categories, category_loss_weight, 1.0, loss_positions,
                       sampled_softmax, item_counts, logits_dtype, targets_per_row,
                       label_smoothing)
    return _assemble(encoder, tasks, num_items, embedding_dim, num_categories, side_features,
                     device, input_scale)


@dataclass(frozen=True)
class Mamba4RecConfig:
    """Tables, tasks and loss of :class:`Mamba4Rec` (the encoder is passed in already built).

    Args:
        num_items (int): number of items I; table ``"item"`` has ``I + 1`` rows (0 = padding).
        embedding_dim (int): width D of every table; must equal the encoder's ``d_model``.
            Default: 64.
        num_categories (int): number of categories C; 0 means no category table. Default: 0.
        category_loss_weight (float): weight of the next-category task; 0 means no such task
            (categories are then only an input). Default: 0.0.
        item_loss_weight (float): weight of the next-item loss. Default: 1.0.
        loss_positions (str): ``"all"`` or ``"last"`` (:mod:`~torchrec_mamba.models.tasks`).
            Default: ``"all"``.
        sampled_softmax (SampledSoftmaxConfig | None): sampled item softmax; None means the full
            softmax over all I items. Default: None.
        side_features (tuple[SideFeature, ...]): pooled side features. Default: ().
        init_std (float): std of the uniform embedding init. Default: 0.02.
        candidate_chunk_size (int): ids per lookup when a whole table is read. Default: 65536.

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
        """Whether a next-category task is trained."""
        return self.category_loss_weight > 0

    def tables(self) -> SequenceTables:
        """The :class:`SequenceTables` this config describes."""
        return SequenceTables(self.num_items, self.embedding_dim, self.num_categories,
                              self.init_std, self.candidate_chunk_size)


class Mamba4Rec(SequentialRecommender):
    """A :class:`SequentialRecommender` built from a :class:`Mamba4RecConfig` (the old API).

    Prefer :func:`mamba4rec` / :func:`sasrec`. This constructor stays for code that builds the
    encoder itself; despite the name it takes any encoder (``SASRecEncoder`` too).

    Args:
        config (Mamba4RecConfig): tables, tasks and loss.
        encoder (nn.Module): an already built encoder whose ``d_model`` is
            ``config.embedding_dim``.
        item_counts (Tensor | None): (I + 1,) training frequency of each item, for the
            popularity proposal of the sampled softmax; None means uniform. Default: None.
        device (torch.device | str | None): device of the tables. Default: None (CPU).

    Example::

        >>> enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
        >>> cfg = Mamba4RecConfig(num_items=20, embedding_dim=8, num_categories=5)
        >>> Mamba4Rec(cfg, enc).category_embeddings().shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        config: Mamba4RecConfig,
        encoder: nn.Module,
        item_counts: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        tasks = make_tasks(
            config.num_items, config.num_categories, config.category_loss_weight,
            config.item_loss_weight, config.loss_positions, config.sampled_softmax, item_counts,
        )
        super().__init__(config.tables(), encoder, tasks, config.side_features, device)
        self.config = config
