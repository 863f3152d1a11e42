"""Sharding the tables: sharders, the ``EmbeddingShardingPlanner`` plan and the DMP wrapper.

The tables' fused optimizer comes from :mod:`torchrec_mamba.train.optimizers`, the process group
from :mod:`torchrec_mamba.train.process_group`.
"""

from __future__ import annotations

import logging
import os
from typing import Literal, cast

import torch
from torch import Tensor, nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardedTensor, ShardingEnv, ShardingPlan

from torchrec_mamba.models.recommender import SequentialRecommender as Mamba4Rec
from torchrec_mamba.train.optimizers import EmbeddingOptimizerConfig
from torchrec_mamba.train.process_group import DistributedContext

__all__ = ["SHARDING_TYPES", "format_plan", "make_sharders", "plan_sharding", "shard_model", "unwrap"]

logger = logging.getLogger(__name__)

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")
ShardingType = Literal["table_wise", "row_wise", "column_wise"]


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


def full_state_dict(model: nn.Module, ctx: DistributedContext) -> dict[str, Tensor] | None:
    """The whole, unsharded ``state_dict`` of the model on rank 0; None on the other ranks.

    A ``DistributedModelParallel`` holds each sharded table as a ``ShardedTensor`` whose rows
    (or columns) live on different ranks: each is gathered to rank 0, so the result loads into
    the same model built without sharding (``load_state_dict(strict=True)``), which is what
    :class:`~torchrec_mamba.serving.Recommender` serves. The keys are the unsharded model's. Every
    rank must call it (the gathers are collectives); rank 0 then holds every table whole, so a
    table too large for one process cannot be exported this way (it stays in the sharded
    checkpoints of ``--checkpoint-dir``).

    Args:
        model (nn.Module): a ``Mamba4Rec`` or a DMP around one.
        ctx (DistributedContext): this process's place in the group.

    Returns:
        dict[str, Tensor] | None: CPU tensors on rank 0, None elsewhere.
    """
    if not isinstance(model, DistributedModelParallel):
        return unwrap(model).state_dict() if ctx.is_main else None
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            props = value.metadata().tensor_properties
            full = torch.empty(value.size(), dtype=props.dtype) if ctx.is_main else None
            value.gather(0, full)
            value = full
        if ctx.is_main:
            out[key] = value.detach().cpu()
    return out if ctx.is_main else None
