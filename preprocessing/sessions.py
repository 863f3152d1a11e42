"""Event table → sessions → train/valid/test event sets, partitioned at sequence boundaries.

Everything here is event-level numpy/pandas work that prepares the input of the NVTabular workflow
(:mod:`torchrec_mamba_preprocessing.retailrocket`), which then encodes, groups and truncates.

Rules (documented choices):

* **Sessions.** Events are ordered by (visitor, timestamp, file row). A new session starts at a
  visitor's first event and after a gap of *more than* ``session_gap_minutes`` (a gap of exactly
  the threshold stays in the session).
* **Rows.** One output row per session (``group_by="session"``) or per visitor
  (``group_by="visitor"``), events in time order.
* **Time split** (``split="time"``): the last ``test_days`` days, by session *start*, are the test
  set, the ``valid_days`` before them the validation set, the rest training (the usual
  session-based protocol). The clock is the latest kept event. With ``group_by="visitor"`` a
  visitor's sessions are grouped per split.
* **Leave-one-out** (``split="leave_one_out"``): for every row, test = all events (target: the
  last), valid = all but the last (target: the second to last), train = all but the last two.
* **Short rows.** A row with fewer than 2 events has no next-event target; it is dropped from its
  split and counted (``SplitStats.short_rows_dropped``).
* **Time gaps.** Seconds since the previous event of the same row (0 for the first event), float32.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .report import ETLReport, SplitStats

logger = logging.getLogger(__name__)

__all__ = [
    "SPLITS",
    "EVENT_COLUMNS",
    "sessionise",
    "split_masks",
    "split_events",
    "partition_at_groups",
]

SPLITS = ("train", "valid", "test")
#: Columns of the event table handed to the workflow.
EVENT_COLUMNS = (
    "visitorid",
    "session_id",
    "event_order",
    "timestamp",
    "item",
    "category",
    "top_category",
    "event",
    "time_gap",
)
_DAY_MS = 86_400_000


def sessionise(
    events: pd.DataFrame,
    category: np.ndarray,
    roots: dict[int, int],
    report: ETLReport,
    *,
    session_gap_minutes: float = 30.0,
) -> pd.DataFrame:
    """Order events by visitor and time, cut sessions and attach categories.

    Args:
        events (pd.DataFrame): ``timestamp``, ``visitorid``, ``itemid``, ``event``, ``row`` (from
            :func:`~torchrec_mamba_preprocessing.raw.read_events`).
        category (np.ndarray): float categoryid per event (NaN = never categorised).
        roots (dict[int, int]): categoryid -> top-level categoryid.
        report (ETLReport): filled with session, visitor and missing-from-tree counts.
        session_gap_minutes (float): a longer gap starts a new session. Default: 30.0.

    Returns:
        pd.DataFrame: the columns of :data:`EVENT_COLUMNS` (``time_gap`` still zero), sorted by
        (visitor, time); ``session_id`` and ``event_order`` are 0-based positions in that order.

    Example::

        >>> ev = pd.DataFrame({"timestamp": [0, 60_000, 60_000 + 31 * 60_000], "visitorid": [1] * 3,
        ...                    "itemid": [5, 6, 7], "event": ["view"] * 3, "row": [0, 1, 2]})
        >>> out = sessionise(ev, np.array([1.0, 1.0, 2.0]), {1: 1, 2: 1}, ETLReport())
        >>> out["session_id"].tolist(), out["top_category"].tolist()
        ([0, 0, 1], [1.0, 1.0, 1.0])
    """
    if session_gap_minutes <= 0:
        raise ValueError(f"session_gap_minutes must be > 0, got {session_gap_minutes}")
    ts = events["timestamp"].to_numpy(dtype=np.int64)
    vis = events["visitorid"].to_numpy(dtype=np.int64)
    order = np.lexsort((events["row"].to_numpy(), ts, vis))
    ts, vis = ts[order], vis[order]
    n = len(order)
    new = np.ones(n, dtype=bool)
    if n > 1:
        gap_ms = session_gap_minutes * 60_000.0
        new[1:] = (vis[1:] != vis[:-1]) | ((ts[1:] - ts[:-1]) > gap_ms)
    session = np.cumsum(new) - 1
    cat = np.asarray(category, dtype=np.float64)[order]
    known = ~np.isnan(cat)
    uniq = np.unique(cat[known]).astype(np.int64)
    missing = [c for c in uniq.tolist() if c not in roots]
    report.categories_missing_from_tree = len(missing)
    if missing:
        logger.warning(
            "%d item categories are missing from the category tree; each is its own top-level "
            "category (e.g. %s)",
            len(missing),
            missing[:5],
        )
    root_of = np.array([roots.get(c, c) for c in uniq.tolist()], dtype=np.float64)
    top = np.full(n, np.nan)
    top[known] = root_of[np.searchsorted(uniq, cat[known].astype(np.int64))]
    sizes = np.bincount(session) if n else np.zeros(0, dtype=np.int64)
    report.sessions = int(session[-1] + 1) if n else 0
    report.single_event_sessions = int((sizes == 1).sum())
    report.visitors = int(1 + (vis[1:] != vis[:-1]).sum()) if n else 0
    return pd.DataFrame(
        {
            "visitorid": vis,
            "session_id": session.astype(np.int64),
            "event_order": np.arange(n, dtype=np.int64),
            "timestamp": ts,
            "item": events["itemid"].to_numpy(dtype=np.int64)[order],
            "category": cat,
            "top_category": top,
            "event": events["event"].to_numpy()[order],
            "time_gap": np.zeros(n, dtype=np.float32),
        }
    )


def _group_codes(table: pd.DataFrame, group_by: str) -> np.ndarray:
    """Dense 0-based row codes of (row, time)-sorted events."""
    if group_by not in ("session", "visitor"):
        raise ValueError(f"group_by must be 'session' or 'visitor', got {group_by!r}")
    key = table["session_id" if group_by == "session" else "visitorid"].to_numpy()
    new = np.ones(len(key), dtype=bool)
    new[1:] = key[1:] != key[:-1]
    return np.cumsum(new) - 1


def split_masks(
    table: pd.DataFrame,
    *,
    split: str = "time",
    group_by: str = "session",
    test_days: float = 7.0,
    valid_days: float = 7.0,
) -> dict[str, np.ndarray]:
    """Which events belong to each split, before short rows are dropped.

    Args:
        table (pd.DataFrame): output of :func:`sessionise`.
        split (str): ``"time"`` or ``"leave_one_out"``. Default: ``"time"``.
        group_by (str): ``"session"`` or ``"visitor"``. Default: ``"session"``.
        test_days (float): days at the end for the test set (time split). Default: 7.0.
        valid_days (float): days before those for validation (time split). Default: 7.0.

    Returns:
        dict[str, np.ndarray]: split name -> boolean mask over ``table`` rows.
    """
    n = len(table)
    if split == "time":
        if test_days < 0 or valid_days < 0:
            raise ValueError(
                f"test_days and valid_days must be >= 0, got {test_days}, {valid_days}"
            )
        ts = table["timestamp"].to_numpy()
        sess = table["session_id"].to_numpy()
        if n == 0:
            return {s: np.zeros(0, dtype=bool) for s in SPLITS}
        start = np.full(int(sess.max()) + 1, np.iinfo(np.int64).max)
        np.minimum.at(start, sess, ts)
        t_end = int(ts.max())
        test_start = t_end - test_days * _DAY_MS
        valid_start = test_start - valid_days * _DAY_MS
        s_start = start[sess]
        is_test = (s_start >= test_start) if test_days > 0 else np.zeros(n, dtype=bool)
        is_valid = (
            ~is_test & (s_start >= valid_start) if valid_days > 0 else np.zeros(n, dtype=bool)
        )
        return {"train": ~is_test & ~is_valid, "valid": is_valid, "test": is_test}
    if split == "leave_one_out":
        code = _group_codes(table, group_by)
        if n == 0:
            return {s: np.zeros(0, dtype=bool) for s in SPLITS}
        size = np.bincount(code)
        first = np.concatenate([[0], np.cumsum(size)[:-1]])
        from_end = size[code] - 1 - (np.arange(n) - first[code])
        return {"train": from_end >= 2, "valid": from_end >= 1, "test": np.ones(n, dtype=bool)}
    raise ValueError(f"split must be 'time' or 'leave_one_out', got {split!r}")


def split_events(
    table: pd.DataFrame, mask: np.ndarray, *, group_by: str = "session", max_len: int | None = None
) -> tuple[pd.DataFrame, SplitStats]:
    """The events of one split: drop short rows, compute time gaps.

    Args:
        table (pd.DataFrame): output of :func:`sessionise`.
        mask (np.ndarray): events of this split (from :func:`split_masks`).
        group_by (str): ``"session"`` or ``"visitor"``. Default: ``"session"``.
        max_len (int | None): only counts the rows that ``ListSlice`` will truncate. Default: None.

    Returns:
        tuple[pd.DataFrame, SplitStats]: the split's events (sorted by row, then time; rows of at
        least 2 events) and its counts (``files`` left empty).

    Example::

        >>> t = pd.DataFrame({"visitorid": [1, 1, 2], "session_id": [0, 0, 1],
        ...                   "timestamp": [0, 4_000, 9], "time_gap": [0.0] * 3})
        >>> ev, st = split_events(t, np.array([True, True, True]))
        >>> ev["time_gap"].tolist(), st.rows, st.short_rows_dropped
        ([0.0, 4.0], 1, 1)
    """
    sub = table.loc[mask]
    code = _group_codes(sub, group_by)
    size = np.bincount(code) if len(code) else np.zeros(0, dtype=np.int64)
    keep = size[code] >= 2 if len(code) else np.zeros(0, dtype=bool)
    stats = SplitStats(
        rows=int((size >= 2).sum()),
        events=int(keep.sum()),
        short_rows_dropped=int(((size > 0) & (size < 2)).sum()),
        short_row_events_dropped=int((~keep).sum()),
        truncated_rows=int((size > max_len).sum()) if max_len else 0,
    )
    sub = sub.loc[keep].copy()
    code = code[keep]
    ts = sub["timestamp"].to_numpy()
    gap = np.zeros(len(sub), dtype=np.float32)
    if len(sub) > 1:
        same = code[1:] == code[:-1]
        gap[1:] = np.where(same, (ts[1:] - ts[:-1]) / 1000.0, 0.0).astype(np.float32)
    sub["time_gap"] = gap
    return sub.reset_index(drop=True), stats


def partition_at_groups(
    sub: pd.DataFrame, num_parts: int, *, group_by: str = "session", name: str = "split"
) -> list[pd.DataFrame]:
    """Cut a split's events into ``num_parts`` contiguous chunks of whole rows (±1 row each).

    ``Groupby`` in NVTabular works per partition, so no row may straddle two partitions; cutting
    the (row, time)-sorted events at row boundaries guarantees that without a shuffle.

    Args:
        sub (pd.DataFrame): output of :func:`split_events`.
        num_parts (int): chunks (= parquet shards of this split).
        group_by (str): ``"session"`` or ``"visitor"``. Default: ``"session"``.
        name (str): split name for the error message. Default: ``"split"``.

    Returns:
        list[pd.DataFrame]: ``num_parts`` frames, each holding whole rows.

    Example::

        >>> t = pd.DataFrame({"visitorid": [1, 1, 2, 2, 3, 3], "session_id": [0, 0, 1, 1, 2, 2]})
        >>> [len(p) for p in partition_at_groups(t, 2)]
        [2, 4]
    """
    code = _group_codes(sub, group_by)
    n_groups = int(code[-1] + 1) if len(code) else 0
    if n_groups < num_parts:
        raise ValueError(
            f"{name} split has {n_groups} rows, fewer than the {num_parts} shards requested; "
            f"lower num_shards or change the split sizes"
        )
    cut_groups = (np.arange(num_parts + 1) * n_groups) // num_parts
    bounds = np.searchsorted(code, cut_groups, side="left")
    bounds[-1] = len(sub)
    return [sub.iloc[bounds[i] : bounds[i + 1]].reset_index(drop=True) for i in range(num_parts)]
