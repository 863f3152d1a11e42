"""Reproduction benchmark: Mamba4Rec vs the SASRec baseline on public data, paper protocol.

Protocol: leave-one-out by time (last item = test, second-to-last = validation), full ranking over
all items, HR/NDCG/MRR@K, seen items not masked. Each model is trained with the *default*
``torchrec-mamba train`` command (plus ``--model`` and, for ML-1M, ``--max-len 200``), early
stopping on validation NDCG@10; test metrics are those of the best validation epoch.

Datasets (read from ``../shared/data``; the benchmark skips cleanly when they are absent):
    beauty  amazon-beauty/Beauty.txt (5-core, 22,363 users, 12,101 items), --max-len 50
    ml1m    ml-1m/ratings_users0001-2999.dat.gz (users 1-2999 with complete timestamps), --max-len 200

Usage::

    python benchmarks/quality.py                       # both datasets, both models
    python benchmarks/quality.py --datasets beauty --models mamba4rec
    python benchmarks/quality.py --extra-args "--epochs 3"   # quick smoke run

Prints one row per run, then a final JSON line; writes ``docs/quality_curves.png`` (validation
NDCG@10 against epoch) unless ``--no-plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"

DATASETS: dict[str, tuple[str, list[str]]] = {
    "beauty": ("sasrec:{data}/amazon-beauty/Beauty.txt", []),
    "ml1m": ("movielens:{data}/ml-1m/ratings_users0001-2999.dat.gz", ["--max-len", "200"]),
}

# Published Mamba4Rec reproductions on Amazon Beauty (5-core, leave-one-out, full ranking).
PUBLISHED_BEAUTY = {
    "Mamba4Rec, 1 layer (published)": {"hr@10": 0.073, "ndcg@10": 0.043, "mrr@10": 0.034},
    "Mamba4Rec, 2 layers (published)": {"hr@10": 0.082, "ndcg@10": 0.042, "mrr@10": 0.030},
}


def run_one(dataset: str, model: str, data_dir: Path, out_dir: Path, extra: list[str]) -> dict:
    """Train one model on one dataset with the default CLI command; return its metrics.json."""
    spec, args = DATASETS[dataset]
    output = out_dir / f"{dataset}_{model}"
    cmd = [
        sys.executable, "-m", "torchrec_mamba.cli", "train",
        "--data", spec.format(data=data_dir), "--model", model, *args, *extra,
        "--output", str(output),
    ]  # fmt: skip
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    metrics = json.loads((output / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["command"] = " ".join(shlex.quote(c) for c in cmd)
    return metrics


def plot_curves(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({key.split("/")[0] for key in results})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for key, metrics in results.items():
            if not key.startswith(dataset + "/"):
                continue
            history = metrics.get("history", [])
            epochs = [h["epoch"] for h in history if "valid" in h]
            ndcg = [h["valid"]["ndcg@10"] for h in history if "valid" in h]
            ax.plot(epochs, ndcg, marker=".", label=key.split("/")[1])
        ax.set_title(f"{dataset}: validation NDCG@10")
        ax.set_xlabel("epoch")
        ax.set_ylabel("NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["beauty", "ml1m"])
    parser.add_argument("--models", nargs="+", choices=["mamba4rec", "sasrec"], default=["mamba4rec", "sasrec"])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "out" / "quality")
    parser.add_argument("--extra-args", default="", help="extra arguments for every train command")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "quality_curves.png")
    args = parser.parse_args(argv)

    if not args.data_dir.is_dir():
        print(f"SKIP: public datasets not found at {args.data_dir}")
        print(json.dumps({"skipped": True, "reason": f"{args.data_dir} absent"}))
        return 0
    extra = shlex.split(args.extra_args)
    results: dict[str, dict] = {}
    for dataset in args.datasets:
        for model in args.models:
            results[f"{dataset}/{model}"] = run_one(dataset, model, args.data_dir, args.out_dir, extra)

    print(f"\n{'run':<22} {'HR@10':>7} {'NDCG@10':>8} {'MRR@10':>7} {'s/epoch':>8} {'epochs':>6} {'best':>5}")
    if "beauty" in args.datasets:
        for name, m in PUBLISHED_BEAUTY.items():
            print(f"{name:<22} {m['hr@10']:>7.4f} {m['ndcg@10']:>8.4f} {m['mrr@10']:>7.4f}")
    for key, m in results.items():
        t = m["test"]
        print(
            f"{key:<22} {t['hr@10']:>7.4f} {t['ndcg@10']:>8.4f} {t['mrr@10']:>7.4f} "
            f"{m['train_seconds_per_epoch']:>8.1f} {m['epochs_run']:>6} {m.get('best_epoch', '-'):>5}"
        )
    for dataset in args.datasets:
        a, b = results.get(f"{dataset}/mamba4rec"), results.get(f"{dataset}/sasrec")
        if a and b and b["test"]["ndcg@10"] > 0:
            print(f"{dataset}: mamba4rec / sasrec test NDCG@10 ratio {a['test']['ndcg@10'] / b['test']['ndcg@10']:.3f}")
    if not args.no_plot and results:
        plot_curves(results, args.plot)
    summary = {
        key: {
            "test": {k: m["test"][k] for k in ("hr@10", "ndcg@10", "mrr@10")},
            "train_seconds_per_epoch": m["train_seconds_per_epoch"],
            "epochs_run": m["epochs_run"],
            "best_epoch": m.get("best_epoch"),
            "wall_seconds": m["wall_seconds"],
        }
        for key, m in results.items()
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
