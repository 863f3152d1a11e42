"""The ``torchrec-mamba`` command: train and evaluate Mamba4Rec (or the SASRec baseline).

Examples::

    torchrec-mamba train --data sasrec:../shared/data/amazon-beauty/Beauty.txt --output runs/beauty
    torchrun --standalone --nproc_per_node=2 -m torchrec_mamba.cli train --data sasrec:data.txt \\
        --sharding row_wise --checkpoint-dir runs/ckpt --output runs/rw
    torchrec-mamba evaluate --run runs/beauty --split test --mask-seen --output runs/beauty/masked.json
    torchrec-mamba evaluate --checkpoint-dir runs/ckpt --split test
    torchrec-mamba recommend --run runs/beauty --input histories.txt -k 10 --output recs.jsonl
    torchrec-mamba plan --items 1000000000 --dim 128 --gpus 64 --hbm-gb 80

``train`` writes ``OUTPUT/run_config.json`` (the resolved :class:`~torchrec_mamba.train.config.RunConfig`),
``OUTPUT/data_info.json`` (table sizes, item id mapping), ``OUTPUT/model.pt`` (the best-epoch
``state_dict``) and ``OUTPUT/metrics.json``::

    {"valid": {...}, "test": {"hr@5", "ndcg@5", "mrr@5", ..., "mrr@20"}, "epochs_run": n,
     "best_epoch": e, "train_seconds_per_epoch": s, "stopped_early": bool,
     "history": [{"epoch", "loss", "valid", "train_seconds"}, ...], "config": {...}}

and prints the same JSON as its last stdout line. ``recommend`` reads one user per line
(``user_id item_1 ... item_n``, raw ids) and writes JSON lines
``{"user": ..., "items": [...], "scores": [...]}``, best first. A bad data file ends the command with exit
status 2 and one line on stderr naming the file and line.
"""

from __future__ import annotations

import os

# libgomp's spin-waiting makes small ops ~200x slower on machines with few cores; this must be set
# before torch (and so OpenMP) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Transparent huge pages for torch's large CPU buffers (c10 reads this once, at the first
# allocation): a fresh 300 MB logits buffer otherwise costs ~75k page faults, and the training
# step ran 15-25% slower on the 2-vCPU box without it (docs/benchmarks.md). Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:
    from torchrec_mamba.data import SequenceData
    from torchrec_mamba.train.config import RunConfig
    from torchrec_mamba.train.distributed import DistributedContext

__all__ = ["build_parser", "main"]

logger = logging.getLogger("torchrec_mamba.cli")

_RUN_CONFIG = "run_config.json"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``torchrec-mamba``; ``train``'s flags come from ``RunConfig``."""
    from torchrec_mamba.train.config import add_run_config_args

    parser = argparse.ArgumentParser(
        prog="torchrec-mamba", description="Mamba4Rec sequential recommendation on TorchRec."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train, early-stop on validation, report test metrics")
    add_run_config_args(train)

    evaluate = sub.add_parser(
        "evaluate", help="full-ranking metrics of a finished run (--run) or a checkpoint")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", default=None,
                        help="a finished train run dir (run_config.json, data_info.json, model.pt)")
    source.add_argument("--checkpoint-dir", default=None, help="a train --checkpoint-dir")
    evaluate.add_argument("--data", default=None, help="FORMAT:PATH (default: the training data)")
    evaluate.add_argument("--split", default="test", choices=["valid", "test"])
    evaluate.add_argument("--mask-seen", action=argparse.BooleanOptionalAction, default=None,
                          help="exclude each user's history from the ranking (default: as trained)")
    evaluate.add_argument("--output", default=None,
                          help="write the report to OUTPUT if it ends in .json, else to "
                               "OUTPUT/eval_metrics.json")
    evaluate.add_argument("--eval-batch-size", type=int, default=None)
    evaluate.add_argument("--no-progress", action="store_true")
    _add_serving_parsers(sub)
    return parser


def _add_serving_parsers(sub: Any) -> None:
    """``recommend`` and ``plan`` (``plan``'s flags are ``train.plan``'s own, passed through)."""
    rec = sub.add_parser("recommend", help="top-K items per user from a finished train run")
    rec.add_argument("--run", required=True, help="the run dir (train --output)")
    rec.add_argument("--input", required=True,
                     help="one user per line: user_id item_1 ... item_n (the sasrec: format)")
    rec.add_argument("-k", type=int, default=10, help="items per user (default 10)")
    rec.add_argument("--exclude-seen", action="store_true", help="never recommend a seen item")
    rec.add_argument("--output", default=None, help="JSON lines file (default: stdout)")
    rec.add_argument("--batch-size", type=int, default=1024, help="users per batch (default 1024)")
    sub.add_parser("plan", add_help=False,
                   help="plan the item table on a GPU fleet (torchrec-mamba plan --help)")


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


def _loaders(cfg: RunConfig, data: SequenceData, ctx: DistributedContext):  # type: ignore[no-untyped-def]
    from torchrec_mamba.data import SequenceLoader, leave_one_out

    split = leave_one_out(data, max_len=cfg.max_len)
    common: dict[str, Any] = dict(rank=ctx.rank, world_size=ctx.world_size,
                                  with_category=data.item_category is not None, seed=cfg.seed)
    train = SequenceLoader(split.train, batch_size=cfg.batch_size, shuffle=True,
                           bucket=cfg.length_buckets, **common)
    # sorted by length: each batch is padded to its own longest row (same metrics, ~5x less work)
    valid = SequenceLoader(split.valid, batch_size=cfg.eval_batch_size, shuffle=False,
                           sort_by_length=True, **common)
    test = SequenceLoader(split.test, batch_size=cfg.eval_batch_size, shuffle=False,
                          sort_by_length=True, **common)
    return split, train, valid, test


def _start(cfg: RunConfig) -> tuple[RunConfig, DistributedContext]:
    """Join/start the process group (one is needed whenever tables are sharded) and log."""
    from torchrec_mamba.train.distributed import init_distributed

    ctx = init_distributed(force_process_group=cfg.sharding is not None, device=cfg.device)
    _setup_logging(ctx.rank)
    return cfg.resolved(ctx.world_size), ctx


def _prepare_run(cfg: RunConfig, ctx: DistributedContext):  # type: ignore[no-untyped-def]
    """Seed, data, loaders, model (sharded when asked), optimizer; ValueError/OSError on bad input.

    Returns the model, optimizer, the three loaders, the :class:`DataInfo` and the derived facts
    (data sizes, split statistics, the resolved table optimizer) that ``metrics.json`` reports.
    """
    import numpy as np
    import torch

    from torchrec_mamba.data import load_sequences
    from torchrec_mamba.runtime import keep_freed_memory
    from torchrec_mamba.train.config import (
        DataInfo,
        build_model,
        resolve_head_dtype,
        targets_per_row,
    )
    from torchrec_mamba.train.distributed import (
        build_optimizer,
        resolve_embedding_optimizer,
        shard_model,
    )
    from torchrec_mamba.train.run_guard import data_fingerprint

    _seed_everything(cfg.seed)
    data = load_sequences(cfg.data)
    split, train, valid, test = _loaders(cfg, data, ctx)
    info = dataclasses.replace(
        DataInfo.from_sequence_data(data),
        data_fingerprint=data_fingerprint(cfg.data.partition(":")[2]),
        targets_per_row=targets_per_row(np.diff(split.train.offsets) - 1),  # window inputs
    )
    counts = torch.from_numpy(np.bincount(split.train.values, minlength=data.num_items + 1))
    model: Any = build_model(cfg, info, ctx.device, item_counts=counts)
    sharded = cfg.sharding is not None
    emb_opt = resolve_embedding_optimizer(
        cfg.embedding_optimizer, cfg.embedding_lr, cfg.lr, sharded, ctx.device,
        weight_decay=cfg.embedding_weight_decay,
    )
    if cfg.sharding is not None:
        model = shard_model(model, cfg.sharding, ctx, emb_opt)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, emb_opt)
    head_dtype = resolve_head_dtype(cfg.head_dtype, ctx.device)
    # Reuse freed heap memory across steps (about a fifth of a CPU epoch; torchrec_mamba.runtime).
    heap = keep_freed_memory()
    if ctx.is_main:
        logger.info("keep freed memory in the heap: %s", heap)
    if ctx.is_main and cfg.head_dtype == "auto":
        logger.info(
            "head_dtype 'auto' -> %s (%s)", head_dtype,
            "native bf16 GEMMs" if head_dtype == "bfloat16" else "no native bf16 GEMMs here")
    derived = dict(embedding_optimizer_resolved={"name": emb_opt.name, "lr": emb_opt.lr,
                                                 "weight_decay": emb_opt.weight_decay},
                   head_dtype_resolved=head_dtype,
                   num_items=data.num_items, num_users=data.num_users,
                   world_size=ctx.world_size, split_stats=dict(split.stats))
    return model, optimizer, (train, valid, test), info, derived


def _error(err: BaseException | str) -> int:
    print(f"torchrec-mamba: error: {err}", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    from torchrec_mamba.train.config import RunConfig
    from torchrec_mamba.train.distributed import (
        CollectiveFailure,
        collective_errors,
        destroy_distributed,
    )
    from torchrec_mamba.train.loop import fit
    from torchrec_mamba.train.run_guard import (
        check_output_dir,
        check_resume_config,
        resolve_resume,
    )

    try:
        cfg = RunConfig.from_dict({k: v for k, v in vars(args).items() if k != "command"})
        # before anything is loaded or written: no silent fresh start, no clobbered results
        mode = resolve_resume(cfg.checkpoint_dir, cfg.resume, cfg.resume_if_exists)
        if mode == "fresh":
            for folder in (cfg.output, cfg.checkpoint_dir):
                if folder is not None:
                    check_output_dir(folder, cfg.overwrite)
        fit_config = cfg.fit_config(resume=mode == "resume")
    except ValueError as err:
        return _error(err)
    cfg, ctx = _start(cfg)
    try:
        try:
            model, optimizer, (train, valid, test), info, derived = _prepare_run(cfg, ctx)
            if mode == "resume" and cfg.checkpoint_dir is not None:  # before any weight loads
                check_resume_config(cfg.checkpoint_dir, {**cfg.to_dict(), **info.to_dict()})
        except (ValueError, OSError) as err:  # bad or missing data file, impossible setting
            return _error(err)
        if ctx.is_main:
            for folder in (cfg.output, cfg.checkpoint_dir):
                if folder is not None:
                    cfg.save(folder)
                    info.save(folder)
        try:
            with collective_errors(ctx):
                result = fit(model, optimizer, train, valid, test, fit_config, ctx)
        except (ValueError, CollectiveFailure) as err:  # unreadable checkpoint, a dead rank
            return _error(err)
        report = {
            "valid": result.valid,
            "test": result.test,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "train_seconds_per_epoch": result.train_seconds_per_epoch,
            "stopped_early": result.stopped_early,
            "history": result.history,
            "config": {**cfg.to_dict(), **derived},
        }
        if ctx.is_main:
            text = json.dumps(report, default=str)
            (Path(cfg.output) / "metrics.json").write_text(text + "\n")
            print(text, flush=True)
    finally:
        destroy_distributed(ctx)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """``evaluate --run DIR`` (a finished run's best model) or ``--checkpoint-dir`` (the latest)."""
    if args.run is not None:
        return _evaluate_run(args)
    return _evaluate_checkpoint(args)


def _eval_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The ``RunConfig`` fields ``evaluate``'s flags override."""
    changes: dict[str, Any] = {"resume": False}
    if args.data:
        changes["data"] = args.data
    if args.eval_batch_size is not None:
        changes["eval_batch_size"] = args.eval_batch_size
    return changes


def _write_eval_report(report: dict[str, Any], output: str | None) -> None:
    """Print the report as one JSON line; also write it to ``output`` (a .json file or a dir)."""
    text = json.dumps(report)
    if output:
        target = Path(output)
        if target.suffix != ".json":
            target = target / "eval_metrics.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")
    print(text, flush=True)


def _check_same_items(data: SequenceData, run: Path) -> None:
    """The data must map raw item ids to the dense ids the run trained with."""
    from torchrec_mamba.train.config import DATA_INFO, DataInfo

    info, found = DataInfo.load(run), DataInfo.from_sequence_data(data)
    same = (info.num_items, info.num_categories) == (found.num_items, found.num_categories)
    if same and info.raw_item_ids is not None:
        same = info.raw_item_ids == found.raw_item_ids
    if not same:
        raise ValueError(
            f"the data has {found.num_items} items / {found.num_categories} categories with "
            f"another id mapping than the run ({info.num_items} / {info.num_categories}, "
            f"{run / DATA_INFO}): evaluate on the data the run was trained on")


def _evaluate_run(args: argparse.Namespace) -> int:
    """Evaluate ``model.pt`` of a finished run dir on its data (or ``--data``), full ranking."""
    from torchrec_mamba.data import load_sequences
    from torchrec_mamba.serving.recommender import Recommender
    from torchrec_mamba.train.config import RunConfig
    from torchrec_mamba.train.distributed import destroy_distributed
    from torchrec_mamba.train.loop import evaluate

    run = Path(args.run)
    try:
        rec = Recommender.load(run)  # checks the three files, naming a missing or corrupt one
        cfg = RunConfig.load(run)
    except (ValueError, OSError) as err:
        return _error(err)
    # model.pt is a whole unsharded model: no sharding, no resume, no checkpoints
    changes = {**_eval_changes(args), "sharding": None, "checkpoint_dir": None}
    cfg, ctx = _start(dataclasses.replace(cfg, **changes))
    mask_seen = cfg.mask_seen if args.mask_seen is None else args.mask_seen
    try:
        try:
            data = load_sequences(cfg.data)
            _check_same_items(data, run)
            _, _, valid, test = _loaders(cfg, data, ctx)
        except (ValueError, OSError) as err:
            return _error(err)
        model = rec.model.to(ctx.device)
        metrics = evaluate(model, test if args.split == "test" else valid, ctx, mask_seen=mask_seen)
        if ctx.is_main:
            _write_eval_report({args.split: metrics, "mask_seen": mask_seen, "run": str(run),
                                "data": cfg.data}, args.output)
    finally:
        destroy_distributed(ctx)
    return 0


def _evaluate_checkpoint(args: argparse.Namespace) -> int:
    """Evaluate the latest checkpoint of a ``--checkpoint-dir`` (sharded runs included)."""
    from torchrec_mamba.train.checkpoint import load_checkpoint
    from torchrec_mamba.train.config import RunConfig
    from torchrec_mamba.train.distributed import destroy_distributed
    from torchrec_mamba.train.loop import evaluate

    try:
        cfg = RunConfig.load(Path(args.checkpoint_dir) / _RUN_CONFIG)
    except (ValueError, OSError) as err:
        return _error(err)
    cfg, ctx = _start(dataclasses.replace(cfg, **_eval_changes(args)))
    mask_seen = cfg.mask_seen if args.mask_seen is None else args.mask_seen
    try:
        try:
            model, optimizer, (_, valid, test), _, _ = _prepare_run(cfg, ctx)
            restored = load_checkpoint(args.checkpoint_dir, model, optimizer, ctx)
        except (ValueError, OSError) as err:
            return _error(err)
        if restored is None:
            return _error(f"no checkpoint in {args.checkpoint_dir}")
        loader = test if args.split == "test" else valid
        metrics = evaluate(model, loader, ctx, mask_seen=mask_seen)
        if ctx.is_main:
            _write_eval_report({args.split: metrics, "epoch": restored[0]["epoch"],
                                "mask_seen": mask_seen, "checkpoint_dir": args.checkpoint_dir},
                               args.output)
    finally:
        destroy_distributed(ctx)
    return 0


def _read_histories(path: Path, rec: Any) -> tuple[list[Any], list[list[int]]]:
    """Users and raw histories of a ``user item_1 ... item_n`` file; errors name file:line."""
    users: list[Any] = []
    histories: list[list[int]] = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    for line_no, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) == 1:
            raise ValueError(f"{path}:{line_no}: user {tokens[0]} has no items")
        try:
            items = [int(t) for t in tokens[1:]]
        except ValueError:
            bad = next(t for t in tokens[1:] if not t.lstrip("-").isdigit())
            raise ValueError(f"{path}:{line_no}: item id {bad[:40]!r} is not an integer") from None
        try:
            rec.items.encode([items])
        except ValueError as err:
            raise ValueError(f"{path}:{line_no}: {str(err).split(': ', 1)[-1]}") from None
        users.append(int(tokens[0]) if tokens[0].isdigit() else tokens[0])
        histories.append(items)
    if not users:
        raise ValueError(f"{path}: no users")
    return users, histories


def _recommend(args: argparse.Namespace) -> int:
    from torchrec_mamba.serving.recommender import Recommender

    _setup_logging(0)
    logging.getLogger("torchrec_mamba").setLevel(logging.WARNING)  # stderr: errors only
    try:
        rec = Recommender.load(args.run, batch_size=args.batch_size)
        users, histories = _read_histories(Path(args.input), rec)
        ids, scores = rec.recommend(histories, k=args.k, exclude_seen=args.exclude_seen)
    except ValueError as err:
        return _error(err)
    lines = [json.dumps({"user": u, "items": i, "scores": [round(x, 6) for x in s]})
             for u, i, s in zip(users, ids.tolist(), scores.tolist(), strict=True)]
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``torchrec-mamba``; returns the exit status.

    Args:
        argv (list[str] | None): arguments without the program name. Default: ``sys.argv[1:]``.

    Returns:
        int: 0 on success, 2 for bad input (one message on stderr).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # train.plan owns its flags
        from torchrec_mamba.train.plan import main as plan_main

        return plan_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "recommend":
        return _recommend(args)
    return _evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
