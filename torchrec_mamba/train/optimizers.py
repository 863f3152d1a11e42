"""Keyed optimizers: the embedding-table optimizer config and :func:`build_optimizer`.

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

import logging
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

__all__ = [
    "DEFAULT_ADAGRAD_LR",
    "EMBEDDING_OPTIMIZERS",
    "EmbeddingOptimizerConfig",
    "build_optimizer",
    "resolve_embedding_optimizer",
]

logger = logging.getLogger(__name__)

EMBEDDING_OPTIMIZERS = ("adam", "adagrad", "rowwise_adagrad", "sgd")
DEFAULT_ADAGRAD_LR = 0.05  # table lr of the non-Adam optimizers when none is given
EmbeddingOptimizerName = Literal["adam", "adagrad", "rowwise_adagrad", "sgd"]


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
        if not self.weight_decay >= 0:
            raise ValueError(f"embedding weight_decay must be >= 0, got {self.weight_decay}")

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
    weight_decay: float = 0.0,
) -> EmbeddingOptimizerConfig:
    """Pick the table optimizer; ``"auto"`` is Adam unless tables are sharded on CPU.

    Args:
        name (str): ``"auto"`` or one of :data:`EMBEDDING_OPTIMIZERS`.
        lr (float | None): learning rate of the tables; None means ``dense_lr`` for Adam and
            :data:`DEFAULT_ADAGRAD_LR` for the others (Adagrad needs a much larger step).
        dense_lr (float): learning rate of the dense layers.
        sharded (bool): tables are sharded by DMP.
        device (torch.device): compute device.
        weight_decay (float): L2 weight decay of the tables. Default: 0.0.

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
    return EmbeddingOptimizerConfig(
        cast(EmbeddingOptimizerName, name), lr=lr, weight_decay=weight_decay
    )


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
