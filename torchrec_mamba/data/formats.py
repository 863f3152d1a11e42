"""The format readers: SASRec text, MovieLens ratings and CSV event tables.

Each returns a :class:`~torchrec_mamba.data.sequence_data.SequenceData`; the validation rules
they share are described in :mod:`torchrec_mamba.data.readers`.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from torchrec_mamba.data._text import (
    _bad_token_message,
    _bulk_read,
    _check_file,
    _check_nonnegative,
    _csv_line_of_row,
    _csv_rows,
    _is_number,
    _is_uint,
    _read_text,
    _scan_for_bad_row,
)
from torchrec_mamba.data.sequence_data import SequenceData, _assemble, _group_events

__all__ = ["read_sasrec", "read_movielens", "read_csv"]

logger = logging.getLogger(__name__)

_SASREC_LINE = re.compile(r"[ \t]*[0-9]+(?:[ \t]+[0-9]+)*[ \t]*", re.ASCII)


# --- SASRec txt -------------------------------------------------------------------------------
def read_sasrec(path: str | Path) -> SequenceData:
    """Read the SASRec / S3-Rec text format: one line per user, ``user item1 item2 ...``.

    Items are in time order. Whitespace (spaces or tabs) separates ids. Each user appears on one
    line only; a repeated user is an error. A line with a user and no items is skipped and
    counted in ``stats["empty_users"]``.

    Args:
        path (str | Path): the text file (``.gz`` allowed), e.g. ``shared/data/amazon-beauty/Beauty.txt``.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "seq.txt")
        >>> _ = open(p, "w").write("1 5 7 5\\n2 7 9\\n")
        >>> data = read_sasrec(p)
        >>> data.user_ids.tolist(), [s.tolist() for s in data.sequences]
        ([1, 2], [[1, 2, 1], [2, 3]])

    Returns:
        SequenceData: users in file order.
    """
    p = _check_file(path)
    text = _read_text(p)
    lines = text.split("\n") if text else []
    users, lengths, items, empty = _parse_sasrec_lines(p, lines)
    if not users:
        raise ValueError(f"{p}: no interactions found")
    try:
        user_arr = np.array(users, dtype=np.int64)
        item_arr = np.array(items, dtype=np.int64)
    except OverflowError:
        for line_no, line in enumerate(lines, start=1):
            for tok in line.split():
                if not _is_uint(tok):
                    raise ValueError(f"{p}:{line_no}: {_bad_token_message(tok, 'id')}") from None
        raise
    if empty:
        logger.warning("%s: skipped %d users with no items", p, empty)
    stats = {"empty_users": empty}
    return _assemble(user_arr, item_arr, np.array(lengths, dtype=np.int64), str(p), stats)


def _parse_sasrec_lines(p: Path, lines: list[str]) -> tuple[list[int], list[int], list[int], int]:
    """``(users, lengths, flat items, empty users)`` of SASRec lines; the first bad line raises."""
    users: list[int] = []
    lengths: list[int] = []
    items: list[int] = []
    empty = 0
    first_line_of: dict[int, int] = {}
    fullmatch = _SASREC_LINE.fullmatch
    for line_no, line in enumerate(lines, start=1):
        if fullmatch(line) is None:
            if not line.strip():
                raise ValueError(
                    f"{p}:{line_no}: blank line inside the file (only trailing blank lines are "
                    "allowed; remove it if the rest of the file is intact)"
                )
            for tok in line.split():
                if not _is_uint(tok):
                    raise ValueError(f"{p}:{line_no}: {_bad_token_message(tok, 'id')}")
            raise ValueError(f"{p}:{line_no}: cannot parse line {line[:80]!r}")
        tokens = line.split()
        if max(map(len, tokens)) > 18:  # int() refuses > 4300 digits, so check long ones first
            bad = next((t for t in tokens if not _is_uint(t)), None)
            if bad is not None:
                raise ValueError(f"{p}:{line_no}: {_bad_token_message(bad, 'id')}")
            tokens = [t.lstrip("0") or "0" for t in tokens]
        vals = list(map(int, tokens))
        if len(vals) == 1:
            empty += 1
            continue
        seen_on = first_line_of.setdefault(vals[0], line_no)
        if seen_on != line_no:
            raise ValueError(
                f"{p}:{line_no}: user {vals[0]} already appeared on line {seen_on} "
                "(one line per user expected)"
            )
        users.append(vals[0])
        lengths.append(len(vals) - 1)
        items.extend(vals[1:])
    return users, lengths, items, empty


# --- MovieLens ------------------------------------------------------------------------------------
_ML_COLUMNS = ["user", "item", "rating", "timestamp"]


def read_movielens(path: str | Path) -> SequenceData:
    """Read MovieLens ratings: ``ratings.dat`` (``user::item::rating::timestamp``) or ml-100k ``u.data``.

    The separator (``::`` or tab) is detected from the first line; ``.gz`` files are
    decompressed. Each user's ratings are sorted by timestamp; equal timestamps keep file order.
    Every rating counts as an interaction (no rating threshold), as in SASRec / Mamba4Rec.

    Args:
        path (str | Path): the ratings file.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ratings.dat")
        >>> _ = open(p, "w").write("1::20::5::300\\n1::10::3::100\\n2::20::4::50\\n")
        >>> data = read_movielens(p)
        >>> data.user_ids.tolist(), [data.raw_item_ids[s].tolist() for s in data.sequences]
        ([1, 2], [[10, 20], [20]])

    Returns:
        SequenceData: users sorted by raw id.
    """
    p = _check_file(path)
    text = _read_text(p)
    if not text:
        raise ValueError(f"{p}: no interactions found")
    first_line = text.split("\n", 1)[0]
    if "::" in first_line:
        sep = "::"
    elif "\t" in first_line:
        sep = "\t"
    else:
        raise ValueError(
            f"{p}:1: cannot detect the separator: expected 'user::item::rating::timestamp' "
            f"(ratings.dat) or tab-separated 'user item rating timestamp' (u.data), "
            f"got {first_line[:80]!r}"
        )
    bulk = text.replace("::", "\t") if sep == "::" else text
    # a tab in a '::' file would become a separator in `bulk`: let the line scan name it
    mixed = sep == "::" and "\t" in text
    frame = None if mixed else _bulk_read(
        bulk, sep="\t", header=None, names=_ML_COLUMNS, quoting=csv.QUOTE_NONE
    )
    if frame is None or not _ml_frame_ok(frame):
        lines = text.split("\n")
        _scan_for_bad_row(
            p,
            ((i, line.split(sep)) for i, line in enumerate(lines, start=1)),
            _ML_COLUMNS,
            {0: _is_uint, 1: _is_uint, 2: _is_number, 3: _is_uint},
        )
        raise ValueError(f"{p}: could not parse the file (no single bad line found)")
    users = frame["user"].to_numpy(np.int64)
    items = frame["item"].to_numpy(np.int64)
    times = frame["timestamp"].to_numpy(np.int64)
    _check_nonnegative(p, {"user": users, "item": items, "timestamp": times}, lambda r: r + 1)
    return _group_events(users, items, times, str(p), {})


def _ml_frame_ok(frame: pd.DataFrame) -> bool:
    for col in ("user", "item", "timestamp"):
        if frame[col].dtype != np.int64:  # uint64 / object / float (NaN) all need the slow scan
            return False
    rating = frame["rating"]
    return bool(
        pd.api.types.is_numeric_dtype(rating.dtype) and np.isfinite(rating.to_numpy(float)).all()
    )


# --- CSV --------------------------------------------------------------------------------------
def read_csv(
    path: str | Path,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = "timestamp",
    sep: str = ",",
    category_col: str | None = None,
) -> SequenceData:
    """Read an event table with a header row; each user's events are sorted by time.

    Other columns are ignored. With ``time_col=None`` file order is the time order.

    Args:
        path (str | Path): the table (``.gz`` allowed).
        user_col (str): user id column. Default: ``"user"``.
        item_col (str): item id column. Default: ``"item"``.
        time_col (str | None): timestamp column (non-negative integers), or None to keep file
            order. Default: ``"timestamp"``.
        sep (str): field separator. Default: ``","``.
        category_col (str | None): optional item category column (non-negative integers); each
            item takes the category of its first event in (user, time) order, and events whose
            category differs are counted in ``stats["category_conflicts"]``. Default: None.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "events.csv")
        >>> _ = open(p, "w").write("user,item,timestamp\\n7,3,20\\n7,4,10\\n7,3,10\\n")
        >>> data = read_csv(p)
        >>> [data.raw_item_ids[s].tolist() for s in data.sequences]
        [[4, 3, 3]]

    Returns:
        SequenceData: users sorted by raw id.
    """
    p = _check_file(path)
    text = _read_text(p)
    if not text:
        raise ValueError(f"{p}: empty file (a header row is required)")
    if not isinstance(sep, str) or len(sep) != 1:
        raise ValueError(f"sep must be one character, got {sep!r}")
    wanted = {"user": user_col, "item": item_col}
    if time_col is not None:
        wanted["timestamp"] = time_col
    if category_col is not None:
        wanted["category"] = category_col
    header = _csv_header(p, text, sep, wanted)
    frame = _bulk_read(text, sep=sep, header=0)
    names = list(wanted.values())
    if frame is not None and len(frame) == 0:
        raise ValueError(f"{p}: no interactions found (header only)")
    if (
        frame is None
        or len(frame.columns) != len(header)
        or not all(frame[c].dtype == np.int64 for c in names)
    ):
        col_index = {name: header.index(name) for name in names}
        rows = _csv_rows(p, text, sep)
        next(rows)
        _scan_for_bad_row(p, rows, header, {col_index[name]: _is_uint for name in names})
        raise ValueError(f"{p}: could not parse the file (no single bad line found)")
    arrays = {role: frame[name].to_numpy(np.int64) for role, name in wanted.items()}
    _check_nonnegative(p, arrays, lambda row: _csv_line_of_row(p, text, sep, row))
    return _group_events(
        arrays["user"], arrays["item"], arrays.get("timestamp"), str(p), {}, arrays.get("category")
    )


def _csv_header(p: Path, text: str, sep: str, wanted: dict[str, str]) -> list[str]:
    """The header row's column names; raise at ``PATH:1`` if a ``wanted`` column is missing."""
    header_line = text.split("\n", 1)[0]
    if not header_line.strip():
        raise ValueError(f"{p}:1: blank header line (a header row is required)")
    header = next(_csv_rows(p, header_line, sep))[1]
    for role, name in wanted.items():
        if name not in header:
            raise ValueError(
                f"{p}:1: {role} column {name!r} not in the header; columns are {header}"
            )
    if len(set(header)) != len(header):
        raise ValueError(f"{p}:1: repeated column names in the header {header}")
    return header
