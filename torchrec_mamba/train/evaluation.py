"""``evaluate`` / ``evaluate_tasks``: full-ranking metrics of a model's tasks over any loader.

Shape letters: B batch, D width, K ids of a task's table.
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
) -> dict[str, dict[str, float]]:
    """Full-ranking HR/NDCG/MRR@K of each task over ``loader`` (a collective when distributed).

    Each task's table is read once (through the EC, so it works sharded); every batch's user
    vectors are computed once and ranked against each table; rows a distributed loader repeated
    (``batch.mask``) are not counted. ``mask_seen`` masks the ids of the task's own feature.

    Args:
        model (nn.Module): a ``SequentialRecommender`` or a DMP around one.
        loader (Loader): an evaluation loader (valid or test part).
        ctx (DistributedContext): process layout.
        ks (tuple[int, ...]): cut-offs. Default: (5, 10, 20).
        mask_seen (bool): exclude seen ids from the ranking. Default: False.
        tasks (list[str] | None): task names; None means every task. Default: None.

    Returns:
        dict[str, dict[str, float]]: task name -> ``"hr@K"``, ``"ndcg@K"``, ``"mrr@K"``.
    """
    inner = unwrap(model)
    chosen = inner.tasks if tasks is None else [inner.task(name) for name in tasks]
    was_training = model.training
    model.eval()
    try:
        tables = {t.name: inner.table_embeddings(t.key) for t in chosen}  # (K, D) each
        metrics = {t.name: RankingMetrics(ks=ks, mask_seen=mask_seen, device="cpu") for t in chosen}
        for batch in loader:
            batch = batch.to(ctx.device)
            user = inner.user_representation(batch)  # (B, D)
            for t in chosen:
                scores = t.scores(user, tables[t.name])  # (B, K + 1)
                history = batch.padded(t.key)[0] if mask_seen else None
                metrics[t.name].update(scores, batch.targets(t.key), history=history, mask=batch.mask)
        return {name: m.compute(ctx.process_group) for name, m in metrics.items()}
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    loader: Loader,
    ctx: DistributedContext,
    ks: tuple[int, ...] = (5, 10, 20),
    mask_seen: bool = False,
) -> dict[str, float]:
    """Full-ranking HR/NDCG/MRR@K of the model's primary (first) task, usually the next item.

    See :func:`evaluate_tasks` (this is its primary-task entry).

    Returns:
        dict[str, float]: ``"hr@K"``, ``"ndcg@K"``, ``"mrr@K"``, the same on every rank.
    """
    primary = unwrap(model).tasks[0].name
    return evaluate_tasks(model, loader, ctx, ks, mask_seen, [primary])[primary]
