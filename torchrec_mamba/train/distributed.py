"""Process group, sharding planner, ``DistributedModelParallel`` and the keyed optimizers.

The names are defined in three modules and re-exported here:

* :mod:`torchrec_mamba.train.process_group`: :class:`DistributedContext`,
  :func:`init_distributed` / :func:`destroy_distributed`, the timeout and
  :func:`collective_errors`;
* :mod:`torchrec_mamba.train.optimizers`: :class:`EmbeddingOptimizerConfig`,
  :func:`resolve_embedding_optimizer` and :func:`build_optimizer` (with the measured facts about
  FBGEMM's fused table optimizers);
* :mod:`torchrec_mamba.train.sharding`: :func:`make_sharders`, :func:`plan_sharding`,
  :func:`shard_model`, :func:`unwrap` and :func:`full_state_dict`.

Nothing here runs at import time; :func:`init_distributed` starts a process group only when
called, and only under ``torchrun`` (or when a single-process group is asked for explicitly).
"""

from __future__ import annotations

from torchrec_mamba.train.optimizers import (
    DEFAULT_ADAGRAD_LR,
    EMBEDDING_OPTIMIZERS,
    EmbeddingOptimizerConfig,
    build_optimizer,
    resolve_embedding_optimizer,
)
from torchrec_mamba.train.optimizers import (
    EmbeddingOptimizerName as EmbeddingOptimizerName,
)
from torchrec_mamba.train.process_group import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    CollectiveFailure,
    DistributedContext,
    collective_errors,
    destroy_distributed,
    init_distributed,
    resolve_timeout,
)
from torchrec_mamba.train.sharding import (
    SHARDING_TYPES,
    format_plan,
    full_state_dict,
    make_sharders,
    plan_sharding,
    shard_model,
    unwrap,
)
from torchrec_mamba.train.sharding import (
    ShardingType as ShardingType,
)

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
    "full_state_dict",
    "init_distributed",
    "make_sharders",
    "plan_sharding",
    "resolve_embedding_optimizer",
    "shard_model",
    "unwrap",
]
