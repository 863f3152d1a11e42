"""`RunConfig`: every default of a training run in one typed place, and the one `build_model`.

The ``torchrec-mamba train`` flags are generated from the fields (:func:`add_run_config_args`);
the run writes the resolved config as ``run_config.json`` and :meth:`RunConfig.load` reads it back
exactly (an unknown key is an error). The examples and benchmarks start from ``RunConfig(...)``
with their own overrides and build models with the same :func:`build_model`.

Per-model default: ``dropout=None`` resolves to :data:`MODEL_DROPOUT` (0.5 for both models today,
chosen on Amazon Beauty's validation split, ``docs/benchmarks.md``; kept per model so one can move
without the other).
To change a default, edit its field below: that one line changes the CLI, its help and the docs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torchrec_mamba.train.loop import FitConfig

__all__ = [
    "DATA_INFO",
    "MODEL_DROPOUT",
    "MODEL_FILE",
    "RUN_CONFIG",
    "LR_SCHEDULES",
    "DataInfo",
    "RunConfig",
    "add_run_config_args",
    "build_model",
    "native_bf16_gemm",
    "resolve_head_dtype",
    "targets_per_row",
]

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
MODEL_FILE = "model.pt"  # the best epoch's weights, in the run's output folder
DATA_INFO = "data_info.json"

#: Default dropout of each model (``RunConfig.dropout=None``).
MODEL_DROPOUT = {"mamba4rec": 0.5, "sasrec": 0.5}

_MODELS = ("mamba4rec", "sasrec")
_BACKENDS = ("auto", "fused", "cpu", "chunked", "reference")
#: Learning-rate schedules of a run (``train.loop.lr_factor``).
LR_SCHEDULES = ("constant", "cosine")
Pipeline = Literal["auto", "sparse_dist", "base", "plain"]
Sharding = Literal["table_wise", "row_wise", "column_wise"]


def _opt(default: Any, help: str, group: str, **extra: Any) -> Any:  # noqa: A002 - argparse's name
    """A field with its CLI help, group and argparse extras (choices, metavar) as metadata."""
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass(frozen=True)
class RunConfig:
    """Settings of one training run: data, model, optimisation and run flags.

    Every field is a ``torchrec-mamba train`` flag (``lr`` -> ``--lr``); see each field's help.

    Example::

        >>> cfg = RunConfig(data="sasrec:Beauty.txt", model="sasrec")
        >>> cfg.resolved().dropout, cfg.lr, cfg.batch_size
        (0.5, 0.002, 128)
    """

    # --- data ---
    data: str = _opt("", "FORMAT:PATH, FORMAT in sasrec|movielens|csv", "data", required=True)
    output: str = _opt("", "folder for metrics.json, run_config.json and the model", "data",
                       required=True)
    max_len: int = _opt(50, "longest input sequence", "data")
    # --- model ---
    model: str = _opt("mamba4rec", "the encoder", "model", choices=_MODELS)
    d_model: int = _opt(64, "embedding / model width", "model")
    num_layers: int = _opt(2, "encoder layers", "model")
    d_state: int = _opt(32, "SSM state size", "model")
    d_conv: int = _opt(4, "conv width", "model")
    expand: int = _opt(2, "Mamba inner expansion", "model")
    init: str = _opt("mamba4rec", "Mamba init: the paper code's (dt bias 0) or mamba-ssm's "
                     "log-uniform dt", "model", choices=("mamba4rec", "mamba"))
    num_heads: int = _opt(2, "SASRec attention heads", "model")
    dropout: float | None = _opt(None, "dropout (default 0.5 for both models: chosen on Beauty's "
                                 "validation split)", "model")
    attn_dropout: float | None = _opt(None, "SASRec attention-probability dropout (default: "
                                      "--dropout, as RecBole; 0 is faster on CPU)", "model")
    backend: str = _opt("auto", "selective-scan backend", "model", choices=_BACKENDS)
    loss_positions: str = _opt("all", "train on every position or only the last", "model",
                               choices=("all", "last"))
    sampled_softmax: int = _opt(0, "sampled softmax with S negatives and logQ correction "
                                "(0: full)", "model", metavar="S")
    category_loss_weight: float = _opt(0.0, "weight of the next-category task when the data has "
                                       "categories", "model")
    embedding_scale: str = _opt("sqrt", "scale the embeddings entering the encoder: none, or "
                                "sqrt (times sqrt(d_model), as the original SASRec)", "model",
                                choices=("none", "sqrt"))
    label_smoothing: float = _opt(0.0, "label smoothing of the full item softmax, in [0, 1) "
                                  "(0: none; needs --sampled-softmax 0)", "model")
    # --- optimisation ---
    epochs: int = _opt(60, "maximum epochs", "train")
    patience: int = _opt(10, "early-stopping patience", "train")
    lr: float = _opt(2e-3, "learning rate", "train")
    weight_decay: float = _opt(0.0, "AdamW decay of dense weights (0: Adam)", "train")
    lr_schedule: str = _opt("constant", "learning-rate schedule over --epochs: constant, or cosine "
                            "(every lr, tables included, times (1 + cos(pi * epoch / epochs)) / 2 "
                            "from the start of each epoch)", "train", choices=LR_SCHEDULES)
    embedding_weight_decay: float = _opt(0.0, "L2 weight decay of the embedding tables (the "
                                         "table optimizer's weight_decay; 0: none)", "train")
    ema_decay: float = _opt(0.999, "validate, select and save an exponential moving average of "
                            "the weights, updated after every step n with the decay "
                            "min(--ema-decay, (1 + n) / (10 + n)) (0: the live weights; 0.999 was "
                            "chosen on Beauty's validation split)", "train")
    head_dtype: str = _opt("auto", "dtype of the training softmax product (auto: bfloat16 where "
                           "the device has native bf16 GEMMs, i.e. CUDA with bf16 or a CPU with "
                           "AVX512-BF16/AMX, else float32; bfloat16 is several times faster "
                           "there and several times slower elsewhere; evaluation stays float32)",
                           "train", choices=("auto", "float32", "bfloat16"))
    loss_normalization: str = _opt(
        "global", "batch: mean over each batch's targets; global: sum / (rows x mean targets per "
        "training row), so every target weighs the same whatever the length mix of its batch",
        "train", choices=("batch", "global"))
    embedding_optimizer: str = _opt(
        "auto", "table optimizer; auto = adam, or exact adagrad for sharded tables on CPU where "
        "FBGEMM has no fused Adam", "train",
        choices=("auto", "adam", "adagrad", "rowwise_adagrad", "sgd"))
    embedding_lr: float | None = _opt(None, "table learning rate (default: --lr for adam, 0.05 "
                                      "for adagrad)", "train")
    batch_size: int = _opt(128, "training rows per rank", "train")
    length_buckets: int = _opt(16, "sort each run of K training batches by length before "
                               "batching, so batches carry little padding; 0 turns it off",
                               "train", metavar="K")
    pipeline: Pipeline = _opt("auto", "training loop (auto: sparse_dist when sharded, else plain)",
                         "train", choices=("auto", "sparse_dist", "base", "plain"))
    # --- run ---
    seed: int = _opt(0, "random seed", "run")
    sharding: Sharding | None = _opt(None, "shard tables with DMP (default: unsharded in one process, "
                                "row_wise under torchrun)", "run",
                                choices=("table_wise", "row_wise", "column_wise"))
    device: str | None = _opt(None, "default: cuda if available", "run", choices=("cpu", "cuda"))
    checkpoint_dir: str | None = _opt(None, "checkpoint after every epoch here", "run")
    resume: bool = _opt(False, "continue from --checkpoint-dir (an error when it holds no "
                        "checkpoint, or one of another run)", "run")
    resume_if_exists: bool = _opt(False, "resume when --checkpoint-dir holds a checkpoint of this "
                                  "run, else start from scratch", "run")
    overwrite: bool = _opt(False, "replace the results already in --output (and the checkpoint "
                           "in --checkpoint-dir) of an earlier run", "run")
    eval_batch_size: int = _opt(1024, "evaluation rows per rank", "run")
    mask_seen: bool = _opt(False, "do not rank items already in the history", "run")
    no_progress: bool = _opt(False, "no tqdm bar", "run")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"RunConfig.{f.name}={value!r}: choose from {list(choices)}")
        for name in ("max_len", "d_model", "num_layers", "d_state", "d_conv", "expand",
                     "num_heads", "epochs", "patience", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RunConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("sampled_softmax", "length_buckets", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"RunConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("dropout", "attn_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"RunConfig.{name} must be in [0, 1), got {p!r}")
        if not self.lr > 0:
            raise ValueError(f"RunConfig.lr must be > 0, got {self.lr!r}")
        for name in ("weight_decay", "embedding_weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and value >= 0):
                raise ValueError(f"RunConfig.{name} must be a number >= 0, got {value!r}")
        if not (isinstance(self.ema_decay, (int, float)) and not isinstance(self.ema_decay, bool)
                and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"RunConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not (isinstance(self.label_smoothing, (int, float)) and not isinstance(
                self.label_smoothing, bool) and 0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"RunConfig.label_smoothing must be in [0, 1), got "
                             f"{self.label_smoothing!r}")
        if self.label_smoothing > 0 and self.sampled_softmax > 0:
            raise ValueError(f"RunConfig.label_smoothing={self.label_smoothing} needs the full "
                             f"softmax, but sampled_softmax={self.sampled_softmax}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("RunConfig.resume=True needs a checkpoint_dir")

    def resolved(self, world_size: int = 1) -> RunConfig:
        """A copy with the per-model dropout filled in and, under torchrun, sharding row_wise."""
        changes: dict[str, Any] = {}
        if self.dropout is None:
            changes["dropout"] = MODEL_DROPOUT[self.model]
        if world_size > 1 and self.sharding is None:
            changes["sharding"] = "row_wise"
        return dataclasses.replace(self, **changes)

    def fit_config(self, **overrides: Any) -> FitConfig:
        """The :class:`~torchrec_mamba.train.loop.FitConfig` of this run: epochs, patience,
        mask_seen, pipeline, checkpoint_dir, resume, progress, lr_schedule and ema_decay, with the
        best model saved to ``OUTPUT/model.pt`` (none when ``output`` is empty); ``overrides``
        replace any of these or set FitConfig's other fields (``monitor``, ``ks``, ``all_tasks``).

        Example::

            >>> RunConfig(data="sasrec:x.txt", output="run", ema_decay=0.999).fit_config(
            ...     ks=(10,), monitor="hr@10").ema_decay
            0.999
        """
        from torchrec_mamba.train.loop import FitConfig

        values: dict[str, Any] = {
            "epochs": self.epochs, "patience": self.patience, "mask_seen": self.mask_seen,
            "pipeline": self.pipeline, "checkpoint_dir": self.checkpoint_dir,
            "resume": self.resume, "progress": not self.no_progress,
            "lr_schedule": self.lr_schedule, "ema_decay": self.ema_decay,
            "best_model_path": str(Path(self.output) / MODEL_FILE) if self.output else None,
        }
        return FitConfig(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a dict; an unknown key is a ``ValueError`` naming it (missing: default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown RunConfig key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        """Write ``run_config.json`` (``path`` is its folder, or the file itself); returns it."""
        target = Path(path)
        if target.suffix != ".json":
            target.mkdir(parents=True, exist_ok=True)
            target = target / RUN_CONFIG
        target.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return target

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read what :meth:`save` wrote (a folder holding ``run_config.json``, or the file)."""
        target = Path(path)
        if target.suffix != ".json":
            target = target / RUN_CONFIG
        if not target.is_file():
            raise FileNotFoundError(f"{target} not found (written by `torchrec-mamba train`)")
        values = json.loads(target.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{target}: expected a JSON object, got {type(values).__name__}")
        return cls.from_dict(values)


def add_run_config_args(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`RunConfig` field, with its default, type, choices and help."""
    hints = typing.get_type_hints(RunConfig)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        meta = dict(f.metadata)
        group_name = meta.pop("group")
        group = groups.get(group_name) or parser.add_argument_group(group_name)
        groups[group_name] = group
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        required = meta.pop("required", False)
        help_text = meta.pop("help")
        if "(default" not in help_text and f.default not in (None, ""):
            help_text += f" (default {f.default})"
        if kind is bool:
            group.add_argument(flag, action="store_true", help=help_text)
            continue
        if typing.get_origin(kind) is not Literal and typing.get_args(kind):  # X | None
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        base = str if typing.get_origin(kind) is Literal else kind  # Literal: its values are choices
        group.add_argument(flag, type=base, default=None if required else f.default,
                           required=required, help=help_text, **meta)


@dataclass(frozen=True)
class DataInfo:
    """What a model needs from the data to be rebuilt without it (saved as ``data_info.json``).

    Args:
        num_items (int): items I (table rows I + 1).
        num_categories (int): categories C (0: no category table). Default: 0.
        num_users (int): users in the training data. Default: 0.
        data_fingerprint (str | None): identity of the data file
            (:func:`~torchrec_mamba.train.run_guard.data_fingerprint`), so that ``--resume``
            refuses another file. Default: None.
        targets_per_row (float | None): mean training targets per row (:func:`targets_per_row`),
            the constant of ``loss_normalization="global"``. Default: None.
        raw_item_ids (list[int] | None): raw id of each dense item id (entry 0 padding, -1),
            when the reader re-indexed the items. Default: None.

    Example::

        >>> DataInfo(num_items=3, raw_item_ids=[-1, 10, 20, 30]).num_items
        3
    """

    num_items: int
    num_categories: int = 0
    num_users: int = 0
    raw_item_ids: list[int] | None = None
    data_fingerprint: str | None = None
    targets_per_row: float | None = None

    @classmethod
    def from_sequence_data(cls, data: Any) -> DataInfo:
        """From a :class:`~torchrec_mamba.data.SequenceData` (categories only when it has them)."""
        return cls(
            num_items=int(data.num_items),
            num_categories=int(data.num_categories) if data.item_category is not None else 0,
            num_users=int(data.num_users),
            raw_item_ids=[int(i) for i in data.raw_item_ids],
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/data_info.json``; returns its path."""
        target = Path(directory) / DATA_INFO
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(dataclasses.asdict(self)) + "\n")
        return target

    @classmethod
    def load(cls, directory: str | Path) -> DataInfo:
        """Read ``directory/data_info.json``; an unknown key is a ``ValueError``."""
        values = json.loads((Path(directory) / DATA_INFO).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown DataInfo key(s) {unknown}")
        return cls(**values)


def build_model(
    config: RunConfig,
    data: DataInfo,
    device: torch.device | str | None = None,
    item_counts: Tensor | None = None,
    targets_per_row: float | None = None,
) -> Any:
    """The run's ``SequentialRecommender``: ``mamba4rec(...)`` or ``sasrec(...)`` from the config.

    Seed torch before calling it: the encoder, then the tables, draw their initial weights.

    Args:
        config (RunConfig): the run (``dropout=None`` resolves per model).
        data (DataInfo): table sizes; categories are fused (and their task trained when
            ``category_loss_weight > 0``) only when ``data.num_categories > 0``.
        device (torch.device | str | None): parameter device. Default: None (CPU).
        item_counts (Tensor | None): (I + 1,) training counts of each item, the proposal of the
            sampled softmax (count training ids only, so nothing leaks). Default: None.
        targets_per_row (float | None): mean training targets per row for
            ``loss_normalization="global"`` (see :func:`targets_per_row`). Default: None
            (``data.targets_per_row``).

    Example::

        >>> m = build_model(RunConfig(d_model=8, d_state=4, num_layers=1, backend="reference"),
        ...                 DataInfo(num_items=10))
        >>> type(m).__name__, m.tasks[0].name
        ('SequentialRecommender', 'next_item')

    Returns:
        SequentialRecommender: the model.
    """
    from torchrec_mamba.models import SampledSoftmaxConfig, mamba4rec, sasrec

    cfg = config.resolved()
    if targets_per_row is None:
        targets_per_row = data.targets_per_row
    if cfg.loss_normalization == "global" and targets_per_row is None:
        # Only the loss's scale depends on the constant: Adam and Adagrad updates do not (up to
        # their epsilon), and a model rebuilt for inference never uses it.
        logger.info("loss_normalization='global' without targets_per_row: the loss is the sum "
                    "per row (pass targets_per_row for a per-target mean)")
        targets_per_row = 1.0
    sampled = SampledSoftmaxConfig(num_negatives=cfg.sampled_softmax) if cfg.sampled_softmax else None
    common: dict[str, Any] = dict(
        num_categories=data.num_categories,
        category_loss_weight=cfg.category_loss_weight if data.num_categories > 0 else 0.0,
        loss_positions=cfg.loss_positions,
        sampled_softmax=sampled,
        item_counts=item_counts if sampled is not None else None,
        device=device,
        num_layers=cfg.num_layers,
        dropout=cfg.dropout,
        logits_dtype=torch.bfloat16 if resolve_head_dtype(cfg.head_dtype, device) == "bfloat16"
        else None,
        targets_per_row=targets_per_row if cfg.loss_normalization == "global" else None,
        input_scale=math.sqrt(cfg.d_model) if cfg.embedding_scale == "sqrt" else 1.0,
        label_smoothing=cfg.label_smoothing,
    )
    if cfg.model == "mamba4rec":
        return mamba4rec(data.num_items, cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv,
                         expand=cfg.expand, backend=cfg.backend, init=cfg.init, **common)
    return sasrec(data.num_items, cfg.d_model, num_heads=cfg.num_heads, max_len=cfg.max_len,
                  attn_dropout=cfg.attn_dropout, **common)


def native_bf16_gemm(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (and so faster than float32).

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: oneDNN's bf16 path, which needs AVX512-BF16
    or AMX; without it a bf16 GEMM is emulated and runs about 5x *slower* than float32 (AMD Zen 3,
    measured in ``docs/benchmarks.md``).
    """
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_head_dtype(name: str, device: torch.device | str | None = None) -> str:
    """``"float32"`` or ``"bfloat16"`` for :attr:`RunConfig.head_dtype` on ``device``.

    ``"auto"`` is bfloat16 only where :func:`native_bf16_gemm` holds. Explicit names are kept, so a
    run can still force either.

    Example::

        >>> resolve_head_dtype("float32")
        'float32'
    """
    if name not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"head_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    if name != "auto":
        return name
    return "bfloat16" if native_bf16_gemm(device) else "float32"


def targets_per_row(lengths: Any) -> float:
    """Mean training targets per row, from the rows' input lengths (``"global"`` normalisation).

    Example::

        >>> targets_per_row([2, 3, 7])
        4.0
    """
    import numpy as np

    values = np.asarray(lengths, dtype=np.float64)
    if values.size == 0 or not values.sum() > 0:
        raise ValueError("targets_per_row: the training part has no targets")
    return float(values.mean())
