"""Synthetic RetailRocket: exact Kaggle format, determinism, and the planted sequential structure."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torchrec_mamba_preprocessing.raw import category_depths, category_roots, read_category_tree
from torchrec_mamba_preprocessing.report import ETLReport
from torchrec_mamba_preprocessing.sessions import sessionise
from torchrec_mamba_preprocessing.synthetic import SyntheticConfig, main, write_retailrocket

FILES = (
    "events.csv",
    "item_properties_part1.csv",
    "item_properties_part2.csv",
    "category_tree.csv",
)


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    cfg = SyntheticConfig(num_events=3_000, seed=11)
    write_retailrocket(tmp_path / "a", cfg)
    write_retailrocket(tmp_path / "b", cfg)
    write_retailrocket(tmp_path / "c", SyntheticConfig(num_events=3_000, seed=12))
    for name in FILES:
        a, b, c = ((tmp_path / d / name).read_bytes() for d in "abc")
        assert a == b, name
        assert a != c, name


def test_kaggle_format(synth_raw: Path, synth_cfg: SyntheticConfig) -> None:
    heads = {n: (synth_raw / n).read_text().split("\n", 1)[0] for n in FILES}
    assert heads == {
        "events.csv": "timestamp,visitorid,event,itemid,transactionid",
        "item_properties_part1.csv": "timestamp,itemid,property,value",
        "item_properties_part2.csv": "timestamp,itemid,property,value",
        "category_tree.csv": "categoryid,parentid",
    }
    ev = pd.read_csv(synth_raw / "events.csv", dtype={"transactionid": "Int64"})
    assert len(ev) == synth_cfg.num_events
    for col in ("timestamp", "visitorid", "itemid"):
        assert ev[col].dtype == np.int64, col
    assert set(ev["event"]) == {"view", "addtocart", "transaction"}
    is_tr = ev["event"] == "transaction"
    assert ev.loc[is_tr, "transactionid"].notna().all()
    assert ev.loc[~is_tr, "transactionid"].isna().all()
    # ms since epoch inside 2015, sorted like the real file
    assert ev["timestamp"].between(1_420_070_400_000, 1_451_606_400_000).all()
    assert ev["timestamp"].is_monotonic_increasing
    # transaction rows: empty transactionid field is written as nothing at all
    first_view = next(
        line for line in (synth_raw / "events.csv").read_text().splitlines() if ",view," in line
    )
    assert first_view.endswith(",")

    props = pd.concat(
        [pd.read_csv(synth_raw / f, dtype={"value": str}) for f in FILES[1:3]], ignore_index=True
    )
    assert props["timestamp"].dtype == np.int64 and props["itemid"].dtype == np.int64
    assert {"categoryid", "available"} <= set(props["property"])
    assert props.loc[props["property"] == "categoryid", "value"].str.fullmatch(r"\d+").all()

    tree = pd.read_csv(synth_raw / "category_tree.csv")
    assert tree["categoryid"].dtype == np.int64
    assert tree["categoryid"].is_unique
    assert tree["parentid"].isna().sum() >= 2  # several roots, empty parentid


def test_category_tree_has_few_roots_and_two_or_three_levels(synth_raw: Path) -> None:
    tree = read_category_tree(synth_raw / "category_tree.csv", ETLReport())
    depth = category_depths(tree)
    roots = set(category_roots(tree).values())
    assert 2 <= len(roots) <= 5
    assert max(depth.values()) in (1, 2)
    # item categories are leaves (no category has items and children)
    props = pd.read_csv(synth_raw / "item_properties_part1.csv", dtype={"value": str})
    used = set(props.loc[props["property"] == "categoryid", "value"].astype(int))
    parents = set(tree["parentid"])
    assert used and not (used & parents)


def test_some_items_change_category(synth_raw: Path) -> None:
    props = pd.concat(
        [pd.read_csv(synth_raw / f, dtype={"value": str}) for f in FILES[1:3]], ignore_index=True
    )
    cat = props[props["property"] == "categoryid"]
    distinct = cat.groupby("itemid")["value"].nunique()
    assert (distinct > 1).sum() > 0


def test_sessions_recovered_exactly_by_a_30_minute_gap(
    synth_raw: Path, synth_cfg: SyntheticConfig
) -> None:
    from torchrec_mamba_preprocessing.synthetic import generate

    summary = generate(synth_cfg).summary
    ev = pd.read_csv(synth_raw / "events.csv")
    ev["row"] = np.arange(len(ev))
    report = ETLReport()
    sessionise(ev, np.full(len(ev), np.nan), {}, report)
    assert report.sessions == summary.num_sessions
    assert report.single_event_sessions == summary.num_single_event_sessions
    assert report.visitors == summary.num_visitors


def test_next_item_is_far_more_predictable_from_the_sequence_than_from_popularity() -> None:
    """Fit a bigram (most frequent successor) and popularity on the first 80% of sessions; on the
    rest, the bigram guesses the next item several times more often than the most popular item."""
    from torchrec_mamba_preprocessing.synthetic import generate

    ev = generate(SyntheticConfig(num_events=20_000, seed=3)).events
    ev = ev.sort_values(["visitorid", "timestamp"], kind="stable")
    same = ev["visitorid"].to_numpy()[1:] == ev["visitorid"].to_numpy()[:-1]
    gap_ok = np.diff(ev["timestamp"].to_numpy()) <= 30 * 60_000
    cur, nxt = ev["itemid"].to_numpy()[:-1], ev["itemid"].to_numpy()[1:]
    keep = same & gap_ok & (cur != nxt)  # skip repeat views: both models would get them free
    cur, nxt = cur[keep], nxt[keep]
    split = int(0.8 * len(cur))
    succ: dict[int, Counter[int]] = {}
    for a, b in zip(cur[:split], nxt[:split], strict=True):
        succ.setdefault(int(a), Counter())[int(b)] += 1
    top = Counter(nxt[:split].tolist()).most_common(1)[0][0]
    seen = np.array([int(a) in succ for a in cur[split:]])
    bigram = np.array(
        [
            int(a) in succ and succ[int(a)].most_common(1)[0][0] == b
            for a, b in zip(cur[split:], nxt[split:], strict=True)
        ]
    )
    pop = nxt[split:] == top
    assert seen.mean() > 0.5
    assert bigram.mean() > 0.25
    assert bigram.mean() > 5 * pop.mean()
    assert pop.mean() > 0  # popularity is not useless: Zipf-like head


def test_popularity_is_zipf_like() -> None:
    from torchrec_mamba_preprocessing.synthetic import generate

    ev = generate(SyntheticConfig(num_events=20_000, seed=4)).events
    counts = np.sort(ev["itemid"].value_counts().to_numpy())[::-1]
    assert counts[0] > 20 * np.median(counts)
    top_share = counts[: max(1, len(counts) // 100)].sum() / counts.sum()
    assert 0.05 < top_share < 0.6  # a heavy head, not a single dominant item


def test_funnels_cart_after_repeat_and_purchase_after_cart() -> None:
    from torchrec_mamba_preprocessing.synthetic import generate

    ev = generate(SyntheticConfig(num_events=20_000, seed=5)).events
    ev = ev.sort_values(["visitorid", "timestamp"], kind="stable").reset_index(drop=True)
    prev = ev.shift(1)
    same_visitor = ev["visitorid"] == prev["visitorid"]
    cart = (ev["event"] == "addtocart") & same_visitor
    assert cart.sum() > 0
    assert (ev.loc[cart, "itemid"] == prev.loc[cart, "itemid"]).all()  # a repeat of the item
    buy = (ev["event"] == "transaction") & same_visitor
    assert buy.sum() > 0
    assert (prev.loc[buy, "event"] == "addtocart").all()
    assert (ev.loc[buy, "itemid"] == prev.loc[buy, "itemid"]).all()


def test_full_size_config_matches_retailrocket() -> None:
    cfg = SyntheticConfig.full().resolved()
    assert (cfg.num_events, cfg.num_items, cfg.num_categories) == (2_756_101, 417_053, 1_669)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_events": 0}, "num_events must be >= 1, got 0"),
        ({"p_repeat": 1.5}, r"p_repeat must be in \[0, 1\], got 1.5"),
        (
            {"p_successor": 0.9, "p_repeat": 0.2},
            "p_repeat \\+ p_successor \\+ p_same_category must be <= 1",
        ),
        ({"num_categories": 10, "num_roots": 6}, "num_categories >= 2 \\* num_roots"),
        (
            {"num_items": 20, "num_categories": 40},
            r"num_items \(20\) must be >= num_categories \(40\)",
        ),
        ({"mean_session_length": 1.0}, "mean_session_length must be >= 2"),
    ],
)
def test_bad_config(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs).resolved()  # type: ignore[arg-type]


def test_cli_writes_the_four_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = main(["--out", str(tmp_path), "--events", "500", "--seed", "2"])
    assert summary.num_events == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert "wrote 500 events" in capsys.readouterr().out
