"""RetailRocket ETL: raw Kaggle files → NVTabular workflow → sharded parquet sequences.

Stages (each logged, counted in an :class:`~torchrec_mamba_preprocessing.report.ETLReport`):

1. read and validate ``events.csv``, ``item_properties_part{1,2}.csv`` and ``category_tree.csv``
   (:mod:`~torchrec_mamba_preprocessing.raw`); attach the ``categoryid`` in force at each event and
   its top-level category;
2. cut sessions, assign train/valid/test events, drop rows shorter than 2 events
   (:mod:`~torchrec_mamba_preprocessing.sessions`);
3. the NVTabular workflow (cuDF on a GPU when importable, pandas otherwise; same output):
   ``Categorify`` item, category, top-level category and event type; ``LogOp`` on the time gaps
   (``log_time_gaps``); ``Groupby`` session (or visitor) sorted by time into list columns;
   ``ListSlice(-max_len)`` keeps the last ``max_len`` events (as
   :class:`~torchrec_mamba_preprocessing.nvt_ops.TailSlice`, which also passes the scalar columns
   through, so the graph is one chain and ``Groupby`` runs once);
4. write ``num_shards`` parquet files per split (a multiple of ``world_size``), the Merlin schema,
   the fitted workflow and the vocabularies.

Vocabularies are fit **once, on the events of all splits** (each event counted once), then every
split is transformed with the same fitted workflow, so an id means the same item in train, valid and
test. Fitting on train only would map items first seen in the evaluation period to the single OOV
id 2; all those distinct targets would become one easy class and inflate the metrics. With the
vocabulary fit on all ids an unseen item keeps its own, untrained row, which is the honest setting.
Ids: 0 padding, 1 null (e.g. never-categorised items), 2 OOV, vocabulary from 3 by decreasing
frequency. ``Categorify`` breaks frequency ties with an unstable sort, so after fitting the
vocabularies are rewritten in a canonical order (count descending, raw value ascending): CPU, GPU
and the pandas reference then give identical ids.

``Groupby`` works per partition, so each split is partitioned at row (session/visitor) boundaries
before the workflow (rows are sorted by row and time already): no shuffle is needed and no row is
cut. ``ListSlice`` is used without ``pad`` (on CPU ``pad=True`` silently fails to pad rows read
back from parquet); the loader (``torchrec_mamba.data.parquet``) truncates and the batch pads.

Time gaps are log1p'd by default (``LogOp``): raw gaps span seconds to 30 minutes (and days
between a visitor's sessions with ``group_by="visitor"``), a heavy tail a model digests badly.

Output layout::

    out_dir/train|valid|test/part_{i}.parquet   + schema.pbtxt, .merlin/schema.json, _metadata
    out_dir/workflow/                           nvt.Workflow.save (categories/unique.*.parquet)
    out_dir/vocabs/{item,category,top_category,event}.csv   raw,id,count
    out_dir/etl_report.json, out_dir/etl_meta.json

Columns: ``item_list``, ``category_list``, ``top_category_list``, ``event_list`` (int64 ids),
``time_gap_list`` (float32; seconds since the previous event, ``log1p`` when ``log_time_gaps``),
the row key (``session_id`` or ``visitorid``), ``start_ms`` / ``end_ms`` (first and last event
time, ms since epoch) and, for sessions, ``visitorid``.

Command line::

    python -m torchrec_mamba_preprocessing.retailrocket --raw data/rr_synth --out data/rr_etl
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .raw import (
    category_at_event_time,
    category_roots,
    read_category_tree,
    read_events,
    read_item_categories,
)
from .report import ETLReport
from .sessions import SPLITS, partition_at_groups, sessionise, split_events, split_masks

logger = logging.getLogger(__name__)

__all__ = [
    "CATEGORICAL_COLUMNS",
    "ETLConfig",
    "RAW_FILES",
    "build_workflow",
    "gpu_available",
    "list_columns",
    "run_etl",
    "main",
]

#: Categorified event columns; each becomes ``<name>_list`` after ``Groupby``.
CATEGORICAL_COLUMNS = ("item", "category", "top_category", "event")
RAW_FILES = (
    "events.csv",
    "item_properties_part1.csv",
    "item_properties_part2.csv",
    "category_tree.csv",
)
_RESERVED = 3  # 0 padding, 1 null, 2 OOV
_RENAMES = {"timestamp_min": "start_ms", "timestamp_max": "end_ms", "visitorid_min": "visitorid"}


@dataclass(frozen=True)
class ETLConfig:
    """Options of the RetailRocket ETL.

    Args:
        session_gap_minutes (float): a longer gap between a visitor's events starts a new session.
            Default: 30.0.
        group_by (str): one row per ``"session"`` or per ``"visitor"``. Default: ``"session"``.
        split (str): ``"time"`` (last days by session start) or ``"leave_one_out"``.
            Default: ``"time"``.
        test_days (float): days at the end of the log for test (time split). Default: 7.0.
        valid_days (float): days before those for validation (time split). Default: 7.0.
        max_len (int): events kept per row (the last ones); the loader's input is one shorter.
            Default: 50.
        world_size (int): ranks that will read the shards. Default: 1.
        num_shards (int | None): parquet files per split, a multiple of ``world_size``;
            ``None`` is ``world_size``. Default: None.
        log_time_gaps (bool): store ``log1p(seconds)`` instead of raw seconds. Default: True.
        on_unknown_event (str): ``"error"`` or ``"drop"`` (counted). Default: ``"error"``.
        device (str): ``"auto"`` (cuDF when importable with a GPU), ``"cpu"`` or ``"gpu"``.
            Default: ``"auto"``.

    Example::

        >>> ETLConfig(world_size=2).shards
        2
        >>> ETLConfig(world_size=2, num_shards=3).shards
        Traceback (most recent call last):
        ...
        ValueError: num_shards (3) must be a positive multiple of world_size (2)
    """

    session_gap_minutes: float = 30.0
    group_by: str = "session"
    split: str = "time"
    test_days: float = 7.0
    valid_days: float = 7.0
    max_len: int = 50
    world_size: int = 1
    num_shards: int | None = None
    log_time_gaps: bool = True
    on_unknown_event: str = "error"
    device: str = "auto"

    @property
    def shards(self) -> int:
        """Parquet files per split (validated)."""
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        n = self.world_size if self.num_shards is None else self.num_shards
        if n < 1 or n % self.world_size:
            raise ValueError(
                f"num_shards ({n}) must be a positive multiple of world_size ({self.world_size})"
            )
        return n

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        _ = self.shards
        if self.group_by not in ("session", "visitor"):
            raise ValueError(f"group_by must be 'session' or 'visitor', got {self.group_by!r}")
        if self.split not in ("time", "leave_one_out"):
            raise ValueError(f"split must be 'time' or 'leave_one_out', got {self.split!r}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 (input + target), got {self.max_len}")
        if self.session_gap_minutes <= 0:
            raise ValueError(f"session_gap_minutes must be > 0, got {self.session_gap_minutes}")
        if self.on_unknown_event not in ("error", "drop"):
            raise ValueError(
                f"on_unknown_event must be 'error' or 'drop', got {self.on_unknown_event!r}"
            )
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {self.device!r}")

    @property
    def key(self) -> str:
        """The row key column: ``session_id`` or ``visitorid``."""
        return "session_id" if self.group_by == "session" else "visitorid"


def list_columns() -> tuple[str, ...]:
    """Names of the list columns written by the ETL, in order.

    Example::

        >>> list_columns()
        ('item_list', 'category_list', 'top_category_list', 'event_list', 'time_gap_list')
    """
    return tuple(f"{c}_list" for c in CATEGORICAL_COLUMNS) + ("time_gap_list",)


def gpu_available() -> bool:
    """Whether cuDF imports and a GPU is visible (``import cudf`` raises RuntimeError without one)."""
    try:
        import cudf  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    try:
        from merlin.core.compat import HAS_GPU
    except (ImportError, RuntimeError):
        return False
    return bool(HAS_GPU)


def _quiet_nvtabular() -> Any:
    """Import NVTabular without its optional-backend warnings (TensorFlow, Triton, CPU mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nvtabular as nvt
    return nvt


def _output_name(name: str) -> str:
    """Output column names (a module-level function, so that the saved workflow unpickles)."""
    return _RENAMES.get(name, name)


def build_workflow(config: ETLConfig, categories_dir: str | Path) -> Any:
    """The NVTabular workflow: Categorify → (LogOp) → Groupby(key, sorted by time) → ListSlice.

    The slice is :class:`~torchrec_mamba_preprocessing.nvt_ops.TailSlice`, a ``ListSlice(-max_len)``
    that passes the scalar columns through, so that the graph stays one chain.

    Args:
        config (ETLConfig): grouping, ``max_len`` and time-gap options.
        categories_dir (str | Path): where ``Categorify`` writes its unique-value files at fit.

    Returns:
        nvtabular.Workflow: unfitted; input columns are
        :data:`~torchrec_mamba_preprocessing.sessions.EVENT_COLUMNS`.
    """
    nvt = _quiet_nvtabular()
    from .nvt_ops import TailSlice

    ops = nvt.ops
    cats = list(CATEGORICAL_COLUMNS) >> ops.Categorify(out_path=str(categories_dir))
    gaps = ["time_gap"] >> ops.LogOp() if config.log_time_gaps else ["time_gap"]
    key = config.key
    aggs: dict[str, Any] = {c: "list" for c in (*CATEGORICAL_COLUMNS, "time_gap")}
    # min/max, not first/last: the same values on time-sorted rows, but vectorised aggregations
    # (NVTabular's CPU first/last builds a Python list per row)
    aggs["timestamp"] = ["min", "max"]
    extra = ["timestamp", "event_order"]
    if key == "session_id":
        aggs["visitorid"] = ["min"]
        extra.append("visitorid")
    grouped = (cats + gaps + [key] + extra) >> ops.Groupby(
        groupby_cols=[key], sort_cols=["event_order"], aggs=aggs
    )
    # one chain after Groupby (a branch would make merlin run Groupby once per branch)
    return nvt.Workflow(grouped >> TailSlice(config.max_len) >> ops.Rename(f=_output_name))


def _categorify_ops(workflow: Any) -> list[Any]:
    from merlin.dag import Graph

    nvt = _quiet_nvtabular()
    nodes = Graph.get_nodes_by_op_type([workflow.output_node], nvt.ops.Categorify)
    return [n.op for n in nodes]


def _canonicalise_vocabularies(workflow: Any) -> None:
    """Rewrite each fitted unique-value file in (count desc, value asc) order, ids from 3."""
    for op in _categorify_ops(workflow):
        for col, path in op.categories.items():
            df = pd.read_parquet(path)
            size = f"{col}_size"
            if df[col].isna().any():
                raise RuntimeError(f"unexpected null row in the fitted vocabulary {path}")
            df = df.sort_values([size, col], ascending=[False, True], kind="stable")
            df.index = pd.RangeIndex(_RESERVED, _RESERVED + len(df))
            df.to_parquet(path)


def _export_vocabularies(workflow: Any, out: Path) -> dict[str, int]:
    """Write ``vocabs/<col>.csv`` (raw, id, count); return embedding rows per column."""
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for op in _categorify_ops(workflow):
        for col, path in op.categories.items():
            df = pd.read_parquet(path)
            raw = df[col]
            if col != "event":
                raw = raw.astype(np.int64)
            pd.DataFrame({"raw": raw, "id": df.index, "count": df[f"{col}_size"]}).to_csv(
                out / f"{col}.csv", index=False
            )
            sizes[col] = _RESERVED + len(df)
    return {c: sizes[c] for c in CATEGORICAL_COLUMNS}


def _to_dataset(parts: list[pd.DataFrame], cpu: bool) -> Any:
    import dask
    import dask.dataframe as dd

    nvt = _quiet_nvtabular()
    meta = parts[0].iloc[:0]
    ddf = dd.from_delayed([dask.delayed(p) for p in parts], meta=meta, verify_meta=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nvt.Dataset(ddf, cpu=cpu)


def _fit_partitions(table: pd.DataFrame, chunk: int = 500_000) -> list[pd.DataFrame]:
    """Partitions for fitting: a tiny first one, because merlin runs the whole graph (including the
    slow CPU ``Groupby``) on the first partition to capture dtypes; ``Categorify`` statistics do not
    care where partitions are cut."""
    bounds = [0, min(len(table), 1_000), *range(1_000 + chunk, len(table), chunk), len(table)]
    bounds = sorted(set(bounds))
    return [
        table.iloc[a:b].reset_index(drop=True) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def run_etl(raw_dir: str | Path, out_dir: str | Path, config: ETLConfig | None = None) -> ETLReport:
    """Run the whole RetailRocket ETL (see the module docstring).

    Args:
        raw_dir (str | Path): folder with the four Kaggle files.
        out_dir (str | Path): output folder; its ``train``/``valid``/``test``/``workflow``/
            ``vocabs`` subfolders are replaced.
        config (ETLConfig | None): options; ``None`` uses the defaults. Default: None.

    Returns:
        ETLReport: what was kept, dropped and written (also saved as ``etl_report.json``).
    """
    cfg = config or ETLConfig()
    cfg.validate()
    raw, out = Path(raw_dir), Path(out_dir)
    if cfg.device == "gpu" and not gpu_available():
        raise RuntimeError(
            "device='gpu' needs cuDF and a visible GPU: pip install 'torchrec-mamba[gpu]' "
            "(cudf-cu12) on a CUDA machine, or use device='auto'/'cpu'"
        )
    cpu = cfg.device == "cpu" or not gpu_available()
    report = ETLReport(
        backend="pandas" if cpu else "cudf",
        raw_dir=str(raw.resolve()),
        output_dir=str(out.resolve()),
    )
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report.seconds[name] = round(now - clock, 3)
        clock = now

    events = read_events(raw / "events.csv", report, on_unknown_event=cfg.on_unknown_event)
    props = read_item_categories(
        [raw / "item_properties_part1.csv", raw / "item_properties_part2.csv"], report
    )
    tree = read_category_tree(raw / "category_tree.csv", report)
    lap("read")
    category = category_at_event_time(events, props, report)
    roots = category_roots(tree)
    table = sessionise(events, category, roots, report, session_gap_minutes=cfg.session_gap_minutes)
    del events, props
    masks = split_masks(
        table,
        split=cfg.split,
        group_by=cfg.group_by,
        test_days=cfg.test_days,
        valid_days=cfg.valid_days,
    )
    splits = {}
    for name in SPLITS:
        splits[name], report.splits[name] = split_events(
            table, masks[name], group_by=cfg.group_by, max_len=cfg.max_len
        )
    lap("prepare")

    from merlin.io.worker import clean_worker_cache

    clean_worker_cache()
    out.mkdir(parents=True, exist_ok=True)
    for sub in (*SPLITS, "workflow", "vocabs", "_categorify"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    workflow = build_workflow(cfg, out / "_categorify")
    # fit on the union of the splits, each event once (vocabularies shared by all splits)
    fit_rows = np.zeros(len(table), dtype=bool)
    for name in SPLITS:
        kept = splits[name]["event_order"].to_numpy()
        fit_rows[kept] = True
    fit_table = table.loc[fit_rows].reset_index(drop=True)
    if len(fit_table) == 0:
        raise ValueError(f"no sequence of at least 2 events in {raw}; nothing to write")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workflow.fit(_to_dataset(_fit_partitions(fit_table), cpu))
    _canonicalise_vocabularies(workflow)
    workflow.save(str(out / "workflow"))
    shutil.rmtree(out / "_categorify", ignore_errors=True)
    lap("fit")

    for name in SPLITS:
        sub = splits[name]
        stats = report.splits[name]
        if stats.rows == 0:
            logger.warning("split %s is empty; no shards written", name)
            continue
        parts = partition_at_groups(sub, cfg.shards, group_by=cfg.group_by, name=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            workflow.transform(_to_dataset(parts, cpu)).to_parquet(
                str(out / name), output_files=cfg.shards
            )
        stats.files = sorted(str(p) for p in (out / name).glob("part_*.parquet"))
        if len(stats.files) != cfg.shards:
            raise RuntimeError(f"expected {cfg.shards} shards in {out / name}, found {stats.files}")
    lap("transform_write")
    clean_worker_cache()

    report.vocab_sizes = _export_vocabularies(workflow, out / "vocabs")
    meta = {
        "config": asdict(cfg),
        "vocab_sizes": report.vocab_sizes,
        "list_columns": list(list_columns()),
        "key": cfg.key,
        "splits": {n: s.rows for n, s in report.splits.items()},
        "num_shards": cfg.shards,
    }
    (out / "etl_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    report.save(out / "etl_report.json")
    report.log()
    return report


def main(argv: Sequence[str] | None = None) -> ETLReport:
    """Command line: ``python -m torchrec_mamba_preprocessing.retailrocket --raw DIR --out DIR``."""
    p = argparse.ArgumentParser(description="RetailRocket events -> NVTabular -> parquet sequences")
    p.add_argument("--raw", required=True, help="folder with the four RetailRocket csv files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--session-gap-minutes", type=float, default=30.0)
    p.add_argument("--group-by", choices=("session", "visitor"), default="session")
    p.add_argument("--split", choices=("time", "leave_one_out"), default="time")
    p.add_argument("--test-days", type=float, default=7.0)
    p.add_argument("--valid-days", type=float, default=7.0)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--num-shards", type=int, default=None)
    p.add_argument("--raw-time-gaps", action="store_true", help="store seconds, not log1p(seconds)")
    p.add_argument("--on-unknown-event", choices=("error", "drop"), default="error")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = ETLConfig(
        session_gap_minutes=a.session_gap_minutes,
        group_by=a.group_by,
        split=a.split,
        test_days=a.test_days,
        valid_days=a.valid_days,
        max_len=a.max_len,
        world_size=a.world_size,
        num_shards=a.num_shards,
        log_time_gaps=not a.raw_time_gaps,
        on_unknown_event=a.on_unknown_event,
        device=a.device,
    )
    return run_etl(a.raw, a.out, cfg)  # logs the report


if __name__ == "__main__":
    main()
