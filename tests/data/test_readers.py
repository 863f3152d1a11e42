"""Readers: parsing, dense re-indexing, time ordering, and errors that name file and line."""

from __future__ import annotations

import gzip
import re
import time
from pathlib import Path

import numpy as np
import pytest

from torchrec_mamba.data.readers import (
    SequenceData,
    load_sequences,
    read_csv,
    read_movielens,
    read_sasrec,
)


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _raw_sequences(data: SequenceData) -> dict[int, list[int]]:
    """User raw id -> raw item ids, decoded with the stored maps."""
    return {
        int(u): data.raw_item_ids[s].tolist()
        for u, s in zip(data.user_ids, data.sequences, strict=True)
    }


def _check_dense(data: SequenceData) -> None:
    """Dense ids are 1..num_items, in increasing raw order, and item_map agrees with raw_item_ids."""
    raw = sorted({int(data.raw_item_ids[v]) for s in data.sequences for v in s})
    assert data.num_items == len(raw)
    assert data.raw_item_ids.tolist() == [-1] + raw
    assert data.item_map == {r: i + 1 for i, r in enumerate(raw)}
    for s in data.sequences:
        assert s.dtype == np.int64 and s.min() >= 1 and s.max() <= data.num_items


# --- SASRec -----------------------------------------------------------------------------------
def test_sasrec_reads_and_reindexes(tmp_path: Path) -> None:
    p = _write(tmp_path / "s.txt", "7 30 10 30 30\n3 20\t10\n\n\n")
    data = read_sasrec(p)
    assert data.user_ids.tolist() == [7, 3]  # file order
    assert [s.tolist() for s in data.sequences] == [[3, 1, 3, 3], [2, 1]]  # repeats kept
    assert _raw_sequences(data) == {7: [30, 10, 30, 30], 3: [20, 10]}
    assert data.user_map == {7: 0, 3: 1}
    assert data.stats["empty_users"] == 0 and data.num_interactions == 6
    _check_dense(data)


def test_sasrec_gzip_and_crlf(tmp_path: Path) -> None:
    p = _write(tmp_path / "s.txt.gz", "1 1 2\r\n2 2 3\r\n")
    data = read_sasrec(p)
    assert _raw_sequences(data) == {1: [1, 2], 2: [2, 3]}


def test_sasrec_user_without_items_is_skipped_and_counted(tmp_path: Path) -> None:
    p = _write(tmp_path / "s.txt", "1 5 6\n2\n3 6\n")
    data = read_sasrec(p)
    assert data.user_ids.tolist() == [1, 3] and data.stats["empty_users"] == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 2 3\n2 4 x5\n", r"s\.txt:2: non-numeric id 'x5'"),
        ("1 2 3\n2 4 -5\n", r"s\.txt:2: negative id '-5'"),
        ("1 2 3\n\n2 4 5\n", r"s\.txt:2: blank line inside the file"),
        ("1 2 3\n2 4\n1 7\n", r"s\.txt:3: user 1 already appeared on line 1"),
        ("1 2 3\n2 4 1.5\n", r"s\.txt:2: non-numeric id '1.5'"),
        (
            "1 2 99999999999999999999\n",
            r"s\.txt:1: id '99999999999999999999' does not fit in int64",
        ),
        ("\n\n", r"s\.txt: no interactions found"),
    ],
)
def test_sasrec_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    p = _write(tmp_path / "s.txt", text)
    with pytest.raises(ValueError, match=message):
        read_sasrec(p)


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    for reader in (read_sasrec, read_movielens, read_csv):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            reader(missing)
    with pytest.raises(FileNotFoundError, match="not a regular file"):
        read_sasrec(tmp_path)


# --- MovieLens ------------------------------------------------------------------------------------
ML_DAT = "1::50::5::300\n1::10::3::100\n2::50::4::50\n1::20::4::100\n1::30::2::100\n"


def test_movielens_dat_sorts_by_time_with_stable_ties(tmp_path: Path) -> None:
    data = read_movielens(_write(tmp_path / "ratings.dat", ML_DAT))
    # user 1: t=100 for items 10, 20, 30 (file order kept), then 50 at t=300
    assert _raw_sequences(data) == {1: [10, 20, 30, 50], 2: [50]}
    _check_dense(data)


def test_movielens_u_data_gz_matches_dat(tmp_path: Path) -> None:
    tab = ML_DAT.replace("::", "\t")
    a = read_movielens(_write(tmp_path / "u.data.gz", tab))
    b = read_movielens(_write(tmp_path / "ratings.dat", ML_DAT))
    assert _raw_sequences(a) == _raw_sequences(b)


def test_movielens_matches_pure_python_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 500
    users = rng.integers(0, 40, n)
    items = rng.integers(0, 90, n)
    times = rng.integers(0, 30, n)  # many ties
    text = "".join(
        f"{u}\t{i}\t{rng.integers(1, 6)}\t{t}\n"
        for u, i, t in zip(users, items, times, strict=True)
    )
    data = read_movielens(_write(tmp_path / "u.data", text))
    expected: dict[int, list[tuple[int, int]]] = {}
    for u, i, t in zip(users.tolist(), items.tolist(), times.tolist(), strict=True):
        expected.setdefault(u, []).append((t, i))
    reference = {u: [i for _, i in sorted(ev, key=lambda x: x[0])] for u, ev in expected.items()}
    assert _raw_sequences(data) == reference
    assert data.user_ids.tolist() == sorted(reference)
    _check_dense(data)


def test_movielens_float_ratings_are_fine(tmp_path: Path) -> None:
    data = read_movielens(_write(tmp_path / "r.dat", "1::5::3.5::10\n1::6::4.0::5\n"))
    assert _raw_sequences(data) == {1: [6, 5]}


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "1::2::3::4\n1::2::3\n",
            r"r\.dat:2: expected 4 columns \(user, item, rating, timestamp\), got 3",
        ),
        ("1::2::3::4\n1::2::3::4::5\n", r"r\.dat:2: expected 4 columns .*got 5"),
        ("1::2::3::4\n1::b::3::4\n", r"r\.dat:2: non-numeric item 'b'"),
        ("1::2::3::4\n1::2::3::-4\n", r"r\.dat:2: negative timestamp -4"),
        ("1::2::3::4\n1::2::3::4\n-1::2::3::4\n", r"r\.dat:3: negative user -1"),
        ("1::2::3::4\n\n1::2::3::4\n", r"r\.dat:2: blank line inside the file"),
        ("1::2::3::4\n1::2::good::4\n", r"r\.dat:2: non-numeric rating 'good'"),
        ("1::2::3::4\n1::2::3::4.5\n", r"r\.dat:2: non-numeric timestamp '4.5'"),
        ("1,2,3,4\n", r"r\.dat:1: cannot detect the separator"),
        ("", r"r\.dat: no interactions found"),
    ],
)
def test_movielens_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    p = _write(tmp_path / "r.dat", text)
    with pytest.raises(ValueError, match=message):
        read_movielens(p)


# --- CSV --------------------------------------------------------------------------------------
def test_csv_sorts_by_time_and_ignores_other_columns(tmp_path: Path) -> None:
    text = "ts,visitor,item,event\n5,9,100,view\n1,9,200,view\n3,4,100,cart\n1,9,300,view\n"
    data = read_csv(_write(tmp_path / "e.csv", text), user_col="visitor", time_col="ts")
    assert _raw_sequences(data) == {4: [100], 9: [200, 300, 100]}
    assert data.user_ids.tolist() == [4, 9]
    _check_dense(data)


def test_csv_without_time_keeps_file_order_and_tab_gz(tmp_path: Path) -> None:
    text = "user\titem\n2\t7\n1\t8\n2\t5\n"
    data = read_csv(_write(tmp_path / "e.tsv.gz", text), time_col=None, sep="\t")
    assert _raw_sequences(data) == {1: [8], 2: [7, 5]}


def test_csv_categories_first_event_rule(tmp_path: Path) -> None:
    text = "user,item,timestamp,cat\n1,10,1,500\n1,20,2,600\n2,10,1,700\n2,30,5,600\n"
    data = read_csv(_write(tmp_path / "e.csv", text), category_col="cat")
    assert data.num_categories == 3  # raw 500, 600, 700 -> 1, 2, 3
    assert data.item_category is not None
    # item 10 first appears (user 1, t=1) with 500; user 2's 700 is a conflict
    cat_of = {int(data.raw_item_ids[i]): int(data.item_category[i]) for i in range(1, 4)}
    assert cat_of == {10: 1, 20: 2, 30: 2}
    assert data.item_category[0] == 0
    assert data.stats["category_conflicts"] == 1


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "user,item\n1,2\n",
            r"e\.csv:1: timestamp column 'timestamp' not in the header; columns are \['user', 'item'\]",
        ),
        ("user,item,timestamp\n1,2,3\n1,2,\n", r"e\.csv:3: empty timestamp"),
        ("user,item,timestamp\n1,2,3\n1,x,3\n", r"e\.csv:3: non-numeric item 'x'"),
        (
            "user,item,timestamp\n1,2,3\n1,2,3,4\n",
            r"e\.csv:3: expected 3 columns \(user, item, timestamp\), got 4",
        ),
        ("user,item,timestamp\n1,2,3\n1,2\n", r"e\.csv:3: expected 3 columns"),
        ("user,item,timestamp\n1,2,3\n1,-2,3\n", r"e\.csv:3: negative item -2"),
        ("user,item,timestamp\n1,2,3\n\n1,2,3\n", r"e\.csv:3: blank line inside the file"),
        ("user,item,timestamp\n", r"e\.csv: no interactions found \(header only\)"),
        ("user,item,timestamp,user\n1,2,3,4\n", r"e\.csv:1: repeated column names"),
        ("", r"e\.csv: empty file"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    p = _write(tmp_path / "e.csv", text)
    with pytest.raises(ValueError, match=message):
        read_csv(p)


# --- specs ----------------------------------------------------------------------------------------
def test_load_sequences_dispatches(tmp_path: Path) -> None:
    s = _write(tmp_path / "s.txt", "1 2 3\n")
    m = _write(tmp_path / "r.dat", "1::2::3::4\n")
    c = _write(tmp_path / "e.csv", "user,item,timestamp\n1,2,3\n")
    assert _raw_sequences(load_sequences(f"sasrec:{s}")) == {1: [2, 3]}
    assert _raw_sequences(load_sequences(f"movielens:{m}")) == {1: [2]}
    assert _raw_sequences(load_sequences(f"csv:{c}")) == {1: [2]}


def test_load_sequences_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="unknown data format 'json' .*choose one of: sasrec, movielens, csv"
    ):
        load_sequences("json:x")
    with pytest.raises(ValueError, match="must look like FORMAT:PATH"):
        load_sequences(str(tmp_path / "s.txt"))
    with pytest.raises(ValueError, match="empty path"):
        load_sequences("sasrec:")
    with pytest.raises(FileNotFoundError, match="interaction file not found: .*missing.txt"):
        load_sequences(f"sasrec:{tmp_path / 'missing.txt'}")


def test_from_lists_and_encode_items() -> None:
    data = SequenceData.from_lists([[5, 9], [9]], user_ids=[100, 200])
    np.testing.assert_array_equal(data.encode_items(np.array([9, 5])), [2, 1])
    with pytest.raises(ValueError, match="unknown raw item id 7"):
        data.encode_items(np.array([7]))
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        SequenceData.from_lists([[1], []])
    with pytest.raises(ValueError, match="negative item id -3"):
        SequenceData.from_lists([[1, -3]])
    with pytest.raises(ValueError, match="2 sequences but 1 user ids"):
        SequenceData(
            sequences=[np.array([1]), np.array([1])],
            num_items=1,
            user_ids=np.array([0]),
            raw_item_ids=np.array([-1, 0]),
        )


@pytest.mark.data
def test_beauty_counts_and_speed(shared_data: Path) -> None:
    path = shared_data / "amazon-beauty" / "Beauty.txt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    start = time.perf_counter()
    data = read_sasrec(path)
    elapsed = time.perf_counter() - start
    assert (data.num_users, data.num_items, data.num_interactions) == (22363, 12101, 198502)
    # raw ids are already 1..12101, so dense ids equal raw ids
    np.testing.assert_array_equal(data.raw_item_ids[1:], np.arange(1, 12102))
    assert data.sequences[0].tolist() == [1, 2, 3, 4, 5]
    lengths = [len(s) for s in data.sequences]
    assert (min(lengths), max(lengths)) == (5, 204)
    assert elapsed < 10.0, f"reading Beauty took {elapsed:.2f} s (target < 2 s on an idle core)"


# --- bytes that are not text, broken gzip, and what the fuzz tests found ------------------------
@pytest.mark.parametrize(
    "reader, name, good",
    [
        (read_sasrec, "s.txt", b"1 2 3\n"),
        (read_movielens, "r.dat", b"1::2::3::4\n"),
        (read_csv, "e.csv", b"user,item,timestamp\n1,2,3\n"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_byte_names_file_line_and_column(
    tmp_path: Path, reader, name: str, good: bytes, gz: bool
) -> None:
    blob = good + good.splitlines()[-1][:2] + b"\xff9\n"  # 0xff at column 3 of the next line
    path = tmp_path / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(blob) if gz else blob)
    line = blob.count(b"\n")
    with pytest.raises(
        ValueError,
        match=re.escape(f"{path}:{line}: not valid UTF-8 (byte 0xff at column 3)"),
    ):
        reader(path)


@pytest.mark.parametrize("reader", [read_sasrec, read_movielens, read_csv])
def test_broken_gzip_names_the_file(tmp_path: Path, reader) -> None:
    not_gzip = tmp_path / "a.txt.gz"
    not_gzip.write_bytes(b"1 2 3\n")
    with pytest.raises(ValueError, match=re.escape(f"{not_gzip}: not a valid gzip file")):
        reader(not_gzip)
    cut = tmp_path / "b.txt.gz"
    cut.write_bytes(gzip.compress(b"1 2 3\n" * 100)[:20])
    with pytest.raises(ValueError, match=re.escape(f"{cut}: not a valid gzip file")):
        reader(cut)


def test_bom_is_dropped_and_lone_carriage_return_is_named(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    p.write_bytes(b"\xef\xbb\xbfuser,item,timestamp\r\n1,2,3\r\n")
    assert _raw_sequences(read_csv(p)) == {1: [2]}
    p.write_bytes(b"\xef\xbb\xbfuser,item,timestamp\n1,2,3\n1,\xff,3\n")
    with pytest.raises(ValueError, match=r"e\.csv:3: not valid UTF-8 \(byte 0xff at column 3\)"):
        read_csv(p)
    s = tmp_path / "s.txt"
    s.write_bytes(b"1 2 3\n2 3\r4\n")
    with pytest.raises(ValueError, match=r"s\.txt:2: carriage return inside a line"):
        read_sasrec(s)


def test_fuzz_findings_are_errors_that_name_the_line(tmp_path: Path) -> None:
    e = tmp_path / "e.csv"
    # pandas dropped the extra field of a lone long row with only a ParserWarning
    e.write_text("user,item,timestamp\n1,2,0,0\n")
    with pytest.raises(ValueError, match=r"e\.csv:2: expected 3 columns .*got 4"):
        read_csv(e)
    # csv.Error (not a ValueError) for a field over csv's 128 KiB limit
    e.write_text("user,item,timestamp\n1,2,x\n1," + "7" * 200_000 + ",3\n")
    with pytest.raises(ValueError, match=r"e\.csv:2: non-numeric timestamp 'x'"):
        read_csv(e)
    e.write_text("user,item,timestamp\n1," + "7" * 200_000 + ",3\n")
    with pytest.raises(ValueError, match=r"e\.csv:2: malformed CSV row \(field larger than"):
        read_csv(e)
    # a quoted field spanning two lines: the bad row is named by its own line
    e.write_text('user,item,timestamp,note\n1,2,3,"a\nb"\n1,-2,3,c\n')
    with pytest.raises(ValueError, match=r"e\.csv:4: negative item -2"):
        read_csv(e)
    e.write_text("\n1,2,3\n")
    with pytest.raises(ValueError, match=r"e\.csv:1: blank header line"):
        read_csv(e)
    with pytest.raises(ValueError, match="sep must be one character, got '::'"):
        read_csv(e, sep="::")
    # int() refuses > 4300 digits with a ValueError that names nothing
    s = tmp_path / "s.txt"
    s.write_text("1 2\n2 " + "9" * 5000 + "\n")
    with pytest.raises(ValueError, match=r"s\.txt:2: id '9{40}'\.\.\. \(5000 chars\) does not fit"):
        read_sasrec(s)
    s.write_text("1 " + "0" * 5000 + "7\n")
    assert _raw_sequences(read_sasrec(s)) == {1: [7]}
    # a tab in a '::' file would have become a separator
    r = tmp_path / "r.dat"
    r.write_text("1::2::3::4\n1::2\t5::3::4\n")
    with pytest.raises(ValueError, match=r"r\.dat:2: non-numeric item '2\\t5'"):
        read_movielens(r)
    r.write_text("1::2::inf::4\n")
    with pytest.raises(ValueError, match=r"r\.dat:1: non-numeric rating 'inf'"):
        read_movielens(r)
