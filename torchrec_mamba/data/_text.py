"""Text helpers of the readers: checked file reading, id-token validation, bulk parse, line scan.

Every failure is a ``ValueError("PATH[:LINE]: ...")`` naming the first bad row; see
:mod:`torchrec_mamba.data.readers` for the rules.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

_INT_TOKEN = re.compile(r"[0-9]+", re.ASCII)
_INT64_MAX = np.iinfo(np.int64).max


# --- files and decoding -----------------------------------------------------------------------
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


# --- tokens ------------------------------------------------------------------------------------
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


# --- bulk parse and line scan -----------------------------------------------------------------
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
