"""Process group, sharding planner, ``DistributedModelParallel`` and the keyed optimizers.

Nothing here runs at import time; :func:`init_distributed` starts a process group only when
called, and only under ``torchrun`` (or when a single-process group is asked for explicitly).

Embedding-table optimizers (measured facts about TorchRec 1.8 / FBGEMM 1.8):

* Sharded tables are updated by a *fused* optimizer inside the backward pass, configured through
  the sharders' ``fused_params``. Without them FBGEMM trains with SGD at lr 0.01.
* On CUDA, ``"adam"`` maps to FBGEMM's fused Adam. FBGEMM's **CPU** kernels only implement
  ``exact_adagrad``, ``exact_rowwise_adagrad`` and ``exact_sgd``
  (``AssertionError: Optimizer adam is not supported in CPU mode``), and the dense-kernel escape
  hatch is refused by the planner for model-parallel sharding and corrupts memory when forced. So
  sharded tables on CPU train with Adagrad (``"adagrad"``, exact per-coordinate) or row-wise
  Adagrad, with their own learning rate; :func:`resolve_embedding_optimizer` picks that when asked
  for ``"auto"``. Unsharded tables are ordinary parameters and use ``torch.optim`` (Adam by
  default), so the single-process path keeps the paper's optimizer.
* The fused optimizer sums the gradients of every rank (no division by the world size), while
  DDP averages dense gradients. Adam and Adagrad are invariant to that constant scale (up to
  ``eps``); plain SGD is not.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from torchrec_mamba.models.recommender import SequentialRecommender as Mamba4Rec

__all__ = [
    "DEFAULT_ADAGRAD_LR",
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "CollectiveFailure",
    "collective_errors",
    "resolve_timeout",
    "EMBEDDING_OPTIMIZERS",
    "SHARDING_TYPES",
    "DistributedContext",
    "EmbeddingOptimizerConfig",
    "build_optimizer",
    "destroy_distributed",
    "format_plan",
    "init_distributed",
    "make_sharders",
    "plan_sharding",
    "resolve_embedding_optimizer",
    "shard_model",
    "unwrap",
]

logger = logging.getLogger(__name__)

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")
EMBEDDING_OPTIMIZERS = ("adam", "adagrad", "rowwise_adagrad", "sgd")
DEFAULT_ADAGRAD_LR = 0.05  # table lr of the non-Adam optimizers when none is given
TIMEOUT_ENV = "TORCHREC_MAMBA_PG_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # torch's own default is 30 min; a dead rank should not cost that
ShardingType = Literal["table_wise", "row_wise", "column_wise"]
EmbeddingOptimizerName = Literal["adam", "adagrad", "rowwise_adagrad", "sgd"]


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


@dataclass(frozen=True)
class EmbeddingOptimizerConfig:
    """Optimizer of the embedding tables (fused into backward when sharded).

    Args:
        name (str): ``"adam"``, ``"adagrad"`` (exact, per coordinate), ``"rowwise_adagrad"``
            (one accumulator per row; sharded only) or ``"sgd"``.
        lr (float): learning rate of the tables.
        eps (float): epsilon. Default: 1e-8.
        beta1 (float): Adam beta1. Default: 0.9.
        beta2 (float): Adam beta2. Default: 0.999.
        weight_decay (float): L2 weight decay of the tables. Default: 0.0.

    Example::

        >>> EmbeddingOptimizerConfig("adagrad", lr=0.05).fused_params()["learning_rate"]
        0.05
    """

    name: EmbeddingOptimizerName
    lr: float
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"embedding optimizer must be one of {EMBEDDING_OPTIMIZERS}, got {self.name!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"embedding lr must be > 0, got {self.lr}")

    def fused_params(self) -> dict[str, object]:
        """The ``fused_params`` of TorchRec's sharders for this optimizer."""
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        kind = {
            "adam": EmbOptimType.ADAM,
            "adagrad": EmbOptimType.EXACT_ADAGRAD,
            "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            "sgd": EmbOptimType.EXACT_SGD,
        }[self.name]
        params: dict[str, object] = {
            "optimizer": kind,
            "learning_rate": self.lr,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }
        if self.name == "adam":
            params.update(beta1=self.beta1, beta2=self.beta2)
        return params

    def torch_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The ``torch.optim`` equivalent for unsharded tables (same update rule)."""
        if self.name == "adam":
            return torch.optim.Adam(
                params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                weight_decay=self.weight_decay,
            )
        if self.name == "adagrad":
            return torch.optim.Adagrad(params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay)
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(
            "rowwise_adagrad exists only as FBGEMM's fused optimizer of sharded tables; "
            "use adam, adagrad or sgd for unsharded tables"
        )


def resolve_embedding_optimizer(
    name: str,
    lr: float | None,
    dense_lr: float,
    sharded: bool,
    device: torch.device,
) -> EmbeddingOptimizerConfig:
    """Pick the table optimizer; ``"auto"`` is Adam unless tables are sharded on CPU.

    Args:
        name (str): ``"auto"`` or one of :data:`EMBEDDING_OPTIMIZERS`.
        lr (float | None): learning rate of the tables; None means ``dense_lr`` for Adam and
            :data:`DEFAULT_ADAGRAD_LR` for the others (Adagrad needs a much larger step).
        dense_lr (float): learning rate of the dense layers.
        sharded (bool): tables are sharded by DMP.
        device (torch.device): compute device.

    Example::

        >>> cpu = torch.device("cpu")
        >>> resolve_embedding_optimizer("auto", None, 1e-3, sharded=True, device=cpu)
        EmbeddingOptimizerConfig(name='adagrad', lr=0.05, eps=1e-08, beta1=0.9, beta2=0.999, weight_decay=0.0)
        >>> resolve_embedding_optimizer("auto", None, 1e-3, sharded=False, device=cpu).name
        'adam'

    Returns:
        EmbeddingOptimizerConfig: the choice.
    """
    if name == "auto":
        name = "adagrad" if sharded and device.type == "cpu" else "adam"
        if name == "adagrad":
            logger.warning(
                "sharded tables on CPU: FBGEMM has no fused Adam on CPU, the tables use exact "
                "Adagrad (dense layers keep Adam)"
            )
    if name == "adam" and sharded and device.type == "cpu":
        raise ValueError(
            "FBGEMM's CPU embedding kernels have no fused Adam (only exact_adagrad, "
            "exact_rowwise_adagrad, exact_sgd): use embedding optimizer adagrad, rowwise_adagrad "
            "or sgd for sharded tables on CPU, train unsharded, or train on a GPU"
        )
    if name == "rowwise_adagrad" and not sharded:
        raise ValueError("rowwise_adagrad is only available for sharded tables (FBGEMM fused)")
    if lr is None:
        lr = dense_lr if name == "adam" else DEFAULT_ADAGRAD_LR
    return EmbeddingOptimizerConfig(cast(EmbeddingOptimizerName, name), lr=lr)


def make_sharders(embedding_optimizer: EmbeddingOptimizerConfig) -> list[ModuleSharder[nn.Module]]:
    """EC and EBC sharders whose fused optimizer is ``embedding_optimizer``."""
    fused = embedding_optimizer.fused_params()
    return [
        cast(ModuleSharder[nn.Module], EmbeddingCollectionSharder(fused_params=dict(fused))),
        cast(ModuleSharder[nn.Module], EmbeddingBagCollectionSharder(fused_params=dict(fused))),
    ]


def _table_names(model: Mamba4Rec) -> list[str]:
    names = [c.name for c in model.ec.embedding_configs()]
    if model.ebc is not None:
        names += [c.name for c in model.ebc.embedding_bag_configs()]
    return names


def plan_sharding(
    model: Mamba4Rec,
    sharding: ShardingType,
    ctx: DistributedContext,
    sharders: list[ModuleSharder[nn.Module]],
) -> ShardingPlan:
    """Plan with ``EmbeddingShardingPlanner``, every table restricted to one sharding type.

    Data-parallel is never allowed (TorchRec's data-parallel EC is broken on CPU), and the planner
    decides the shard sizes (e.g. column-wise may keep a narrow table in one shard).

    Args:
        model (Mamba4Rec): the unsharded model.
        sharding (str): ``"table_wise"``, ``"row_wise"`` or ``"column_wise"``.
        ctx (DistributedContext): an active process group.
        sharders (list): from :func:`make_sharders`.

    Returns:
        ShardingPlan: the same plan on every rank.
    """
    if sharding not in SHARDING_TYPES:
        raise ValueError(f"sharding must be one of {SHARDING_TYPES}, got {sharding!r}")
    if ctx.process_group is None:
        raise ValueError("sharding needs a process group: run under torchrun or init_distributed(True)")
    constraints = {name: ParameterConstraints(sharding_types=[sharding]) for name in _table_names(model)}
    topology = Topology(
        world_size=ctx.world_size,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)),
        compute_device=ctx.device.type,
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, sharders, ctx.process_group)


def format_plan(plan: ShardingPlan) -> str:
    """The plan as TorchRec's table text (sharding type, kernel, ranks, shard offsets)."""
    return str(plan)


def shard_model(
    model: Mamba4Rec,
    sharding: ShardingType,
    ctx: DistributedContext,
    embedding_optimizer: EmbeddingOptimizerConfig,
) -> DistributedModelParallel:
    """Shard the tables of ``model`` with DMP; dense layers are wrapped in DDP.

    A model built on a real device keeps its exact initial weights (they are copied into the
    shards), so a sharded run starts from the same point as an unsharded run with the same seed.
    A model built on the meta device is materialised by DMP (tables) and by each module's
    ``reset_parameters`` (dense layers).

    Args:
        model (Mamba4Rec): the model.
        sharding (str): see :func:`plan_sharding`.
        ctx (DistributedContext): an active process group.
        embedding_optimizer (EmbeddingOptimizerConfig): the fused table optimizer.

    Returns:
        DistributedModelParallel: the sharded model (``.module`` is the ``Mamba4Rec``).
    """
    if embedding_optimizer.name == "adam" and ctx.device.type == "cpu":
        raise ValueError(
            "FBGEMM's CPU embedding kernels have no fused Adam; pick adagrad, rowwise_adagrad or sgd"
        )
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    initial = None
    if not on_meta:
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sharders = make_sharders(embedding_optimizer)
    plan = plan_sharding(model, sharding, ctx, sharders)
    if ctx.is_main:
        logger.info("sharding plan (%s, %d ranks):\n%s", sharding, ctx.world_size, format_plan(plan))
    if ctx.process_group is None:  # plan_sharding already refused this; keeps type checkers quiet
        raise ValueError("sharding needs a process group")
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(ctx.process_group),
        device=ctx.device,
        plan=plan,
        sharders=sharders,
    )
    if initial is not None:
        dmp.load_state_dict(dict(initial))  # DMP consumes the dict it is given
    return dmp


def unwrap(model: nn.Module) -> Mamba4Rec:
    """The ``Mamba4Rec`` inside a DMP (or the model itself)."""
    inner = model.module if isinstance(model, DistributedModelParallel) else model
    if not isinstance(inner, Mamba4Rec):
        raise TypeError(f"expected a Mamba4Rec (optionally in DMP), got {type(inner).__name__}")
    return inner


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms and params tagged ``_no_weight_decay`` (A_log, D, dt bias) get no decay."""
    if getattr(param, "_no_weight_decay", False) or param.dim() < 2:
        return True
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("A_log", "D") or "norm" in name


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    embedding_optimizer: EmbeddingOptimizerConfig,
) -> CombinedOptimizer:
    """One keyed optimizer over everything, so a single ``state_dict`` checkpoints it all.

    Dense parameters get Adam (AdamW with decoupled decay when ``weight_decay > 0``, no decay on
    biases, norms, ``A_log``, ``D`` and other ``_no_weight_decay`` params). Tables get
    ``embedding_optimizer``: the DMP's fused optimizer when sharded, ``torch.optim`` otherwise.

    Args:
        model (nn.Module): a ``Mamba4Rec`` or a DMP around one.
        lr (float): dense learning rate.
        weight_decay (float): dense weight decay.
        embedding_optimizer (EmbeddingOptimizerConfig): table optimizer (unsharded case; a DMP
            already carries its fused one).

    Example::

        >>> from torchrec_mamba.modules import MambaSequenceEncoder
        >>> enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
        >>> from torchrec_mamba.models import Mamba4Rec, Mamba4RecConfig
        >>> m = Mamba4Rec(Mamba4RecConfig(num_items=5, embedding_dim=8), enc)
        >>> opt = build_optimizer(m, 1e-3, 0.0, EmbeddingOptimizerConfig("adam", lr=1e-3))
        >>> sorted(k.split(".")[0] for k, _ in opt.optimizers)
        ['dense', 'embeddings']

    Returns:
        CombinedOptimizer: keyed optimizers ``"dense"`` and ``"embeddings"``.
    """
    sharded = isinstance(model, DistributedModelParallel)
    named = dict(model.named_parameters())
    table_names = {n for n in named if ".ec." in f".{n}" or ".ebc." in f".{n}"}
    dense = {n: p for n, p in named.items() if n not in table_names and p.requires_grad}
    decay = [n for n, p in dense.items() if not _no_weight_decay(n, p)]
    no_decay = [n for n in dense if n not in set(decay)]

    def dense_factory(params: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
        if weight_decay > 0:
            groups = [
                {"params": [params[n] for n in decay], "weight_decay": weight_decay},
                {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
            ]
            return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
        return torch.optim.Adam(list(params.values()), lr=lr)

    optims: list[tuple[str, KeyedOptimizer]] = [
        ("dense", KeyedOptimizerWrapper(dense, dense_factory, pass_params_dict=True))  # type: ignore[arg-type]
    ]
    if sharded:
        optims.append(("embeddings", cast(DistributedModelParallel, model).fused_optimizer))
    else:
        tables = {n: named[n] for n in sorted(table_names)}
        optims.append(
            ("embeddings", KeyedOptimizerWrapper(tables, lambda ps: embedding_optimizer.torch_optimizer(ps)))  # type: ignore[arg-type]
        )
    return CombinedOptimizer(optims)  # type: ignore[arg-type]
