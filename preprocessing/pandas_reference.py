"""A straightforward pandas implementation of the RetailRocket ETL: the oracle and the baseline.

It implements the same transformation as :func:`~torchrec_mamba_preprocessing.retailrocket.run_etl`
with plain pandas, written independently of it (it imports nothing from the NVTabular path):

* category in force: events and ``categoryid`` rows are concatenated, sorted by
  (item, time, rows-before-events, file order) and forward-filled per item (instead of
  ``merge_asof``); the earliest value fills what is left;
* top-level categories: repeated parent lookups over the whole tree (instead of a walk per node);
* sessions: ``groupby(visitor).timestamp.diff() > gap``;
* splits: ``groupby(...).transform("min")`` / ``cumcount(ascending=False)``;
* vocabularies: ``value_counts`` ordered by (count desc, value asc), ids from 3; null -> 1;
* rows: ``groupby(key).agg(list)`` and Python slicing of the last ``max_len`` elements.

It assumes clean input (it drops exact duplicate rows and, with ``on_unknown_event="drop"``,
unknown event types, but it does not validate). :func:`compare` checks an NVTabular output folder
against it, column by column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["ReferenceOutput", "reference_etl", "write_reference", "read_split", "compare"]

_CATS = ("item", "category", "top_category", "event")
_DAY_MS = 86_400_000


@dataclass
class ReferenceOutput:
    """Result of :func:`reference_etl`.

    Args:
        splits (dict[str, pd.DataFrame]): split -> one row per sequence, sorted by the key.
        vocab_sizes (dict[str, int]): embedding rows per categorical column (incl. 0/1/2).
        vocabs (dict[str, pd.Series]): column -> raw value -> id.
    """

    splits: dict[str, pd.DataFrame] = field(default_factory=dict)
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    vocabs: dict[str, pd.Series] = field(default_factory=dict)


def _roots(tree: pd.DataFrame) -> pd.Series:
    parent = tree.set_index("categoryid")["parentid"]
    cur = pd.Series(parent.index.to_numpy(), index=parent.index)
    for _ in range(len(parent) + 1):
        up = cur.map(parent)  # NaN: no row (a root by definition); -1: root
        move = up.notna() & (up >= 0)
        if not move.any():
            return cur
        cur = cur.where(~move, up).astype(np.int64)
    raise ValueError("category tree has a cycle")


def reference_etl(
    raw_dir: str | Path,
    *,
    session_gap_minutes: float = 30.0,
    group_by: str = "session",
    split: str = "time",
    test_days: float = 7.0,
    valid_days: float = 7.0,
    max_len: int = 50,
    log_time_gaps: bool = True,
    on_unknown_event: str = "error",
) -> ReferenceOutput:
    """Run the reference ETL in memory (same options as ``ETLConfig``; no sharding).

    Args:
        raw_dir (str | Path): folder with the four RetailRocket files.
        session_gap_minutes (float): session gap. Default: 30.0.
        group_by (str): ``"session"`` or ``"visitor"``. Default: ``"session"``.
        split (str): ``"time"`` or ``"leave_one_out"``. Default: ``"time"``.
        test_days (float): test days (time split). Default: 7.0.
        valid_days (float): validation days (time split). Default: 7.0.
        max_len (int): events kept per row. Default: 50.
        log_time_gaps (bool): ``log(1 + seconds)`` in float32. Default: True.
        on_unknown_event (str): ``"error"`` or ``"drop"``. Default: ``"error"``.

    Returns:
        ReferenceOutput: per-split frames with the columns of the NVTabular output.
    """
    raw = Path(raw_dir)
    ev = pd.read_csv(raw / "events.csv", dtype={"event": str, "transactionid": str})
    unknown = ~ev["event"].isin(["view", "addtocart", "transaction"])
    if unknown.any():
        if on_unknown_event != "drop":
            raise ValueError(f"unknown event types {sorted(ev.loc[unknown, 'event'].unique())}")
        ev = ev[~unknown]
    ev = ev.drop_duplicates()
    ev["row"] = ev.index
    ev = ev.rename(columns={"itemid": "item"})
    props = pd.concat(
        [pd.read_csv(raw / f"item_properties_part{i}.csv", dtype={"value": str}) for i in (1, 2)],
        ignore_index=True,
    )
    props["order"] = np.arange(len(props))
    props = props[props["property"] == "categoryid"].copy()
    props["categoryid"] = props["value"].astype(np.int64)
    props = props.drop_duplicates(["timestamp", "itemid", "categoryid"])

    # category in force: forward fill over (item, time, property rows first, file order)
    a = props[["itemid", "timestamp", "order", "categoryid"]].assign(kind=0, row=-1)
    b = ev[["item", "timestamp", "row"]].rename(columns={"item": "itemid"})
    b = b.assign(kind=1, order=-1, categoryid=np.nan)
    both = pd.concat([a, b], ignore_index=True)
    both = both.sort_values(["itemid", "timestamp", "kind", "order", "row"])
    both["cat"] = both.groupby("itemid")["categoryid"].ffill()
    at_event = both[both["kind"] == 1].set_index("row")["cat"]
    first = props.sort_values(["itemid", "timestamp", "order"])
    first = first[first["timestamp"] == first.groupby("itemid")["timestamp"].transform("min")]
    earliest = first.groupby("itemid")["categoryid"].last()
    ev["category"] = ev["row"].map(at_event)
    ev["category"] = ev["category"].fillna(ev["item"].map(earliest)).astype(np.float64)

    tree = pd.read_csv(raw / "category_tree.csv")
    tree["parentid"] = tree["parentid"].fillna(-1).astype(np.int64)
    tree = tree.drop_duplicates()
    roots = _roots(tree)
    ev["top_category"] = ev["category"].map(roots)
    ev["top_category"] = ev["top_category"].fillna(ev["category"]).astype(np.float64)

    # sessions
    ev = ev.sort_values(["visitorid", "timestamp", "row"]).reset_index(drop=True)
    gap = ev.groupby("visitorid")["timestamp"].diff()
    ev["session_id"] = (gap.isna() | (gap > session_gap_minutes * 60_000)).cumsum() - 1
    key = "session_id" if group_by == "session" else "visitorid"

    # splits (before dropping short rows)
    if split == "time":
        start = ev.groupby("session_id")["timestamp"].transform("min")
        test_start = ev["timestamp"].max() - test_days * _DAY_MS
        valid_start = test_start - valid_days * _DAY_MS
        is_test = (start >= test_start) & (test_days > 0)
        is_valid = ~is_test & (start >= valid_start) & (valid_days > 0)
        masks = {"train": ~is_test & ~is_valid, "valid": is_valid, "test": is_test}
    else:
        from_end = ev.groupby(key).cumcount(ascending=False)
        masks = {"train": from_end >= 2, "valid": from_end >= 1, "test": from_end >= 0}
    split_ev = {}
    for name, m in masks.items():
        s = ev[m.to_numpy()].copy()
        s = s[s.groupby(key)["timestamp"].transform("size") >= 2]
        split_ev[name] = s

    # vocabularies on the union of the splits, each event once
    union = pd.concat(split_ev.values()).drop_duplicates(subset=["row"])
    out = ReferenceOutput()
    for col in _CATS:
        counts = union[col].value_counts(dropna=True)
        order = pd.DataFrame({"value": counts.index, "count": counts.to_numpy()})
        order = order.sort_values(["count", "value"], ascending=[False, True])
        out.vocabs[col] = pd.Series(np.arange(3, 3 + len(order)), index=order["value"].to_numpy())
        out.vocab_sizes[col] = 3 + len(order)

    for name, s in split_ev.items():
        enc = pd.DataFrame({key: s[key].to_numpy()})
        for col in _CATS:
            enc[col] = s[col].map(out.vocabs[col]).fillna(1).astype(np.int64).to_numpy()
        secs = (s.groupby(key)["timestamp"].diff().fillna(0) / 1000.0).astype(np.float32)
        enc["time_gap"] = (
            np.log(secs + np.float32(1)).to_numpy() if log_time_gaps else secs.to_numpy()
        )
        enc["timestamp"] = s["timestamp"].to_numpy()
        enc["visitor"] = s["visitorid"].to_numpy()
        aggs = {
            "item_list": ("item", list),
            "category_list": ("category", list),
            "top_category_list": ("top_category", list),
            "event_list": ("event", list),
            "time_gap_list": ("time_gap", list),
            "start_ms": ("timestamp", "min"),
            "end_ms": ("timestamp", "max"),
        }
        if key == "session_id":
            aggs["visitorid"] = ("visitor", "first")
        rows = enc.groupby(key, sort=True).agg(**aggs).reset_index()
        for c in ("item_list", "category_list", "top_category_list", "event_list", "time_gap_list"):
            rows[c] = [v[-max_len:] for v in rows[c]]
        out.splits[name] = rows
    return out


def write_reference(ref: ReferenceOutput, out_dir: str | Path, num_shards: int = 1) -> list[Path]:
    """Write the reference splits as ``num_shards`` parquet files each (for a fair benchmark)."""
    out = Path(out_dir)
    files = []
    for name, rows in ref.splits.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(np.array_split(np.arange(len(rows)), num_shards)):
            f = d / f"part_{i}.parquet"
            rows.iloc[idx].to_parquet(f, index=False)
            files.append(f)
    return files


def read_split(split_dir: str | Path) -> pd.DataFrame:
    """Concatenate the ``part_*.parquet`` shards of one split, in shard order."""
    files = sorted(Path(split_dir).glob("part_*.parquet"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise FileNotFoundError(f"no part_*.parquet shards in {split_dir}")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def compare(nvt_out: str | Path, ref: ReferenceOutput, *, key: str = "session_id") -> list[str]:
    """Differences between an NVTabular output folder and the reference (empty list: equal).

    Integer lists must match exactly; ``time_gap_list`` to float32 precision (rtol 1e-6).
    """
    problems: list[str] = []
    root = Path(nvt_out)
    for name, want in ref.splits.items():
        if len(want) == 0:
            if list(root.joinpath(name).glob("part_*.parquet")):
                problems.append(f"{name}: reference is empty but shards exist")
            continue
        got = read_split(root / name).sort_values(key, kind="stable").reset_index(drop=True)
        if len(got) != len(want):
            problems.append(f"{name}: {len(got)} rows, reference has {len(want)}")
            continue
        for col in want.columns:
            if col not in got.columns:
                problems.append(f"{name}: column {col} missing")
                continue
            g, w = got[col], want[col]
            if col.endswith("_list"):
                lg = np.array([len(v) for v in g])
                lw = np.array([len(v) for v in w])
                if not np.array_equal(lg, lw):
                    problems.append(f"{name}.{col}: lengths differ in {int((lg != lw).sum())} rows")
                    continue
                fg = np.concatenate([np.asarray(v) for v in g]) if len(g) else np.zeros(0)
                fw = np.concatenate([np.asarray(v) for v in w]) if len(w) else np.zeros(0)
                ok = (
                    np.allclose(fg, fw, rtol=1e-6, atol=1e-6)
                    if col == "time_gap_list"
                    else np.array_equal(fg.astype(np.int64), fw.astype(np.int64))
                )
                if not ok:
                    problems.append(f"{name}.{col}: values differ")
            elif not np.array_equal(g.to_numpy(), w.to_numpy()):
                problems.append(f"{name}.{col}: values differ")
    return problems
