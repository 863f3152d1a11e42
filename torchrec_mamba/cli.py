"""The ``torchrec-mamba`` command: train and evaluate Mamba4Rec (or the SASRec baseline).

Examples::

    torchrec-mamba train --data sasrec:../shared/data/amazon-beauty/Beauty.txt --output runs/beauty
    torchrun --standalone --nproc_per_node=2 -m torchrec_mamba.cli train --data sasrec:data.txt \\
        --sharding row_wise --checkpoint-dir runs/ckpt --output runs/rw
    torchrec-mamba evaluate --checkpoint-dir runs/ckpt --split test

``train`` writes ``OUTPUT/metrics.json``::

    {"valid": {...}, "test": {"hr@5", "ndcg@5", "mrr@5", ..., "mrr@20"}, "epochs_run": n,
     "best_epoch": e, "train_seconds_per_epoch": s, "stopped_early": bool,
     "history": [{"epoch", "loss", "valid", "train_seconds"}, ...], "config": {...}}

and prints the same JSON as its last stdout line. A bad data file ends the command with exit
status 2 and one line on stderr naming the file and line.
"""

from __future__ import annotations

import os

# libgomp's spin-waiting makes small ops ~200x slower on machines with few cores; this must be set
# before torch (and so OpenMP) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:
    from torchrec_mamba.data import SequenceData
    from torchrec_mamba.models import Mamba4Rec
    from torchrec_mamba.train.distributed import DistributedContext

__all__ = ["build_parser", "main"]

logger = logging.getLogger("torchrec_mamba.cli")

_RUN_CONFIG = "run_config.json"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``torchrec-mamba`` (subcommands ``train`` and ``evaluate``)."""
    parser = argparse.ArgumentParser(
        prog="torchrec-mamba", description="Mamba4Rec sequential recommendation on TorchRec."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train, early-stop on validation, report test metrics")
    train.add_argument("--data", required=True, help="FORMAT:PATH, FORMAT in sasrec|movielens|csv")
    train.add_argument("--output", required=True, help="folder for metrics.json")
    _add_model_args(train)
    _add_run_args(train)
    train.add_argument("--epochs", type=int, default=60, help="maximum epochs (default 60)")
    train.add_argument("--patience", type=int, default=5, help="early-stopping patience (default 5)")
    train.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    train.add_argument("--weight-decay", type=float, default=0.0,
                       help="AdamW decay of dense weights (default 0: Adam)")
    train.add_argument("--embedding-optimizer", default="auto",
                       choices=["auto", "adam", "adagrad", "rowwise_adagrad", "sgd"],
                       help="table optimizer; auto = adam, or exact adagrad for sharded tables on "
                       "CPU where FBGEMM has no fused Adam (default auto)")
    train.add_argument("--embedding-lr", type=float, default=None,
                       help="table learning rate (default: --lr for adam, 0.05 for adagrad)")
    train.add_argument("--batch-size", type=int, default=128, help="training rows per rank (default 128)")
    train.add_argument("--length-buckets", type=int, default=16, metavar="K",
                       help="sort each run of K training batches by length before batching, so "
                       "batches carry little padding; 0 turns it off (default 16)")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    train.add_argument("--pipeline", default="auto", choices=["auto", "sparse_dist", "base", "plain"],
                       help="training loop (default auto: sparse_dist when sharded, else plain)")

    evaluate = sub.add_parser("evaluate", help="evaluate the checkpoint in --checkpoint-dir")
    evaluate.add_argument("--checkpoint-dir", required=True)
    evaluate.add_argument("--data", default=None, help="FORMAT:PATH (default: the training data)")
    evaluate.add_argument("--split", default="test", choices=["valid", "test"])
    evaluate.add_argument("--output", default=None, help="write OUTPUT/eval_metrics.json too")
    evaluate.add_argument("--eval-batch-size", type=int, default=None)
    evaluate.add_argument("--no-progress", action="store_true")
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mamba4rec", choices=["mamba4rec", "sasrec"])
    p.add_argument("--max-len", type=int, default=50, help="longest input sequence (default 50)")
    p.add_argument("--d-model", type=int, default=64, help="embedding / model width (default 64)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="encoder layers (default 2)")
    p.add_argument("--d-state", type=int, default=32, help="SSM state size (default 32)")
    p.add_argument("--d-conv", type=int, default=4, help="conv width (default 4)")
    p.add_argument("--expand", type=int, default=2, help="Mamba inner expansion (default 2)")
    p.add_argument("--init", default="mamba4rec", choices=["mamba4rec", "mamba"],
                   help="Mamba init: the paper code's (dt bias 0) or mamba-ssm's log-uniform dt "
                   "(default mamba4rec)")
    p.add_argument("--num-heads", type=int, default=2, help="SASRec attention heads (default 2)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout (default 0.5 for mamba4rec, 0.4 for sasrec: each model's best "
                   "on Beauty's validation split, docs/benchmarks.md)")
    p.add_argument("--backend", default="auto",
                   choices=["auto", "fused", "cpu", "chunked", "reference"],
                   help="selective-scan backend (default auto)")
    p.add_argument("--loss-positions", default="all", choices=["all", "last"],
                   help="train on every position or only the last (default all)")
    p.add_argument("--sampled-softmax", type=int, default=0, metavar="S",
                   help="sampled softmax with S negatives and logQ correction (default 0: full)")
    p.add_argument("--category-loss-weight", type=float, default=0.0,
                   help="weight of the next-category head when the data has categories (default 0)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--sharding", default=None, choices=["table_wise", "row_wise", "column_wise"],
                   help="shard tables with DMP (default: unsharded in one process, row_wise "
                   "under torchrun)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint after every epoch here")
    p.add_argument("--eval-batch-size", type=int, default=1024, help="evaluation rows per rank")
    p.add_argument("--mask-seen", action="store_true", help="do not rank items already in the history")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def _setup_logging(rank: int) -> None:
    """Our INFO messages on rank 0 (the sharding plan, epochs); only warnings from libraries."""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # torchrec configures the root logger on import
    )
    logging.getLogger("torchrec_mamba").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_model(
    cfg: dict[str, Any], data: SequenceData, train_ids: Any, ctx: DistributedContext
) -> Mamba4Rec:
    """Encoder + Mamba4Rec; the sampled-softmax proposal counts only training ids (no leak)."""
    import numpy as np
    import torch

    from torchrec_mamba.models import (
        Mamba4Rec,
        Mamba4RecConfig,
        SampledSoftmaxConfig,
        SASRecEncoder,
    )
    from torchrec_mamba.modules import MambaSequenceEncoder

    device = ctx.device
    if cfg["model"] == "mamba4rec":
        encoder: torch.nn.Module = MambaSequenceEncoder(
            d_model=cfg["d_model"], num_layers=cfg["num_layers"], d_state=cfg["d_state"],
            d_conv=cfg["d_conv"], expand=cfg["expand"], dropout=cfg["dropout"],
            backend=cfg["backend"], init=cfg.get("init", "mamba4rec"), device=device,
        )
    else:
        encoder = SASRecEncoder(
            d_model=cfg["d_model"], num_layers=cfg["num_layers"], num_heads=cfg["num_heads"],
            max_len=cfg["max_len"], dropout=cfg["dropout"], device=device,
        )
    use_category = data.item_category is not None
    sampled = SampledSoftmaxConfig(num_negatives=cfg["sampled_softmax"]) if cfg["sampled_softmax"] else None
    counts = None
    if sampled is not None:
        counts = torch.from_numpy(np.bincount(train_ids, minlength=data.num_items + 1))
    config = Mamba4RecConfig(
        num_items=data.num_items,
        embedding_dim=cfg["d_model"],
        num_categories=data.num_categories if use_category else 0,
        category_loss_weight=cfg["category_loss_weight"] if use_category else 0.0,
        loss_positions=cfg["loss_positions"],
        sampled_softmax=sampled,
    )
    return Mamba4Rec(config, encoder, item_counts=counts, device=device)


def _load_data(spec: str) -> SequenceData:
    from torchrec_mamba.data import load_sequences

    return load_sequences(spec)


def _loaders(cfg: dict[str, Any], data: SequenceData, ctx: DistributedContext):  # type: ignore[no-untyped-def]
    from torchrec_mamba.data import SequenceLoader, leave_one_out

    split = leave_one_out(data, max_len=cfg["max_len"])
    common = dict(rank=ctx.rank, world_size=ctx.world_size,
                  with_category=data.item_category is not None)
    train = SequenceLoader(split.train, batch_size=cfg["batch_size"], shuffle=True,
                           seed=cfg["seed"], bucket=cfg.get("length_buckets", 0),
                           **common)  # type: ignore[arg-type]
    valid = SequenceLoader(split.valid, batch_size=cfg["eval_batch_size"], shuffle=False,
                           seed=cfg["seed"], **common)  # type: ignore[arg-type]
    test = SequenceLoader(split.test, batch_size=cfg["eval_batch_size"], shuffle=False,
                          seed=cfg["seed"], **common)  # type: ignore[arg-type]
    return split, train, valid, test


def _start(cfg: dict[str, Any]) -> DistributedContext:
    """Join/start the process group (one is needed whenever tables are sharded) and log."""
    from torchrec_mamba.train.distributed import init_distributed

    ctx = init_distributed(force_process_group=cfg["sharding"] is not None, device=cfg["device"])
    if ctx.world_size > 1 and cfg["sharding"] is None:
        cfg["sharding"] = "row_wise"
    _setup_logging(ctx.rank)
    return ctx


def _prepare_run(cfg: dict[str, Any], ctx: DistributedContext):  # type: ignore[no-untyped-def]
    """Seed, data, loaders, model (sharded when asked), optimizer; ValueError/OSError on bad input."""
    from torchrec_mamba.train.distributed import (
        build_optimizer,
        resolve_embedding_optimizer,
        shard_model,
    )

    _seed_everything(cfg["seed"])
    data = _load_data(cfg["data"])
    split, train, valid, test = _loaders(cfg, data, ctx)
    # Defaults chosen on Amazon Beauty's validation split (docs/benchmarks.md, "Quality").
    if cfg["num_layers"] is None:
        cfg["num_layers"] = 2
    if cfg["dropout"] is None:
        cfg["dropout"] = 0.5 if cfg["model"] == "mamba4rec" else 0.4
    model: Any = _build_model(cfg, data, split.train.values, ctx)
    lr = cfg.get("lr", 1e-3)
    sharded = cfg["sharding"] is not None
    emb_opt = resolve_embedding_optimizer(
        cfg.get("embedding_optimizer", "auto"), cfg.get("embedding_lr"), lr, sharded, ctx.device
    )
    cfg["embedding_optimizer_resolved"] = {"name": emb_opt.name, "lr": emb_opt.lr}
    if sharded:
        model = shard_model(model, cfg["sharding"], ctx, emb_opt)
    optimizer = build_optimizer(model, lr, cfg.get("weight_decay", 0.0), emb_opt)
    cfg.update(num_items=data.num_items, num_users=data.num_users, world_size=ctx.world_size,
               split_stats=dict(split.stats))
    return model, optimizer, train, valid, test


def _error(err: BaseException | str) -> int:
    print(f"torchrec-mamba: error: {err}", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    from torchrec_mamba.train.distributed import destroy_distributed
    from torchrec_mamba.train.loop import FitConfig, fit

    cfg = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        fit_config = FitConfig(
            epochs=cfg["epochs"], patience=cfg["patience"], mask_seen=cfg["mask_seen"],
            pipeline=cfg["pipeline"], checkpoint_dir=cfg["checkpoint_dir"], resume=cfg["resume"],
            progress=not cfg["no_progress"],
        )
    except ValueError as err:
        return _error(err)
    ctx = _start(cfg)
    try:
        try:
            model, optimizer, train, valid, test = _prepare_run(cfg, ctx)
        except (ValueError, OSError) as err:  # bad or missing data file, impossible setting
            return _error(err)
        if ctx.is_main and cfg["checkpoint_dir"] is not None:
            Path(cfg["checkpoint_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(cfg["checkpoint_dir"]) / _RUN_CONFIG).write_text(json.dumps(cfg, indent=1))
        result = fit(model, optimizer, train, valid, test, fit_config, ctx)
        report = {
            "valid": result.valid,
            "test": result.test,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "train_seconds_per_epoch": result.train_seconds_per_epoch,
            "stopped_early": result.stopped_early,
            "history": result.history,
            "config": cfg,
        }
        if ctx.is_main:
            out = Path(cfg["output"])
            out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(report, default=str)
            (out / "metrics.json").write_text(text + "\n")
            print(text, flush=True)
    finally:
        destroy_distributed(ctx)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from torchrec_mamba.train.checkpoint import load_checkpoint
    from torchrec_mamba.train.distributed import destroy_distributed
    from torchrec_mamba.train.loop import evaluate

    run_config = Path(args.checkpoint_dir) / _RUN_CONFIG
    if not run_config.is_file():
        return _error(f"{run_config} not found (written by `train --checkpoint-dir`)")
    cfg = json.loads(run_config.read_text())
    cfg["data"] = args.data or cfg["data"]
    if args.eval_batch_size is not None:
        cfg["eval_batch_size"] = args.eval_batch_size
    ctx = _start(cfg)
    try:
        try:
            model, optimizer, _, valid, test = _prepare_run(cfg, ctx)
            restored = load_checkpoint(args.checkpoint_dir, model, optimizer, ctx)
        except (ValueError, OSError) as err:
            return _error(err)
        if restored is None:
            return _error(f"no checkpoint in {args.checkpoint_dir}")
        loader = test if args.split == "test" else valid
        metrics = evaluate(model, loader, ctx, mask_seen=cfg["mask_seen"])
        report = {args.split: metrics, "epoch": restored[0]["epoch"],
                  "checkpoint_dir": args.checkpoint_dir}
        if ctx.is_main:
            text = json.dumps(report)
            if args.output:
                Path(args.output).mkdir(parents=True, exist_ok=True)
                (Path(args.output) / "eval_metrics.json").write_text(text + "\n")
            print(text, flush=True)
    finally:
        destroy_distributed(ctx)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``torchrec-mamba``; returns the exit status.

    Args:
        argv (list[str] | None): arguments without the program name. Default: ``sys.argv[1:]``.

    Returns:
        int: 0 on success, 2 for bad input (one message on stderr).
    """
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    return _evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
