"""Pooled side features (e.g. a user-id table): their spec, their table, their id checks, pooling.

Shape letters: B batch, L sequence length, D width, F number of side features.

Side features are summed into one (B, D) vector that is added to the user representation at
every position, after the encoder, so the encoder stays a pure sequence model and its streaming
``step`` state is unaffected. Their tables live in the model's ``EmbeddingBagCollection`` (an
attribute of the model itself, so DMP shards it and the train pipeline finds its input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_mamba.models.tables import (
    CATEGORY,
    CATEGORY_CANDIDATES,
    ITEM,
    ITEM_CANDIDATES,
    check_range,
)

__all__ = ["SideFeature", "add_side", "build_side_tables", "check_side_ids"]


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


def build_side_tables(
    features: Sequence[SideFeature],
    embedding_dim: int,
    init_bound: float,
    device: torch.device | str | None = None,
) -> EmbeddingBagCollection | None:
    """One sum-pooled table per feature, uniform(-b, b) init; None without features.

    Args:
        features (Sequence[SideFeature]): the side features (unique names).
        embedding_dim (int): width D (the encoder's).
        init_bound (float): ``b`` of the uniform init.
        device (torch.device | str | None): table device. Default: None (CPU).

    Returns:
        EmbeddingBagCollection | None: the tables.
    """
    names = [f.name for f in features]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate side feature names: {names}")
    if not features:
        return None
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f.name,
                num_embeddings=f.num_embeddings,
                embedding_dim=embedding_dim,
                feature_names=[f.name],
                pooling=PoolingType.SUM,
                weight_init_min=-init_bound,
                weight_init_max=init_bound,
            )
            for f in features
        ],
        device=torch.device(device or "cpu"),
    )


def check_side_ids(side: KeyedJaggedTensor | None, features: Sequence[SideFeature]) -> None:
    """Raise ``ValueError`` for a missing side key or an id outside its table."""
    if not features:
        return
    if side is None:
        names = [f.name for f in features]
        raise ValueError(f"the model has side features {names} but batch.side is None")
    keys = side.keys()
    for f in features:
        if f.name not in keys:
            raise ValueError(f"batch.side lacks key {f.name!r} (has {keys})")
        check_range(side[f.name].values(), f.num_embeddings, f"side[{f.name!r}]", f.name)


def add_side(h: Tensor, side: KeyedTensor | None, embedding_dim: int) -> Tensor:
    """Add the summed side embeddings to every position: (B, L, D) -> (B, L, D)."""
    if side is None:
        return h
    pooled = side.values().view(h.shape[0], -1, embedding_dim).sum(1)  # (B, D) sum over F
    return h + pooled[:, None, :]  # (B, L, D)
