"""End-of-epoch checkpoints that resume a run exactly.

A checkpoint holds the model, the whole optimizer state (dense Adam moments and the fused
optimizer state of sharded tables), the RNG states (python, numpy, torch, CUDA), the data-order
state of the training loader, and the training progress (epochs done, best metrics, early-stopping
counter, history). A run resumed from it and continued with the same settings reproduces the
uninterrupted run bit for bit (tested with a run killed mid-epoch).

Two layouts, both crash-safe (a checkpoint becomes visible only once it is complete):

* **unsharded** (one process, plain model): ``DIR/checkpoint.pt``, written by ``torch.save`` to a
  temporary file and moved into place with ``os.replace``;
* **sharded** (``DistributedModelParallel``): ``DIR/epoch_NNNN/`` written with
  ``torch.distributed.checkpoint`` (tables as ShardedTensors, each rank writes its shards) plus one
  ``rank_R.pt`` per rank for that rank's RNG and loader state. It is written under a temporary
  name, renamed by rank 0 when every rank has finished, and ``DIR/latest`` (a one-line text file,
  replaced atomically) then points at it; older epoch folders are removed after that.

Resuming a sharded checkpoint needs the same world size (the RNG and loader states are per rank;
the model and optimizer tensors themselves could be resharded by DCP).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from torchrec_mamba.train.distributed import DistributedContext

__all__ = [
    "CHECKPOINT_VERSION",
    "capture_rng",
    "has_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_UNSHARDED = "checkpoint.pt"
_LATEST = "latest"


def capture_rng() -> dict[str, Any]:
    """Snapshot every RNG a training step can touch (python, numpy, torch CPU and CUDA).

    Example::

        >>> state = capture_rng(); a = torch.rand(1); restore_rng(state)
        >>> bool(torch.rand(1) == a)
        True

    Returns:
        dict[str, Any]: picklable states.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore a :func:`capture_rng` snapshot."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _init_optimizer_state(optimizer: KeyedOptimizer) -> None:
    """Create the lazily built state of every non-fused optimizer so it can be loaded in place.

    The dummy step uses zero gradients; Adam's update is then exactly zero and any weight-decay
    change is overwritten by the model weights loaded right after.
    """
    parts = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [("", optimizer)]
    for _, opt in parts:
        if len(opt.state) == 0 and any(p.requires_grad for p in opt.params.values()):
            opt.init_state()
            opt.zero_grad(set_to_none=True)
            for p in opt.params.values():
                if isinstance(p, torch.Tensor):
                    p.grad = None


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a complete checkpoint (either layout)."""
    d = Path(directory)
    return (d / _UNSHARDED).is_file() or (d / _LATEST).is_file()


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: KeyedOptimizer,
    progress: dict[str, Any],
    loader_state: dict[str, int],
    ctx: DistributedContext,
) -> Path:
    """Write the checkpoint of a finished epoch (a collective when sharded: call on every rank).

    Args:
        directory (str | Path): checkpoint folder (created if needed).
        model (nn.Module): the model (plain or DMP).
        optimizer (KeyedOptimizer): the optimizer from ``build_optimizer``.
        progress (dict[str, Any]): training progress; must hold ``"epoch"`` (epochs done).
        loader_state (dict[str, int]): ``SequenceLoader.state_dict()`` of the training loader.
        ctx (DistributedContext): process layout.

    Returns:
        Path: the file or folder written.
    """
    d = Path(directory)
    extra = {
        "version": CHECKPOINT_VERSION,
        "progress": progress,
        "loader": loader_state,
        "rng": capture_rng(),
        "world_size": ctx.world_size,
        "rank": ctx.rank,
    }
    if not isinstance(model, DistributedModelParallel):
        if ctx.world_size != 1:
            raise ValueError("an unsharded model is only checkpointed in a single process")
        d.mkdir(parents=True, exist_ok=True)
        path = d / _UNSHARDED
        _atomic_save(
            {**extra, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, path
        )
        logger.info("checkpoint (epoch %d) -> %s", progress["epoch"], path)
        return path

    import torch.distributed.checkpoint as dcp

    name = f"epoch_{int(progress['epoch']):04d}"
    tmp = d / f".{name}.tmp"
    if ctx.is_main:
        d.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=str(tmp))
    _atomic_save(extra, tmp / f"rank_{ctx.rank}.pt")
    dist.barrier()
    final = d / name
    if ctx.is_main:
        if final.exists():  # left by a crashed run that never pointed `latest` at it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(name + "\n", d / _LATEST)
        for old in d.glob("epoch_*"):
            if old.name != name and old.is_dir():
                shutil.rmtree(old)
        logger.info("checkpoint (epoch %d) -> %s", progress["epoch"], final)
    dist.barrier()
    return final


def load_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: KeyedOptimizer,
    ctx: DistributedContext,
) -> tuple[dict[str, Any], dict[str, int]] | None:
    """Restore model, optimizer and RNG states in place; return (progress, loader state).

    Args:
        directory (str | Path): checkpoint folder.
        model (nn.Module): a model built exactly as for the saved run (plain or DMP).
        optimizer (KeyedOptimizer): its optimizer, freshly built.
        ctx (DistributedContext): process layout (same world size as the saved run).

    Returns:
        tuple | None: ``(progress, loader_state)``, or None when ``directory`` has no checkpoint.
    """
    d = Path(directory)
    sharded = isinstance(model, DistributedModelParallel)
    if not sharded:
        path = d / _UNSHARDED
        if not path.is_file():
            if (d / _LATEST).is_file():
                raise ValueError(f"{d} holds a sharded checkpoint; resume it with the same sharding")
            return None
        saved = torch.load(path, map_location=ctx.device, weights_only=False)  # our own file
        _check_version(saved, path)
        _init_optimizer_state(optimizer)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        restore_rng(saved["rng"])
        logger.info("resumed from %s (epoch %d)", path, saved["progress"]["epoch"])
        return saved["progress"], saved["loader"]

    import torch.distributed.checkpoint as dcp

    pointer = d / _LATEST
    if not pointer.is_file():
        if (d / _UNSHARDED).is_file():
            raise ValueError(f"{d} holds an unsharded checkpoint; resume it without sharding")
        return None
    folder = d / pointer.read_text().strip()
    rank_file = folder / f"rank_{ctx.rank}.pt"
    if not rank_file.is_file():
        raise ValueError(f"{folder} has no {rank_file.name}: was it written with {ctx.world_size} ranks?")
    extra = torch.load(rank_file, map_location="cpu", weights_only=False)  # our own file
    _check_version(extra, rank_file)
    if extra["world_size"] != ctx.world_size:
        raise ValueError(
            f"{folder} was written by {extra['world_size']} ranks; resume with the same world size "
            f"(now {ctx.world_size})"
        )
    _init_optimizer_state(optimizer)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    dcp.load(state, checkpoint_id=str(folder))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(extra["rng"])
    if ctx.is_main:
        logger.info("resumed from %s (epoch %d)", folder, extra["progress"]["epoch"])
    return extra["progress"], extra["loader"]


def _check_version(saved: dict[str, Any], path: Path) -> None:
    version = saved.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {version!r}, expected {CHECKPOINT_VERSION}")
