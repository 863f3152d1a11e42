"""Training: the run config and ``build_model`` (:mod:`.config`), process group + planner + DMP
(:mod:`.distributed`), ``fit`` (:mod:`.loop`), ``evaluate`` / ``evaluate_tasks``
(:mod:`.evaluation`), exact-resume checkpoints (:mod:`.checkpoint`), the weight average
(:mod:`.averaging`) and full-ranking metrics (:mod:`.metrics`).

Names load on first access, so ``import torchrec_mamba.train.metrics`` does not pull in
``torchrec.distributed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchrec_mamba._lazy import lazy_exports

_LAZY = {
    "DistributedContext": "torchrec_mamba.train.process_group",
    "EmbeddingOptimizerConfig": "torchrec_mamba.train.optimizers",
    "build_optimizer": "torchrec_mamba.train.optimizers",
    "init_distributed": "torchrec_mamba.train.process_group",
    "destroy_distributed": "torchrec_mamba.train.process_group",
    "resolve_embedding_optimizer": "torchrec_mamba.train.optimizers",
    "shard_model": "torchrec_mamba.train.sharding",
    "unwrap": "torchrec_mamba.train.sharding",
    "full_state_dict": "torchrec_mamba.train.sharding",
    "DataInfo": "torchrec_mamba.train.config",
    "RunConfig": "torchrec_mamba.train.config",
    "build_model": "torchrec_mamba.train.config",
    "evaluate_tasks": "torchrec_mamba.train.evaluation",
    "FitConfig": "torchrec_mamba.train.loop",
    "WeightAverage": "torchrec_mamba.train.averaging",
    "FitResult": "torchrec_mamba.train.loop",
    "evaluate": "torchrec_mamba.train.evaluation",
    "fit": "torchrec_mamba.train.loop",
    "train_one_epoch": "torchrec_mamba.train.loop",
    "load_checkpoint": "torchrec_mamba.train.checkpoint",
    "save_checkpoint": "torchrec_mamba.train.checkpoint",
    "RankingMetrics": "torchrec_mamba.train.metrics",
    "ranking_metrics": "torchrec_mamba.train.metrics",
}

__all__ = [
    "DataInfo",
    "DistributedContext",
    "EmbeddingOptimizerConfig",
    "FitConfig",
    "FitResult",
    "RankingMetrics",
    "RunConfig",
    "build_model",
    "build_optimizer",
    "destroy_distributed",
    "evaluate",
    "evaluate_tasks",
    "fit",
    "init_distributed",
    "load_checkpoint",
    "ranking_metrics",
    "resolve_embedding_optimizer",
    "save_checkpoint",
    "shard_model",
    "full_state_dict",
    "train_one_epoch",
    "unwrap",
    "WeightAverage",
]

if TYPE_CHECKING:
    from torchrec_mamba.train.averaging import WeightAverage
    from torchrec_mamba.train.checkpoint import load_checkpoint, save_checkpoint
    from torchrec_mamba.train.config import DataInfo, RunConfig, build_model
    from torchrec_mamba.train.evaluation import evaluate, evaluate_tasks
    from torchrec_mamba.train.loop import FitConfig, FitResult, fit, train_one_epoch
    from torchrec_mamba.train.metrics import RankingMetrics, ranking_metrics
    from torchrec_mamba.train.optimizers import (
        EmbeddingOptimizerConfig,
        build_optimizer,
        resolve_embedding_optimizer,
    )
    from torchrec_mamba.train.process_group import (
        DistributedContext,
        destroy_distributed,
        init_distributed,
    )
    from torchrec_mamba.train.sharding import full_state_dict, shard_model, unwrap


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
