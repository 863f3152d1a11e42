"""Fuzz tests of the ``sasrec:``, ``movielens:`` and ``csv:`` readers (hypothesis).

Every outcome must be a parse that matches what was written, or a ``ValueError`` whose message
starts with ``PATH:LINE: `` (or ``PATH: `` for whole-file problems such as an empty file or a
broken gzip stream); any other exception fails the test. Where the test knows which line it
broke, the message must name exactly that line.

The runs are derandomized (the same examples in CI every time) and bounded; set
``FUZZ_EXAMPLES`` (and ``FUZZ_RANDOM=1``) to hunt longer locally, e.g. ``FUZZ_EXAMPLES=2000``.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchrec_mamba.data.readers import SequenceData, read_csv, read_movielens, read_sasrec

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # ms per example: a hang fails instead of blocking CI (loaded 2-core runner)
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",  # FUZZ_RANDOM=1: new examples each run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
Reader = Callable[[Path], SequenceData]
READERS: dict[str, tuple[Reader, str]] = {
    "sasrec": (read_sasrec, "s.txt"),
    "movielens": (read_movielens, "ratings.dat"),
    "csv": (read_csv, "events.csv"),
}
_HEADER = b"user,item,timestamp\n"


def _write(folder: Path, name: str, data: bytes, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _outcome(reader: Reader, path: Path) -> SequenceData | tuple[int | None, str]:
    """The parse, or (line or None, message) of the ValueError; other exceptions propagate."""
    try:
        data = reader(path)
    except ValueError as e:
        msg = str(e)
        m = re.match(re.escape(str(path)) + r"(?::(\d+))?: \S", msg)
        assert m is not None, f"message does not start with '{path}:[LINE:] ': {msg!r}"
        assert "\n" not in msg, f"message is not one line: {msg!r}"
        return (int(m.group(1)) if m.group(1) else None, msg)
    _check_parse(data)
    return data


def _check_parse(data: SequenceData) -> None:
    assert data.num_users >= 1
    assert all(s.dtype == np.int64 and len(s) >= 1 for s in data.sequences)
    flat = np.concatenate(data.sequences)
    assert flat.min() >= 1 and flat.max() == data.num_items
    assert (np.diff(data.raw_item_ids[1:]) > 0).all()


# --- what a valid file holds ------------------------------------------------------------------
_ids = st.integers(0, 10**12)
_users = st.lists(
    st.lists(st.tuples(_ids, st.integers(0, 10**9)), min_size=1, max_size=6),
    min_size=1,
    max_size=8,
)


def _render(fmt: str, users: list[list[tuple[int, int]]]) -> tuple[list[bytes], dict[int, list[int]]]:
    """Lines of a valid file in ``fmt`` and the expected raw item sequence of each user."""
    lines: list[bytes] = []
    expected: dict[int, list[int]] = {}
    for u, events in enumerate(users, start=1):
        if fmt == "sasrec":
            lines.append(" ".join(str(v) for v in [u] + [i for i, _ in events]).encode())
            expected[u] = [i for i, _ in events]
            continue
        for item, t in events:
            line = f"{u}::{item}::3::{t}" if fmt == "movielens" else f"{u},{item},{t}"
            lines.append(line.encode())
        expected[u] = [i for i, _ in sorted(events, key=lambda e: e[1])]  # stable: ties keep order
    return lines, expected


def _join(fmt: str, lines: list[bytes]) -> bytes:
    return (_HEADER if fmt == "csv" else b"") + b"".join(line + b"\n" for line in lines)


def _raw(data: SequenceData) -> dict[int, list[int]]:
    return {int(u): data.raw_item_ids[s].tolist() for u, s in zip(data.user_ids, data.sequences, strict=True)}


# --- the properties ---------------------------------------------------------------------------
_PREFIX = {"sasrec": b"1 2 3\n", "movielens": b"1::2::3::4\n", "csv": _HEADER + b"1,2,3\n"}


@FUZZ
@given(
    fmt=st.sampled_from(sorted(READERS)),
    blob=st.binary(max_size=200),
    gz=st.booleans(),
    prefixed=st.booleans(),
)
def test_random_bytes_parse_or_name_the_file(
    tmp_path_factory, fmt: str, blob: bytes, gz: bool, prefixed: bool
) -> None:
    reader, name = READERS[fmt]
    content = (_PREFIX[fmt] if prefixed else b"") + blob  # a valid start gets past the header
    path = _write(tmp_path_factory.mktemp(fmt), name, content, gz)
    _outcome(reader, path)
    if gz:  # bytes that are not gzip at all, under a .gz name
        _outcome(reader, _write(tmp_path_factory.mktemp(fmt), name + ".gz", blob))


_PIECES = ["1", "22", "0", "-3", "x", "1.5", "", " ", "\t", "::", ",", "99999999999999999999",
           "1e3", "\x00", "\x0c", "\u00e9", "\u0661", "\r", "\ufeff", '"', "nan", "+4"]


@FUZZ
@given(
    fmt=st.sampled_from(sorted(READERS)),
    lines=st.lists(st.lists(st.sampled_from(_PIECES), max_size=8).map("".join), max_size=6),
    bad_byte=st.sampled_from([b"", b"\xff", b"\xc3", b"\x80"]),
)
def test_valid_looking_lines_parse_or_name_the_line(
    tmp_path_factory, fmt: str, lines: list[str], bad_byte: bytes
) -> None:
    reader, name = READERS[fmt]
    body = [line.encode() for line in lines]
    if body and bad_byte:
        body[len(body) // 2] += bad_byte
    path = _write(tmp_path_factory.mktemp(fmt), name, _join(fmt, body))
    result = _outcome(reader, path)
    if isinstance(result, tuple) and result[0] is not None:
        assert 1 <= result[0] <= len(body) + 1, result


@FUZZ
@given(fmt=st.sampled_from(sorted(READERS)), users=_users, gz=st.booleans())
def test_valid_files_parse_to_what_was_written(tmp_path_factory, fmt: str, users, gz: bool) -> None:
    reader, name = READERS[fmt]
    lines, expected = _render(fmt, users)
    path = _write(tmp_path_factory.mktemp(fmt), name, _join(fmt, lines), gz)
    result = _outcome(reader, path)
    assert isinstance(result, SequenceData), result
    assert _raw(result) == expected


_CORRUPTIONS = {
    "sasrec": ["x", "-4", "1.5", "", "99999999999999999999", "9" * 5000, "\xff", "1;2"],
    "movielens": ["x", "-4", "", "99999999999999999999", "9" * 5000, "\xff", "1.5", "1::2"],
    "csv": ["x", "-4", "", "99999999999999999999", "9" * 5000, "\xff", "1.5", "1,2"],
}


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(sorted(READERS)), users=_users)
def test_one_broken_line_is_the_line_named(tmp_path_factory, data, fmt: str, users) -> None:
    reader, name = READERS[fmt]
    lines, _ = _render(fmt, users)
    k = data.draw(st.integers(0, len(lines) - 1), label="broken line")
    sep = {"sasrec": b" ", "movielens": b"::", "csv": b","}[fmt]
    fields = lines[k].split(sep)
    col = data.draw(st.integers(0, len(fields) - 1), label="column")
    if fmt == "movielens" and col == 2:
        col = 3  # the rating may be any number; corrupt the timestamp instead
    bad = data.draw(st.sampled_from(_CORRUPTIONS[fmt]), label="bad token")
    if bad == "" and fmt == "sasrec":
        bad = "\x00"  # an empty token just joins two separators: still a valid line
    fields[col] = bad.encode("latin-1") if bad == "\xff" else bad.encode()
    lines[k] = sep.join(fields)
    path = _write(tmp_path_factory.mktemp(fmt), name, _join(fmt, lines))
    result = _outcome(reader, path)
    assert isinstance(result, tuple), f"line {k + 1} = {lines[k]!r} was accepted"
    header = 1 if fmt == "csv" else 0
    assert result[0] == k + 1 + header, result


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(sorted(READERS)), users=_users, gz=st.booleans())
def test_truncated_files_parse_a_prefix_or_name_the_last_line(
    tmp_path_factory, data, fmt: str, users, gz: bool
) -> None:
    reader, name = READERS[fmt]
    lines, _ = _render(fmt, users)
    blob = _join(fmt, lines)
    stored = gzip.compress(blob, mtime=0) if gz else blob
    cut = data.draw(st.integers(0, len(stored) - 1), label="cut at byte")
    folder = tmp_path_factory.mktemp(fmt)
    path = folder / (name + ".gz" if gz else name)
    path.write_bytes(stored[:cut])
    result = _outcome(reader, path)
    if gz:
        return  # a cut gzip stream is a whole-file error or (cut in the trailer) a full parse
    kept = blob[:cut]
    if isinstance(result, tuple) and result[0] is not None:
        # only the cut line can be broken: it is the last one of what is left
        assert result[0] == kept.count(b"\n") + (0 if kept.endswith(b"\n") else 1), result
