"""Readers for common public interaction formats, giving one time-ordered item sequence per user.

Every reader returns a :class:`SequenceData` with item ids re-indexed densely to ``1..num_items``
in increasing order of the raw id (``0`` is reserved for padding; raw ids that already are
``1..N`` keep their values). Users are rows, sorted by raw user id (``read_sasrec`` keeps file
order).

Validation rules, the same in every reader: ids and timestamps must be non-negative integers
written in ASCII digits, every row must have the expected number of columns, and the first bad
row is reported as ``ValueError("PATH:LINE: ...")``. Nothing is dropped silently:

* blank lines at the end of a file are ignored; a blank line anywhere else is an error (in these
  formats it means a file was cut or concatenated badly);
* a SASRec line holding a user id and no items is skipped, counted in
  ``SequenceData.stats["empty_users"]`` and logged, because it holds no interaction;
* repeated items, consecutive or not, are kept: a user who bought the same thing twice did so.

Large files are parsed in bulk with pandas / numpy; only when that fails is the file scanned line
by line to find and name the first bad row.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import logging
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["SequenceData", "read_sasrec", "read_movielens", "read_csv", "load_sequences", "READERS"]

logger = logging.getLogger(__name__)

_INT_TOKEN = re.compile(r"[0-9]+", re.ASCII)
_SASREC_LINE = re.compile(r"[ \t]*[0-9]+(?:[ \t]+[0-9]+)*[ \t]*", re.ASCII)
_INT64_MAX = np.iinfo(np.int64).max


@dataclass
class SequenceData:
    """Time-ordered item sequences, one per user, with dense item ids.

    Args:
        sequences (list[np.ndarray]): one int64 array per user, oldest first, ids in
            ``1..num_items``.
        num_items (int): number of distinct items (the largest dense id).
        user_ids (np.ndarray): ``(U,)`` int64 raw user id of each sequence.
        raw_item_ids (np.ndarray): ``(num_items + 1,)`` int64 raw id of each dense id; entry 0
            (padding) is ``-1``.
        item_category (np.ndarray | None): ``(num_items + 1,)`` int64 dense category id of each
            dense item id (entry 0 is 0), when the source had categories. Default: None.
        num_categories (int): number of distinct categories (0 when there are none). Default: 0.
        source (str): where the data came from, for messages. Default: ``""``.
        stats (dict[str, int]): counts of what the reader saw and skipped. Default: empty.

    Example::

        >>> data = SequenceData.from_lists([[10, 30], [30, 20, 20]])
        >>> data.num_items, [s.tolist() for s in data.sequences]
        (3, [[1, 3], [3, 2, 2]])
        >>> data.item_map[30], data.raw_item_ids.tolist()
        (3, [-1, 10, 20, 30])
    """

    sequences: list[np.ndarray]
    num_items: int
    user_ids: np.ndarray
    raw_item_ids: np.ndarray
    item_category: np.ndarray | None = None
    num_categories: int = 0
    source: str = ""
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.user_ids):
            raise ValueError(
                f"{len(self.sequences)} sequences but {len(self.user_ids)} user ids ({self.source})"
            )
        if self.raw_item_ids.shape != (self.num_items + 1,):
            raise ValueError(
                f"raw_item_ids has shape {self.raw_item_ids.shape}, expected ({self.num_items + 1},)"
            )
        if self.item_category is not None and self.item_category.shape != (self.num_items + 1,):
            raise ValueError(
                f"item_category has shape {self.item_category.shape}, "
                f"expected ({self.num_items + 1},)"
            )

    @property
    def num_users(self) -> int:
        """Number of sequences ``U``."""
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        """Total number of events over all sequences."""
        return int(sum(len(s) for s in self.sequences))

    @property
    def item_map(self) -> dict[int, int]:
        """Raw item id -> dense id (built on each call; use :meth:`encode_items` for arrays)."""
        return {int(r): i + 1 for i, r in enumerate(self.raw_item_ids[1:])}

    @property
    def user_map(self) -> dict[int, int]:
        """Raw user id -> row index in :attr:`sequences`."""
        return {int(u): i for i, u in enumerate(self.user_ids)}

    def encode_items(self, raw: np.ndarray) -> np.ndarray:
        """Map raw item ids to dense ids; raise ``ValueError`` naming the first unknown raw id.

        Args:
            raw (np.ndarray): raw ids, any shape.

        Returns:
            np.ndarray: int64 dense ids, same shape.
        """
        raw = np.asarray(raw, dtype=np.int64)
        known = self.raw_item_ids[1:]  # sorted
        pos = np.searchsorted(known, raw)
        ok = (pos < len(known)) & (known[np.minimum(pos, len(known) - 1)] == raw)
        if not ok.all():
            bad = raw[~ok].ravel()[0]
            raise ValueError(f"unknown raw item id {int(bad)} ({self.source})")
        return pos + 1

    @classmethod
    def from_lists(
        cls,
        sequences: Iterable[Iterable[int]],
        user_ids: Iterable[int] | None = None,
        source: str = "<lists>",
    ) -> SequenceData:
        """Build from raw (not yet dense) item-id lists, one per user, already in time order.

        Args:
            sequences (Iterable[Iterable[int]]): raw item ids per user, non-negative.
            user_ids (Iterable[int] | None): raw user ids. Default: ``0..U-1``.
            source (str): name used in messages. Default: ``"<lists>"``.

        Returns:
            SequenceData: with dense ids; empty sequences raise ``ValueError``.
        """
        seqs = [np.asarray(list(s), dtype=np.int64) for s in sequences]
        users = (
            np.arange(len(seqs), dtype=np.int64)
            if user_ids is None
            else np.asarray(list(user_ids), dtype=np.int64)
        )
        for i, s in enumerate(seqs):
            if s.size == 0:
                raise ValueError(f"{source}: sequence {i} is empty")
            if s.min() < 0:
                raise ValueError(f"{source}: sequence {i} has negative item id {int(s.min())}")
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        return _assemble(users, flat, lengths, source, {})


# --- shared helpers ---------------------------------------------------------------------------
def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"interaction file not found: {p}")
    if not p.is_file():
        raise FileNotFoundError(f"not a regular file: {p}")
    return p


def _decode_error(path: Path, raw: bytes, err: UnicodeDecodeError) -> ValueError:
    """``PATH:LINE: ...`` for the first byte that is not UTF-8 (lines counted on ``\\n``)."""
    line = raw.count(b"\n", 0, err.start) + 1
    column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    return ValueError(
        f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
        "re-encode the file as UTF-8"
    )


def _read_text(path: Path) -> str:
    """Whole file as text (``.gz`` decompressed, UTF-8, ``\\r\\n`` -> ``\\n``), trailing blank lines cut.

    A byte that is not UTF-8, a broken gzip stream and a carriage return inside a line raise
    ``ValueError`` naming the file (and the line where there is one). A UTF-8 byte-order mark
    is dropped.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a valid gzip file ({e})") from None
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[start:].decode("utf-8") if start else raw.decode("utf-8")
    except UnicodeDecodeError as e:
        e.start += start
        raise _decode_error(path, raw, e) from None
    cr = text.find("\r")
    if cr >= 0:
        text = text.replace("\r\n", "\n")
        cr = text.find("\r")
    if cr >= 0:
        raise ValueError(
            f"{path}:{text.count(chr(10), 0, cr) + 1}: carriage return inside a line "
            "(only \\n or \\r\\n line endings are read)"
        )
    end = len(text)
    while end > 0:
        nl = text.rfind("\n", 0, end)
        if text[nl + 1 : end].strip():
            break
        end = max(nl, 0)
    return text[:end]


def _assemble(
    users: np.ndarray,
    flat_raw_items: np.ndarray,
    lengths: np.ndarray,
    source: str,
    stats: dict[str, int],
    flat_categories: np.ndarray | None = None,
) -> SequenceData:
    """Dense re-indexing and splitting of concatenated per-user sequences."""
    raw_items, dense = np.unique(flat_raw_items, return_inverse=True)  # sorted raw ids
    dense = (dense.reshape(-1) + 1).astype(np.int64)
    raw_item_ids = np.concatenate([np.array([-1], dtype=np.int64), raw_items.astype(np.int64)])
    sequences = np.split(dense, np.cumsum(lengths)[:-1]) if len(lengths) else []
    item_category = None
    num_categories = 0
    if flat_categories is not None:
        raw_cats, dense_cats = np.unique(flat_categories, return_inverse=True)
        dense_cats = dense_cats.reshape(-1) + 1
        num_categories = len(raw_cats)
        # one category per item: the one of its first event in (user, time) order
        first_dense, first_pos = np.unique(dense, return_index=True)
        item_category = np.zeros(len(raw_items) + 1, dtype=np.int64)
        item_category[first_dense] = dense_cats[first_pos]
        conflicts = int((item_category[dense] != dense_cats).sum())
        stats["category_conflicts"] = conflicts
        if conflicts:
            logger.warning(
                "%s: %d events carry a category different from their item's first category; "
                "each item keeps the category of its first event",
                source,
                conflicts,
            )
    stats.setdefault("users", len(sequences))
    stats.setdefault("items", len(raw_items))
    stats.setdefault("interactions", int(len(flat_raw_items)))
    logger.info(
        "%s: %d users, %d items, %d interactions",
        source,
        len(sequences),
        len(raw_items),
        len(flat_raw_items),
    )
    return SequenceData(
        sequences=list(sequences),
        num_items=int(len(raw_items)),
        user_ids=users.astype(np.int64),
        raw_item_ids=raw_item_ids,
        item_category=item_category,
        num_categories=num_categories,
        source=source,
        stats=stats,
    )


def _group_events(
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray | None,
    source: str,
    stats: dict[str, int],
    categories: np.ndarray | None = None,
) -> SequenceData:
    """Sort events by (user, time), stable in file order for ties, and build sequences."""
    if times is None:
        order = np.argsort(users, kind="stable")
    else:
        order = np.argsort(times, kind="stable")
        order = order[np.argsort(users[order], kind="stable")]
    users_sorted = users[order]
    uniq, starts = np.unique(users_sorted, return_index=True)
    lengths = np.diff(np.append(starts, len(users_sorted)))
    cats = None if categories is None else categories[order]
    return _assemble(uniq, items[order], lengths, source, stats, cats)


def _bad_token_message(token: str, what: str) -> str:
    if token == "":
        return f"empty {what}"
    if token.lstrip().startswith("-") and _INT_TOKEN.fullmatch(token.strip()[1:]):
        return f"negative {what} {token.strip()[:40]!r}"
    if _INT_TOKEN.fullmatch(token.strip()) and not _fits_int64(token.strip()):
        return f"{what} {_clip(token.strip())} does not fit in int64"
    return f"non-numeric {what} {_clip(token)}"


def _clip(token: str, width: int = 40) -> str:
    """``repr`` of a token, cut to ``width`` characters so a huge token stays one short line."""
    return repr(token) if len(token) <= width else repr(token[:width]) + f"... ({len(token)} chars)"


def _fits_int64(digits: str) -> bool:
    """Whether an ASCII digit string is ``<= 2**63 - 1``, without ``int()`` on huge strings.

    Python refuses ``int()`` of more than 4300 digits with a ``ValueError`` that names nothing.
    """
    d = digits.lstrip("0")
    return len(d) < 19 or (len(d) == 19 and int(d) <= _INT64_MAX)


def _is_uint(token: str) -> bool:
    t = token.strip()
    return bool(_INT_TOKEN.fullmatch(t)) and _fits_int64(t)


def _is_number(token: str) -> bool:
    try:
        return np.isfinite(float(token))
    except ValueError:
        return False


def _bulk_read(text: str, **kwargs: object) -> pd.DataFrame | None:
    """pandas' C parser over the whole text, or None when it fails or would drop fields.

    With ``index_col=False`` pandas drops the extra fields of rows longer than the header with
    only a ``ParserWarning``; that warning is turned into a failure here so that the caller's
    line scan names the row.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(
                io.StringIO(text),
                index_col=False,
                skip_blank_lines=False,
                engine="c",
                **kwargs,  # type: ignore[arg-type]
            )
        except (ValueError, pd.errors.ParserError, pd.errors.ParserWarning):
            return None


def _scan_for_bad_row(
    path: Path,
    rows: Iterable[tuple[int, list[str]]],
    columns: list[str],
    checks: dict[int, Callable[[str], bool]],
) -> None:
    """Raise ``ValueError`` at the first row with a wrong column count or a failed check."""
    for line_no, fields in rows:
        if len(fields) == 0 or (len(fields) == 1 and not fields[0].strip()):
            raise ValueError(f"{path}:{line_no}: blank line inside the file")
        if len(fields) != len(columns):
            raise ValueError(
                f"{path}:{line_no}: expected {len(columns)} columns "
                f"({', '.join(columns)}), got {len(fields)}"
            )
        for col, ok in checks.items():
            if not ok(fields[col]):
                what = columns[col]
                if ok is _is_uint:
                    msg = _bad_token_message(fields[col], what)
                else:
                    msg = f"non-numeric {what} {_clip(fields[col])}"
                raise ValueError(f"{path}:{line_no}: {msg}")


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
    users: list[int] = []
    lengths: list[int] = []
    items: list[int] = []
    empty = 0
    first_line_of: dict[int, int] = {}
    fullmatch = _SASREC_LINE.fullmatch
    lines = text.split("\n") if text else []
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


def _check_nonnegative(
    path: Path, columns: dict[str, np.ndarray], line_of: Callable[[int], int]
) -> None:
    """Raise at the first row holding a negative value; ``line_of(row)`` is its line number."""
    for name, values in columns.items():
        neg = np.flatnonzero(values < 0)
        if neg.size:
            row = int(neg[0])
            raise ValueError(f"{path}:{line_of(row)}: negative {name} {int(values[row])}")


def _csv_rows(path: Path, text: str, sep: str) -> Iterator[tuple[int, list[str]]]:
    """``(first line number, fields)`` of every CSV row; ``csv.Error`` becomes ``PATH:LINE``.

    A quoted field may span lines, so rows and lines are counted apart.
    """
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    start = 1
    try:
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path}:{start}: malformed CSV row ({e})") from None


def _csv_line_of_row(path: Path, text: str, sep: str, row: int) -> int:
    """Line number of data row ``row`` (0-based, after the header)."""
    if '"' not in text:
        return row + 2
    for i, (line_no, _) in enumerate(_csv_rows(path, text, sep)):
        if i == row + 1:
            return line_no
    return -1


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
    header_line = text.split("\n", 1)[0]
    if not header_line.strip():
        raise ValueError(f"{p}:1: blank header line (a header row is required)")
    header = next(_csv_rows(p, header_line, sep))[1]
    wanted = {"user": user_col, "item": item_col}
    if time_col is not None:
        wanted["timestamp"] = time_col
    if category_col is not None:
        wanted["category"] = category_col
    for role, name in wanted.items():
        if name not in header:
            raise ValueError(
                f"{p}:1: {role} column {name!r} not in the header; columns are {header}"
            )
    if len(set(header)) != len(header):
        raise ValueError(f"{p}:1: repeated column names in the header {header}")
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


# --- spec strings ---------------------------------------------------------------------------------
READERS: dict[str, Callable[[str], SequenceData]] = {
    "sasrec": read_sasrec,
    "movielens": read_movielens,
    "csv": read_csv,
}


def load_sequences(spec: str) -> SequenceData:
    """Read sequences from a ``"FORMAT:PATH"`` spec: ``sasrec:``, ``movielens:`` or ``csv:``.

    Args:
        spec (str): e.g. ``"sasrec:../shared/data/amazon-beauty/Beauty.txt"``.

    Example::

        >>> load_sequences("parquet:x")
        Traceback (most recent call last):
        ...
        ValueError: unknown data format 'parquet' in 'parquet:x'; choose one of: sasrec, movielens, csv

    Returns:
        SequenceData: see the reader of that format.
    """
    fmt, colon, path = spec.partition(":")
    choices = ", ".join(READERS)
    if not colon:
        raise ValueError(
            f"data spec {spec!r} must look like FORMAT:PATH with FORMAT one of: {choices}"
        )
    if fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r} in {spec!r}; choose one of: {choices}")
    if not path:
        raise ValueError(f"data spec {spec!r} has an empty path")
    return READERS[fmt](path)
