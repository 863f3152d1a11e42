"""Read a ``SequentialRecommender``'s tables for serving: direct rows when unsharded, the EC when sharded.

An unsharded ``EmbeddingCollection`` is read with plain tensor indexing (a KJT round trip
through the EC costs ~100x more for one event); a table sharded by DMP is read through the EC, so
every rank's rows are reachable (a collective: all ranks must read the same ids in lockstep).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

from torchrec_mamba.serving.topk import ItemSource

if TYPE_CHECKING:
    from torchrec_mamba.models.recommender import SequentialRecommender

__all__ = ["InputFn", "event_input", "item_source", "table_lookup", "table_source"]


def table_lookup(model: SequentialRecommender, table: str, key: str) -> Callable[[Tensor], Tensor]:
    """``ids (n,) -> (n, D)`` rows of one of the model's tables.

    An unsharded ``EmbeddingCollection`` is read with one ``index_select`` (a KJT round trip
    through the EC costs ~100x more for a single event); a sharded one (DMP) through the EC, so
    every rank's rows are reachable.
    """
    from torchrec.modules.embedding_modules import EmbeddingCollection

    if type(model.ec) is EmbeddingCollection:
        weight: Tensor = model.ec.embeddings[table].weight  # (rows, D)
        return lambda ids: weight.index_select(0, ids.to(weight.device).long())
    return lambda ids: model._lookup(key, ids.long())


def table_source(model: SequentialRecommender, key: str) -> ItemSource:
    """Ids ``1..K`` of table ``key`` as an :class:`ItemSource` (weight slices, or the EC when sharded).

    Args:
        model (SequentialRecommender): the model.
        key (str): ``"item"`` or ``"category"``.

    Returns:
        ItemSource: chunks of the table; nothing is copied when unsharded.
    """
    from torchrec.modules.embedding_modules import EmbeddingCollection

    from torchrec_mamba.models.tables import candidate_key

    if key not in model.sequence_keys:
        raise ValueError(f"no table {key!r} in this model (tables {model.sequence_keys})")
    if type(model.ec) is EmbeddingCollection:  # unsharded: slice the weight, no KJT round trip
        return ItemSource.from_table(model.ec.embeddings[key].weight.detach())
    lookup_key = candidate_key(key)
    return ItemSource.from_lookup(lambda ids: model._lookup(lookup_key, ids),
                                  model.tables.num_ids(key))


def item_source(model: SequentialRecommender) -> ItemSource:
    """The model's items ``1..I`` as an :class:`ItemSource` (direct rows, or the EC when sharded).

    Example::

        >>> import torch
        >>> from torchrec_mamba.models import Mamba4Rec, Mamba4RecConfig
        >>> from torchrec_mamba.modules import MambaSequenceEncoder
        >>> enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
        >>> model = Mamba4Rec(Mamba4RecConfig(num_items=5, embedding_dim=8), enc)
        >>> src = item_source(model)
        >>> torch.equal(torch.cat([e for _, e in src.chunks(2)]), model.item_embeddings())
        True
    """
    from torchrec_mamba.models.tables import ITEM

    return table_source(model, ITEM)

InputFn = Callable[[Tensor, "Tensor | None"], Tensor]


def event_input(model: SequentialRecommender, item_categories: Tensor | None = None) -> InputFn:
    """``(item_ids (B,), category_ids (B,) | None) -> (B, D)``: the tower's encoder input.

    The item embedding (plus the category embedding when the model has a category table), times
    the model's ``input_scale``, exactly what :class:`SequenceTower` feeds its encoder per
    position.

    Args:
        model (SequentialRecommender): the model (sharded tables are read through the EC).
        item_categories (Tensor | None): (I + 1,) dense category of each item, used when an
            event comes without its category. Default: None (categories must be passed).

    Example::

        >>> import torch
        >>> from torchrec_mamba.train.config import DataInfo, RunConfig, build_model
        >>> m = build_model(RunConfig(d_model=4, d_state=2, num_layers=1, backend="reference",
        ...                           loss_normalization="batch"), DataInfo(num_items=5))
        >>> x = event_input(m)(torch.tensor([2]), None)
        >>> torch.equal(x, 2.0 * m.ec.embeddings["item"].weight[2:3])   # sqrt(4) input scale
        True
    """
    from torchrec_mamba.models.tables import CATEGORY, CATEGORY_CANDIDATES, ITEM, ITEM_CANDIDATES

    if model.side_features:
        raise ValueError("streaming does not support models with side features yet")
    lookup = table_lookup(model, ITEM, ITEM_CANDIDATES)
    has_categories = model.tables.num_categories > 0
    category_lookup = table_lookup(model, CATEGORY, CATEGORY_CANDIDATES) if has_categories else None
    scale = model.tower.input_scale

    def input_fn(item_ids: Tensor, category_ids: Tensor | None) -> Tensor:
        x = lookup(item_ids)  # (B, D)
        if category_lookup is not None:
            if category_ids is None:
                if item_categories is None:
                    raise ValueError("this model has a category table: pass category_ids")
                category_ids = item_categories.to(item_ids.device)[item_ids].clamp(min=1)
            x = x + category_lookup(category_ids)
        # the tower scales the fused input; LayerNorm hides most of it, its eps does not
        return x * scale if scale != 1.0 else x

    return input_fn
