"""Bad RetailRocket input: each case raises a clear error or is dropped and counted."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from rr_common import EVENTS_HEADER, HANDMADE_EVENTS  # type: ignore[import-not-found]
from torchrec_mamba_preprocessing.raw import (
    read_category_tree,
    read_events,
    read_item_categories,
)
from torchrec_mamba_preprocessing.report import ETLReport
from torchrec_mamba_preprocessing.retailrocket import ETLConfig, run_etl


@pytest.mark.parametrize(
    "name",
    ["events.csv", "item_properties_part1.csv", "item_properties_part2.csv", "category_tree.csv"],
)
def test_missing_file_names_the_path(
    tmp_path: Path, write_raw: Callable[..., Path], name: str
) -> None:
    raw = write_raw(tmp_path / "raw")
    (raw / name).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(raw / name))):
        run_etl(raw, tmp_path / "out")


def test_missing_columns_are_named(tmp_path: Path, write_raw: Callable[..., Path]) -> None:
    raw = write_raw(
        tmp_path / "raw",
        events=["1,2,view", "3,4,view"],
        events_header="timestamp,visitor,event",
    )
    with pytest.raises(
        ValueError, match=r"missing column\(s\) \['visitorid', 'itemid', 'transactionid'\]"
    ):
        read_events(raw / "events.csv", ETLReport())
    raw = write_raw(tmp_path / "raw2", tree_header="categoryid,parent")
    with pytest.raises(ValueError, match=r"category_tree.csv: missing column\(s\) \['parentid'\]"):
        read_category_tree(raw / "category_tree.csv", ETLReport())
    raw = write_raw(tmp_path / "raw3", props_header="timestamp,itemid,property")
    with pytest.raises(ValueError, match=r"part1.csv: missing column\(s\) \['value'\]"):
        read_item_categories([raw / "item_properties_part1.csv"], ETLReport())


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "events.csv"
    p.write_text("")
    with pytest.raises(ValueError, match=r"events.csv: empty file \(expected a header"):
        read_events(p, ETLReport())


def test_unknown_event_types_error_lists_them(
    tmp_path: Path, write_raw: Callable[..., Path]
) -> None:
    events = [*HANDMADE_EVENTS, "9,3,click,10,", "10,3,click,11,", "11,3,wishlist,10,"]
    raw = write_raw(tmp_path / "raw", events=events)
    line = len(HANDMADE_EVENTS) + 2  # header is line 1
    with pytest.raises(
        ValueError,
        match=rf"events.csv:{line}: unknown event type\(s\) \{{'click': 2, 'wishlist': 1\}}",
    ):
        read_events(raw / "events.csv", ETLReport())


def test_unknown_event_types_can_be_dropped_and_counted(
    tmp_path: Path, write_raw: Callable[..., Path]
) -> None:
    events = [*HANDMADE_EVENTS, "9,3,click,10,", "10,3,click,11,"]
    raw = write_raw(tmp_path / "raw", events=events)
    report = ETLReport()
    df = read_events(raw / "events.csv", report, on_unknown_event="drop")
    assert report.unknown_events_dropped == {"click": 2}
    assert (report.events_read, report.events_kept, len(df)) == (8, 6, 6)
    assert "2 unknown event types {'click': 2}" in report.lines()[0]
    with pytest.raises(ValueError, match="on_unknown_event must be 'error' or 'drop', got 'skip'"):
        read_events(raw / "events.csv", report, on_unknown_event="skip")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("12,abc,view,10,", r"events.csv:4: non-numeric visitorid 'abc'"),
        ("12,3,view,x10,", r"events.csv:4: non-numeric itemid 'x10'"),
        ("12,3,view,,", r"events.csv:4: missing itemid"),
        ("12,3.5,view,10,", r"events.csv:4: non-integer visitorid 3.5"),
        ("-12,3,view,10,", r"events.csv:4: negative timestamp -12"),
        ("noon,3,view,10,", r"events.csv:4: non-numeric timestamp 'noon'"),
    ],
)
def test_bad_event_values_name_file_and_line(
    tmp_path: Path, write_raw: Callable[..., Path], bad_line: str, message: str
) -> None:
    events = [*HANDMADE_EVENTS[:2], bad_line, *HANDMADE_EVENTS[2:]]
    raw = write_raw(tmp_path / "raw", events=events)
    with pytest.raises(ValueError, match=message):
        read_events(raw / "events.csv", ETLReport())


def test_line_numbers_skip_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "events.csv"
    p.write_text(f"{EVENTS_HEADER}\n1,2,view,3,\n\n4,x,view,3,\n")
    with pytest.raises(ValueError, match=r"events.csv:4: non-numeric visitorid 'x'"):
        read_events(p, ETLReport())


@pytest.mark.parametrize(
    ("props2", "message"),
    [
        (["7,12,categoryid,abc"], r"part2.csv:2: non-numeric categoryid value 'abc'"),
        (["5,11,790,n1.000", "7,x12,available,1"], r"part2.csv:3: non-numeric itemid 'x12'"),
        (["-7,12,available,1"], r"part2.csv:2: negative timestamp -7"),
    ],
)
def test_bad_property_values_name_file_and_line(
    tmp_path: Path, write_raw: Callable[..., Path], props2: list[str], message: str
) -> None:
    raw = write_raw(tmp_path / "raw", props2=props2)
    files = [raw / "item_properties_part1.csv", raw / "item_properties_part2.csv"]
    with pytest.raises(ValueError, match=message):
        read_item_categories(files, ETLReport())


def test_bad_tree_values(tmp_path: Path, write_raw: Callable[..., Path]) -> None:
    raw = write_raw(tmp_path / "raw", tree=["1,", "2,one"])
    with pytest.raises(ValueError, match=r"category_tree.csv:3: non-numeric parentid 'one'"):
        read_category_tree(raw / "category_tree.csv", ETLReport())
    raw = write_raw(tmp_path / "raw2", tree=["1,", "2,1", "2,3", "3,"])
    with pytest.raises(
        ValueError, match=r"categoryid\(s\) with more than one parent.*\[2, 1\], \[2, 3\]"
    ):
        read_category_tree(raw / "category_tree.csv", ETLReport())


def test_malformed_csv_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "events.csv"
    p.write_text(f"{EVENTS_HEADER}\n1,2,view,3,\n1,2,view,3,,,,\n")
    with pytest.raises(ValueError, match=r"events.csv:3: expected 5 fields, got 8"):
        read_events(p, ETLReport())
    p.write_text(f'{EVENTS_HEADER}\n1,2,view,3,"\n')
    with pytest.raises(ValueError, match=r"events.csv: malformed CSV: Error tokenizing data"):
        read_events(p, ETLReport())


@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_byte_names_file_line_and_column(tmp_path: Path, gz: bool) -> None:
    import gzip

    blob = f"{EVENTS_HEADER}\n1,2,view,3,\n\n4,2,vi\xe9w,3,\n".encode("latin-1")
    p = tmp_path / ("events.csv.gz" if gz else "events.csv")
    p.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(
        ValueError, match=re.escape(f"{p}:4: not valid UTF-8 (byte 0xe9 at column 7)")
    ):
        read_events(p, ETLReport())
    tree = tmp_path / "category_tree.csv"
    tree.write_bytes(b"categoryid,parent\xffid\n1,\n")
    with pytest.raises(ValueError, match=re.escape(f"{tree}:1: not valid UTF-8 (byte 0xff")):
        read_category_tree(tree, ETLReport())


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [  # all of these used to become a float and then a wrong int64 without a word
        ("12,1e30,view,10,", r"events.csv:4: out-of-range visitorid 1e\+30"),
        ("12,3,view,99999999999999999999,", r"events.csv:4: out-of-range itemid '9{20}' \(expected an integer that fits in int64\)"),
        ("12,3,view,18446744073709551615,", r"events.csv:4: out-of-range itemid"),
        ("12,inf,view,10,", r"events.csv:4: non-integer visitorid"),
    ],
)
def test_ids_that_are_no_int64_name_the_line(
    tmp_path: Path, write_raw: Callable[..., Path], bad_line: str, message: str
) -> None:
    events = [*HANDMADE_EVENTS[:2], bad_line, *HANDMADE_EVENTS[2:]]
    raw = write_raw(tmp_path / "raw", events=events)
    with pytest.raises(ValueError, match=message):
        read_events(raw / "events.csv", ETLReport())


def test_broken_gzip_and_gzip_line_numbers(tmp_path: Path) -> None:
    import gzip

    p = tmp_path / "events.csv.gz"
    p.write_bytes(gzip.compress(f"{EVENTS_HEADER}\n1,2,view,3,\n".encode() * 50)[:40])
    with pytest.raises(ValueError, match=re.escape(f"{p}: not a valid compressed file")):
        read_events(p, ETLReport())
    p.write_bytes(gzip.compress(f"{EVENTS_HEADER}\n1,2,view,3,\n\n4,x,view,3,\n".encode()))
    with pytest.raises(ValueError, match=r"events.csv.gz:4: non-numeric visitorid 'x'"):
        read_events(p, ETLReport())


def test_exact_duplicates_are_dropped_and_counted(
    tmp_path: Path, write_raw: Callable[..., Path]
) -> None:
    events = [*HANDMADE_EVENTS, HANDMADE_EVENTS[1], HANDMADE_EVENTS[1], "1,1,view,10,"]
    raw = write_raw(
        tmp_path / "raw",
        events=events,
        props2=["0,10,categoryid,100", "0,10,categoryid,100", "5,10,categoryid,100"],
        tree=["100,200", "100,200", "200,"],
    )
    report = ETLReport()
    ev = read_events(raw / "events.csv", report)
    cats = read_item_categories(
        [raw / "item_properties_part1.csv", raw / "item_properties_part2.csv"], report
    )
    tree = read_category_tree(raw / "category_tree.csv", report)
    assert (report.events_read, report.duplicate_events_dropped, report.events_kept) == (9, 2, 7)
    assert len(ev) == 7
    # the two exact copies of part1's first categoryid row in part2 are duplicates; t=5 is not
    assert (report.categoryid_rows, report.duplicate_categoryid_rows_dropped) == (5, 2)
    assert len(cats) == 3
    assert (report.duplicate_tree_rows_dropped, len(tree)) == (1, 2)
    text = "\n".join(report.lines())
    assert "dropped 2 exact duplicates" in text
    assert "(2 exact duplicates dropped)" in text


def test_bad_config_values() -> None:
    with pytest.raises(
        ValueError, match=r"num_shards \(3\) must be a positive multiple of world_size \(2\)"
    ):
        ETLConfig(world_size=2, num_shards=3).validate()
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        ETLConfig(world_size=0).validate()
    with pytest.raises(ValueError, match="group_by must be 'session' or 'visitor', got 'day'"):
        ETLConfig(group_by="day").validate()
    with pytest.raises(ValueError, match="split must be 'time' or 'leave_one_out', got 'x'"):
        ETLConfig(split="x").validate()
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        ETLConfig(max_len=1).validate()
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'gpu'"):
        ETLConfig(device="tpu").validate()
    with pytest.raises(ValueError, match="on_unknown_event must be 'error' or 'drop'"):
        ETLConfig(on_unknown_event="ignore").validate()


def test_gpu_requested_without_gpu(tmp_path: Path, write_raw: Callable[..., Path]) -> None:
    from torchrec_mamba_preprocessing.retailrocket import gpu_available

    if gpu_available():
        pytest.skip("a GPU with cuDF is available here")
    raw = write_raw(tmp_path / "raw")
    with pytest.raises(RuntimeError, match="device='gpu' needs cuDF and a visible GPU"):
        run_etl(raw, tmp_path / "out", ETLConfig(device="gpu"))
