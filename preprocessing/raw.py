"""Read and validate the raw RetailRocket files; categories in force at event time; tree roots.

Bad input never disappears silently. Missing files raise ``FileNotFoundError`` naming the path;
missing columns, non-numeric or missing ids, negative timestamps and unknown event types raise
``ValueError`` naming the file and line (line 1 is the header), and so do bytes that are not
UTF-8, ids that do not fit int64 (``1e30``) and broken compressed files (see
:mod:`~torchrec_mamba_preprocessing.raw_io`); exact duplicate rows are dropped and counted in the
:class:`~torchrec_mamba_preprocessing.report.ETLReport`.

Category rules (documented choices):

* The ``categoryid`` of an event is the value of the latest ``categoryid`` row of its item with
  ``timestamp <= event timestamp``; on equal timestamps the later row in file order (part1 before
  part2) wins.
* An event before its item's first ``categoryid`` row gets the earliest known value (snapshots start
  after the log does, so this is the best guess), counted as ``events_category_from_earliest``.
* Items never categorised get a null category, which ``Categorify`` encodes as 1.
* The top-level category is found by walking ``parentid`` up to a category without a parent. A
  parent that has no row of its own, and an item category absent from the tree, count as roots
  (the latter is counted). A cycle raises ``ValueError`` listing it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .raw_io import as_int64, first_bad_int, line_of_row, read_errors
from .report import ETLReport

logger = logging.getLogger(__name__)

__all__ = [
    "EVENT_TYPES",
    "read_events",
    "read_item_categories",
    "read_category_tree",
    "category_roots",
    "category_depths",
    "category_at_event_time",
]

#: Event types of RetailRocket's ``events.csv``.
EVENT_TYPES = ("view", "addtocart", "transaction")
_CHUNK_ROWS = 2_000_000


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _require_columns(path: Path, needed: Sequence[str]) -> None:
    with read_errors(path):
        try:
            header = list(pd.read_csv(path, nrows=0).columns)
        except pd.errors.EmptyDataError:
            raise ValueError(
                f"{path}: empty file (expected a header with {list(needed)})"
            ) from None
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the header has {header}")


def read_events(
    path: str | Path, report: ETLReport, *, on_unknown_event: str = "error"
) -> pd.DataFrame:
    """Read and validate ``events.csv``.

    Args:
        path (str | Path): the events file (``timestamp,visitorid,event,itemid,transactionid``).
        report (ETLReport): filled with read / duplicate / unknown-type counts.
        on_unknown_event (str): ``"error"`` raises listing the unknown types; ``"drop"`` drops
            and counts them. Default: ``"error"``.

    Returns:
        pd.DataFrame: ``timestamp`` (int64 ms), ``visitorid``, ``itemid`` (int64), ``event`` (str),
        ``row`` (int64 position in the file), in file order, exact duplicates dropped.

    Example::

        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "events.csv")
        >>> _ = open(p, "w").write("timestamp,visitorid,event,itemid,transactionid\\n"
        ...                        "5,1,view,7,\\n5,1,view,7,\\n9,1,transaction,7,3\\n")
        >>> r = ETLReport(); df = read_events(p, r)
        >>> len(df), r.duplicate_events_dropped
        (2, 1)
    """
    path = Path(path)
    if on_unknown_event not in ("error", "drop"):
        raise ValueError(f"on_unknown_event must be 'error' or 'drop', got {on_unknown_event!r}")
    _require_file(path, "RetailRocket events file")
    _require_columns(path, ("timestamp", "visitorid", "event", "itemid", "transactionid"))
    with read_errors(path):
        raw = _read_events_csv(path)
    report.events_read = len(raw)
    df = pd.DataFrame(
        {
            "timestamp": as_int64(raw["timestamp"], path, "timestamp", non_negative=True),
            "visitorid": as_int64(raw["visitorid"], path, "visitorid"),
            "itemid": as_int64(raw["itemid"], path, "itemid"),
            "event": raw["event"].astype(str),
            "transactionid": raw["transactionid"],
        }
    )
    return _clean_events(df, path, report, on_unknown_event)


def _read_events_csv(path: Path) -> pd.DataFrame:
    # no usecols: with it pandas silently accepts rows with too many fields
    return pd.read_csv(
        path,
        dtype={"event": str, "transactionid": str},
        keep_default_na=False,
        na_values={"timestamp": [""], "visitorid": [""], "itemid": [""]},
    )


def _clean_events(
    df: pd.DataFrame, path: Path, report: ETLReport, on_unknown_event: str
) -> pd.DataFrame:
    """Unknown event types (error or counted drop), then exact duplicates (counted drop)."""
    unknown = ~df["event"].isin(EVENT_TYPES)
    if unknown.any():
        counts = df.loc[unknown, "event"].value_counts().sort_index()
        if on_unknown_event == "error":
            first = int(np.flatnonzero(unknown.to_numpy())[0])
            raise ValueError(
                f"{path}:{line_of_row(path, first)}: unknown event type(s) "
                f"{dict(counts.items())} (expected {list(EVENT_TYPES)}); pass "
                f"on_unknown_event='drop' to drop and count them"
            )
        report.unknown_events_dropped = {str(k): int(v) for k, v in counts.items()}
        logger.warning(
            "dropping %d events of unknown types %s", int(unknown.sum()), dict(counts.items())
        )
        df = df.loc[~unknown]
    dup = df.duplicated(keep="first")
    report.duplicate_events_dropped = int(dup.sum())
    if dup.any():
        logger.info("dropping %d exact duplicate rows of %s", int(dup.sum()), path)
    df = df.loc[~dup].drop(columns=["transactionid"])
    df["row"] = df.index.to_numpy(dtype=np.int64)
    df = df.reset_index(drop=True)
    report.events_kept = len(df)
    return df


def _chunks(reader: Iterator[pd.DataFrame], path: Path) -> Iterator[pd.DataFrame]:
    while True:
        with read_errors(path):
            chunk = next(reader, None)
        if chunk is None:
            return
        yield chunk


def read_item_categories(paths: Sequence[str | Path], report: ETLReport) -> pd.DataFrame:
    """Read the ``categoryid`` rows of the item-property files (other properties are ignored).

    Args:
        paths (Sequence[str | Path]): ``item_properties_part1.csv``, ``item_properties_part2.csv``.
        report (ETLReport): filled with row / categoryid / duplicate counts.

    Returns:
        pd.DataFrame: ``timestamp``, ``itemid``, ``categoryid`` (int64) and ``order`` (position
        across the files in order), exact duplicates dropped.

    Example::

        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "p.csv")
        >>> _ = open(p, "w").write("timestamp,itemid,property,value\\n1,7,categoryid,3\\n"
        ...                        "1,7,available,1\\n")
        >>> read_item_categories([p], ETLReport())[["itemid", "categoryid"]].values.tolist()
        [[7, 3]]
    """
    parts: list[pd.DataFrame] = []
    order0 = 0
    for p in map(Path, paths):
        _require_file(p, "RetailRocket item-properties file")
        _require_columns(p, ("timestamp", "itemid", "property", "value"))
        offset = 0
        with read_errors(p):
            reader = pd.read_csv(
                p,
                dtype={"property": str, "value": str},
                keep_default_na=False,
                na_values={"timestamp": [""], "itemid": [""]},
                chunksize=_CHUNK_ROWS,
            )
        for chunk in _chunks(reader, p):
            report.property_rows_read += len(chunk)
            keep = (chunk["property"] == "categoryid").to_numpy()
            ts = as_int64(chunk["timestamp"], p, "timestamp", offset, non_negative=True)
            item = as_int64(chunk["itemid"], p, "itemid", offset)
            rows = np.flatnonzero(keep)
            value = chunk["value"].iloc[rows].replace("", np.nan).reset_index(drop=True)
            bad = first_bad_int(value)
            if bad is not None:
                i, kind = bad
                line = line_of_row(p, offset + int(rows[i]))
                raise ValueError(
                    f"{p}:{line}: {kind} categoryid value {value.iloc[i]!r} "
                    f"(expected an integer category id)"
                )
            cat = pd.to_numeric(value).to_numpy(dtype=np.int64)
            parts.append(
                pd.DataFrame(
                    {
                        "timestamp": ts[rows],
                        "itemid": item[rows],
                        "categoryid": cat,
                        "order": order0 + offset + rows,
                    }
                )
            )
            offset += len(chunk)
        order0 += offset
    cats = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(
            {c: np.empty(0, np.int64) for c in ("timestamp", "itemid", "categoryid", "order")}
        )
    )
    report.categoryid_rows = len(cats)
    dup = cats.duplicated(subset=["timestamp", "itemid", "categoryid"], keep="first")
    report.duplicate_categoryid_rows_dropped = int(dup.sum())
    cats = cats.loc[~dup].reset_index(drop=True)
    report.items_with_category = int(cats["itemid"].nunique())
    return cats


def read_category_tree(path: str | Path, report: ETLReport) -> pd.DataFrame:
    """Read and validate ``category_tree.csv``.

    Args:
        path (str | Path): the tree file (``categoryid,parentid``; empty parent for roots).
        report (ETLReport): filled with tree counts.

    Returns:
        pd.DataFrame: ``categoryid`` (int64) and ``parentid`` (int64, -1 for roots).
    """
    path = Path(path)
    _require_file(path, "RetailRocket category tree")
    _require_columns(path, ("categoryid", "parentid"))
    with read_errors(path):
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    cat = as_int64(raw["categoryid"].replace("", np.nan), path, "categoryid", non_negative=True)
    is_root = (raw["parentid"] == "").to_numpy()
    par = raw["parentid"].where(~is_root, "-1")
    parent = as_int64(par, path, "parentid")
    tree = pd.DataFrame({"categoryid": cat, "parentid": parent})
    dup = tree.duplicated(keep="first")
    report.duplicate_tree_rows_dropped = int(dup.sum())
    tree = tree.loc[~dup].reset_index(drop=True)
    clash = tree["categoryid"].duplicated(keep=False)
    if clash.any():
        bad = tree.loc[clash].sort_values("categoryid").head(6).values.tolist()
        raise ValueError(
            f"{path}: categoryid(s) with more than one parent, e.g. (categoryid, parentid) {bad}"
        )
    report.categories_in_tree = len(tree)
    report.root_categories = int((tree["parentid"] < 0).sum())
    return tree


def category_roots(tree: pd.DataFrame) -> dict[int, int]:
    """Top-level (root) category of every category in the tree.

    Args:
        tree (pd.DataFrame): ``categoryid``, ``parentid`` (-1 for roots), one row per category.

    Returns:
        dict[int, int]: categoryid -> root categoryid (a root maps to itself; a parent without its
        own row is a root).

    Example::

        >>> t = pd.DataFrame({"categoryid": [1, 2, 3, 4], "parentid": [-1, 1, 2, -1]})
        >>> category_roots(t)
        {1: 1, 2: 1, 3: 1, 4: 4}
    """
    parent = dict(zip(tree["categoryid"].tolist(), tree["parentid"].tolist(), strict=True))
    root: dict[int, int] = {}
    for start in parent:
        path: list[int] = []
        on_path: set[int] = set()
        c = start
        while c not in root:
            if c in on_path:
                cycle = path[path.index(c) :] + [c]
                raise ValueError(f"category tree has a cycle: {' -> '.join(map(str, cycle))}")
            path.append(c)
            on_path.add(c)
            p = parent.get(c, -1)
            if p < 0:
                root[c] = c
                break
            c = p
        top = root[c]
        for node in path:
            root[node] = top
    return {c: root[c] for c in parent}


def category_depths(tree: pd.DataFrame) -> dict[int, int]:
    """Depth of every category (roots are level 0); see :func:`category_roots` for the rules.

    Example::

        >>> t = pd.DataFrame({"categoryid": [1, 2, 3], "parentid": [-1, 1, 2]})
        >>> category_depths(t)
        {1: 0, 2: 1, 3: 2}
    """
    category_roots(tree)  # validates: no cycles
    parent = dict(zip(tree["categoryid"].tolist(), tree["parentid"].tolist(), strict=True))
    depth: dict[int, int] = {}
    for start in parent:
        chain: list[int] = []
        c = start
        while c not in depth and parent.get(c, -1) >= 0:
            chain.append(c)
            c = parent[c]
        d = depth.setdefault(c, 0)
        for node in reversed(chain):
            d += 1
            depth[node] = d
    return {c: depth[c] for c in parent}


def category_at_event_time(
    events: pd.DataFrame, item_categories: pd.DataFrame, report: ETLReport
) -> np.ndarray:
    """The ``categoryid`` in force at each event (see the module docstring for the rules).

    Args:
        events (pd.DataFrame): ``timestamp``, ``itemid`` per event.
        item_categories (pd.DataFrame): ``timestamp``, ``itemid``, ``categoryid``, ``order``
            (from :func:`read_item_categories`).
        report (ETLReport): filled with ``events_category_from_earliest`` and
            ``events_without_category``.

    Returns:
        np.ndarray: float64 categoryid per event (in ``events`` order), NaN where the item has no
        ``categoryid`` row at all.

    Example::

        >>> ev = pd.DataFrame({"timestamp": [1, 5, 10, 3], "itemid": [7, 7, 7, 8]})
        >>> cats = pd.DataFrame({"timestamp": [4, 8], "itemid": [7, 7], "categoryid": [30, 31],
        ...                      "order": [0, 1]})
        >>> category_at_event_time(ev, cats, ETLReport()).tolist()
        [30.0, 30.0, 31.0, nan]
    """
    n = len(events)
    out = np.full(n, np.nan)
    if n == 0:
        return out
    right = item_categories.sort_values(["timestamp", "order"], kind="stable")
    left = pd.DataFrame(
        {
            "timestamp": events["timestamp"].to_numpy(dtype=np.int64),
            "itemid": events["itemid"].to_numpy(dtype=np.int64),
            "pos": np.arange(n),
        }
    ).sort_values(["timestamp", "pos"], kind="stable")
    merged = pd.merge_asof(
        left,
        right[["timestamp", "itemid", "categoryid"]].astype(np.int64),
        on="timestamp",
        by="itemid",
        direction="backward",
        allow_exact_matches=True,
    )
    out[merged["pos"].to_numpy()] = merged["categoryid"].to_numpy(dtype=np.float64)
    missing = np.isnan(out)
    # the value in force at the item's first snapshot (the last row at that timestamp)
    first_ts = right.groupby("itemid")["timestamp"].transform("min")
    at_first = right.loc[right["timestamp"] == first_ts]
    earliest = at_first.drop_duplicates("itemid", keep="last").set_index("itemid")["categoryid"]
    fill = events["itemid"].iloc[np.flatnonzero(missing)].map(earliest).to_numpy(dtype=np.float64)
    out[missing] = fill
    report.events_category_from_earliest = int((~np.isnan(fill)).sum())
    report.events_without_category = int(np.isnan(out).sum())
    return out
