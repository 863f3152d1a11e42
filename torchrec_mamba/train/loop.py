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

Every batch goes through :meth:`SequentialRecommender.prepare_batch` before the pipeline sees it (id checks
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
import os
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.optim.keyed import KeyedOptimizer
from tqdm import tqdm

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.data.loader import Loader
from torchrec_mamba.train.averaging import WeightAverage
from torchrec_mamba.train.checkpoint import load_checkpoint, save_checkpoint
from torchrec_mamba.train.config import LR_SCHEDULES
from torchrec_mamba.train.distributed import DistributedContext, full_state_dict, unwrap
from torchrec_mamba.train.evaluation import evaluate, evaluate_tasks

__all__ = [
    "LR_SCHEDULES", "FitConfig", "FitResult", "evaluate", "evaluate_tasks", "fit", "lr_factor",
    "train_one_epoch",
]

logger = logging.getLogger(__name__)

Pipeline = Literal["auto", "sparse_dist", "base", "plain"]
_AVERAGE_KEY = "weight_average"  # the average's state inside a checkpoint's progress
BatchHook = Callable[[int, int], None]


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The multiplier of the built learning rates during 0-based ``epoch`` of ``epochs``.

    ``"cosine"`` is half a cosine sampled at epoch starts: 1 for the first epoch, then down to
    ``(1 + cos(pi * (epochs - 1) / epochs)) / 2`` (small, never 0) for the last.

    Example::

        >>> [round(lr_factor("cosine", e, 4), 3) for e in range(4)]
        [1.0, 0.854, 0.5, 0.146]
        >>> lr_factor("constant", 3, 4)
        1.0
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose from {LR_SCHEDULES}")


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
        all_tasks (bool): evaluate every task of the model, not only the primary (first) one;
            their metrics go to ``FitResult.valid_tasks`` / ``test_tasks`` and to each history
            entry's ``"tasks"``. Default: False.
        best_model_path (str | None): write the best epoch's model ``state_dict`` here (loadable
            with ``torch.load(weights_only=True)``), on rank 0; a sharded model's tables are
            gathered first, so the file always loads into the unsharded model. Default: None.
        lr_schedule (str): ``"constant"`` keeps every learning rate as built; ``"cosine"``
            scales each param group's built lr (tables included, fused or not) by
            :func:`lr_factor` at the start of every epoch, from 1 at epoch 1 towards 0 at
            ``epochs``. A function of the epoch only, so ``resume`` continues it. Default:
            ``"constant"``.
        ema_decay (float): 0 trains and evaluates the live weights. In (0, 1): keep an
            exponential moving average of the weights (:class:`~torchrec_mamba.train.averaging.
            WeightAverage`, updated after every optimizer step with this decay) and validate,
            select, test and save it instead; training continues on the live weights. The
            average is part of the checkpoint. Default: 0.

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
    all_tasks: bool = False
    best_model_path: str | None = None
    lr_schedule: str = "constant"
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if (isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float))
                or not 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
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
        valid_tasks (dict[str, dict[str, float]]): with ``all_tasks``, validation metrics of
            every task at the best epoch, by task name. Default: empty.
        test_tasks (dict[str, dict[str, float]]): the same on the test split. Default: empty.
    """

    valid: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    epochs_run: int
    train_seconds_per_epoch: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    valid_tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    test_tasks: dict[str, dict[str, float]] = field(default_factory=dict)


def _prepared(model: nn.Module, loader: Loader, device: torch.device) -> Iterator[SequenceBatch]:
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


def _steps(
    model: nn.Module,
    optimizer: KeyedOptimizer,
    batches: Iterator[SequenceBatch],
    kind: str,
    ctx: DistributedContext,
) -> Generator[Any, None, None]:
    """One optimizer step per batch; yields each step's output (``out.loss`` is detached)."""
    if kind == "plain":
        for batch in batches:
            optimizer.zero_grad()
            loss, out = model(batch)
            loss.backward()
            optimizer.step()
            yield out
        return
    cls = TrainPipelineSparseDist if kind == "sparse_dist" else TrainPipelineBase
    pipe = cls(model, optimizer, ctx.device)
    try:
        while True:
            try:
                out = pipe.progress(batches)
            except StopIteration:
                return
            yield out
    finally:
        if isinstance(pipe, TrainPipelineSparseDist):
            pipe.detach()  # restore the sharded modules' own forwards for evaluation


def train_one_epoch(
    model: nn.Module,
    optimizer: KeyedOptimizer,
    loader: Loader,
    ctx: DistributedContext,
    pipeline: Pipeline = "auto",
    progress: bool = True,
    epoch: int = 0,
    on_batch_end: BatchHook | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss over batches and ranks.

    Args:
        model (nn.Module): ``SequentialRecommender`` or a DMP around it.
        optimizer (KeyedOptimizer): from ``build_optimizer``.
        loader (Loader): the training loader (already ``set_epoch``-ed).
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
        with closing(_steps(model, optimizer, batches, kind, ctx)) as steps:  # detach on errors too
            for out in steps:
                total, count = total + float(out.loss), count + 1
                bar.update(1)
                if on_batch_end is not None:
                    on_batch_end(epoch, count)
    finally:
        bar.close()
    return _mean_over_ranks(total / max(count, 1), ctx)


def _new_progress() -> dict[str, Any]:
    return {
        "epoch": 0,
        "best_epoch": 0,
        "best_score": -math.inf,
        "best_valid": {},
        "best_test": {},
        "best_valid_tasks": {},
        "best_test_tasks": {},
        "epochs_since_best": 0,
        "stopped_early": False,
        "history": [],
    }


def _restore(
    model: nn.Module, optimizer: KeyedOptimizer, train_loader: Loader, config: FitConfig,
    ctx: DistributedContext,
) -> dict[str, Any]:
    """The saved progress (and model, optimizer, RNG and loader states) or a fresh start."""
    progress = _new_progress()
    if config.resume and config.checkpoint_dir is not None:
        restored = load_checkpoint(config.checkpoint_dir, model, optimizer, ctx)
        if restored is not None:
            saved, loader_state = restored
            progress.update(saved)  # checkpoints written before all_tasks lack its keys
            train_loader.load_state_dict(loader_state)
        elif ctx.is_main:
            logger.info("no checkpoint in %s: starting from scratch", config.checkpoint_dir)
    return progress


def _save_best_model(model: nn.Module, path: str, ctx: DistributedContext) -> None:
    """The best epoch's whole weights, atomically, on rank 0; a sharded model's tables are
    gathered first (every rank takes part), so the file loads into the unsharded model."""
    state = full_state_dict(model, ctx)
    if state is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)


def _evaluate_split(
    model: nn.Module, loader: Loader, config: FitConfig, ctx: DistributedContext
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Primary-task metrics and, with ``all_tasks``, every task's."""
    if not config.all_tasks:
        return evaluate(model, loader, ctx, config.ks, config.mask_seen), {}
    by_task = evaluate_tasks(model, loader, ctx, config.ks, config.mask_seen)
    return by_task[unwrap(model).tasks[0].name], by_task


def _with_average(hook: BatchHook | None, average: WeightAverage | None) -> BatchHook | None:
    """``hook`` preceded by the weight-average update (after every optimizer step)."""
    if average is None:
        return hook

    def both(epoch: int, done: int) -> None:
        average.update()
        if hook is not None:
            hook(epoch, done)

    return both


def _run_epoch(
    model: nn.Module, optimizer: KeyedOptimizer, loaders: tuple[Loader, Loader, Loader],
    config: FitConfig, ctx: DistributedContext, progress: dict[str, Any], epoch: int,
    on_batch_end: BatchHook | None, average: WeightAverage | None = None,
) -> None:
    """Train one epoch, validate, test when validation improved; updates ``progress``.

    With ``average`` the averaged weights are validated, tested and saved."""
    train_loader, valid_loader, test_loader = loaders
    train_loader.set_epoch(epoch)
    start = time.perf_counter()
    loss = train_one_epoch(
        model, optimizer, train_loader, ctx, config.pipeline, config.progress, epoch,
        _with_average(on_batch_end, average),
    )
    seconds = time.perf_counter() - start
    weights: AbstractContextManager[None] = average.applied() if average else nullcontext()
    with weights:
        valid, valid_tasks = _evaluate_split(model, valid_loader, config, ctx)
        score = valid[config.monitor]
        improved = score > progress["best_score"]
        if improved:
            test, test_tasks = _evaluate_split(model, test_loader, config, ctx)
            progress.update(best_epoch=epoch + 1, best_score=score, best_valid=valid,
                            best_test=test, best_valid_tasks=valid_tasks,
                            best_test_tasks=test_tasks, epochs_since_best=0)
            if config.best_model_path is not None:
                _save_best_model(model, config.best_model_path, ctx)
    if not improved:
        progress["epochs_since_best"] += 1
    entry: dict[str, Any] = {"epoch": epoch + 1, "loss": loss, "valid": valid,
                             "train_seconds": seconds}
    if valid_tasks:
        entry["tasks"] = valid_tasks
    progress["history"].append(entry)
    progress["epoch"] = epoch + 1
    progress["stopped_early"] = progress["epochs_since_best"] >= config.patience
    if ctx.is_main:
        logger.info(
            "epoch %d: loss %.4f, valid %s %.4f%s (%.1fs)",
            epoch + 1, loss, config.monitor, score, " *" if improved else "", seconds,
        )


def fit(
    model: nn.Module,
    optimizer: KeyedOptimizer,
    train_loader: Loader,
    valid_loader: Loader,
    test_loader: Loader,
    config: FitConfig,
    ctx: DistributedContext,
    on_batch_end: BatchHook | None = None,
) -> FitResult:
    """Train with early stopping on validation, evaluate test at the best epoch, checkpoint.

    Any model following the task contract works (``SequentialRecommender`` from any factory, or
    a DMP around one), with any :class:`~torchrec_mamba.data.loader.Loader` (in-memory or
    parquet): the checkpoint holds the training loader's position, so ``resume`` continues
    exactly where the last complete epoch ended.

    Args:
        model (nn.Module): ``SequentialRecommender`` or a DMP around it.
        optimizer (KeyedOptimizer): from ``build_optimizer``.
        train_loader (Loader): shuffled training loader.
        valid_loader (Loader): validation loader.
        test_loader (Loader): test loader.
        config (FitConfig): settings.
        ctx (DistributedContext): process layout.
        on_batch_end (Callable[[int, int], None] | None): see :func:`train_one_epoch`.

    Returns:
        FitResult: best-epoch metrics and the per-epoch history.
    """
    # The lrs as built, read before a resume loads (scheduled) lrs into the param groups.
    base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
    average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    progress = _restore(model, optimizer, train_loader, config, ctx)
    saved_average = progress.pop(_AVERAGE_KEY, None)
    if (saved_average is None) != (average is None) and progress["epoch"] > 0:
        raise ValueError(
            f"the checkpoint in {config.checkpoint_dir} was written "
            f"{'without' if saved_average is None else 'with'} a weight average, but this run "
            f"has ema_decay={config.ema_decay}; resume with the run's own setting (--ema-decay "
            f"{0 if saved_average is None else saved_average['decay']})"
        )
    if average is not None and saved_average is not None:
        average.load_state_dict(saved_average)
    loaders = (train_loader, valid_loader, test_loader)
    for epoch in range(int(progress["epoch"]), config.epochs):
        if progress["stopped_early"]:
            break
        factor = lr_factor(config.lr_schedule, epoch, config.epochs)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * factor  # type: ignore[index]  # fused tables read it at step()
        _run_epoch(model, optimizer, loaders, config, ctx, progress, epoch, on_batch_end, average)
        if config.checkpoint_dir is not None:
            state = progress if average is None else {**progress, _AVERAGE_KEY: average.state_dict()}
            save_checkpoint(
                config.checkpoint_dir, model, optimizer, state, train_loader.state_dict(), ctx
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
        valid_tasks=dict(progress["best_valid_tasks"]),
        test_tasks=dict(progress["best_test_tasks"]),
    )
