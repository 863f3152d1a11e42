"""Raw-file rules of the RetailRocket ETL: categories at event time, tree roots, sessions, splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from torchrec_mamba_preprocessing.raw import (
    category_at_event_time,
    category_depths,
    category_roots,
)
from torchrec_mamba_preprocessing.report import ETLReport
from torchrec_mamba_preprocessing.sessions import (
    partition_at_groups,
    sessionise,
    split_events,
    split_masks,
)

MIN = 60_000
DAY = 86_400_000


def _events(ts: list[int], visitors: list[int], items: list[int] | None = None) -> pd.DataFrame:
    n = len(ts)
    return pd.DataFrame(
        {
            "timestamp": np.asarray(ts, dtype=np.int64),
            "visitorid": np.asarray(visitors, dtype=np.int64),
            "itemid": np.asarray(items if items is not None else range(n), dtype=np.int64),
            "event": ["view"] * n,
            "row": np.arange(n, dtype=np.int64),
        }
    )


def test_session_gap_splits_strictly_above_threshold() -> None:
    # gaps: 29:59.999, exactly 30:00, 30:00.001 (only the last starts a new session)
    ts = [0, 30 * MIN - 1, 60 * MIN - 1, 90 * MIN]
    ts[-1] = ts[2] + 30 * MIN + 1
    table = sessionise(_events(ts, [7] * 4), np.full(4, np.nan), {}, ETLReport())
    assert table["session_id"].tolist() == [0, 0, 0, 1]
    # a shorter configured gap cuts the 29:59.999 gap too
    table = sessionise(
        _events(ts, [7] * 4), np.full(4, np.nan), {}, ETLReport(), session_gap_minutes=20
    )
    assert table["session_id"].tolist() == [0, 1, 2, 3]


def test_sessions_follow_visitor_and_time_order_not_file_order() -> None:
    # file order is shuffled; visitor 2's events interleave with visitor 1's
    ev = _events([50 * MIN, 0, 10 * MIN, 5 * MIN, 100 * MIN], [1, 1, 2, 2, 1], [5, 1, 4, 3, 6])
    report = ETLReport()
    table = sessionise(ev, np.full(5, np.nan), {}, report)
    assert table["visitorid"].tolist() == [1, 1, 1, 2, 2]
    assert table["item"].tolist() == [1, 5, 6, 3, 4]
    assert table["session_id"].tolist() == [0, 1, 2, 3, 3]
    assert (report.sessions, report.single_event_sessions, report.visitors) == (4, 3, 2)


def test_equal_timestamps_keep_file_order() -> None:
    ev = _events([5, 5, 5], [1, 1, 1], [30, 10, 20])
    table = sessionise(ev, np.full(3, np.nan), {}, ETLReport())
    assert table["item"].tolist() == [30, 10, 20]


def test_category_in_force_at_event_time() -> None:
    ev = pd.DataFrame(
        {
            "timestamp": [1, 4, 7, 8, 9, 3, 3],
            "itemid": [7, 7, 7, 7, 7, 8, 9],
        }
    )
    cats = pd.DataFrame(
        {
            "timestamp": [4, 8, 8, 2, 6],
            "itemid": [7, 7, 7, 8, 8],
            "categoryid": [30, 31, 32, 40, 41],
            "order": [0, 1, 2, 3, 4],
        }
    )
    report = ETLReport()
    got = category_at_event_time(ev, cats, report)
    # t=1: before any row -> earliest value (30); t=4: the row at t=4 applies (<=); t=7: still 30;
    # t=8: two rows at t=8, the later one in file order wins (32); item 8 at t=3: 40;
    # item 9: never categorised -> NaN
    np.testing.assert_array_equal(got, [30.0, 30.0, 30.0, 32.0, 32.0, 40.0, np.nan])
    assert report.events_category_from_earliest == 1
    assert report.events_without_category == 1


def test_earliest_value_uses_last_row_of_first_snapshot() -> None:
    ev = pd.DataFrame({"timestamp": [0], "itemid": [7]})
    cats = pd.DataFrame(
        {"timestamp": [5, 5, 9], "itemid": [7, 7, 7], "categoryid": [1, 2, 3], "order": [0, 1, 2]}
    )
    assert category_at_event_time(ev, cats, ETLReport()).tolist() == [2.0]


def test_category_roots_and_levels() -> None:
    tree = pd.DataFrame(
        {
            "categoryid": [1, 2, 3, 4, 5, 6, 7],
            "parentid": [-1, 1, 2, 2, -1, 5, 99],  # 99 has no row of its own: a root
        }
    )
    assert category_roots(tree) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 5, 6: 5, 7: 99}
    assert category_depths(tree) == {1: 0, 2: 1, 3: 2, 4: 2, 5: 0, 6: 1, 7: 1}


@pytest.mark.parametrize(
    ("parents", "cycle"),
    [([2, 3, 1], "1 -> 2 -> 3 -> 1"), ([1, -1, -1], "1 -> 1")],
)
def test_category_cycle_is_an_error(parents: list[int], cycle: str) -> None:
    tree = pd.DataFrame({"categoryid": [1, 2, 3], "parentid": parents})
    with pytest.raises(ValueError, match=f"cycle: {cycle}"):
        category_roots(tree)


def test_top_category_of_unknown_category_is_itself_and_counted() -> None:
    report = ETLReport()
    table = sessionise(
        _events([0, 1, 2], [1, 1, 1]), np.array([10.0, 11.0, np.nan]), {10: 1}, report
    )
    np.testing.assert_array_equal(table["top_category"].to_numpy(), [1.0, 11.0, np.nan])
    assert report.categories_missing_from_tree == 1


def _table(starts_days: list[float], lengths: list[int]) -> pd.DataFrame:
    ts, vis = [], []
    for v, (start, n) in enumerate(zip(starts_days, lengths, strict=True)):
        ts += [int(start * DAY) + i * MIN for i in range(n)]
        vis += [v] * n
    return sessionise(_events(ts, vis), np.full(len(ts), np.nan), {}, ETLReport())


def test_time_split_by_session_start() -> None:
    # the log ends at day 30 (+ a few minutes); test = start >= day 23, valid = start >= day 16
    table = _table([0.0, 15.99, 16.0, 22.99, 23.0, 30.0], [2, 3, 2, 2, 2, 2])
    m = split_masks(table, split="time", test_days=7, valid_days=7)
    sess = table["session_id"].to_numpy()
    t_end = table["timestamp"].max()
    starts = table.groupby("session_id")["timestamp"].min()
    for s in range(6):
        start = starts[s]
        want = (
            "test"
            if start >= t_end - 7 * DAY
            else "valid"
            if start >= t_end - 14 * DAY
            else "train"
        )
        for name in ("train", "valid", "test"):
            assert m[name][sess == s].all() == (name == want), (s, name)
    # the three masks partition the events
    np.testing.assert_array_equal(m["train"].astype(int) + m["valid"] + m["test"], 1)


def test_leave_one_out_masks_and_short_rows() -> None:
    table = _table([0.0, 1.0, 2.0], [4, 2, 1])
    m = split_masks(table, split="leave_one_out", group_by="session")
    assert m["test"].tolist() == [True] * 7
    assert m["valid"].tolist() == [True, True, True, False, True, False, False]
    assert m["train"].tolist() == [True, True, False, False, False, False, False]
    train, stats = split_events(table, m["train"])
    assert train["session_id"].tolist() == [0, 0]
    assert (stats.rows, stats.short_rows_dropped, stats.short_row_events_dropped) == (1, 0, 0)
    valid, stats = split_events(table, m["valid"])
    assert (stats.rows, stats.short_rows_dropped, stats.short_row_events_dropped) == (1, 1, 1)
    test, stats = split_events(table, m["test"], max_len=3)
    assert (stats.rows, stats.short_rows_dropped, stats.truncated_rows) == (2, 1, 1)


def test_time_gaps_are_seconds_within_a_row() -> None:
    table = _table([0.0, 1.0], [3, 2])
    sub, _ = split_events(table, np.ones(len(table), dtype=bool))
    assert sub["time_gap"].dtype == np.float32
    assert sub["time_gap"].tolist() == [0.0, 60.0, 60.0, 0.0, 60.0]


def test_partitions_hold_whole_rows_and_balance() -> None:
    table = _table([float(i) for i in range(10)], [3, 2, 5, 2, 2, 4, 2, 3, 2, 2])
    sub, _ = split_events(table, np.ones(len(table), dtype=bool))
    parts = partition_at_groups(sub, 4)
    groups = [set(p["session_id"]) for p in parts]
    assert sorted(len(g) for g in groups) == [2, 2, 3, 3]
    assert set().union(*groups) == set(range(10))
    assert sum(len(g) for g in groups) == 10  # no session in two partitions
    with pytest.raises(ValueError, match="test split has 10 rows, fewer than the 11 shards"):
        partition_at_groups(sub, 11, name="test")


def test_bad_split_options() -> None:
    table = _table([0.0], [2])
    with pytest.raises(ValueError, match="split must be 'time' or 'leave_one_out', got 'random'"):
        split_masks(table, split="random")
    with pytest.raises(ValueError, match="group_by must be 'session' or 'visitor', got 'user'"):
        split_masks(table, split="leave_one_out", group_by="user")
    with pytest.raises(ValueError, match="test_days and valid_days must be >= 0"):
        split_masks(table, test_days=-1)
    with pytest.raises(ValueError, match="session_gap_minutes must be > 0, got 0"):
        sessionise(_events([0], [1]), np.full(1, np.nan), {}, ETLReport(), session_gap_minutes=0)
