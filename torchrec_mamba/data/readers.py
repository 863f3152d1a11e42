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

The container is in :mod:`torchrec_mamba.data.sequence_data`, the readers in
:mod:`torchrec_mamba.data.formats` and their shared text checks in ``torchrec_mamba.data._text``;
the public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable

from torchrec_mamba.data.formats import read_csv, read_movielens, read_sasrec
from torchrec_mamba.data.sequence_data import SequenceData

__all__ = ["SequenceData", "read_sasrec", "read_movielens", "read_csv", "load_sequences", "READERS"]


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
