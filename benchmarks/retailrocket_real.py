"""Real RetailRocket view sessions: next-item Mamba4Rec vs SASRec vs popularity (session protocol).

Data (read-only, ``../shared/data/retailrocket``; see its ``SOURCE.md``): the COTREC / SR-GNN
preprocessing of RetailRocket ``view`` events, item ids re-indexed 1..36968, no categories.

* ``train_sessions.txt.gz``: one session per line. The LAST ``--valid-fraction`` of the lines
  (10 %) are held out for early stopping (each gives one pair: its last item after the rest) and
  are not trained on; the other sessions are trained with the all-position next-item loss (every
  prefix of a session predicts its next item, i.e. the prefix augmentation of SR-GNN / COTREC).
* ``test_prefix_target.tsv.gz``: COTREC's 15,132 ``prefix \\t target`` pairs; each is one test row.

Metrics: full ranking over all 36,968 items, HR/NDCG/MRR@{10,20} (seen items not masked), test at
the best validation NDCG@10 epoch (:func:`torchrec_mamba.train.loop.fit`). Both models come from
the library's ``build_model`` (same tables, tied next-item task, loss, optimizer); only the
encoder differs. With ~0.5 M
training pairs a full softmax over 37k items is too slow for 2 CPU cores, so the default trains
with a sampled softmax (``--sampled-softmax 1024`` negatives from the popularity proposal, logQ
correction); evaluation is always the full ranking. ``--sampled-softmax 0`` trains full softmax.
Training batches are bucketed by length (``SequenceLoader(bucket=50)``: runs of 50 shuffled
batches sorted by length, batch order shuffled): sessions average 5 events but reach 285, and
random batches padded to ``max_len`` made an epoch about 4x slower here.

Usage::

    python benchmarks/retailrocket_real.py                    # ~15 min on 2 shared cores
    python benchmarks/retailrocket_real.py --epochs 1 --models mamba4rec     # smoke run
    for s in 0 1 2; do python benchmarks/retailrocket_real.py --seed $s > rr_$s.log; done
    python benchmarks/retailrocket_real.py --aggregate rr_0.log rr_1.log rr_2.log   # mean ± std

Prints a table, the Mamba4Rec / SASRec ratio of every metric (measured in the same run) and a
final JSON line. Without the data it prints a ``SKIP`` line and a JSON line, and exits 0.
"""

from __future__ import annotations

import os

# libgomp's spin-waiting makes small ops ~200x slower on machines with few cores; set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for large torch buffers (fewer faults)

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "retailrocket"
TRAIN_FILE = "train_sessions.txt.gz"
TEST_FILE = "test_prefix_target.tsv.gz"
KS = (10, 20)
MODELS = ("mamba4rec", "sasrec")

logger = logging.getLogger("retailrocket_real")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; the defaults are the documented run."""
    from torchrec_mamba.train.config import RunConfig  # no torch.distributed: cheap

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                   help="folder with train_sessions.txt.gz and test_prefix_target.tsv.gz "
                   "(default ../shared/data/retailrocket)")
    p.add_argument("--models", default=",".join(MODELS), help="subset of mamba4rec,sasrec")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="last share of the train lines held out for early stopping (default 0.1)")
    p.add_argument("--max-len", type=int, default=50, help="longest input (default 50)")
    p.add_argument("--d-model", type=int, default=64, help="embedding width (default 64)")
    p.add_argument("--d-state", type=int, default=32, help="Mamba state size (default 32)")
    p.add_argument("--mamba-layers", type=int, default=2,
                   help="default 2 (the library default, the same depth as SASRec)")
    p.add_argument("--sasrec-layers", type=int, default=2, help="default 2")
    p.add_argument("--dropout", type=float, default=0.2, help="default 0.2")
    p.add_argument("--sampled-softmax", type=int, default=1024, metavar="S",
                   help="negatives of the sampled training softmax; 0 = full (default 1024)")
    p.add_argument("--epochs", type=int, default=8, help="maximum epochs per model (default 8)")
    p.add_argument("--patience", type=int, default=2, help="early-stopping patience (default 2)")
    p.add_argument("--batch-size", type=int, default=512, help="training rows (default 512)")
    p.add_argument("--length-buckets", type=int, default=50, metavar="K",
                   help="sort runs of K training batches by length; 0 = off (default 50)")
    p.add_argument("--eval-batch-size", type=int, default=1024, help="default 1024")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--ema-decay", type=float, default=RunConfig.ema_decay,
                   help="validate, select and keep a moving average of the weights with this "
                   "per-step decay (the library default, %(default)s; 0: the live weights)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--aggregate", nargs="+", type=Path, metavar="LOG",
                   help="train nothing: read the final JSON line of each LOG (the stdout of one "
                   "run per --seed, same settings otherwise) and print mean +- sample std per "
                   "model and metric, and the ratio of the means")
    return p


#: Settings that may differ between the runs that --aggregate combines.
_PER_RUN = ("seed", "data_dir", "device", "no_progress", "aggregate")
AGG_METRICS = tuple(f"{m}@{k}" for k in KS for m in ("hr", "ndcg", "mrr"))


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define a run, other than its seed (JSON-safe)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in _PER_RUN}


def final_json(path: Path) -> dict[str, Any]:
    """The last JSON line of a run's stdout (or a file holding just that line)."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("{")]
    for line in reversed(lines):
        try:
            out = json.loads(line)
        except json.JSONDecodeError:
            continue
        if out.get("benchmark") == "retailrocket_real":
            if out.get("skipped"):
                raise ValueError(f"{path}: that run was skipped ({out.get('reason')})")
            return out
    raise ValueError(f"{path}: no final JSON line of retailrocket_real in it")


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(paths: Sequence[Path]) -> dict[str, Any]:
    """Mean and sample std over seeds of every model's test metrics (see ``--aggregate``).

    Raises:
        ValueError: a log without a result, a repeated seed, or runs whose settings differ.
    """
    runs = [final_json(p) for p in paths]
    seeds = [r.get("seed") for r in runs]
    if None in seeds:
        raise ValueError(f"{paths[seeds.index(None)]}: its JSON line has no seed (a run made "
                         "before --aggregate existed): rerun it")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seed {next(s for s in seeds if seeds.count(s) > 1)} appears twice "
                         f"in {[str(p) for p in paths]}")
    for path, run in zip(paths[1:], runs[1:], strict=True):
        differ = sorted(k for k in set(run["settings"]) | set(runs[0]["settings"])
                        if run["settings"].get(k) != runs[0]["settings"].get(k))
        if differ:
            raise ValueError(f"{path} and {paths[0]} differ in {differ}: aggregate runs that "
                             "differ only in --seed")
    models = [m for m in (*MODELS, "popularity") if all(m in r for r in runs)]
    table: dict[str, dict[str, tuple[float, float | None]]] = {}
    for m in models:
        per_seed = [r[m]["test"] if m in MODELS else r[m] for r in runs]
        table[m] = {k: _mean_std([float(t[k]) for t in per_seed]) for k in AGG_METRICS}
    out: dict[str, Any] = {
        "benchmark": "retailrocket_real_aggregate", "seeds": seeds,
        "settings": runs[0]["settings"],
        **{m: {k: {"mean": mean, "std": std} for k, (mean, std) in t.items()}
           for m, t in table.items()},
    }
    for m in MODELS:
        if m in table:
            out[m]["best_epochs"] = [r[m]["best_epoch"] for r in runs]
            out[m]["epochs_run"] = [r[m]["epochs_run"] for r in runs]
    if "mamba4rec" in table and "sasrec" in table:
        out["ratio_mamba4rec_over_sasrec"] = {
            k: round(table["mamba4rec"][k][0] / table["sasrec"][k][0], 3)
            if table["sasrec"][k][0] else None for k in AGG_METRICS}

    def cell(mean: float, std: float | None) -> str:
        return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")

    lines = [f"RetailRocket real sessions, {len(runs)} seed(s) {seeds}, test, mean ± sample std:",
             "", "| model | " + " | ".join(AGG_METRICS) + " |",
             "|---|" + "---:|" * len(AGG_METRICS)]
    for m, t in table.items():
        lines.append(f"| {m} | " + " | ".join(cell(*t[k]) for k in AGG_METRICS) + " |")
    if "ratio_mamba4rec_over_sasrec" in out:
        ratio = out["ratio_mamba4rec_over_sasrec"]
        lines.append("| mamba4rec / sasrec | " + " | ".join(f"{ratio[k]}" for k in AGG_METRICS)
                     + " |")
    print("\n".join(lines))
    print(json.dumps(out), flush=True)
    return out


# --- data -----------------------------------------------------------------------------------------
def _ids(tokens: list[str], path: Path, line_no: int) -> np.ndarray:
    try:
        ids = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        raise ValueError(f"{path}:{line_no}: not an integer item id in {' '.join(tokens)!r}") from None
    if len(ids) and ids.min() < 1:
        raise ValueError(f"{path}:{line_no}: item id {int(ids.min())} < 1")
    return ids


def read_sessions(path: Path) -> list[np.ndarray]:
    """One int64 array per line of a gzipped space-separated session file."""
    with gzip.open(path, "rt") as f:
        out = [_ids(line.split(), path, i) for i, line in enumerate(f, 1) if line.strip()]
    if not out:
        raise ValueError(f"{path}: no sessions")
    return out


def read_prefix_target(path: Path) -> list[np.ndarray]:
    """``prefix \\t target`` lines as windows ``prefix + [target]`` (the target last)."""
    out = []
    with gzip.open(path, "rt") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            prefix, tab, target = line.rstrip("\n").partition("\t")
            if not tab or not prefix.split() or len(target.split()) != 1:
                raise ValueError(f"{path}:{i}: expected 'prefix ids<TAB>target id', got {line!r}")
            out.append(_ids(prefix.split() + target.split(), path, i))
    if not out:
        raise ValueError(f"{path}: no test pairs")
    return out


def missing_files(data_dir: Path) -> list[str]:
    """Names of the needed files absent from ``data_dir``."""
    return [f for f in (TRAIN_FILE, TEST_FILE) if not (data_dir / f).is_file()]


def by_length(rows: list[np.ndarray]) -> list[np.ndarray]:
    """Rows sorted by length: evaluation batches then need little padding (metrics are means, so
    the order does not change them)."""
    return sorted(rows, key=len)


# --- models ---------------------------------------------------------------------------------------
def run_config(kind: str, args: argparse.Namespace) -> Any:
    """This benchmark's settings for ``kind`` as a library ``RunConfig`` (its own defaults)."""
    from torchrec_mamba.train.config import RunConfig

    return RunConfig(
        data=f"sessions:{args.data_dir}", output="", model=kind, max_len=args.max_len,
        d_model=args.d_model, d_state=args.d_state,
        num_layers=args.mamba_layers if kind == "mamba4rec" else args.sasrec_layers,
        num_heads=2, dropout=args.dropout, attn_dropout=0.0,
        sampled_softmax=args.sampled_softmax, epochs=args.epochs, patience=args.patience,
        lr=args.lr, ema_decay=args.ema_decay, batch_size=args.batch_size,
        length_buckets=args.length_buckets,
        eval_batch_size=args.eval_batch_size, seed=args.seed, device=args.device,
        no_progress=args.no_progress,
    )


def popularity_metrics(counts: np.ndarray, test_targets: np.ndarray) -> dict[str, float]:
    """Full-ranking metrics of ranking items by training count (ties broken by id)."""
    import torch

    from torchrec_mamba.train.metrics import RankingMetrics

    n = len(counts)
    scores = torch.from_numpy(counts.astype(np.float64) - np.arange(n) / (n + 1))  # strict order
    scores[0] = float("-inf")
    metrics = RankingMetrics(ks=KS, device="cpu")
    targets = torch.from_numpy(test_targets)
    for start in range(0, len(targets), 2048):
        chunk = targets[start : start + 2048]  # (B,)
        metrics.update(scores.expand(len(chunk), -1), chunk)
    return metrics.compute()


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table of test metrics, one row per model."""
    cols = [f"{m}@{k}" for k in KS for m in ("hr", "ndcg", "mrr")]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def skip(reason: str) -> dict[str, Any]:
    """Print the SKIP line and the JSON line of a skipped run."""
    out = {"benchmark": "retailrocket_real", "skipped": True, "reason": reason}
    print(f"SKIP: {reason}")
    print(json.dumps(out), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or skip without data); returns the final JSON line's object.

    Args:
        argv (Sequence[str] | None): arguments without the program name. Default: ``sys.argv[1:]``.

    Returns:
        dict[str, Any]: the JSON line's object.
    """
    args = build_parser().parse_args(argv)
    if args.aggregate:
        return aggregate(args.aggregate)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        raise ValueError(f"--models must name some of {MODELS}, got {args.models!r}")
    if not 0.0 < args.valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction must be in (0, 1), got {args.valid_fraction}")
    missing = missing_files(args.data_dir)
    if missing:
        return skip(f"{missing} not found in {args.data_dir}")

    import torch

    from torchrec_mamba.data import SequenceLoader, windows_from_sequences
    from torchrec_mamba.train.config import DataInfo, build_model, targets_per_row
    from torchrec_mamba.train.distributed import (
        EmbeddingOptimizerConfig,
        build_optimizer,
        init_distributed,
    )
    from torchrec_mamba.train.loop import fit

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for name in ("retailrocket_real", "torchrec_mamba"):
        logging.getLogger(name).setLevel(logging.INFO)
    start = time.perf_counter()
    sessions = read_sessions(args.data_dir / TRAIN_FILE)
    test_rows = read_prefix_target(args.data_dir / TEST_FILE)
    num_items = int(max(max(int(s.max()) for s in sessions), max(int(s.max()) for s in test_rows)))
    n_valid = max(1, int(round(len(sessions) * args.valid_fraction)))
    train_sessions, valid_sessions = sessions[:-n_valid], sessions[-n_valid:]
    train = windows_from_sequences("train", train_sessions, num_items, args.max_len)
    valid = windows_from_sequences("valid", by_length(valid_sessions), num_items, args.max_len)
    test = windows_from_sequences("test", by_length(test_rows), num_items, args.max_len)
    if len(test) != len(test_rows):
        raise RuntimeError(f"{len(test_rows) - len(test)} test rows were dropped")
    counts = np.bincount(np.concatenate(train_sessions), minlength=num_items + 1)  # (I + 1,)
    logger.info("%d items; train %d sessions (%d pairs), valid %d sessions, test %d pairs",
                num_items, len(train), train.num_pairs, len(valid), len(test))

    ctx = init_distributed(device=args.device)
    loaders = {
        "train": SequenceLoader(train, args.batch_size, shuffle=True, seed=args.seed,
                                bucket=args.length_buckets),
        # sorted by length like the CLI's: each batch padded to its own longest row, same metrics
        "valid": SequenceLoader(valid, args.eval_batch_size, shuffle=False, seed=args.seed,
                                sort_by_length=True),
        "test": SequenceLoader(test, args.eval_batch_size, shuffle=False, seed=args.seed,
                               sort_by_length=True),
    }
    results: dict[str, dict[str, Any]] = {}
    for kind in models:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        info = DataInfo(num_items=num_items, targets_per_row=targets_per_row(np.diff(train.offsets) - 1))
        model = build_model(run_config(kind, args), info, ctx.device,
                            item_counts=torch.from_numpy(counts).float())
        optimizer = build_optimizer(model, args.lr, 0.0, EmbeddingOptimizerConfig("adam", lr=args.lr))
        res = fit(model, optimizer, loaders["train"], loaders["valid"], loaders["test"],
                  run_config(kind, args).fit_config(ks=KS), ctx)
        epoch_s = [float(h["train_seconds"]) for h in res.history]
        results[kind] = {
            "test": res.test,
            "valid": res.valid,
            "best_epoch": res.best_epoch,
            "epochs_run": res.epochs_run,
            "train_seconds_per_epoch_median": round(statistics.median(epoch_s), 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "valid_ndcg@10_per_epoch": [round(h["valid"]["ndcg@10"], 4) for h in res.history],
        }
    popularity = popularity_metrics(counts, test.targets())

    rows = {k: r["test"] for k, r in results.items()}
    rows["popularity"] = popularity
    print(f"\nRetailRocket views (COTREC preprocessing), {len(test)} test pairs, full ranking over "
          f"{num_items} items, test metrics at the best validation NDCG@10 epoch:\n")
    print(format_table(rows))
    for kind, r in results.items():
        print(f"{kind}: best epoch {r['best_epoch']} of {r['epochs_run']}, median "
              f"{r['train_seconds_per_epoch_median']} s per training epoch, {r['seconds']} s total")
    out: dict[str, Any] = {
        "benchmark": "retailrocket_real",
        "data_dir": str(args.data_dir),
        "num_items": num_items,
        "train_sessions": len(train),
        "train_pairs": train.num_pairs,
        "valid_sessions": len(valid),
        "test_pairs": len(test),
        "sampled_softmax": args.sampled_softmax,
        "seed": args.seed,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings(args).items()},
        **results,
        "popularity": popularity,
    }
    if "mamba4rec" in results and "sasrec" in results:
        m, s = results["mamba4rec"], results["sasrec"]
        ratio = {k: round(m["test"][k] / s["test"][k], 3) if s["test"][k] else None
                 for k in m["test"]}
        ratio["train_seconds_per_epoch"] = round(
            m["train_seconds_per_epoch_median"] / s["train_seconds_per_epoch_median"], 3
        )
        print("mamba4rec / sasrec: " + ", ".join(f"{k} {v}" for k, v in ratio.items()))
        out["ratio_mamba4rec_over_sasrec"] = ratio
    if "mamba4rec" in results:
        out["ratio_mamba4rec_over_popularity"] = {
            k: round(results["mamba4rec"]["test"][k] / v, 3) if v else None
            for k, v in popularity.items()
        }
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
