"""Multi-seed reproduction benchmark: Mamba4Rec vs the SASRec baseline on public data, paper protocol.

Protocol: leave-one-out by time (last item = test, second-to-last = validation), full ranking over
all items, HR/NDCG/MRR@K, test metrics at the best validation NDCG@10 epoch (early stopping).
Each (dataset, model, seed) is trained with the *default* ``torchrec-mamba train`` command plus
``--model``, ``--seed`` and the dataset's flags below; its test split is then scored again with
``torchrec-mamba evaluate --run DIR --mask-seen`` (seen items excluded, the RecBole / FMLP /
BSARec protocol). Both protocols are reported.

Datasets (read from ``../shared/data``; the benchmark skips cleanly when they are absent):
    beauty  amazon-beauty/Beauty.txt (5-core, 22,363 users, 12,101 items), --max-len 50
    ml1m    ml-1m/ratings_users0001-2999.dat.gz (users 1-2999, complete timestamps), --max-len 200
    ml100k  ml-100k/u.data.gz (943 users, 1,682 items; the movielens: reader reads u.data),
            --max-len 200
The real RetailRocket sessions are not here: they have their own session protocol (prefix ->
target test pairs, no users), see ``benchmarks/retailrocket_real.py``.

Statistics: mean and *sample* standard deviation (n - 1) over seeds ``0..N-1``; the ratio is
mean(Mamba4Rec) / mean(SASRec) of the same metric and protocol.

Restartable: a run dir with ``metrics.json`` is reused (after checking that its config is the one
this command would train: otherwise it stops and says which settings differ), and so is its
``test_masked.json``; an unfinished run dir is trained again from scratch (``--overwrite``).

Usage::

    python benchmarks/quality.py --seeds 3                       # every dataset, both models
    python benchmarks/quality.py --seeds 3 --datasets beauty
    python benchmarks/quality.py --seeds 1 --datasets ml100k --extra-args "--epochs 1"  # smoke

Prints one line per (dataset, model), the mamba4rec / sasrec ratios, a markdown table for
``docs/benchmarks.md`` and a final JSON line; writes ``docs/quality_curves.png`` (validation
NDCG@10 against epoch: one thin line per seed, the mean over the seeds still running in bold)
unless ``--no-plot``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
MODELS = ("mamba4rec", "sasrec")
METRICS = ("hr@10", "ndcg@10", "mrr@10")
PROTOCOLS = ("unmasked", "masked")
MASKED_FILE = "test_masked.json"
UNMASKED_FILE = "test_unmasked.json"
# RunConfig fields that do not change what is trained
_IGNORED_CONFIG = {"overwrite", "no_progress"}
# fields whose default changed after runs without them were recorded: those runs had this value
_LEGACY_DEFAULTS: dict[str, Any] = {"ema_decay": 0.0}

DATASETS: dict[str, tuple[str, list[str]]] = {
    "beauty": ("sasrec:{data}/amazon-beauty/Beauty.txt", []),
    "ml1m": ("movielens:{data}/ml-1m/ratings_users0001-2999.dat.gz", ["--max-len", "200"]),
    "ml100k": ("movielens:{data}/ml-100k/u.data.gz", ["--max-len", "200"]),
}

# Published Mamba4Rec reproductions on Amazon Beauty (5-core, leave-one-out, full ranking, unmasked).
PUBLISHED_BEAUTY = {
    "Mamba4Rec, 1 layer (published)": {"hr@10": 0.073, "ndcg@10": 0.043, "mrr@10": 0.034},
    "Mamba4Rec, 2 layers (published)": {"hr@10": 0.082, "ndcg@10": 0.042, "mrr@10": 0.030},
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "torchrec_mamba.cli", *args]


def train_command(dataset: str, model: str, seed: int, data_dir: Path, run: Path,
                  extra: Sequence[str]) -> list[str]:
    """The default train command of one (dataset, model, seed), writing to ``run``."""
    spec, args = DATASETS[dataset]
    return _cli("train", "--data", spec.format(data=data_dir), "--model", model,
                "--seed", str(seed), *args, *extra, "--output", str(run))


def expected_config(command: Sequence[str]) -> dict[str, Any]:
    """The resolved RunConfig (as in ``metrics.json``) that ``command`` trains."""
    from torchrec_mamba.cli import build_parser
    from torchrec_mamba.train.config import RunConfig

    values = vars(build_parser().parse_args(list(command[3:])))  # past "python -m module"
    values.pop("command")
    return RunConfig.from_dict(values).resolved().to_dict()


def config_mismatch(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``"name: recorded -> expected"`` for every RunConfig field that differs.

    A field missing from ``recorded`` (a run made before the field existed) counts as the
    behaviour that run had: its RunConfig default, or for ``ema_decay`` (added with default 0,
    made 0.999 later) 0.
    """
    from torchrec_mamba.train.config import RunConfig

    defaults = {**RunConfig().to_dict(), **_LEGACY_DEFAULTS}
    out = []
    for k, v in sorted(expected.items()):
        was = recorded.get(k, defaults.get(k))
        if k not in _IGNORED_CONFIG and was != v:
            out.append(f"{k}: {was!r} -> {v!r}")
    return out


def _run(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    # this checkout's package, whatever the cwd
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": path}
    subprocess.run(cmd, check=True, env=env)


def ensure_run(command: list[str], run: Path) -> dict[str, Any]:
    """Train unless ``run/metrics.json`` exists (with the same config); add the other protocol.

    Returns:
        dict: ``metrics.json`` plus ``"masked"`` / ``"unmasked"`` test metrics.
    """
    metrics_file = run / "metrics.json"
    expected = expected_config(command)
    if metrics_file.is_file():
        differ = config_mismatch(json.loads(metrics_file.read_text())["config"], expected)
        if differ:
            raise SystemExit(f"{run} was trained with another config ({'; '.join(differ)}): "
                             "delete it or choose another --out-dir")
        print(f"reusing {run}", flush=True)
    else:
        _run(command + (["--overwrite"] if run.exists() else []))
    metrics = json.loads(metrics_file.read_text())
    trained_masked = bool(metrics["config"].get("mask_seen", False))
    other = "masked" if not trained_masked else "unmasked"
    other_file = run / (MASKED_FILE if other == "masked" else UNMASKED_FILE)
    if not other_file.is_file():
        _run(_cli("evaluate", "--run", str(run), "--split", "test",
                  "--mask-seen" if other == "masked" else "--no-mask-seen",
                  "--output", str(other_file)))
    metrics[other] = json.loads(other_file.read_text())["test"]
    metrics["masked" if trained_masked else "unmasked"] = metrics["test"]
    return metrics


# --- aggregation (no training; tests/test_quality_benchmark.py) ----------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std is NaN for a single value."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std


def summarize(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, Any]:
    """Per ``"dataset/model"``: seeds, mean / std per protocol and metric; per dataset: ratios.

    Args:
        runs (dict): ``(dataset, model) -> [run, ...]``, each run ``ensure_run``'s dict (it needs
            ``"seed"``, ``"unmasked"``, ``"masked"``, ``"epochs_run"``, ``"best_epoch"``).

    Returns:
        dict: ``{"runs": {"beauty/mamba4rec": {"seeds", "unmasked": {"hr@10": {"mean", "std"}},
        "masked", "epochs_run", "best_epoch"}}, "ratios": {"beauty": {"unmasked": {"hr@10": r}}}}``
    """
    out: dict[str, Any] = {"runs": {}, "ratios": {}}
    for (dataset, model), group in runs.items():
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in group]}
        for protocol in PROTOCOLS:
            entry[protocol] = {}
            for m in METRICS:
                mean, std = mean_std([r[protocol][m] for r in group])
                entry[protocol][m] = {"mean": mean, "std": std}
        entry["epochs_run"] = [r["epochs_run"] for r in group]
        entry["best_epoch"] = [r["best_epoch"] for r in group]
        out["runs"][f"{dataset}/{model}"] = entry
    for dataset in dict.fromkeys(d for d, _ in runs):
        a, b = out["runs"].get(f"{dataset}/mamba4rec"), out["runs"].get(f"{dataset}/sasrec")
        if a and b:
            out["ratios"][dataset] = {
                p: {m: _ratio(a[p][m]["mean"], b[p][m]["mean"]) for m in METRICS}
                for p in PROTOCOLS
            }
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def fmt(mean: float, std: float) -> str:
    """``"0.0846 ± 0.0012"``; just the mean when the std is undefined (one seed)."""
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def text_lines(summary: dict[str, Any]) -> list[str]:
    """One line per (dataset, model), then one ratio line per dataset."""
    lines = []
    for key, e in summary["runs"].items():
        for p in PROTOCOLS:
            cells = "  ".join(f"{m} {fmt(**e[p][m])}" for m in METRICS)
            lines.append(f"{key:<18} {p:<8} (seeds {len(e['seeds'])})  {cells}")
    for dataset, by_protocol in summary["ratios"].items():
        for p, r in by_protocol.items():
            cells = "  ".join(f"{m} {r[m]:.3f}" for m in METRICS)
            lines.append(f"{dataset}: mamba4rec / sasrec, {p}: {cells}")
    return lines


def markdown_table(summary: dict[str, Any], published: dict[str, dict] | None = None) -> str:
    """A table for ``docs/benchmarks.md``: mean ± sample std over seeds, both protocols."""
    head = ["dataset", "model", "seeds"] + [f"{m.upper()}{' masked' * (p == 'masked')}"
                                            for p in PROTOCOLS for m in METRICS]
    head.append("epochs (best)")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * 6 + "---|"]
    for name, m in (published or {}).items():
        rows.append(f"| beauty | {name} | | " + " | ".join(f"{m[k]:.3f}" for k in METRICS)
                    + " | | | | |")
    for key, e in summary["runs"].items():
        dataset, model = key.split("/")
        cells = [fmt(**e[p][m]) for p in PROTOCOLS for m in METRICS]
        epochs = ", ".join(f"{n} ({b})" for n, b in zip(e["epochs_run"], e["best_epoch"],
                                                         strict=True))
        rows.append(f"| {dataset} | {model} | {len(e['seeds'])} | " + " | ".join(cells)
                    + f" | {epochs} |")
    for dataset, by_protocol in summary["ratios"].items():
        cells = [f"{by_protocol[p][m]:.3f}" for p in PROTOCOLS for m in METRICS]
        rows.append(f"| {dataset} | **mamba4rec / sasrec** | | " + " | ".join(cells) + " | |")
    return "\n".join(rows)


def plot_curves(runs: dict[tuple[str, str], list[dict[str, Any]]], path: Path) -> None:
    """Validation NDCG@10 per epoch: thin line per seed, bold mean of the seeds still running."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(d for d, _ in runs))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for (d, model), group in runs.items():
            if d != dataset:
                continue
            by_epoch: dict[int, list[float]] = {}
            for r in group:
                points = [(h["epoch"], h["valid"]["ndcg@10"]) for h in r["history"] if "valid" in h]
                if len(group) > 1:
                    ax.plot(*zip(*points, strict=True), lw=0.7, alpha=0.35,
                            color=f"C{MODELS.index(model)}")
                for epoch, value in points:
                    by_epoch.setdefault(epoch, []).append(value)
            epochs = sorted(by_epoch)
            label = model if len(group) == 1 else f"{model} (mean of {len(group)} seeds)"
            ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker=".",
                    color=f"C{MODELS.index(model)}", label=label)
        ax.set_title(f"{dataset}: validation NDCG@10")
        ax.set_xlabel("epoch")
        ax.set_ylabel("NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS),
                        default=["beauty", "ml1m", "ml100k"])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--seed-ids", type=int, nargs="+", default=None, metavar="S",
                        help="exactly these seeds instead of 0..N-1 (to split one table's runs "
                             "over parallel jobs; aggregate afterwards with --seeds N)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "out" / "quality")
    parser.add_argument("--extra-args", default="", help="extra arguments for every train command")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "quality_curves.png")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    seeds = list(range(args.seeds)) if args.seed_ids is None else list(dict.fromkeys(args.seed_ids))
    if any(s < 0 for s in seeds):
        parser.error(f"--seed-ids must be >= 0, got {args.seed_ids}")

    if not args.data_dir.is_dir():
        print(f"SKIP: public datasets not found at {args.data_dir}")
        print(json.dumps({"skipped": True, "reason": f"{args.data_dir} absent"}))
        return 0
    extra = shlex.split(args.extra_args)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for dataset in args.datasets:
        for model in args.models:
            for seed in seeds:
                run = args.out_dir / f"{dataset}_{model}_seed{seed}"
                cmd = train_command(dataset, model, seed, args.data_dir, run, extra)
                metrics = ensure_run(cmd, run)
                metrics.update(seed=seed, command=shlex.join(cmd))
                runs.setdefault((dataset, model), []).append(metrics)

    summary = summarize(runs)
    print("\nmean ± sample std (n - 1) over seeds; test metrics at the best validation epoch")
    print("\n".join(text_lines(summary)))
    published = PUBLISHED_BEAUTY if "beauty" in args.datasets else None
    print("\n" + markdown_table(summary, published) + "\n")
    if not args.no_plot and runs:
        plot_curves(runs, args.plot)
    summary["commands"] = {f"{d}/{m}/seed{r['seed']}": r["command"]
                           for (d, m), group in runs.items() for r in group}
    print(json.dumps(_nan_to_none(summary), allow_nan=False))
    return 0


def _nan_to_none(value: Any) -> Any:
    """Strict JSON: an undefined std (one seed) or ratio becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
