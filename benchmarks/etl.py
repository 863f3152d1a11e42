"""RetailRocket ETL speed: the NVTabular workflow against a straightforward pandas implementation.

Both read the same synthetic RetailRocket raw files (``torchrec_mamba_preprocessing.synthetic``,
by default at the real size: 2,756,101 events, 417,053 items, 1,669 categories), apply the same
transformation (category in force at event time, top-level categories, 30-minute sessions, time
split, vocabularies, sequences of the last ``max_len`` events) and write parquet shards:

* **nvtabular**: ``torchrec_mamba_preprocessing.retailrocket.run_etl`` (cuDF when a GPU is
  there, pandas/dask otherwise; this machine has no GPU, so this measures NVTabular on CPU);
* **pandas**: ``torchrec_mamba_preprocessing.pandas_reference`` (``groupby(...).agg(list)``),
  the baseline, measured in the same run.

Then it checks that the two outputs are equal, row by row and id by id. Times are medians over
``--repeats`` runs (wall time, including reading the csv files and writing parquet); a tiny
warm-up run first keeps imports and one-time JIT costs out of both. Prints events/s, the ratio
(pandas time / NVTabular time, > 1 means NVTabular is faster) and one final JSON line.

Usage::

    python benchmarks/etl.py                    # full size (a few minutes on 2 CPU cores)
    python benchmarks/etl.py --events 200000    # quick run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the dict printed as the final JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=None, help="events (default: the real 2,756,101)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each implementation")
    p.add_argument("--world-size", type=int, default=1, help="shards per split")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="work folder (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")

    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    from torchrec_mamba_preprocessing import pandas_reference as ref
    from torchrec_mamba_preprocessing.retailrocket import ETLConfig, gpu_available, run_etl
    from torchrec_mamba_preprocessing.synthetic import SyntheticConfig, write_retailrocket

    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="etl_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = SyntheticConfig.full(seed=a.seed)
    if a.events is not None:
        cfg = replace(cfg, num_events=a.events, num_items=None, num_categories=None, num_roots=None)
    raw = work / "raw"
    gen_s, summary = _timed(lambda: write_retailrocket(raw, cfg))
    print(
        f"synthetic RetailRocket: {summary.num_events} events, {summary.num_sessions} sessions, "
        f"{summary.num_items} items, {summary.num_categories} categories ({gen_s:.1f}s to write)"
    )
    etl_cfg = ETLConfig(world_size=a.world_size, max_len=a.max_len)

    # warm-up: imports (NVTabular takes seconds) and one-time costs out of the timings
    warm = work / "warm"
    write_retailrocket(warm / "raw", SyntheticConfig(num_events=2_000, seed=1))
    run_etl(warm / "raw", warm / "out", etl_cfg)
    ref.reference_etl(warm / "raw", max_len=a.max_len)

    nvt_times, pd_times = [], []
    report = None
    reference = None
    for i in range(a.repeats):
        out = work / "nvt"
        t, report = _timed(lambda out=out: run_etl(raw, out, etl_cfg))
        nvt_times.append(t)
        print(f"  nvtabular run {i + 1}: {t:.1f}s  stages {report.seconds}")
        pd_out = work / "pandas"
        if pd_out.exists():
            shutil.rmtree(pd_out)

        def pandas_run(pd_out: Path = pd_out) -> Any:
            r = ref.reference_etl(raw, max_len=a.max_len)
            ref.write_reference(r, pd_out, num_shards=etl_cfg.shards)
            return r

        t, reference = _timed(pandas_run)
        pd_times.append(t)
        print(f"  pandas run {i + 1}: {t:.1f}s")
    assert report is not None and reference is not None
    problems = ref.compare(work / "nvt", reference, key=etl_cfg.key)
    equal = not problems
    if problems:
        print("OUTPUTS DIFFER:", *problems, sep="\n  ")

    nvt_s, pd_s = statistics.median(nvt_times), statistics.median(pd_times)
    n = summary.num_events
    rows = {s: st.rows for s, st in report.splits.items()}
    print(f"rows written: {rows}; vocabulary sizes: {report.vocab_sizes}")
    print(f"{'implementation':<14} {'median s':>9} {'events/s':>12}")
    print(f"{'nvtabular':<14} {nvt_s:>9.1f} {n / nvt_s:>12,.0f}   backend={report.backend}")
    print(f"{'pandas':<14} {pd_s:>9.1f} {n / pd_s:>12,.0f}   (baseline)")
    print(f"ratio pandas/nvtabular time: {pd_s / nvt_s:.2f}  (>1: NVTabular faster)")
    print(f"outputs equal: {equal}")
    result = {
        "benchmark": "etl_retailrocket",
        "events": n,
        "sessions": summary.num_sessions,
        "repeats": a.repeats,
        "backend": report.backend,
        "gpu": gpu_available(),
        "nvtabular_s": round(nvt_s, 2),
        "pandas_s": round(pd_s, 2),
        "nvtabular_events_per_s": round(n / nvt_s),
        "pandas_events_per_s": round(n / pd_s),
        "ratio_pandas_over_nvtabular": round(pd_s / nvt_s, 3),
        "nvtabular_stages_s": report.seconds,
        "rows": rows,
        "outputs_equal": equal,
    }
    print(json.dumps(result))
    if not a.keep and not a.out:
        shutil.rmtree(work, ignore_errors=True)
    if not equal:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
