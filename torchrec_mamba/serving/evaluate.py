"""Chunked full-ranking evaluation: the drop-in for ``train.loop.evaluate`` at any catalogue size.

Same signature and results as :func:`torchrec_mamba.train.loop.evaluate`, but the item table is
streamed in chunks through :func:`~torchrec_mamba.serving.topk.chunked_topk`, so memory is
``O(B * chunk_size)`` instead of ``O(B * I)`` plus an ``(I, D)`` copy of the table. With a table
sharded by DMP every rank reads the same chunks through the EC (a collective, in lockstep).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from torchrec_mamba.serving.tables import item_source
from torchrec_mamba.serving.topk import chunked_topk
from torchrec_mamba.train.metrics import RankingMetrics

if TYPE_CHECKING:
    from torchrec_mamba.data.loader import SequenceLoader
    from torchrec_mamba.train.distributed import DistributedContext

__all__ = ["evaluate_chunked", "item_source"]  # item_source re-exported from .tables


@torch.no_grad()
def evaluate_chunked(
    model: nn.Module,
    loader: SequenceLoader,
    ctx: DistributedContext,
    ks: tuple[int, ...] = (5, 10, 20),
    mask_seen: bool = False,
    chunk_size: int = 65536,
) -> dict[str, float]:
    """Full-ranking HR/NDCG/MRR@K over ``loader``, scoring the items chunk by chunk.

    Args:
        model (nn.Module): ``Mamba4Rec`` or a DMP around it.
        loader (SequenceLoader): an evaluation loader.
        ctx (DistributedContext): process layout (``compute`` all-reduces over its group).
        ks (tuple[int, ...]): cut-offs. Default: (5, 10, 20).
        mask_seen (bool): exclude each user's history (except the target). Default: False.
        chunk_size (int): items scored at a time. Default: 65536.

    Returns:
        dict[str, float]: ``"hr@K"``, ``"ndcg@K"``, ``"mrr@K"``, as ``train.loop.evaluate``.
    """
    from torchrec_mamba.train.distributed import unwrap

    inner = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        items = item_source(inner)
        metrics = RankingMetrics(ks=ks, device="cpu")
        for batch in loader:
            batch = batch.to(ctx.device)
            user = inner.user_representation(batch)  # (B, D)
            exclude = batch.padded()[0] if mask_seen else None  # (B, L)
            # only the rank counts matter here; k=1 keeps the running top-K trivial
            out = chunked_topk(user, items, k=1, targets=batch.targets(), exclude=exclude,
                               chunk_size=chunk_size)
            if out.above is None or out.tied is None or out.nan is None:  # pragma: no cover
                raise RuntimeError("chunked_topk returned no rank counts despite targets")
            metrics.update_counts(out.above, out.tied, out.nan, mask=batch.mask)
        return metrics.compute(ctx.process_group)
    finally:
        model.train(was_training)
