"""The process group: :class:`DistributedContext`, its timeout and clear collective failures.

Nothing here runs at import time; :func:`init_distributed` starts a process group only when
called, and only under ``torchrun`` (or when a single-process group is asked for explicitly).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "CollectiveFailure",
    "DistributedContext",
    "collective_errors",
    "destroy_distributed",
    "init_distributed",
    "resolve_timeout",
]

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "TORCHREC_MAMBA_PG_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # torch's own default is 30 min; a dead rank should not cost that


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs.

    Args:
        rank (int): global rank.
        world_size (int): number of processes.
        local_rank (int): rank on this host.
        device (torch.device): compute device of this process.
        process_group (dist.ProcessGroup | None): the world group, None when not distributed.
        started_here (bool): whether :func:`init_distributed` created the group (and so should
            destroy it).
        timeout_s (float): process-group timeout: how long a collective waits for the other
            ranks before it fails. Default: 600.

    Example::

        >>> ctx = DistributedContext(0, 1, 0, torch.device("cpu"), None, False)
        >>> ctx.is_main, ctx.distributed
        (True, False)
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    process_group: dist.ProcessGroup | None
    started_here: bool
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs, shows progress and writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is active."""
        return self.process_group is not None


def resolve_timeout(timeout_s: float | None = None) -> float:
    """The process-group timeout in seconds: the argument, else ``$TORCHREC_MAMBA_PG_TIMEOUT_S``, else 600.

    Example::

        >>> resolve_timeout(30)
        30.0
        >>> resolve_timeout(-1)
        Traceback (most recent call last):
        ...
        ValueError: process-group timeout must be a number of seconds > 0, got -1
    """
    raw: object = timeout_s
    if raw is None:
        raw = os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        where = f" (from ${TIMEOUT_ENV})" if timeout_s is None else ""
        raise ValueError(f"process-group timeout must be a number of seconds > 0, got {raw!r}{where}")
    return value


class CollectiveFailure(RuntimeError):
    """A collective failed or timed out: another rank died or hangs. The message says so."""


@contextmanager
def collective_errors(ctx: DistributedContext) -> Iterator[None]:
    """Turn a failed or timed-out collective into one clear :class:`CollectiveFailure`.

    gloo and NCCL report a dead peer as ``Connection closed by peer`` or a ``Timed out`` after
    :attr:`DistributedContext.timeout_s`; wrap the training loop so that the survivor says
    which rank it is, that another rank has failed, and exits instead of waiting.
    """
    try:
        yield
    except RuntimeError as e:
        if not ctx.distributed or isinstance(e, CollectiveFailure):
            raise
        reason = " ".join(str(e).split())[:300]
        raise CollectiveFailure(
            f"rank {ctx.rank} of {ctx.world_size}: a collective failed ({reason}); another rank "
            f"has probably died or hangs (see its log). Gave up instead of waiting; the "
            f"process-group timeout is {ctx.timeout_s:g} s (${TIMEOUT_ENV})"
        ) from None


def init_distributed(
    force_process_group: bool = False, device: str | None = None, timeout_s: float | None = None
) -> DistributedContext:
    """Join the ``torchrun`` process group (gloo on CPU, NCCL on GPU), or run as one process.

    Args:
        force_process_group (bool): start a one-process gloo/NCCL group even without torchrun
            (needed to shard tables with DMP in a single process). Default: False.
        device (str | None): ``"cpu"`` or ``"cuda"``; default: CUDA when available.
        timeout_s (float | None): how long a collective waits for the other ranks before it
            fails; see :func:`resolve_timeout`. Default: ``$TORCHREC_MAMBA_PG_TIMEOUT_S`` or 600.

    Example::

        >>> ctx = init_distributed()          # not under torchrun: no group is started
        >>> ctx.world_size, ctx.distributed
        (1, False)

    Returns:
        DistributedContext: rank, world size, device and group.
    """
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for but CUDA is not available")
    timeout = resolve_timeout(timeout_s)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        return DistributedContext(rank, world, local, dev, dist.GroupMember.WORLD, False, timeout)
    if not under_torchrun and not force_process_group:
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        return DistributedContext(0, 1, 0, dev, None, False, timeout)
    pg_timeout = datetime.timedelta(seconds=timeout)
    backend = "nccl" if use_cuda else "gloo"
    if under_torchrun:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=pg_timeout)
    else:
        local = 0
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=pg_timeout
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    logger.info(
        "process group %s: rank %d of %d on %s (timeout %g s)", backend, rank, world, dev, timeout
    )
    return DistributedContext(rank, world, local, dev, dist.GroupMember.WORLD, True, timeout)


def destroy_distributed(ctx: DistributedContext) -> None:
    """Destroy the process group if :func:`init_distributed` started it."""
    if ctx.started_here and dist.is_initialized():
        dist.destroy_process_group()
