"""The NVTabular RetailRocket workflow: worked example, schema, ids, shards, and the pandas oracle."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rr_common import LOO_SPLIT, TIME_SPLIT  # type: ignore[import-not-found]
from torchrec_mamba_preprocessing.pandas_reference import compare, read_split, reference_etl
from torchrec_mamba_preprocessing.report import ETLReport
from torchrec_mamba_preprocessing.retailrocket import ETLConfig, list_columns, run_etl

from torchrec_mamba.data.parquet import ParquetSequenceLoader, read_vocab_sizes

LISTS = list(list_columns())


def _etl(raw: Path, out: Path, **kw: object) -> ETLReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_etl(raw, out, ETLConfig(**kw))  # type: ignore[arg-type]


def test_worked_example_by_hand(tmp_path: Path, write_raw: Callable[..., Path]) -> None:
    """The handmade log of rr_common.py, encoded by hand (see the comments there)."""
    raw = write_raw(tmp_path / "raw")
    report = _etl(raw, tmp_path / "out", test_days=0, valid_days=0, log_time_gaps=False)
    got = read_split(tmp_path / "out" / "train")
    # vocabularies by count desc, then raw id asc; 0 pad, 1 null, 2 OOV
    #   items 10 (x2) -> 3, 11 (x2) -> 4, 12 -> 5; categories 102 (x2) -> 3, 100 -> 4, 101 -> 5
    #   top-level 200 (x2) -> 3, 201 (x2) -> 4; events view -> 3, addtocart -> 4
    assert got["session_id"].tolist() == [0, 1]
    assert [list(v) for v in got["item_list"]] == [[3, 4, 4], [5, 3]]
    # item 10 is in 100 at t=0 and in 101 after minute 30; item 11 only gets 102 later (earliest
    # value); item 12 is never categorised (null -> 1)
    assert [list(v) for v in got["category_list"]] == [[4, 3, 3], [1, 5]]
    assert [list(v) for v in got["top_category_list"]] == [[3, 4, 4], [1, 3]]
    assert [list(v) for v in got["event_list"]] == [[3, 3, 4], [3, 3]]
    assert [list(v) for v in got["time_gap_list"]] == [[0.0, 60.0, 60.0], [0.0, 60.0]]
    assert got["visitorid"].tolist() == [1, 1]
    assert got["start_ms"].tolist() == [0, 33 * 60_000]
    assert got["end_ms"].tolist() == [2 * 60_000, 34 * 60_000]
    assert (report.sessions, report.single_event_sessions, report.visitors) == (3, 1, 2)
    assert (report.events_category_from_earliest, report.events_without_category) == (2, 1)
    assert report.splits["train"].short_rows_dropped == 1
    assert report.splits["valid"].rows == report.splits["test"].rows == 0
    assert report.vocab_sizes == {"item": 6, "category": 6, "top_category": 5, "event": 5}
    vocab = pd.read_csv(tmp_path / "out" / "vocabs" / "item.csv")
    assert vocab.values.tolist() == [[10, 3, 2], [11, 4, 2], [12, 5, 1]]
    events = pd.read_csv(tmp_path / "out" / "vocabs" / "event.csv")
    assert events.values.tolist() == [["view", 3, 4], ["addtocart", 4, 1]]


def test_log_time_gaps(tmp_path: Path, write_raw: Callable[..., Path]) -> None:
    raw = write_raw(tmp_path / "raw")
    _etl(raw, tmp_path / "out", test_days=0, valid_days=0)
    got = read_split(tmp_path / "out" / "train")
    want = np.log1p(np.array([0.0, 60.0, 60.0], dtype=np.float32))
    torch.testing.assert_close(
        torch.tensor(np.asarray(got["time_gap_list"][0])), torch.from_numpy(want)
    )


def test_parquet_and_merlin_schema(etl_time: tuple[Path, ETLReport]) -> None:
    out, _ = etl_time
    schema = pq.read_schema(out / "train" / "part_0.parquet")
    for col in LISTS:
        want = pa.float32() if col == "time_gap_list" else pa.int64()
        assert pa.types.is_list(schema.field(col).type), col
        assert schema.field(col).type.value_type == want, col
    for col in ("session_id", "start_ms", "end_ms", "visitorid"):
        assert schema.field(col).type == pa.int64(), col
    merlin = json.loads((out / "train" / ".merlin" / "schema.json").read_text())
    feats = {f["name"]: f for f in merlin["feature"]}
    assert set(feats) == {*LISTS, "session_id", "start_ms", "end_ms", "visitorid"}
    for col in LISTS:
        tags = feats[col]["annotation"]["tag"]
        assert "list" in tags, col
        assert ("categorical" in tags) == (col != "time_gap_list"), col
        assert feats[col]["valueCount"]["max"] == str(TIME_SPLIT["max_len"])
    assert "list" not in feats["session_id"]["annotation"].get("tag", [])
    assert (out / "train" / "schema.pbtxt").is_file()
    assert (out / "workflow" / "workflow.pkl").is_file()
    assert sorted(p.name for p in (out / "workflow" / "categories").glob("unique.*.parquet")) == [
        "unique.category.parquet",
        "unique.event.parquet",
        "unique.item.parquet",
        "unique.top_category.parquet",
    ]


def test_id_conventions_and_vocabularies(etl_time: tuple[Path, ETLReport]) -> None:
    out, report = etl_time
    sizes = read_vocab_sizes(out)
    assert sizes == report.vocab_sizes
    for col in ("item", "category", "top_category", "event"):
        vocab = pd.read_csv(out / "vocabs" / f"{col}.csv")
        assert vocab["id"].tolist() == list(range(3, sizes[col]))  # ids start at 3, no gaps
        assert vocab["raw"].is_unique
        assert vocab["count"].is_monotonic_decreasing
        ties = vocab.groupby("count")["raw"].apply(lambda r: r.is_monotonic_increasing)
        assert ties.all(), col  # canonical tie order: raw value ascending
        seen = np.concatenate(
            [
                np.concatenate(read_split(out / s)[f"{col}_list"].to_numpy())
                for s in ("train", "valid", "test")
            ]
        )
        assert seen.min() >= (3 if col in ("item", "event") else 1)
        assert seen.max() < sizes[col]
        assert not (seen == 0).any() and not (seen == 2).any()  # no padding stored, no OOV
    # never-categorised items exist in this data (uncategorised_fraction=0.1): null id 1
    cats = np.concatenate(read_split(out / "train")["category_list"].to_numpy())
    assert (cats == 1).any()


def test_train_and_eval_share_one_encoding(etl_time: tuple[Path, ETLReport]) -> None:
    """Decode every split with the one exported vocabulary: each raw item keeps one id."""
    out, _ = etl_time
    vocab = pd.read_csv(out / "vocabs" / "item.csv").set_index("id")["raw"]
    ref = reference_etl(_raw_of(out), max_len=TIME_SPLIT["max_len"])
    inv = pd.Series(ref.vocabs["item"].index, index=ref.vocabs["item"].to_numpy())
    for split in ("train", "valid", "test"):
        got = read_split(out / split)
        want = ref.splits[split]
        raw_ids = [vocab.loc[np.asarray(v)].tolist() for v in got["item_list"]]
        want_raw = [inv.loc[np.asarray(v)].tolist() for v in want["item_list"]]
        assert raw_ids == want_raw, split


def _raw_of(out: Path) -> Path:
    return Path(json.loads((out / "etl_report.json").read_text())["raw_dir"])


@pytest.mark.parametrize("which", ["time", "loo"])
def test_pandas_reference_equals_nvtabular(
    which: str, etl_time: tuple[Path, ETLReport], etl_loo: tuple[Path, ETLReport]
) -> None:
    out, report = etl_time if which == "time" else etl_loo
    opts = TIME_SPLIT if which == "time" else LOO_SPLIT
    ref = reference_etl(
        _raw_of(out), **{k: v for k, v in opts.items() if k not in ("world_size", "num_shards")}
    )
    key = "session_id" if opts.get("group_by", "session") == "session" else "visitorid"
    assert compare(out, ref, key=key) == []
    assert ref.vocab_sizes == report.vocab_sizes
    assert {s: len(f) for s, f in ref.splits.items()} == {
        s: st.rows for s, st in report.splits.items()
    }


def test_shards_are_a_multiple_of_world_size_and_balanced(
    etl_time: tuple[Path, ETLReport], etl_loo: tuple[Path, ETLReport]
) -> None:
    for (out, report), shards in (
        (etl_time, TIME_SPLIT["num_shards"]),
        (etl_loo, LOO_SPLIT["world_size"]),
    ):
        for split, stats in report.splits.items():
            files = sorted((out / split).glob("part_*.parquet"))
            assert len(files) == shards, (out, split)
            rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
            assert sum(rows) == stats.rows
            assert max(rows) - min(rows) <= 1, rows


def test_report_accounts_for_every_event(etl_time: tuple[Path, ETLReport], synth_cfg) -> None:  # noqa: ANN001
    out, report = etl_time
    assert report.events_read == synth_cfg.num_events
    assert report.events_kept == report.events_read  # clean synthetic data
    written = sum(s.events for s in report.splits.values())
    dropped = sum(s.short_row_events_dropped for s in report.splits.values())
    assert written + dropped == report.events_kept  # a time split puts each event in one split
    assert sum(s.short_rows_dropped for s in report.splits.values()) == report.single_event_sessions
    saved = json.loads((out / "etl_report.json").read_text())
    assert saved["splits"]["train"]["rows"] == report.splits["train"].rows
    lengths = np.array([len(v) for v in read_split(out / "train")["item_list"]])
    assert lengths.max() == TIME_SPLIT["max_len"]
    assert (lengths == TIME_SPLIT["max_len"]).sum() >= report.splits["train"].truncated_rows > 0


def test_saved_workflow_reproduces_the_shards(etl_time: tuple[Path, ETLReport]) -> None:
    import nvtabular as nvt
    from torchrec_mamba_preprocessing import raw as rawmod
    from torchrec_mamba_preprocessing.retailrocket import _to_dataset
    from torchrec_mamba_preprocessing.sessions import sessionise, split_events, split_masks

    out, _ = etl_time
    raw = _raw_of(out)
    r = ETLReport()
    ev = rawmod.read_events(raw / "events.csv", r)
    cats = rawmod.read_item_categories(
        [raw / "item_properties_part1.csv", raw / "item_properties_part2.csv"], r
    )
    tree = rawmod.read_category_tree(raw / "category_tree.csv", r)
    table = sessionise(
        ev, rawmod.category_at_event_time(ev, cats, r), rawmod.category_roots(tree), r
    )
    sub, _ = split_events(table, split_masks(table)["test"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf = nvt.Workflow.load(str(out / "workflow"))
        again = wf.transform(_to_dataset([sub], cpu=True)).to_ddf().compute()
    written = read_split(out / "test")
    assert again["session_id"].tolist() == written["session_id"].tolist()
    for col in ("item_list", "category_list", "event_list"):
        assert [list(v) for v in again[col]] == [list(v) for v in written[col]], col


def test_too_many_shards_for_a_split(tmp_path: Path, write_raw: Callable[..., Path]) -> None:
    raw = write_raw(tmp_path / "raw")
    with pytest.raises(ValueError, match="train split has 2 rows, fewer than the 4 shards"):
        _etl(raw, tmp_path / "out", test_days=0, valid_days=0, num_shards=4)


def test_cli(tmp_path: Path, write_raw: Callable[..., Path]) -> None:
    from torchrec_mamba_preprocessing.retailrocket import main

    raw = write_raw(tmp_path / "raw")
    out = tmp_path / "out"
    args = ["--raw", str(raw), "--out", str(out), "--test-days", "0", "--valid-days", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = main([*args, "--raw-time-gaps", "--max-len", "2", "--session-gap-minutes", "40"])
    # a 40-minute gap keeps visitor 1's five events in one session; max_len 2 keeps the last two
    assert report.sessions == 2 and report.splits["train"].rows == 1
    got = read_split(out / "train")
    # vocabulary over all five events: 10 -> 3, 11 -> 4, 12 -> 5; the last two are 12, 10
    assert [list(v) for v in got["item_list"]] == [[5, 3]]
    assert [list(v) for v in got["time_gap_list"]] == [[31 * 60.0, 60.0]]
    meta = json.loads((out / "etl_meta.json").read_text())
    assert meta["config"]["max_len"] == 2 and meta["vocab_sizes"] == report.vocab_sizes


def test_loader_on_etl_output(etl_time: tuple[Path, ETLReport]) -> None:
    out, report = etl_time
    sizes = read_vocab_sizes(out / "test")
    test = read_split(out / "test")
    loaders = [
        ParquetSequenceLoader(
            out / "test",
            batch_size=16,
            keys=("item", "category"),
            rank=r,
            world_size=2,
            mode="eval",
        )
        for r in range(2)
    ]
    assert len(loaders[0]) == len(loaders[1])
    assert loaders[0].vocab_sizes == sizes == report.vocab_sizes
    targets = {}
    for loader in loaders:
        for batch in loader:
            batch.validate(num_items=sizes["item"] - 1, num_categories=sizes["category"] - 1)
            keep = (
                batch.mask
                if batch.mask is not None
                else torch.ones(batch.batch_size, dtype=torch.bool)
            )
            for sid, t in zip(
                batch.user[keep].tolist(), batch.targets()[keep].tolist(), strict=True
            ):
                targets.setdefault(sid, []).append(t)
    # every test row exactly once over both ranks; the target is the row's last item
    want = {}
    for v, items in zip(test["visitorid"], test["item_list"], strict=True):
        want.setdefault(int(v), []).append(int(items[-1]))
    assert {k: sorted(v) for k, v in targets.items()} == {k: sorted(v) for k, v in want.items()}
    assert sum(len(v) for v in targets.values()) == report.splits["test"].rows


@pytest.mark.data
def test_real_raw_retailrocket_when_present(shared_data: Path) -> None:
    """The real Kaggle files, when someone provides them (the shared copy holds sessions only)."""
    from torchrec_mamba_preprocessing.raw import read_events

    raw = shared_data / "retailrocket"
    if not (raw / "events.csv").is_file():
        pytest.skip(f"raw RetailRocket events.csv not in {raw} (only preprocessed sessions there)")
    report = ETLReport()
    events = read_events(raw / "events.csv", report)
    assert report.events_read == 2_756_101
    assert len(events) == report.events_kept == report.events_read - report.duplicate_events_dropped
