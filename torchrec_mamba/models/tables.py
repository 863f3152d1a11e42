"""The embedding tables of a sequential recommender and the id checks that guard them.

Shape letters: D width, I number of items, C number of categories.

One ``EmbeddingCollection`` holds table ``"item"`` (features ``"item"`` and ``"item_candidates"``)
and, optionally, table ``"category"`` (features ``"category"`` and ``"category_candidates"``).
The ``*_candidates`` features let the tied softmax of a task look its candidate rows up through
the same collection, which is what makes the head work when DMP shards the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

__all__ = [
    "CATEGORY",
    "CATEGORY_CANDIDATES",
    "ITEM",
    "ITEM_CANDIDATES",
    "SequenceTables",
    "candidate_key",
    "check_range",
]

ITEM = "item"
CATEGORY = "category"
ITEM_CANDIDATES = "item_candidates"
CATEGORY_CANDIDATES = "category_candidates"


def candidate_key(key: str) -> str:
    """Name of the candidate feature of table ``key`` (``"item"`` -> ``"item_candidates"``)."""
    return f"{key}_candidates"


@dataclass(frozen=True)
class SequenceTables:
    """Per-position tables: items, and optionally categories (fused into the input by a sum).

    Args:
        num_items (int): number of items I; table ``"item"`` has ``I + 1`` rows (0 = padding).
        embedding_dim (int): width D of every table; must equal the encoder's ``d_model``.
            Default: 64.
        num_categories (int): number of categories C; 0 means no category table. Default: 0.
        init_std (float): std of the uniform embedding init (the paper's N(0, 0.02) scale;
            uniform because TorchRec's sharded kernels initialise uniformly). Default: 0.02.
        candidate_chunk_size (int): ids per lookup when a whole table is read for evaluation.
            Default: 65536.

    Example::

        >>> SequenceTables(num_items=10, num_categories=3).keys
        ['item', 'category']
    """

    num_items: int
    embedding_dim: int = 64
    num_categories: int = 0
    init_std: float = 0.02
    candidate_chunk_size: int = 65536

    def __post_init__(self) -> None:
        for name in ("num_items", "embedding_dim", "candidate_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SequenceTables.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.num_categories, int) or self.num_categories < 0:
            raise ValueError(
                f"SequenceTables.num_categories must be an int >= 0, got {self.num_categories!r}"
            )
        if not self.init_std > 0:
            raise ValueError(f"SequenceTables.init_std must be > 0, got {self.init_std}")

    @property
    def keys(self) -> list[str]:
        """Sequence feature keys, one per table, item first."""
        return [ITEM, CATEGORY] if self.num_categories > 0 else [ITEM]

    def num_ids(self, key: str) -> int:
        """Real ids of table ``key`` (I or C); its table has one more row (padding)."""
        if key not in self.keys:
            raise ValueError(f"no table {key!r}; the tables are {self.keys}")
        return self.num_items if key == ITEM else self.num_categories

    @property
    def init_bound(self) -> float:
        """``b`` of the uniform(-b, b) init, whose std is ``init_std``."""
        return self.init_std * math.sqrt(3.0)

    def build(self, device: torch.device | str | None = None) -> EmbeddingCollection:
        """The ``EmbeddingCollection`` (``"meta"`` works; DMP materialises sharded tables)."""
        bound = self.init_bound
        tables = [
            EmbeddingConfig(
                name=key,
                num_embeddings=self.num_ids(key) + 1,
                embedding_dim=self.embedding_dim,
                feature_names=[key, candidate_key(key)],
                weight_init_min=-bound,
                weight_init_max=bound,
            )
            for key in self.keys
        ]
        return EmbeddingCollection(tables=tables, device=torch.device(device or "cpu"))


def check_range(values: Tensor, size: int, where: str, table: str) -> None:
    """Raise ``ValueError`` if any id is outside ``[0, size)``.

    Example::

        >>> check_range(torch.tensor([0, 3]), 3, "features['item']", "item")
        Traceback (most recent call last):
        ...
        ValueError: features['item'] has id 3 outside [0, 3): table 'item' has 3 rows (0 = padding, ids 1..2)
    """
    if values.numel() == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{where} has id {bad} outside [0, {size}): table {table!r} has {size} rows "
            f"(0 = padding, ids 1..{size - 1})"
        )
