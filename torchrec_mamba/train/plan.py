"""Plan a GPU fleet on paper: TorchRec's sharding planner on a CUDA topology, run on any machine.

The tables are those of ``Mamba4Rec`` (``"item"``: ``I + 1`` rows, features ``item`` and
``item_candidates``; optionally ``"category"``), built on the meta device, so a 1B-row table costs
no memory. ``EmbeddingShardingPlanner`` runs on ``Topology(compute_device="cuda", world_size=W,
hbm_cap=H GiB)``; no GPU and no process group are needed (``planner.plan``, not
``collective_plan``). The optimizer is attached the way TorchRec reads it
(``_apply_optimizer_in_backward`` sets the weights' ``_optimizer_classes``), so the planner's
storage estimate counts the optimizer state: Adam 2 floats per weight, row-wise Adagrad one per
row.

Per device it reports the bytes of the weights and of the optimizer state of the shards placed
there (from the plan's shard metadata), and the planner's own HBM estimate (which adds its I/O
buffers and the reservation margin).

Example::

    python -m torchrec_mamba.train.plan --items 1000000000 --dim 128 --gpus 64 --hbm-gb 80
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["DeviceMemory", "FleetPlan", "OPTIMIZERS", "main", "plan_fleet"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("rowwise_adagrad", "adam", "adagrad", "sgd")
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise")
_GIB = 2**30


@dataclass(frozen=True)
class DeviceMemory:
    """Memory of the shards one device holds.

    Attributes:
        rank (int): global rank.
        weight_bytes (int): embedding rows placed on it.
        optimizer_bytes (int): their optimizer state.
        planner_hbm_bytes (int): the planner's HBM estimate for its shards (incl. I/O buffers);
            less than the total when the kernel keeps rows in host memory (UVM caching).
        planner_ddr_bytes (int): the planner's host-memory (DDR) estimate for its shards.
    """

    rank: int
    weight_bytes: int
    optimizer_bytes: int
    planner_hbm_bytes: int
    planner_ddr_bytes: int

    @property
    def total_bytes(self) -> int:
        """Weights + optimizer state."""
        return self.weight_bytes + self.optimizer_bytes


@dataclass
class FleetPlan:
    """A sharding plan and its per-device memory.

    Attributes:
        plan (object): TorchRec's ``ShardingPlan``.
        devices (list[DeviceMemory]): one per rank, rank order.
        tables (dict[str, tuple[int, int]]): table name -> (rows, dim).
        optimizer (str): optimizer the memory counts.
    """

    plan: object
    devices: list[DeviceMemory]
    tables: dict[str, tuple[int, int]]
    optimizer: str
    hbm_cap_bytes: int = 0
    sharding: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        """Human-readable plan: tables, sharding per table, per-device memory, totals."""
        lines = ["tables: " + ", ".join(f"{n} {r:,} x {d}" for n, (r, d) in self.tables.items())]
        lines += [f"  {n}: {kind}" for n, kind in self.sharding.items()]
        lines.append(
            f"{'rank':>5} {'weights GiB':>12} {'optim GiB':>10} {'total GiB':>10} "
            f"{'planner HBM GiB':>16} {'planner DDR GiB':>16}"
        )
        for d in self.devices:
            lines.append(
                f"{d.rank:>5} {d.weight_bytes / _GIB:>12.3f} {d.optimizer_bytes / _GIB:>10.3f} "
                f"{d.total_bytes / _GIB:>10.3f} {d.planner_hbm_bytes / _GIB:>16.3f} "
                f"{d.planner_ddr_bytes / _GIB:>16.3f}"
            )
        total = sum(d.total_bytes for d in self.devices)
        hbm = max(d.planner_hbm_bytes for d in self.devices)
        lines.append(
            f"total {total / _GIB:.2f} GiB of weights + {self.optimizer} state; busiest device "
            f"{hbm / _GIB:.3f} GiB of {self.hbm_cap_bytes / _GIB:.0f} GiB HBM (planner estimate)"
        )
        return "\n".join(lines)


def _optimizer(name: str) -> tuple[type[torch.optim.Optimizer], dict[str, float], float]:
    """(class the planner recognises, kwargs, state floats per weight for rows of width D=1)."""
    from torchrec.optim import RowWiseAdagrad

    if name == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": 0.01}, -1.0  # -1: one float per row (1 / D per weight)
    if name == "adam":
        return torch.optim.Adam, {"lr": 1e-3}, 2.0
    if name == "adagrad":
        return torch.optim.Adagrad, {"lr": 0.01}, 1.0
    if name == "sgd":
        return torch.optim.SGD, {"lr": 0.01}, 0.0
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _tables(num_items: int, dim: int, num_categories: int) -> nn.Module:
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection

    tables = [EmbeddingConfig(name="item", num_embeddings=num_items + 1, embedding_dim=dim,
                              feature_names=["item", "item_candidates"])]
    if num_categories:
        tables.append(EmbeddingConfig(name="category", num_embeddings=num_categories + 1,
                                      embedding_dim=dim, feature_names=["category", "category_candidates"]))

    class Tables(nn.Module):  # the planner shards submodules, not a bare EC
        def __init__(self) -> None:
            super().__init__()
            self.ec = EmbeddingCollection(tables=tables, device=torch.device("meta"))

    return Tables()


def _check(name: str, value: int, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def plan_fleet(
    num_items: int,
    dim: int,
    gpus: int,
    hbm_gb: float,
    *,
    num_categories: int = 0,
    gpus_per_node: int = 8,
    optimizer: str = "rowwise_adagrad",
    sharding_types: Sequence[str] | None = None,
    batch_size: int = 512,
    reserve: float = 0.15,
    compute_kernels: Sequence[str] | None = None,
) -> FleetPlan:
    """Run ``EmbeddingShardingPlanner`` for the Mamba4Rec tables on a CUDA topology.

    Args:
        num_items (int): items I (the table has I + 1 rows).
        dim (int): embedding width D.
        gpus (int): world size W.
        hbm_gb (float): HBM per GPU, GiB.
        num_categories (int): categories C; 0 means no category table. Default: 0.
        gpus_per_node (int): local world size (intra-node bandwidth). Default: 8.
        optimizer (str): one of :data:`OPTIMIZERS`. Default: ``"rowwise_adagrad"``.
        sharding_types (Sequence[str] | None): allowed sharding types; None: every model-parallel
            type (data-parallel would replicate a huge table). Default: None.
        batch_size (int): per-rank batch size the planner sizes I/O buffers with. Default: 512.
        reserve (float): share of each device's HBM kept free for activations, dense parameters
            and the allocator (``FixedPercentageStorageReservation``). Default: 0.15.
        compute_kernels (Sequence[str] | None): allowed kernels, e.g. ``["fused"]`` to keep every
            row in HBM; None lets the planner also pick ``fused_uvm`` / ``fused_uvm_caching``
            (rows in host memory) when HBM is short. Default: None.

    Example::

        >>> fleet = plan_fleet(num_items=1_000_000, dim=64, gpus=4, hbm_gb=16, gpus_per_node=2,
        ...                    sharding_types=["row_wise"])
        >>> [d.weight_bytes for d in fleet.devices] == [250_001 * 64 * 4] * 3 + [249_998 * 64 * 4]
        True
        >>> fleet.devices[0].optimizer_bytes       # row-wise Adagrad: one float per row
        1000004

    Returns:
        FleetPlan: the plan and per-device memory.
    """
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation,
    )
    from torchrec.distributed.planner.types import PlannerError

    for name, value in (("num_items", num_items), ("dim", dim), ("gpus", gpus),
                        ("gpus_per_node", gpus_per_node), ("batch_size", batch_size)):
        _check(name, value)
    _check("num_categories", num_categories, low=0)
    if not hbm_gb > 0:
        raise ValueError(f"hbm_gb must be > 0, got {hbm_gb!r}")
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve must be in [0, 1), got {reserve!r}")
    kinds = list(sharding_types or SHARDING_TYPES)
    bad = [k for k in kinds if k not in SHARDING_TYPES]
    if bad:
        raise ValueError(f"sharding type {bad[0]!r} is not one of {SHARDING_TYPES}")
    opt_class, opt_kwargs, per_weight = _optimizer(optimizer)
    module = _tables(num_items, dim, num_categories)
    _apply_optimizer_in_backward(opt_class, module.parameters(), opt_kwargs)
    topology = Topology(world_size=gpus, compute_device="cuda", hbm_cap=int(hbm_gb * _GIB),
                        local_world_size=min(gpus_per_node, gpus))
    names = ["item"] + (["category"] if num_categories else [])
    constraints = {
        n: ParameterConstraints(
            sharding_types=kinds, compute_kernels=list(compute_kernels) if compute_kernels else None
        )
        for n in names
    }
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        # a fixed margin: the heuristic one mis-sizes dense tensors of an unmaterialised model
        storage_reservation=FixedPercentageStorageReservation(reserve),
    )
    try:
        plan = planner.plan(module, [EmbeddingCollectionSharder()])
    except PlannerError as err:
        raise ValueError(f"no sharding plan fits {gpus} GPUs x {hbm_gb} GiB: {err}") from err
    return _fleet(plan, planner, gpus, per_weight, optimizer, int(hbm_gb * _GIB), dim,
                  {"item": (num_items + 1, dim), **({"category": (num_categories + 1, dim)} if num_categories else {})})


def _fleet(plan, planner, gpus, per_weight, optimizer, cap, dim, tables) -> FleetPlan:  # type: ignore[no-untyped-def]
    weights: dict[int, int] = defaultdict(int)
    optim: dict[int, int] = defaultdict(int)
    kinds: dict[str, str] = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            kinds[table] = f"{ps.sharding_type} ({ps.compute_kernel}), {len(ps.ranks or [])} ranks"
            for shard in ps.sharding_spec.shards:
                found = re.match(r"rank:(\d+)", str(shard.placement))
                if found is None:
                    raise ValueError(f"unexpected shard placement {shard.placement!r}")
                rank = int(found.group(1))
                rows, cols = shard.shard_sizes
                weights[rank] += rows * cols * 4  # fp32 tables
                optim[rank] += rows * 4 if per_weight < 0 else int(rows * cols * 4 * per_weight)
    hbm: dict[int, int] = defaultdict(int)
    ddr: dict[int, int] = defaultdict(int)
    for option in getattr(planner, "_best_plan", None) or []:  # the planner's own estimate
        for shard in option.shards:
            if shard.rank is not None and shard.storage is not None:
                hbm[shard.rank] += shard.storage.hbm
                ddr[shard.rank] += shard.storage.ddr
    devices = [DeviceMemory(r, weights[r], optim[r], hbm[r], ddr[r]) for r in range(gpus)]
    return FleetPlan(plan, devices, tables, optimizer, cap, kinds)


def main(argv: list[str] | None = None) -> int:
    """``torchrec-mamba plan``: print the plan and the per-device memory."""
    p = argparse.ArgumentParser(prog="torchrec-mamba plan", description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, required=True, help="number of items I")
    p.add_argument("--dim", type=int, default=64, help="embedding width D (default 64)")
    p.add_argument("--gpus", type=int, required=True, help="world size W")
    p.add_argument("--hbm-gb", type=float, required=True, help="HBM per GPU in GiB")
    p.add_argument("--categories", type=int, default=0, help="number of categories (default 0)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="rowwise_adagrad")
    p.add_argument("--sharding", choices=SHARDING_TYPES, action="append",
                   help="allowed sharding type (repeat; default: every model-parallel type)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--kernel", action="append", choices=("fused", "fused_uvm", "fused_uvm_caching"),
                   help="allowed compute kernel (repeat; default: the planner's choice; "
                   "'fused' keeps every row in HBM)")
    p.add_argument("--show-plan", action="store_true", help="also print TorchRec's plan table")
    args = p.parse_args(argv)
    try:
        fleet = plan_fleet(args.items, args.dim, args.gpus, args.hbm_gb,
                           num_categories=args.categories, gpus_per_node=args.gpus_per_node,
                           optimizer=args.optimizer, sharding_types=args.sharding,
                           batch_size=args.batch_size, compute_kernels=args.kernel)
    except ValueError as err:  # bad sizes, or the planner found no plan that fits
        print(f"error: {err}")
        return 2
    if args.show_plan:
        print(fleet.plan)
    print(fleet.text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
