"""Error handling of the raw-file readers: every failure becomes ``ValueError("PATH[:LINE]: ...")``.

pandas reads the raw RetailRocket files (plain or compressed, chunked for the large property
files). What it raises on bad bytes names neither the file nor the line (``UnicodeDecodeError``,
``EmptyDataError``, ``BadGzipFile``, ``EOFError``), and what it silently accepts can be wrong
(``1e30`` or ``99999999999999999999`` as an id becomes a float that does not fit int64). The
helpers here turn both into one-line errors:

* :func:`read_errors` wraps a pandas read and re-raises every known failure naming the file, and
  the line where one can be found (the first undecodable byte is found by a streaming scan);
* :func:`as_int64` checks an id column (missing, non-numeric, non-integer, out of int64 range)
  and names the line of the first bad value; :func:`line_of_row` maps a data row to its line.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

__all__ = ["as_int64", "first_bad_int", "line_of_row", "open_binary", "read_errors"]

_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_EXACT = 2**53  # floats above this are not exact integers
_INT64_MAX = int(np.iinfo(np.int64).max)
_INT_TEXT = r"\s*[+-]?[0-9]+(?:\.0*)?\s*"  # "7", " -7 ", "7.0" (pandas writes ints with NaN so)


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed as pandas does for ``.gz`` / ``.bz2`` / ``.xz``."""
    opener = _OPENERS.get(path.suffix)
    return opener(path, "rb") if opener is not None else open(path, "rb")  # type: ignore[operator]


def _first_undecodable(path: Path) -> str:
    """``PATH:LINE: ...`` of the first byte that is not UTF-8 (a streaming scan, any size)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open_binary(path) as f:
        for line_no, line in enumerate(f, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError as e:
                return (
                    f"{path}:{line_no}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column "
                    f"{e.start + 1}); re-encode the file as UTF-8"
                )
    return f"{path}: not valid UTF-8; re-encode the file as UTF-8"


@contextmanager
def read_errors(path: Path) -> Iterator[None]:
    """Re-raise what pandas raises on a bad file as one-line ``ValueError("PATH[:LINE]: ...")``."""
    try:
        yield
    except UnicodeDecodeError:
        raise ValueError(_first_undecodable(path)) from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file (a header row is required)") from None
    except pd.errors.ParserError as e:
        text = " ".join(str(e).split())
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
        if m:
            raise ValueError(
                f"{path}:{m.group(2)}: expected {m.group(1)} fields, got {m.group(3)}"
            ) from None
        raise ValueError(f"{path}: malformed CSV: {text}") from None
    except (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError) as e:
        raise ValueError(f"{path}: not a valid compressed file ({e})") from None
    except OSError as e:
        if "Invalid data stream" in str(e):  # bz2
            raise ValueError(f"{path}: not a valid compressed file ({e})") from None
        raise


def line_of_row(path: Path, row: int) -> int:
    """1-based line of data row ``row`` (0-based; blank lines skipped as pandas does).

    Quoted fields that span lines are not followed; the header is line 1.
    """
    seen = -1
    with open_binary(path) as raw:
        for line_no, line in enumerate(raw, start=1):
            if line_no == 1 or not line.strip():
                continue
            seen += 1
            if seen == row:
                return line_no
    return row + 2  # not reached for a row pandas read; keeps the message well formed


def first_bad_int(values: pd.Series) -> tuple[int, str] | None:
    """Position and kind of the first value that is not an int64 integer.

    Kinds: ``"missing"``, ``"non-numeric"``, ``"non-integer"`` (``1.5``, ``1e3``, ``inf``) and
    ``"out-of-range"`` (beyond int64, or a float beyond 2**53 that is no exact integer).
    """
    if values.dtype == np.uint64:
        big = values.to_numpy() > _INT64_MAX
        return (int(np.flatnonzero(big)[0]), "out-of-range") if big.any() else None
    missing = values.isna().to_numpy()
    if pd.api.types.is_float_dtype(values.dtype):
        arr = values.to_numpy(dtype=np.float64)
        finite = np.isfinite(arr)
        nonint = ~missing & (~finite | (np.where(finite, arr, 0.0) % 1 != 0))
        big = ~missing & ~nonint & (np.abs(np.where(finite, arr, 0.0)) > _EXACT)
        nonnum = np.zeros_like(missing)
    else:
        text = values.astype(str).where(~values.isna(), "")
        missing = missing | (text.str.strip() == "").to_numpy()
        is_int = text.str.fullmatch(_INT_TEXT).to_numpy(dtype=bool)
        numeric = pd.to_numeric(text, errors="coerce").notna().to_numpy()
        nonnum = ~missing & ~is_int & ~numeric
        nonint = ~missing & ~is_int & numeric
        digits = _digits(text)
        n = digits.str.len()
        too_big = (n > 19) | ((n == 19) & (digits > str(_INT64_MAX)))
        big = is_int & too_big.to_numpy(dtype=bool)
    bad = missing | nonnum | nonint | big
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    kind = (
        "missing" if missing[i] else "non-numeric" if nonnum[i] else
        "non-integer" if nonint[i] else "out-of-range"
    )
    return i, kind


def _digits(text: pd.Series) -> pd.Series:
    """The digits of integer text without sign, leading zeros or a ``.0`` tail."""
    return (
        text.str.strip().str.lstrip("+-").str.replace(r"\.0*$", "", regex=True).str.lstrip("0")
    )


def as_int64(
    values: pd.Series, path: Path, column: str, row_offset: int = 0, *, non_negative: bool = False
) -> np.ndarray:
    """Column as int64; raise ``PATH:LINE: ...`` at a missing, bad or out-of-range value.

    Args:
        values (pd.Series): the column as pandas read it (any dtype).
        path (Path): the file, for messages.
        column (str): the column name, for messages.
        row_offset (int): data row of ``values.iloc[0]`` in the file (chunked reads). Default: 0.
        non_negative (bool): also refuse negative values. Default: False.

    Returns:
        np.ndarray: ``(len(values),)`` int64.
    """
    dtype = values.dtype
    if pd.api.types.is_signed_integer_dtype(dtype) and not pd.api.types.is_extension_array_dtype(
        dtype
    ):
        out = values.to_numpy(dtype=np.int64)
    else:
        bad = first_bad_int(values)
        if bad is not None:
            i, kind = bad
            value = values.iloc[i]
            shown = repr(value) if len(str(value)) <= 40 else f"{str(value)[:40]!r}..."
            expected = "an integer that fits in int64" if kind == "out-of-range" else "an integer"
            raise ValueError(
                f"{path}:{line_of_row(path, row_offset + i)}: {kind} {column} {shown} "
                f"(expected {expected})"
            )
        out = _to_int64(values)
    if non_negative and (out < 0).any():
        i = int(np.flatnonzero(out < 0)[0])
        raise ValueError(
            f"{path}:{line_of_row(path, row_offset + i)}: negative {column} {int(out[i])}; "
            f"{int((out < 0).sum())} negative value(s) in this column"
        )
    return out


def _to_int64(values: pd.Series) -> np.ndarray:
    """Convert a column that :func:`first_bad_int` accepted."""
    if pd.api.types.is_float_dtype(values.dtype):
        return values.to_numpy(dtype=np.float64).astype(np.int64)  # exact: |v| <= 2**53
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.to_numpy(dtype=np.int64)
    text = values.astype(str).str.strip()
    sign = np.where(text.str.startswith("-").to_numpy(), -1, 1)
    digits = _digits(text).replace("", "0")
    return digits.to_numpy(dtype=str).astype(np.int64) * sign
