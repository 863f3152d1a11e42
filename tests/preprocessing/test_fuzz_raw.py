"""Fuzz tests of the RetailRocket raw-file readers (events, item properties, category tree).

Every outcome is a parse, or a ``ValueError`` whose one-line message starts with ``PATH:LINE: ``
(or ``PATH: `` for whole-file problems); any other exception fails. Where the test broke one
known line, the message must name that line. Derandomized and bounded like
``tests/data/test_fuzz_readers.py`` (``FUZZ_EXAMPLES``, ``FUZZ_RANDOM=1`` to hunt longer).
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrec_mamba_preprocessing.raw import read_category_tree, read_events, read_item_categories
from torchrec_mamba_preprocessing.report import ETLReport

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # ms per example: a hang fails instead of blocking CI
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
Reader = Callable[[Path], pd.DataFrame]
READERS: dict[str, tuple[Reader, str, str]] = {
    "events": (
        lambda p: read_events(p, ETLReport()),
        "events.csv",
        "timestamp,visitorid,event,itemid,transactionid",
    ),
    "props": (
        lambda p: read_item_categories([p], ETLReport()),
        "item_properties_part1.csv",
        "timestamp,itemid,property,value",
    ),
    "tree": (lambda p: read_category_tree(p, ETLReport()), "category_tree.csv", "categoryid,parentid"),
}


def _outcome(reader: Reader, path: Path) -> pd.DataFrame | tuple[int | None, str]:
    try:
        return reader(path)
    except ValueError as e:
        msg = str(e)
        m = re.match(re.escape(str(path)) + r"(?::(\d+))?: \S", msg)
        assert m is not None, f"message does not start with '{path}:[LINE:] ': {msg!r}"
        assert "\n" not in msg, f"message is not one line: {msg!r}"
        return (int(m.group(1)) if m.group(1) else None, msg)


def _write(folder: Path, name: str, data: bytes, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _row(kind: str, i: int, a: int, b: int) -> list[str]:
    if kind == "events":
        return [str(a), str(i), ["view", "addtocart", "transaction"][b % 3], str(b), ""]
    if kind == "props":
        return [str(a), str(i), "categoryid" if b % 2 else "available", str(b)]
    return [str(i + 1), str(a % (i + 1)) if a % 3 else ""]  # parents are earlier: no cycles


_rows = st.lists(st.tuples(st.integers(0, 10**12), st.integers(0, 10**6)), min_size=1, max_size=8)


@FUZZ
@given(
    kind=st.sampled_from(sorted(READERS)),
    blob=st.binary(max_size=200),
    with_header=st.booleans(),
    gz=st.booleans(),
)
def test_random_bytes_parse_or_name_the_file(
    tmp_path_factory, kind: str, blob: bytes, with_header: bool, gz: bool
) -> None:
    reader, name, header = READERS[kind]
    content = (header.encode() + b"\n" if with_header else b"") + blob
    _outcome(reader, _write(tmp_path_factory.mktemp(kind), name, content, gz))


_PIECES = ["1", "0", "-3", "x", "1.5", "", ",", "view", "categoryid", "1e30", "99999999999999999999",
           "\x00", '"', "nan", "inf", " ", "\t", "\u00e9"]


@FUZZ
@given(
    kind=st.sampled_from(sorted(READERS)),
    lines=st.lists(st.lists(st.sampled_from(_PIECES), max_size=8).map("".join), max_size=6),
    bad_byte=st.sampled_from([b"", b"\xff", b"\xc3"]),
)
def test_valid_looking_lines_parse_or_name_the_line(
    tmp_path_factory, kind: str, lines: list[str], bad_byte: bytes
) -> None:
    reader, name, header = READERS[kind]
    body = [line.encode() for line in lines]
    if body and bad_byte:
        body[len(body) // 2] += bad_byte
    content = b"".join(line + b"\n" for line in [header.encode(), *body])
    result = _outcome(reader, _write(tmp_path_factory.mktemp(kind), name, content))
    if isinstance(result, tuple) and result[0] is not None:
        assert 1 <= result[0] <= len(body) + 1, result


_CORRUPT = ["x", "-4", "1.5", "1e30", "99999999999999999999", "\xff"]


@FUZZ
@given(data=st.data(), kind=st.sampled_from(sorted(READERS)), rows=_rows, gz=st.booleans())
def test_one_broken_id_is_the_line_named(tmp_path_factory, data, kind: str, rows, gz: bool) -> None:
    reader, name, header = READERS[kind]
    table = [_row(kind, i, a, b) for i, (a, b) in enumerate(rows)]
    k = data.draw(st.integers(0, len(table) - 1), label="broken row")
    # integer columns that are always checked: events ts/visitor/item, props ts/item, tree id
    col = data.draw(st.sampled_from({"events": [0, 1, 3], "props": [0, 1], "tree": [0]}[kind]))
    bad = data.draw(st.sampled_from(_CORRUPT), label="bad token")
    if bad == "-4" and not (kind == "tree" or col == 0):
        bad = "x"  # negative ids are allowed there; only timestamps and category ids are not
    lines = [header.encode()] + [",".join(r).encode() for r in table]
    fields = lines[k + 1].split(b",")
    fields[col] = bad.encode("latin-1")
    lines[k + 1] = b",".join(fields)
    path = _write(tmp_path_factory.mktemp(kind), name, b"".join(x + b"\n" for x in lines), gz)
    result = _outcome(reader, path)
    assert isinstance(result, tuple), f"line {k + 2} = {lines[k + 1]!r} was accepted"
    assert result[0] == k + 2, result


@FUZZ
@given(data=st.data(), kind=st.sampled_from(sorted(READERS)), rows=_rows)
def test_truncated_files_parse_or_name_the_file(tmp_path_factory, data, kind: str, rows) -> None:
    reader, name, header = READERS[kind]
    lines = [header] + [",".join(_row(kind, i, a, b)) for i, (a, b) in enumerate(rows)]
    blob = "".join(x + "\n" for x in lines).encode()
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut at byte")
    result = _outcome(reader, _write(tmp_path_factory.mktemp(kind), name, blob[:cut]))
    if isinstance(result, tuple) and result[0] is not None:
        kept = blob[:cut]
        assert result[0] == kept.count(b"\n") + (0 if kept.endswith(b"\n") else 1), result
