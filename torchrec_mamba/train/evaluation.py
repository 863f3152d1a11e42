"""``evaluate`` / ``evaluate_tasks``: full-ranking metrics of a model's tasks over any loader.

Shape letters: B batch, D width, K ids of a task's table.

Scoring is chunked (:func:`torchrec_mamba.serving.chunked_topk`): evaluation never builds a
(B, K) score matrix, so it runs on catalogues of millions of items.
"""

from __future__ import annotations

import torch
from torch import nn

from torchrec_mamba.data.loader import Loader
from torchrec_mamba.train.distributed import DistributedContext, unwrap
from torchrec_mamba.train.metrics import RankingMetrics

__all__ = ["evaluate", "evaluate_tasks"]


@torch.no_grad()
def evaluate_tasks(
    model: nn.Module,
    loader: Loader,
    ctx: DistributedContext,
    ks: tuple[int, ...] = (5, 10, 20),
    mask_seen: bool = False,
    tasks: list[str] | None = None,
    chunk_size: int = 65536,
) -> dict[str, dict[str, float]]:
    """Full-ranking HR/NDCG/MRR@K of each task over ``loader`` (a collective when distributed).

    Each task's table is scored ``chunk_size`` ids at a time with the target's rank counted on
    the way (:func:`~torchrec_mamba.serving.topk.chunked_topk`), so memory is ``O(B *
    chunk_size)``: never a (B, all ids) matrix nor a copy of the table (a sharded table is read
    through the EC, every rank in lockstep). Every batch's user vectors are computed once and
    ranked against each table; rows a distributed loader repeated (``batch.mask``) are not
    counted. ``mask_seen`` masks the ids of the task's own feature. The ranks equal the full
    matrix's, ties included, up to float rounding (see :mod:`torchrec_mamba.serving.topk`).

    Args:
        model (nn.Module): a ``SequentialRecommender`` or a DMP around one.
        loader (Loader): an evaluation loader (valid or test part).
        ctx (DistributedContext): process layout.
        ks (tuple[int, ...]): cut-offs. Default: (5, 10, 20).
        mask_seen (bool): exclude seen ids from the ranking. Default: False.
        tasks (list[str] | None): task names; None means every task. Default: None.
        chunk_size (int): ids scored at a time. Default: 65536.

    Returns:
        dict[str, dict[str, float]]: task name -> ``"hr@K"``, ``"ndcg@K"``, ``"mrr@K"``.
    """
    from torchrec_mamba.serving.tables import table_source
    from torchrec_mamba.serving.topk import chunked_topk

    inner = unwrap(model)
    chosen = inner.tasks if tasks is None else [inner.task(name) for name in tasks]
    was_training = model.training
    model.eval()
    try:
        sources = {t.name: table_source(inner, t.key) for t in chosen}
        metrics = {t.name: RankingMetrics(ks=ks, mask_seen=mask_seen, device="cpu") for t in chosen}
        for batch in loader:
            batch = batch.to(ctx.device)
            user = inner.user_representation(batch).float()  # (B, D), float32 whatever the head
            for t in chosen:
                history = batch.padded(t.key)[0] if mask_seen else None  # (B, L)
                # only the rank counts matter here; k=1 keeps the running top-K trivial
                out = chunked_topk(user, sources[t.name], k=1, targets=batch.targets(t.key),
                                   exclude=history, chunk_size=chunk_size)
                if out.above is None or out.tied is None or out.nan is None:  # pragma: no cover
                    raise RuntimeError("chunked_topk returned no rank counts despite targets")
                metrics[t.name].update_counts(out.above.cpu(), out.tied.cpu(), out.nan.cpu(),
                                              mask=batch.mask)
        return {name: m.compute(ctx.process_group) for name, m in metrics.items()}
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    loader: Loader,
    ctx: DistributedContext,
    ks: tuple[int, ...] = (5, 10, 20),
    mask_seen: bool = False,
    chunk_size: int = 65536,
) -> dict[str, float]:
    """Full-ranking HR/NDCG/MRR@K of the model's primary (first) task, usually the next item.

    See :func:`evaluate_tasks` (this is its primary-task entry).

    Returns:
        dict[str, float]: ``"hr@K"``, ``"ndcg@K"``, ``"mrr@K"``, the same on every rank.
    """
    primary = unwrap(model).tasks[0].name
    return evaluate_tasks(model, loader, ctx, ks, mask_seen, [primary], chunk_size)[primary]
