"""End-of-epoch checkpoints that resume a run exactly.

A checkpoint holds the model, the whole optimizer state (dense Adam moments and the fused
optimizer state of sharded tables), the RNG states (python, numpy, torch, CUDA), the data-order
state of the training loader, and the training progress (epochs done, best metrics, early-stopping
counter, history). A run resumed from it and continued with the same settings reproduces the
uninterrupted run bit for bit (tested with a run killed mid-epoch).

Two layouts, both crash-safe (a checkpoint becomes visible only once it is complete):

* **unsharded** (one process, plain model): ``DIR/checkpoint.pt``, written by ``torch.save`` to a
  temporary file, fsynced and moved into place with ``os.replace``. The checkpoint it replaces is
  kept as ``DIR/checkpoint.prev.pt``. A checkpoint that cannot be read (cut, overwritten,
  not a checkpoint) raises :class:`CorruptCheckpointError` naming the file, and
  :func:`load_checkpoint` then falls back to ``checkpoint.prev.pt`` with a logged warning;
* **sharded** (``DistributedModelParallel``): ``DIR/epoch_NNNN/`` written with
  ``torch.distributed.checkpoint`` (tables as ShardedTensors, each rank writes its shards) plus one
  ``rank_R.pt`` per rank for that rank's RNG and loader state. It is written under a temporary
  name, renamed by rank 0 when every rank has finished, and ``DIR/latest`` (a one-line text file,
  replaced atomically) then points at it; the folder before it is kept as the previous good one
  and older ones are removed. When any rank cannot read its part of the latest folder, every
  rank falls back to the previous one (agreed by an all-reduce, so no rank is left waiting).

Files are loaded with ``torch.load(weights_only=True)``: only tensors and plain containers are
unpickled (the numpy RNG state is stored as a list; the arrays of version-1 files are allowed
explicitly).

Resuming a sharded checkpoint needs the same world size (the RNG and loader states are per rank;
the model and optimizer tensors themselves could be resharded by DCP).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from torchrec_mamba.train.distributed import DistributedContext

__all__ = [
    "CHECKPOINT_VERSION",
    "CorruptCheckpointError",
    "capture_rng",
    "has_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_UNSHARDED = "checkpoint.pt"
_PREVIOUS = "checkpoint.prev.pt"
_LATEST = "latest"
_REQUIRED = ("version", "progress", "loader", "rng")
# numpy pieces of a numpy RNG state pickled as arrays (files written before it became a list)
_NUMPY_GLOBALS = [np.core.multiarray._reconstruct,  # type: ignore[attr-defined]
                  np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read; the message names the file."""


def capture_rng() -> dict[str, Any]:
    """Snapshot every RNG a training step can touch (python, numpy, torch CPU and CUDA).

    Example::

        >>> state = capture_rng(); a = torch.rand(1); restore_rng(state)
        >>> bool(torch.rand(1) == a)
        True

    Returns:
        dict[str, Any]: picklable states.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, np.asarray(keys).tolist(), pos, has_gauss, cached),  # a list: weights_only loads it
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore a :func:`capture_rng` snapshot."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_payload(obj: object, f: BinaryIO) -> None:
    """``torch.save`` into an open file (a seam: the kill tests slow it down to land mid-write)."""
    torch.save(obj, f)


def _fsync_dir(directory: Path) -> None:
    """Make renames inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def _atomic_save(obj: object, path: Path, keep_previous: Path | None = None) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is always either the old or the new file.

    With ``keep_previous``, the file being replaced is first hard-linked (or, where links are
    not possible, renamed) to ``keep_previous``.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        _write_payload(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous is not None and path.is_file():
        link = keep_previous.with_name(keep_previous.name + ".tmp")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
            os.replace(link, keep_previous)
        except OSError:  # no hard links here: a moment without `path`; loading then uses prev
            os.replace(path, keep_previous)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of one of our files; unreadable -> CorruptCheckpointError."""
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            saved = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF and OS errors all mean "unreadable"
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise CorruptCheckpointError(
            f"{path}: checkpoint is unreadable (cut short or not a checkpoint): {reason}"
        ) from None
    if not isinstance(saved, dict):
        raise CorruptCheckpointError(f"{path}: not a checkpoint of this package")
    _check_version(saved, path)
    missing = [k for k in _REQUIRED if k not in saved]
    if missing:
        raise CorruptCheckpointError(f"{path}: not a complete checkpoint (missing {missing})")
    return saved


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
    return any((d / name).is_file() for name in (_UNSHARDED, _PREVIOUS, _LATEST))


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
            {**extra, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
            path,
            keep_previous=d / _PREVIOUS,
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
        pointer = d / _LATEST
        previous = pointer.read_text().strip() if pointer.is_file() else ""
        if final.exists():  # left by a crashed run that never pointed `latest` at it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(d)
        _atomic_write_text(name + "\n", pointer)
        for old in d.glob("epoch_*"):  # keep the new folder and the previous good one
            if old.name not in (name, previous) and old.is_dir():
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
        if not (d / _UNSHARDED).is_file() and not (d / _PREVIOUS).is_file():
            if (d / _LATEST).is_file():
                raise ValueError(f"{d} holds a sharded checkpoint; resume it with the same sharding")
            return None
        path, saved = _load_unsharded(d, ctx.device)
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
    folder, extra = _pick_sharded(d, pointer.read_text().strip(), ctx)
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


def _read_rank_file(folder: Path, ctx: DistributedContext) -> tuple[dict[str, Any] | None, str]:
    """This rank's part of a sharded checkpoint folder, or (None, why it is unusable)."""
    rank_file = folder / f"rank_{ctx.rank}.pt"
    if not (folder / ".metadata").is_file():
        return None, f"{folder} has no .metadata (incomplete DCP checkpoint)"
    if not rank_file.is_file():
        return None, f"{folder} has no {rank_file.name}: was it written with {ctx.world_size} ranks?"
    try:
        return _read_file(rank_file, "cpu"), ""
    except CorruptCheckpointError as e:
        return None, str(e)


def _all_ranks_ok(ok: bool, ctx: DistributedContext) -> bool:
    """Whether every rank says ok (one all-reduce, so all ranks take the same branch)."""
    if not ctx.distributed:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _pick_sharded(d: Path, latest: str, ctx: DistributedContext) -> tuple[Path, dict[str, Any]]:
    """The latest epoch folder every rank can read, else the newest older one (with a warning)."""
    older = sorted((f.name for f in d.glob("epoch_*") if f.is_dir() and f.name < latest), reverse=True)
    problems: list[str] = []
    for name in [latest, *older[:1]]:
        extra, why = _read_rank_file(d / name, ctx)
        if _all_ranks_ok(extra is not None, ctx):
            if problems:
                logger.warning(
                    "%s; resuming from the previous checkpoint %s (epoch %d) instead",
                    problems[0], d / name, extra["progress"]["epoch"],  # type: ignore[index]
                )
            return d / name, extra  # type: ignore[return-value]
        problems.append(why or f"another rank cannot read {d / name}")
    raise CorruptCheckpointError("; ".join(problems) + " (no readable checkpoint left)")


def _load_unsharded(d: Path, device: torch.device) -> tuple[Path, dict[str, Any]]:
    """Read ``checkpoint.pt``, or ``checkpoint.prev.pt`` (with a warning) when it is unreadable."""
    current, previous = d / _UNSHARDED, d / _PREVIOUS
    problem = f"{current} is missing"
    if current.is_file():
        try:
            return current, _read_file(current, device)
        except CorruptCheckpointError as e:
            if not previous.is_file():
                raise CorruptCheckpointError(f"{e}; there is no {previous.name} to fall back to") from None
            problem = str(e)
    try:
        saved = _read_file(previous, device)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{problem}; the previous checkpoint is unreadable too: {e}") from None
    logger.warning(
        "%s; resuming from the previous checkpoint %s (epoch %d) instead",
        problem, previous, saved["progress"]["epoch"],
    )
    return previous, saved


def _check_version(saved: dict[str, Any], path: Path) -> None:
    version = saved.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {version!r}, expected {CHECKPOINT_VERSION}")
