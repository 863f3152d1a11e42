"""``fit`` and ``evaluate``: epochs, full-ranking validation, early stopping, test at the best epoch.

Training paths:

* sharded (``DistributedModelParallel``): TorchRec's ``TrainPipelineSparseDist``, which runs the
  embedding input-dist of the next batch while the current one computes. A fresh pipeline is
  built every epoch and detached at its end, so evaluation (which calls the sharded
  ``EmbeddingCollection`` directly) sees the original module forwards;
* unsharded (one process): a plain ``zero_grad / forward / backward / step`` loop. On CPU it is as
  fast as ``TrainPipelineBase`` (there is no copy stream to overlap); see
  ``docs`` fragment of this module's author for the measurement. ``pipeline="base"`` selects
  ``TrainPipelineBase`` instead.

Every batch goes through :meth:`Mamba4Rec.prepare_batch` before the pipeline sees it (id checks
and the candidate features of the tied head).

Model selection: after every epoch the model is ranked on the validation split (full ranking,
:class:`~torchrec_mamba.train.metrics.RankingMetrics`); when validation NDCG@10 (``monitor``)
improves, the test split is evaluated with the same weights and those test metrics are kept. So
the reported test metrics are those of the best-validation epoch, without keeping a second copy of
the (possibly sharded) weights. Training stops after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.optim.keyed import KeyedOptimizer
from tqdm import tqdm

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.data.loader import SequenceLoader
from torchrec_mamba.train.checkpoint import load_checkpoint, save_checkpoint
from torchrec_mamba.train.distributed import DistributedContext, unwrap
from torchrec_mamba.train.metrics import RankingMetrics

__all__ = ["FitConfig", "FitResult", "evaluate", "fit", "train_one_epoch"]

logger = logging.getLogger(__name__)

Pipeline = Literal["auto", "sparse_dist", "base", "plain"]
BatchHook = Callable[[int, int], None]


@dataclass(frozen=True)
class FitConfig:
    """Settings of :func:`fit`.

    Args:
        epochs (int): maximum number of epochs. Default: 50.
        patience (int): stop after this many epochs without a better ``monitor``. Default: 10.
        monitor (str): validation metric that selects the best epoch. Default: ``"ndcg@10"``.
        ks (tuple[int, ...]): metric cut-offs. Default: (5, 10, 20).
        mask_seen (bool): exclude already-seen items from the ranking. Default: False.
        pipeline (str): ``"auto"`` (sparse-dist when sharded, plain otherwise),
            ``"sparse_dist"``, ``"base"`` or ``"plain"``. Default: ``"auto"``.
        checkpoint_dir (str | None): write a checkpoint after every epoch here. Default: None.
        resume (bool): continue from the checkpoint in ``checkpoint_dir`` if there is one.
            Default: False.
        progress (bool): show a tqdm bar on rank 0. Default: True.

    Example::

        >>> FitConfig(epochs=3).monitor
        'ndcg@10'
    """

    epochs: int = 50
    patience: int = 10
    monitor: str = "ndcg@10"
    ks: tuple[int, ...] = (5, 10, 20)
    mask_seen: bool = False
    pipeline: Pipeline = "auto"
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {self.epochs!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {self.patience!r}")
        if self.pipeline not in ("auto", "sparse_dist", "base", "plain"):
            raise ValueError(f"unknown pipeline {self.pipeline!r}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir")
        name, _, k = self.monitor.partition("@")
        if name not in ("hr", "ndcg", "mrr") or not k.isdigit() or int(k) not in self.ks:
            raise ValueError(f"monitor {self.monitor!r} must be hr|ndcg|mrr@K with K in ks={self.ks}")


@dataclass
class FitResult:
    """What :func:`fit` returns (and the CLI writes to ``metrics.json``).

    Args:
        valid (dict[str, float]): validation metrics of the best epoch.
        test (dict[str, float]): test metrics of the best epoch.
        best_epoch (int): 1-based best epoch.
        epochs_run (int): epochs trained (including those before a resume).
        train_seconds_per_epoch (float): mean wall time of the training part of an epoch.
        history (list[dict[str, Any]]): per epoch: ``epoch``, ``loss``, ``valid``,
            ``train_seconds``.
        stopped_early (bool): whether patience ran out.
    """

    valid: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    epochs_run: int
    train_seconds_per_epoch: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def _prepared(model: nn.Module, loader: SequenceLoader, device: torch.device) -> Iterator[SequenceBatch]:
    """Batches on ``device`` with ids checked and candidate features added."""
    inner = unwrap(model)
    for batch in loader:
        yield inner.prepare_batch(batch.to(device))


def _mean_over_ranks(value: float, ctx: DistributedContext) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=ctx.process_group)
    return float(t) / ctx.world_size


def train_one_epoch(
    model: nn.Module,
    optimizer: KeyedOptimizer,
    loader: SequenceLoader,
    ctx: DistributedContext,
    pipeline: Pipeline = "auto",
    progress: bool = True,
    epoch: int = 0,
    on_batch_end: BatchHook | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss over batches and ranks.

    Args:
        model (nn.Module): ``Mamba4Rec`` or a DMP around it.
        optimizer (KeyedOptimizer): from ``build_optimizer``.
        loader (SequenceLoader): the training loader (already ``set_epoch``-ed).
        ctx (DistributedContext): process layout.
        pipeline (str): see :class:`FitConfig`. Default: ``"auto"``.
        progress (bool): tqdm bar on rank 0. Default: True.
        epoch (int): 0-based epoch, for the bar and the hook. Default: 0.
        on_batch_end (Callable[[int, int], None] | None): called with ``(epoch, batches done)``
            after every optimizer step (tests use it to simulate a crash). Default: None.

    Returns:
        float: mean loss.
    """
    sharded = isinstance(model, DistributedModelParallel)
    kind = pipeline if pipeline != "auto" else ("sparse_dist" if sharded else "plain")
    if kind == "sparse_dist" and not sharded:
        raise ValueError("pipeline 'sparse_dist' needs a DistributedModelParallel model")
    model.train()
    batches = _prepared(model, loader, ctx.device)
    bar = tqdm(
        total=len(loader),
        desc=f"epoch {epoch + 1}",
        disable=not (progress and ctx.is_main),
        leave=False,
        dynamic_ncols=True,
    )
    total, count = 0.0, 0
    try:
        if kind == "plain":
            for batch in batches:
                optimizer.zero_grad()
                loss, out = model(batch)
                loss.backward()
                optimizer.step()
                total, count = total + float(out.loss), count + 1
                bar.update(1)
                if on_batch_end is not None:
                    on_batch_end(epoch, count)
        else:
            cls = TrainPipelineSparseDist if kind == "sparse_dist" else TrainPipelineBase
            pipe = cls(model, optimizer, ctx.device)
            try:
                while True:
                    try:
                        out = pipe.progress(batches)
                    except StopIteration:
                        break
                    total, count = total + float(out.loss), count + 1
                    bar.update(1)
                    if on_batch_end is not None:
                        on_batch_end(epoch, count)
            finally:
                if isinstance(pipe, TrainPipelineSparseDist):
                    pipe.detach()  # restore the sharded modules' own forwards for evaluation
    finally:
        bar.close()
    return _mean_over_ranks(total / max(count, 1), ctx)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: SequenceLoader,
    ctx: DistributedContext,
    ks: tuple[int, ...] = (5, 10, 20),
    mask_seen: bool = False,
) -> dict[str, float]:
    """Full-ranking HR/NDCG/MRR@K over ``loader`` (a collective when distributed).

    The item table is read once (through the EC, so it works sharded) and every batch is scored
    against all items; rows a distributed loader repeated (``batch.mask``) are not counted.

    Args:
        model (nn.Module): ``Mamba4Rec`` or a DMP around it.
        loader (SequenceLoader): an evaluation loader (valid or test part).
        ctx (DistributedContext): process layout.
        ks (tuple[int, ...]): cut-offs. Default: (5, 10, 20).
        mask_seen (bool): exclude seen items from the ranking. Default: False.

    Returns:
        dict[str, float]: ``"hr@K"``, ``"ndcg@K"``, ``"mrr@K"``, the same on every rank.
    """
    inner = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        items = inner.item_embeddings()  # (I, D)
        metrics = RankingMetrics(ks=ks, mask_seen=mask_seen, device="cpu")
        for batch in loader:
            batch = batch.to(ctx.device)
            scores = inner.score(batch, item_embeddings=items)  # (B, I + 1)
            history = batch.padded()[0] if mask_seen else None
            metrics.update(scores, batch.targets(), history=history, mask=batch.mask)
        return metrics.compute(ctx.process_group)
    finally:
        model.train(was_training)


def fit(
    model: nn.Module,
    optimizer: KeyedOptimizer,
    train_loader: SequenceLoader,
    valid_loader: SequenceLoader,
    test_loader: SequenceLoader,
    config: FitConfig,
    ctx: DistributedContext,
    on_batch_end: BatchHook | None = None,
) -> FitResult:
    """Train with early stopping on validation, evaluate test at the best epoch, checkpoint.

    Args:
        model (nn.Module): ``Mamba4Rec`` or a DMP around it.
        optimizer (KeyedOptimizer): from ``build_optimizer``.
        train_loader (SequenceLoader): shuffled training loader.
        valid_loader (SequenceLoader): validation loader.
        test_loader (SequenceLoader): test loader.
        config (FitConfig): settings.
        ctx (DistributedContext): process layout.
        on_batch_end (Callable[[int, int], None] | None): see :func:`train_one_epoch`.

    Returns:
        FitResult: best-epoch metrics and the per-epoch history.
    """
    progress: dict[str, Any] = {
        "epoch": 0,
        "best_epoch": 0,
        "best_score": -math.inf,
        "best_valid": {},
        "best_test": {},
        "epochs_since_best": 0,
        "stopped_early": False,
        "history": [],
    }
    if config.resume and config.checkpoint_dir is not None:
        restored = load_checkpoint(config.checkpoint_dir, model, optimizer, ctx)
        if restored is not None:
            progress, loader_state = restored
            train_loader.load_state_dict(loader_state)
        elif ctx.is_main:
            logger.info("no checkpoint in %s: starting from scratch", config.checkpoint_dir)
    for epoch in range(int(progress["epoch"]), config.epochs):
        if progress["stopped_early"]:
            break
        train_loader.set_epoch(epoch)
        start = time.perf_counter()
        loss = train_one_epoch(
            model, optimizer, train_loader, ctx, config.pipeline, config.progress, epoch, on_batch_end
        )
        seconds = time.perf_counter() - start
        valid = evaluate(model, valid_loader, ctx, config.ks, config.mask_seen)
        score = valid[config.monitor]
        improved = score > progress["best_score"]
        if improved:
            progress.update(
                best_epoch=epoch + 1,
                best_score=score,
                best_valid=valid,
                best_test=evaluate(model, test_loader, ctx, config.ks, config.mask_seen),
                epochs_since_best=0,
            )
        else:
            progress["epochs_since_best"] += 1
        progress["history"].append(
            {"epoch": epoch + 1, "loss": loss, "valid": valid, "train_seconds": seconds}
        )
        progress["epoch"] = epoch + 1
        progress["stopped_early"] = progress["epochs_since_best"] >= config.patience
        if ctx.is_main:
            logger.info(
                "epoch %d: loss %.4f, valid %s %.4f%s (%.1fs)",
                epoch + 1, loss, config.monitor, score, " *" if improved else "", seconds,
            )
        if config.checkpoint_dir is not None:
            save_checkpoint(
                config.checkpoint_dir, model, optimizer, progress, train_loader.state_dict(), ctx
            )
    history = progress["history"]
    epoch_seconds = [float(h["train_seconds"]) for h in history]
    return FitResult(
        valid=dict(progress["best_valid"]),
        test=dict(progress["best_test"]),
        best_epoch=int(progress["best_epoch"]),
        epochs_run=int(progress["epoch"]),
        train_seconds_per_epoch=sum(epoch_seconds) / max(len(epoch_seconds), 1),
        history=list(history),
        stopped_early=bool(progress["stopped_early"]),
    )
