"""Training-recipe ablation on a validation split: one factor at a time against a base command.

Each run is ``torchrec-mamba train`` with the base flags plus one named change; the table lists
the best *validation* NDCG@10 (the selection metric; test is never used to choose), the epoch it
came at, the epochs run and the training seconds per epoch. The base of each table is measured in
the same run of this script.

Usage::

    python benchmarks/ablation.py --model sasrec                       # every factor, Beauty
    python benchmarks/ablation.py --model mamba4rec --only base,lr1e-3
    python benchmarks/ablation.py --list

Runs go to ``benchmarks/out/ablation/<model>/<name>/``; a finished run (its ``metrics.json``
exists) is reused, so the script can be stopped and restarted. ``--jobs 2`` runs two at a time
with one thread each (more total CPU on a shared 2-core box than one run with two threads).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "amazon-beauty" / "Beauty.txt"

#: name -> extra flags, each one factor changed against the base (the current defaults).
FACTORS: dict[str, list[str]] = {
    "base": [],
    "patience5": ["--patience", "5"],
    "lr1e-3": ["--lr", "1e-3"],
    "lr3e-3": ["--lr", "3e-3"],
    "batch256": ["--batch-size", "256"],
    "batch64": ["--batch-size", "64"],
    "dropout0.3": ["--dropout", "0.3"],
    "dropout0.4": ["--dropout", "0.4"],
    "dropout0.5": ["--dropout", "0.5"],
    "no_buckets": ["--length-buckets", "0"],
    "loss_norm_batch": ["--loss-normalization", "batch"],
    "loss_norm_global": ["--loss-normalization", "global"],
    "emb_scale_on": ["--embedding-scale", "sqrt"],
    "emb_scale_off": ["--embedding-scale", "none"],
    "head_fp32": ["--head-dtype", "float32"],
    "weight_decay0.1": ["--weight-decay", "0.1"],
    "adagrad_tables": ["--embedding-optimizer", "adagrad"],
    "last_position_loss": ["--loss-positions", "last"],
    "lr_cosine": ["--lr-schedule", "cosine"],
    "emb_weight_decay1e-5": ["--embedding-weight-decay", "1e-5"],
    "plain_lr_batch": ["--lr", "1e-3", "--batch-size", "256"],
    "ema0.999": ["--ema-decay", "0.999"],
}


def run(name: str, model: str, data: Path, out_dir: Path, base: list[str], threads: int) -> dict:
    """Train one configuration (or reuse its finished metrics.json)."""
    output = out_dir / model / name
    if not (output / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "torchrec_mamba.cli", "train", "--data", f"sasrec:{data}",
               "--model", model, "--no-progress", "--overwrite", "--output", str(output),
               *base, *FACTORS[name]]
        print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads)}
        output.mkdir(parents=True, exist_ok=True)
        with open(output / "train.log", "w") as log:
            subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = json.loads((output / "metrics.json").read_text())
    return {
        "name": name,
        "flags": " ".join(FACTORS[name]) or "(defaults)",
        "valid_ndcg@10": metrics["valid"]["ndcg@10"],
        "valid_hr@10": metrics["valid"]["hr@10"],
        "best_epoch": metrics["best_epoch"],
        "epochs_run": metrics["epochs_run"],
        "train_s_per_epoch": metrics["train_seconds_per_epoch"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sasrec", choices=["sasrec", "mamba4rec"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a sasrec-format file")
    parser.add_argument("--only", default=None, help="comma-separated factor names")
    parser.add_argument("--base", default="", help="extra flags for every run, e.g. '--epochs 40'")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ablation")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="print the factors and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, flags in FACTORS.items():
            print(f"{name:20s} {' '.join(flags)}")
        return []
    if not args.data.is_file():
        print(f"skip: {args.data} not found", file=sys.stderr)
        return []
    names = args.only.split(",") if args.only else list(FACTORS)
    unknown = [n for n in names if n not in FACTORS]
    if unknown:
        parser.error(f"unknown factor(s) {unknown}; see --list")
    threads = 1 if args.jobs > 1 else 2
    base = shlex.split(args.base)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda n: run(n, args.model, args.data, args.out, base, threads), names))
    ref = next((r for r in rows if r["name"] == "base"), None)
    print(f"\n{args.model}: best validation NDCG@10 per factor (base {args.base or 'defaults'})")
    print("| factor | flags | valid NDCG@10 | vs base | valid HR@10 | best epoch / run | s/epoch |")
    print("|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        ratio = f"{r['valid_ndcg@10'] / ref['valid_ndcg@10']:.3f}" if ref else "-"
        print(f"| {r['name']} | `{r['flags']}` | {r['valid_ndcg@10']:.4f} | {ratio} | "
              f"{r['valid_hr@10']:.4f} | {r['best_epoch']} / {r['epochs_run']} | "
              f"{r['train_s_per_epoch']:.1f} |")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
