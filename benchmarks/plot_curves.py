"""Plot validation NDCG@10 against epoch from ``torchrec-mamba train`` logs (or metrics.json).

The CLI logs ``epoch N: loss L, valid ndcg@10 V`` on stderr every epoch, so curves of runs that
were stopped early (or are still running) can be drawn too.

Usage::

    python benchmarks/plot_curves.py --out docs/quality_curves.png \\
        "SASRec, new recipe=runs/sasrec.log" "Mamba4Rec=runs/mamba/metrics.json"
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

_EPOCH = re.compile(r"epoch (\d+): loss [-\d.e+]+, valid ndcg@10 ([\d.]+)")


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """(epochs, validation NDCG@10) from a train log or a metrics.json."""
    if path.suffix == ".json":
        history = json.loads(path.read_text())["history"]
        return [h["epoch"] for h in history], [h["valid"]["ndcg@10"] for h in history]
    pairs = [(int(m.group(1)), float(m.group(2))) for m in _EPOCH.finditer(path.read_text())]
    return [e for e, _ in pairs], [v for _, v in pairs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=PATH (a train log or a metrics.json)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="Amazon Beauty: validation NDCG@10")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for spec in args.runs:
        label, _, path = spec.partition("=")
        epochs, values = read_curve(Path(path))
        style = "--" if "old" in label.lower() or "without" in label.lower() else "-"
        ax.plot(epochs, values, style, marker=".", label=label)
    ax.set_title(args.title)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
