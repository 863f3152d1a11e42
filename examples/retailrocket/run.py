"""RetailRocket end to end: events → NVTabular ETL → Mamba4Rec vs SASRec vs popularity.

Steps, top to bottom:

1. raw data: the four Kaggle files from ``--data-dir``, or (the default) a seeded synthetic
   RetailRocket written into ``WORK_DIR/raw`` (``torchrec_mamba_preprocessing.synthetic``, 100k
   events; ``--events N`` to change);
2. ETL (``torchrec_mamba_preprocessing.retailrocket.run_etl``): sessions, the category in force
   at each event, time split (last ``--test-days`` days test, the ``--valid-days`` before valid),
   NVTabular ``Categorify`` / ``Groupby`` / ``ListSlice`` into parquet shards in
   ``WORK_DIR/processed``;
3. Mamba4Rec (``build_model`` of a ``RunConfig``): category embeddings summed into the item
   embeddings, a ``NextItemTask`` and a ``NextCategoryTask`` (tied softmax), all-position loss;
   trained by the library's ``train.fit`` (early stopping on validation NDCG@10, next item; test
   at the best epoch; a resumable checkpoint per epoch in ``OUTPUT_DIR/checkpoints/MODEL``,
   ``--resume`` continues it; the best weights in ``OUTPUT_DIR/MODEL/model.pt``); training batches
   are length-bucketed (``--bucket``, ``ParquetSequenceLoader(bucket=...)``);
4. the SASRec baseline: the same tables, tasks, loss, optimizer and trainer with the SASRec
   encoder (``sasrec(...)``) instead of the Mamba stack;
5. a most-popular baseline: train-label frequencies of items and of categories;
6. test split, full ranking over all items (and all categories): HR/NDCG/MRR@{1,10,20}, each
   model at its best validation epoch;
7. ``OUTPUT_DIR/curves.png``: validation NDCG@10 and training loss per epoch, both models;
8. a table, then as the LAST stdout line one JSON object (top-level ``next_item`` /
   ``next_category`` are Mamba4Rec's).

Run::

    python examples/retailrocket/run.py                                   # synthetic demo
    python examples/retailrocket/run.py --data-dir ~/data/retailrocket    # the Kaggle files

Everything that trains and evaluates is the library's (``torchrec_mamba.train``); this script
keeps only the ETL, the popularity baseline and the report.
"""

from __future__ import annotations

import os

# libgomp's spin-waiting makes small ops ~200x slower on machines with few cores; this must be set
# before torch (and so OpenMP) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for large torch buffers (fewer faults)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchrec_mamba_preprocessing.retailrocket import RAW_FILES, ETLConfig, run_etl  # noqa: E402
from torchrec_mamba_preprocessing.synthetic import (  # noqa: E402
    SyntheticConfig,
    write_retailrocket,
)

from torchrec_mamba.data import ParquetSequenceLoader  # noqa: E402
from torchrec_mamba.models import SequentialRecommender  # noqa: E402
from torchrec_mamba.train.config import DataInfo, RunConfig, build_model  # noqa: E402
from torchrec_mamba.train.distributed import (  # noqa: E402
    DistributedContext,
    EmbeddingOptimizerConfig,
    build_optimizer,
    init_distributed,
)
from torchrec_mamba.train.loop import fit  # noqa: E402
from torchrec_mamba.train.metrics import RankingMetrics  # noqa: E402

__all__ = ["BUCKET", "KS", "MODELS", "TASKS", "build_parser", "main"]

logger = logging.getLogger("retailrocket")

HERE = Path(__file__).resolve().parent
KS = (1, 10, 20)
TASKS = ("next_item", "next_category")
MODELS = ("mamba4rec", "sasrec")
MONITOR = "ndcg@10"
#: Default ``--bucket``: training batches of similar length (sessions are short, a few long).
BUCKET = 32


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; the defaults are the ``make demo`` run."""
    p = argparse.ArgumentParser(
        description="RetailRocket: NVTabular ETL -> Mamba4Rec / SASRec / popularity, "
        "next item and next category."
    )
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, default=None,
                      help="folder with the four Kaggle RetailRocket files (events.csv, "
                      "item_properties_part1.csv, item_properties_part2.csv, category_tree.csv); "
                      "default: generate a synthetic RetailRocket")
    data.add_argument("--events", type=int, default=100_000,
                      help="synthetic events to generate (default 100000)")
    data.add_argument("--seed", type=int, default=0, help="data and model seed (default 0)")
    data.add_argument("--work-dir", type=Path, default=HERE / "data",
                      help="raw/ and processed/ go here (default examples/retailrocket/data)")
    data.add_argument("--output-dir", type=Path, default=HERE / "output",
                      help="curves.png and results.json (default examples/retailrocket/output)")
    data.add_argument("--max-len", type=int, default=50,
                      help="events kept per session by the ETL (default 50)")
    data.add_argument("--test-days", type=float, default=7.0, help="test period (default 7)")
    data.add_argument("--valid-days", type=float, default=7.0, help="validation period (default 7)")
    model = p.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=64, help="embedding width (default 64)")
    model.add_argument("--mamba-layers", type=int, default=2,
                       help="Mamba layers (default 2: the library default, and the same depth "
                       "as the SASRec baseline)")
    model.add_argument("--d-state", type=int, default=32, help="SSM state size (default 32)")
    model.add_argument("--sasrec-layers", type=int, default=2, help="SASRec layers (default 2)")
    model.add_argument("--num-heads", type=int, default=2, help="SASRec heads (default 2)")
    model.add_argument("--dropout", type=float, default=0.2, help="dropout (default 0.2)")
    model.add_argument("--category-loss-weight", type=float, default=0.5,
                       help="weight of the next-category loss (default 0.5)")
    model.add_argument("--sampled-softmax", type=int, default=0, metavar="S",
                       help="sampled item softmax with S negatives (default 0: full softmax; "
                       "use ~1000 on the real catalogue on CPU)")
    model.add_argument("--backend", default="auto",
                       choices=["auto", "fused", "cpu", "chunked", "reference"],
                       help="selective-scan backend (default auto)")
    train = p.add_argument_group("training")
    train.add_argument("--models", default=",".join(MODELS),
                       help="comma-separated subset of mamba4rec,sasrec (default both)")
    # Early stopping ends the default run (both models stop at epochs 13-18 on the default
    # data); the cap used to be 8, where both validation curves were still rising.
    train.add_argument("--epochs", type=int, default=30,
                       help="maximum epochs; --patience decides when to stop (default 30)")
    train.add_argument("--patience", type=int, default=3,
                       help="stop after this many epochs without a better validation "
                       f"{MONITOR} (default 3)")
    train.add_argument("--batch-size", type=int, default=256, help="training rows (default 256)")
    train.add_argument("--eval-batch-size", type=int, default=512, help="default 512")
    train.add_argument("--bucket", type=int, default=BUCKET,
                       help="length-bucket training batches: sort runs of BUCKET batches by "
                       f"length, then shuffle the batches; 0 turns it off (default {BUCKET})")
    train.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3)")
    train.add_argument("--ema-decay", type=float, default=RunConfig.ema_decay,
                       help="validate, select and keep a moving average of the weights with this "
                       "per-step decay (the library default, %(default)s; 0: the live weights)")
    train.add_argument("--device", default=None, choices=["cpu", "cuda"],
                       help="default: cuda when available")
    train.add_argument("--resume", action="store_true",
                       help="continue each model from its checkpoint in OUTPUT_DIR/checkpoints")
    train.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


# --- 1-2: data ------------------------------------------------------------------------------------
def prepare_raw(data_dir: Path | None, work_dir: Path, events: int, seed: int) -> tuple[Path, str]:
    """The folder with the four raw files, and ``"kaggle"`` or ``"synthetic"``.

    Args:
        data_dir (Path | None): the Kaggle files; None generates synthetic ones.
        work_dir (Path): the synthetic files go to ``work_dir/raw``.
        events (int): synthetic events.
        seed (int): synthetic seed.

    Returns:
        tuple[Path, str]: raw folder and source name.
    """
    if data_dir is not None:
        missing = [f for f in RAW_FILES if not (data_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"--data-dir {data_dir} lacks {missing}; download the Kaggle dataset "
                "retailrocket/ecommerce-dataset and unzip it there"
            )
        return data_dir, "kaggle"
    if events < 1:
        raise ValueError(f"--events must be >= 1, got {events}")
    raw = work_dir / "raw"
    write_retailrocket(raw, SyntheticConfig(num_events=events, seed=seed))
    return raw, "synthetic"


def etl_counts(report: Any) -> dict[str, Any]:
    """The ETL numbers that go into the final JSON line."""
    return {
        "events_read": report.events_read,
        "events_kept": report.events_kept,
        "sessions": report.sessions,
        "single_event_sessions": report.single_event_sessions,
        "rows": {name: s.rows for name, s in report.splits.items()},
        "events": {name: s.events for name, s in report.splits.items()},
        "vocab_sizes": dict(report.vocab_sizes),
        "backend": report.backend,
        "seconds": round(sum(report.seconds.values()), 2),
    }


@dataclass
class Splits:
    """Parquet loaders of the three splits and the table sizes.

    Args:
        train (ParquetSequenceLoader): shuffled training rows.
        valid (ParquetSequenceLoader): validation rows, file order.
        test (ParquetSequenceLoader): test rows, file order.
        num_items (int): largest item id (the table has ``num_items + 1`` rows).
        num_categories (int): largest category id.
    """

    train: ParquetSequenceLoader
    valid: ParquetSequenceLoader
    test: ParquetSequenceLoader
    num_items: int
    num_categories: int


def make_splits(processed: Path, batch_size: int, eval_batch_size: int, seed: int,
                bucket: int = 0) -> Splits:
    """Loaders over ``processed/{train,valid,test}`` with keys item and category.

    Args:
        processed (Path): the ETL output folder.
        batch_size (int): training rows per batch.
        eval_batch_size (int): validation and test rows per batch.
        seed (int): training shuffle seed.
        bucket (int): length bucketing of the training batches
            (``ParquetSequenceLoader(bucket=...)``); 0 turns it off. Default: 0.

    Returns:
        Splits: the three loaders and the table sizes.
    """
    keys = ("item", "category")
    for name in ("train", "valid", "test"):
        if not list((processed / name).glob("*.parquet")):
            raise ValueError(
                f"the ETL wrote no {name} rows to {processed / name}: the data is too small "
                "or too short for the time split (try more --events or fewer --test-days / "
                "--valid-days)"
            )
    train = ParquetSequenceLoader(processed / "train", batch_size, keys=keys, seed=seed,
                                  bucket=bucket)
    # evaluation rows sorted by length: each batch is padded only to its own longest row
    valid = ParquetSequenceLoader(processed / "valid", eval_batch_size, keys=keys, mode="eval",
                                  sort_by_length=True)
    test = ParquetSequenceLoader(processed / "test", eval_batch_size, keys=keys, mode="eval",
                                 sort_by_length=True)
    # one id space for all splits (the ETL fits its vocabularies on every split); take the max
    sizes = [s.vocab_sizes for s in (train, valid, test)]
    num_items = max(v["item"] for v in sizes) - 1
    num_categories = max(v["category"] for v in sizes) - 1
    return Splits(train, valid, test, num_items, num_categories)


def label_counts(loader: ParquetSequenceLoader, key: str, size: int) -> Tensor:
    """(size + 1,) how often each id is a next-event label in ``loader`` (one epoch)."""
    counts = torch.zeros(size + 1, dtype=torch.float64)
    for batch in loader:
        values = batch.labels[key].values()  # (T,)
        counts += torch.bincount(values, minlength=size + 1).double()
    return counts


def item_categories(loader: ParquetSequenceLoader, num_items: int, num_categories: int) -> list[int]:
    """(I + 1,) the most frequent category of each item in ``loader`` (0: never seen), for serving.

    ``Recommender.load`` reads it as ``item_categories.json``: a history of item ids alone then
    gets the category input the model was trained with.
    """
    pairs = torch.zeros((num_items + 1) * (num_categories + 1), dtype=torch.float64)
    for batch in loader:
        for kjt in (batch.features, batch.labels):
            code = kjt["item"].values() * (num_categories + 1) + kjt["category"].values()
            pairs += torch.bincount(code, minlength=pairs.numel()).double()
    table = pairs.view(num_items + 1, num_categories + 1)  # (I + 1, C + 1)
    best = table.argmax(1)
    best[table.sum(1) == 0] = 0
    return best.tolist()


def save_serving_files(run_dir: Path, processed: Path, categories: list[int]) -> None:
    """The vocabularies and item categories ``Recommender.load(run_dir)`` maps raw ids through."""
    (run_dir / "vocabs").mkdir(parents=True, exist_ok=True)
    for name in ("item", "category"):
        shutil.copyfile(processed / "vocabs" / f"{name}.csv", run_dir / "vocabs" / f"{name}.csv")
    (run_dir / "item_categories.json").write_text(json.dumps(categories) + "\n")


# --- 3-4: models ----------------------------------------------------------------------------------
def run_config(kind: str, args: argparse.Namespace) -> RunConfig:
    """The example's settings for ``kind`` as a library :class:`RunConfig` (its own defaults)."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")
    return RunConfig(
        data=f"parquet:{args.work_dir / 'processed'}", output=str(args.output_dir / kind), model=kind,
        max_len=args.max_len, d_model=args.d_model, d_state=args.d_state,
        num_layers=args.mamba_layers if kind == "mamba4rec" else args.sasrec_layers,
        num_heads=args.num_heads, dropout=args.dropout, attn_dropout=0.0, backend=args.backend,
        sampled_softmax=args.sampled_softmax, category_loss_weight=args.category_loss_weight,
        epochs=args.epochs, patience=args.patience, lr=args.lr, ema_decay=args.ema_decay,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, length_buckets=args.bucket, seed=args.seed,
        device=args.device, checkpoint_dir=str(args.output_dir / "checkpoints" / kind),
        resume=args.resume, no_progress=args.no_progress,
    )


@dataclass
class TrainResult:
    """One model's run.

    Args:
        test (dict[str, dict[str, float]]): test metrics per task at the best epoch.
        valid (dict[str, dict[str, float]]): validation metrics per task at the best epoch.
        best_epoch (int): 1-based.
        history (list[dict[str, Any]]): per epoch ``epoch``, ``loss``, ``valid``, ``tasks``,
            ``train_seconds`` (``FitResult.history``).
        seconds (float): wall time of training and evaluation.
    """

    test: dict[str, dict[str, float]]
    valid: dict[str, dict[str, float]]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def train_model(cfg: RunConfig, model: SequentialRecommender, splits: Splits,
                ctx: DistributedContext) -> TrainResult:
    """``train.fit`` with both tasks evaluated; resumable checkpoints in ``cfg.checkpoint_dir``."""
    start = time.perf_counter()
    optimizer = build_optimizer(model, cfg.lr, 0.0, EmbeddingOptimizerConfig("adam", lr=cfg.lr))
    fit_config = cfg.fit_config(monitor=MONITOR, ks=KS, all_tasks=True)
    res = fit(model, optimizer, splits.train, splits.valid, splits.test, fit_config, ctx)
    return TrainResult(test=res.test_tasks, valid=res.valid_tasks, best_epoch=res.best_epoch,
                       history=res.history, seconds=time.perf_counter() - start)


# --- 5: popularity --------------------------------------------------------------------------------
def popularity_scores(counts: Tensor) -> Tensor:
    """(I + 1,) scores ranking ids by training count, ties broken by id (no optimistic ties).

    Example::

        >>> popularity_scores(torch.tensor([0.0, 2.0, 5.0, 2.0, 0.0])).argsort(descending=True).tolist()
        [2, 1, 3, 4, 0]
    """
    ids = torch.arange(counts.numel(), dtype=torch.float64)
    scores = counts.double() - ids / (counts.numel() + 1)  # (I + 1,) strict total order
    scores[0] = float("-inf")
    return scores


def evaluate_popularity(loader: ParquetSequenceLoader, scores: Tensor, key: str) -> dict[str, float]:
    """Full-ranking metrics of one fixed score vector for every row."""
    metrics = RankingMetrics(ks=KS, device="cpu")
    for batch in loader:
        targets = batch.targets(key)  # (B,)
        metrics.update(scores.expand(targets.numel(), -1), targets, mask=batch.mask)
    return metrics.compute()


# --- 7-8: report ----------------------------------------------------------------------------------
def plot_curves(results: dict[str, TrainResult], path: Path) -> None:
    """Validation NDCG@10 (next item and next category) and training loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, res in results.items():
        epochs = [h["epoch"] for h in res.history]
        for ax, task in zip(axes[:2], TASKS, strict=True):
            ax.plot(epochs, [h["tasks"][task][MONITOR] for h in res.history], marker="o",
                    label=name)
        axes[2].plot(epochs, [h["loss"] for h in res.history], marker="o", label=name)
        axes[0].axvline(res.best_epoch, ls=":", lw=1, color=axes[0].lines[-1].get_color())
    for ax, title in zip(axes, ("valid NDCG@10, next item", "valid NDCG@10, next category",
                                "training loss (item + weighted category)"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one line per (model, task), columns HR/NDCG/MRR@K."""
    cols = [f"{m}@{k}" for k in KS for m in ("hr", "ndcg", "mrr")]
    lines = ["| model | task | " + " | ".join(cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for model, tasks in rows.items():
        for task, metrics in tasks.items():
            cells = " | ".join(f"{metrics[c]:.4f}" for c in cols)
            lines.append(f"| {model} | {task.replace('_', ' ')} | {cells} |")
    return "\n".join(lines)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for name in ("retailrocket", "torchrec_mamba", "torchrec_mamba_preprocessing"):
        logging.getLogger(name).setLevel(logging.INFO)


def check_args(args: argparse.Namespace) -> list[str]:
    """The models to train; ``ValueError`` naming the first bad option."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if not models or unknown:
        raise ValueError(f"--models must name some of {MODELS}, got {args.models!r}")
    for name in ("epochs", "patience", "batch_size", "eval_batch_size", "d_model"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.bucket < 0:
        raise ValueError(f"--bucket must be >= 0, got {args.bucket}")
    return models


def summary(source: str, results: dict[str, TrainResult],
            popularity: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The JSON line's metrics: Mamba4Rec's at the top level, the baselines by name."""
    main_model = results.get("mamba4rec") or next(iter(results.values()))
    out: dict[str, Any] = {
        "data": source,
        "next_item": main_model.test["next_item"],
        "next_category": main_model.test["next_category"],
        "popularity": popularity,
    }
    for kind, res in results.items():
        if kind != "mamba4rec":
            out[kind] = res.test
    out["best_epoch"] = {k: r.best_epoch for k, r in results.items()}
    out["epochs_run"] = {k: len(r.history) for k, r in results.items()}
    out["train_seconds"] = {k: round(r.seconds, 1) for k, r in results.items()}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the whole example; prints a table and, last, the JSON line; returns that object.

    Args:
        argv (Sequence[str] | None): arguments without the program name. Default: ``sys.argv[1:]``.

    Returns:
        dict[str, Any]: the JSON line's object.
    """
    args = build_parser().parse_args(argv)
    models = check_args(args)
    _setup_logging()
    from torchrec_mamba.runtime import keep_freed_memory

    logging.getLogger(__name__).info("keep freed memory in the heap: %s", keep_freed_memory())
    start = time.perf_counter()
    ctx = init_distributed(device=args.device)

    raw, source = prepare_raw(args.data_dir, args.work_dir, args.events, args.seed)
    processed = args.work_dir / "processed"
    etl_config = ETLConfig(max_len=args.max_len, test_days=args.test_days,
                           valid_days=args.valid_days)
    report = run_etl(raw, processed, etl_config)
    splits = make_splits(processed, args.batch_size, args.eval_batch_size, args.seed, args.bucket)
    logger.info("%d items, %d categories; rows train %d, valid %d, test %d",
                splits.num_items, splits.num_categories, splits.train.num_rows,
                splits.valid.num_rows, splits.test.num_rows)

    item_counts = label_counts(splits.train, "item", splits.num_items)
    category_counts = label_counts(splits.train, "category", splits.num_categories)
    info = DataInfo(num_items=splits.num_items, num_categories=splits.num_categories,
                    targets_per_row=float(item_counts[1:].sum()) / max(splits.train.num_rows, 1))
    categories = item_categories(splits.train, splits.num_items, splits.num_categories)
    results: dict[str, TrainResult] = {}
    for kind in models:
        cfg = run_config(kind, args)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, info, ctx.device, item_counts=item_counts.float())
        cfg.save(cfg.output)
        info.save(cfg.output)
        save_serving_files(Path(cfg.output), processed, categories)
        results[kind] = train_model(cfg, model, splits, ctx)
    popularity = {
        "next_item": evaluate_popularity(splits.test, popularity_scores(item_counts), "item"),
        "next_category": evaluate_popularity(
            splits.test, popularity_scores(category_counts), "category"
        ),
    }

    plot = args.output_dir / "curves.png"
    plot_curves(results, plot)
    table_rows = {k: r.test for k, r in results.items()}
    table_rows["popularity"] = popularity
    print(f"\nRetailRocket ({source}), test split, full ranking "
          f"({splits.num_items} items, {splits.num_categories} categories, "
          f"{splits.test.num_rows} test sessions):\n")
    print(format_table(table_rows))
    for kind, res in results.items():
        print(f"{kind}: best epoch {res.best_epoch} of {len(res.history)}, {res.seconds:.0f}s")
    out = summary(source, results, popularity)
    out["etl"] = etl_counts(report)
    out["plot"] = str(plot)
    out["seconds"] = round(time.perf_counter() - start, 1)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    history = {k: r.history for k, r in results.items()}
    (args.output_dir / "results.json").write_text(
        json.dumps({**out, "history": history}, indent=1) + "\n"
    )
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
