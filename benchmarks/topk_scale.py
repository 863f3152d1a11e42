"""Top-K over 1M and 5M items: chunked scoring vs the naive (B, I) matmul, and optional faiss ANN.

Each (catalogue size, method) runs in a fresh process under ``/usr/bin/time -v``, whose
"Maximum resident set size" is the peak RSS of the whole process (Python, torch, the table and the
method's temporaries). The ``table`` method only builds the table and the users, so
``peak - table`` is what a method adds on top of the catalogue. Times are the median of
``--repeats`` batches after one warm-up batch.

Methods:

* ``naive``: ``(user @ table.T).topk(k)``: the (B, I) score matrix (the same-run baseline; skipped
  where it would not fit in ``--naive-max-gb``);
* ``chunked``: :func:`torchrec_mamba.serving.chunked_topk`, ``--chunk-size`` items at a time;
* ``faiss``: an ``IndexIVFFlat`` (inner product) built from the table, with recall@K against the
  exact chunked top-K (needs ``faiss-cpu``: ``pip install torchrec-mamba[faiss]``).

The catalogue is synthetic, seeded and generated in memory: ``--clusters`` Gaussian centres plus
noise (trained item embeddings are clustered; on structureless Gaussian data no ANN index does
well). Users are noisy copies of random centres.

Usage::

    python benchmarks/topk_scale.py                          # 1M and 5M, every method
    python benchmarks/topk_scale.py --items 1000000 --methods table,chunked --repeats 3
    python benchmarks/topk_scale.py --one chunked --items 1000000   # one method in this process

Prints one row per (items, method) and the chunked/naive ratios, then one JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: libgomp spin-waits otherwise
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for large torch buffers (fewer faults)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from torchrec_mamba.serving.topk import chunked_topk  # noqa: E402

METHODS = ("table", "naive", "chunked", "faiss")


def make_catalogue(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(I + 1, D) clustered item table (row 0 padding) and (B, D) users, seeded, in place."""
    g = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(args.clusters, args.dim, generator=g)  # (K, D)
    table = torch.empty(args.items + 1, args.dim)
    step = 1 << 18
    for start in range(0, args.items + 1, step):  # chunked: no (I, D) temporaries
        rows = table[start : start + step]
        which = torch.randint(0, args.clusters, (rows.shape[0],), generator=g)
        rows.copy_(centres[which]).add_(torch.randn(rows.shape, generator=g), alpha=0.5)
    table[0].zero_()
    users = centres[torch.randint(0, args.clusters, (args.users,), generator=g)]
    users = users + 0.5 * torch.randn(args.users, args.dim, generator=g)  # (B, D)
    return table, users


def _time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Run one method in this process; returns its row (without the RSS, which the parent reads)."""
    table, users = make_catalogue(args)
    row: dict[str, Any] = {"items": args.items, "method": args.one, "ms": None}
    if args.one == "naive":

        def naive() -> torch.Tensor:
            return (users @ table[1:].t()).topk(args.k, dim=1).indices + 1  # (B, K)

        row["ms"] = _time(naive, args.repeats)
    elif args.one == "chunked":
        row["ms"] = _time(
            lambda: chunked_topk(users, table, args.k, chunk_size=args.chunk_size), args.repeats
        )
    elif args.one == "faiss":
        row.update(run_faiss(args, table, users))
    return row


def run_faiss(args: argparse.Namespace, table: torch.Tensor, users: torch.Tensor) -> dict[str, Any]:
    """IVF-Flat inner-product index over items 1..I (the library's FaissItemIndex); ms per batch
    and recall@K vs exact."""
    from torchrec_mamba.serving import FaissItemIndex, ItemSource

    t0 = time.perf_counter()
    index = FaissItemIndex(ItemSource.from_table(table), nlist=args.nlist, nprobe=args.nprobe)
    build_s = time.perf_counter() - t0
    ms = _time(lambda: index.search(users, args.k), args.repeats)
    ann, _ = index.search(users, args.k)  # (B, K) item ids
    exact = chunked_topk(users, table, args.k, chunk_size=args.chunk_size).ids  # (B, K)
    recall = (ann[:, :, None] == exact[:, None, :]).any(2).double().mean().item()
    return {"ms": ms, "recall": recall, "build_s": build_s, "nlist": args.nlist, "nprobe": args.nprobe}


def _child(args: argparse.Namespace, items: int, method: str) -> dict[str, Any]:
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--one", method, "--items", str(items)]
    for name in ("dim", "users", "k", "chunk_size", "repeats", "seed", "clusters", "nlist", "nprobe"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"items": items, "method": method, "error": proc.stderr.strip().splitlines()[-1:]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    row["peak_rss_mb"] = int(rss.group(1)) / 1024 if rss else None
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[1_000_000, 5_000_000])
    p.add_argument("--methods", default="table,naive,chunked,faiss")
    p.add_argument("--one", choices=METHODS, help="run one method in this process (internal)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--users", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--chunk-size", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--nlist", type=int, default=2048)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--naive-max-gb", type=float, default=6.0,
                   help="skip naive where the (B, I) fp32 scores exceed this (default 6)")
    args = p.parse_args(argv)
    if args.one:
        args.items = args.items[0]
        print(json.dumps(run_one(args)))
        return 0
    rows = []
    for items in args.items:
        for method in args.methods.split(","):
            if method == "naive" and args.users * items * 4 / 2**30 > args.naive_max_gb:
                print(f"{items:>9} naive    skipped: (B, I) scores exceed {args.naive_max_gb} GB")
                continue
            row = _child(args, items, method)
            rows.append(row)
            print(f"{items:>9} {method:<8} " + " ".join(f"{k}={v}" for k, v in row.items()
                                                      if k not in ("items", "method")), flush=True)
    by = {(r["items"], r["method"]): r for r in rows}
    for items in args.items:
        base, ch, tab = (by.get((items, m), {}) for m in ("naive", "chunked", "table"))
        if base.get("ms") and ch.get("ms"):
            print(f"{items}: chunked/naive time {ch['ms'] / base['ms']:.2f}x, peak RSS beyond the "
                  f"table {ch['peak_rss_mb'] - tab.get('peak_rss_mb', 0):.0f} MB vs "
                  f"{base['peak_rss_mb'] - tab.get('peak_rss_mb', 0):.0f} MB")
    print(json.dumps({"rows": rows, "users": args.users, "dim": args.dim, "k": args.k,
                      "chunk_size": args.chunk_size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
