"""ParquetSequenceLoader: shifted labels, eval targets, truncation, rank balance, vocab sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.data.parquet import ParquetSequenceLoader, read_vocab_sizes, shard_files


def _rows(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 40, int(k)).tolist() for k in rng.integers(2, 12, n)]


@pytest.fixture()
def shards(tmp_path: Path) -> tuple[Path, list[list[int]]]:
    """Four shards of 5, 4, 4 and 3 rows (uneven on purpose); visitorid = global row number."""
    sizes = [5, 4, 4, 3]
    rows = _rows(sum(sizes), seed=0)
    start = 0
    for i, n in enumerate(sizes):
        items = rows[start : start + n]
        pd.DataFrame(
            {
                "item_list": items,
                # category = item // 4 + 3 (ids >= 3), so it can be checked per position
                "category_list": [[x // 4 + 3 for x in r] for r in items],
                "event_list": [[3] * len(r) for r in items],
                "visitorid": np.arange(start, start + n, dtype=np.int64),
            }
        ).to_parquet(tmp_path / f"part_{i}.parquet")
        start += n
    return tmp_path, rows


def _decode(batch: SequenceBatch, key: str = "item") -> list[tuple[list[int], list[int]]]:
    f, y = batch.features[key], batch.labels[key]
    return [(a.tolist(), b.tolist()) for a, b in zip(f.to_dense(), y.to_dense(), strict=True)]


def test_train_mode_shifts_labels(shards: tuple[Path, list[list[int]]]) -> None:
    path, rows = shards
    loader = ParquetSequenceLoader(path, batch_size=4, shuffle=False, mode="train")
    seen = {}
    for batch in loader:
        assert batch.mask is None
        batch.validate()
        for uid, (x, y), (cx, cy) in zip(
            batch.user.tolist(), _decode(batch), _decode(batch, "category"), strict=True
        ):
            seen[uid] = (x, y)
            assert cx == [v // 4 + 3 for v in x] and cy == [v // 4 + 3 for v in y]
    assert seen == {i: (r[:-1], r[1:]) for i, r in enumerate(rows)}
    assert loader.num_rows == len(rows) and len(loader) == 4


def test_eval_mode_targets_are_the_last_event(shards: tuple[Path, list[list[int]]]) -> None:
    path, rows = shards
    loader = ParquetSequenceLoader(path, batch_size=5, mode="eval", keys=("item", "event"))
    assert not loader.shuffle
    users = torch.cat([b.user for b in loader]).tolist()
    targets = torch.cat([b.targets() for b in loader]).tolist()
    assert users == list(range(len(rows)))  # file order
    assert targets == [r[-1] for r in rows]
    batch = next(iter(loader))
    ids, lengths = batch.padded()
    assert lengths.tolist() == [len(r) - 1 for r in rows[:5]]
    assert ids.shape == (5, max(len(r) - 1 for r in rows[:5]))
    assert ids[0, : lengths[0]].tolist() == rows[0][:-1]
    assert (ids[0, lengths[0] :] == 0).all()  # padded with 0 by the batch, not stored


@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_max_len_keeps_the_last_events(shards: tuple[Path, list[list[int]]], max_len: int) -> None:
    path, rows = shards
    loader = ParquetSequenceLoader(path, batch_size=32, max_len=max_len, mode="eval")
    (batch,) = list(loader)
    for (x, y), r in zip(_decode(batch), rows, strict=True):
        w = r[-(max_len + 1) :]
        assert (x, y) == (w[:-1], w[1:])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_rank_yields_the_same_number_of_batches(
    shards: tuple[Path, list[list[int]]], world_size: int
) -> None:
    """4 files: split by file for W in {1, 2, 4}, by row for W = 3. Every row is real exactly once."""
    path, rows = shards
    lens, real_users = [], []
    for rank in range(world_size):
        loader = ParquetSequenceLoader(
            path, batch_size=2, rank=rank, world_size=world_size, seed=7, mode="eval"
        )
        batches = list(loader)
        lens.append(len(batches))
        assert len(batches) == len(loader)
        for b in batches:
            keep = torch.ones(b.batch_size, dtype=torch.bool) if b.mask is None else b.mask
            real_users += b.user[keep].tolist()
            targets = b.targets().tolist()
            assert targets == [rows[u][-1] for u in b.user.tolist()]
    assert len(set(lens)) == 1, lens
    assert sorted(real_users) == list(range(len(rows)))


def test_file_split_assigns_whole_files(shards: tuple[Path, list[list[int]]]) -> None:
    path, _ = shards
    r0 = ParquetSequenceLoader(path, batch_size=3, rank=0, world_size=2, shuffle=False)
    r1 = ParquetSequenceLoader(path, batch_size=3, rank=1, world_size=2, shuffle=False)
    # rank 0: files 0 and 2 (5 + 4 rows), rank 1: files 1 and 3 (4 + 3 rows, one row repeated)
    assert (r0.num_rows, r1.num_rows) == (9, 7)
    assert r0.rank_rows == r1.rank_rows == [9, 7]
    assert len(r0) == len(r1) == 3
    users1 = [u for b in r1 for u in b.user.tolist()]
    masks1 = torch.cat(
        [b.mask if b.mask is not None else torch.ones(b.batch_size, dtype=torch.bool) for b in r1]
    )
    assert users1[:7] == [5, 6, 7, 8, 13, 14, 15]
    assert masks1.tolist() == [True] * 7 + [False] * 2


def test_shuffle_is_seeded_per_epoch(shards: tuple[Path, list[list[int]]]) -> None:
    path, _ = shards

    def order(seed: int, epoch: int) -> list[int]:
        loader = ParquetSequenceLoader(path, batch_size=4, seed=seed)
        loader.set_epoch(epoch)
        return [u for b in loader for u in b.user.tolist()]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert sorted(order(1, 3)) == list(range(16))
    loader = ParquetSequenceLoader(path, batch_size=4, seed=1)
    first = [u for b in loader for u in b.user.tolist()]
    second = [u for b in loader for u in b.user.tolist()]  # iteration moves to the next epoch
    assert first == order(1, 0) and second == order(1, 1)


def test_read_vocab_sizes(tmp_path: Path) -> None:
    schema = {
        "feature": [
            {
                "name": "item_list",
                "intDomain": {"name": "item", "max": "9229", "isCategorical": True},
            },
            {
                "name": "category_list",
                "intDomain": {"name": "category", "max": "275", "isCategorical": True},
            },
            {"name": "time_gap_list", "type": "FLOAT"},
            {"name": "session_id", "type": "INT"},
        ]
    }
    (tmp_path / "train" / ".merlin").mkdir(parents=True)
    (tmp_path / "train" / ".merlin" / "schema.json").write_text(json.dumps(schema))
    want = {"item": 9230, "category": 276}
    assert read_vocab_sizes(tmp_path) == want
    assert read_vocab_sizes(tmp_path / "train") == want
    with pytest.raises(FileNotFoundError, match="no Merlin schema"):
        read_vocab_sizes(tmp_path / "nothing")


def test_bad_arguments(shards: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    path, _ = shards
    with pytest.raises(ValueError, match="mode must be 'train' or 'eval', got 'test'"):
        ParquetSequenceLoader(path, 4, mode="test")
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        ParquetSequenceLoader(path, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="keys must start with 'item'"):
        ParquetSequenceLoader(path, 4, keys=("category", "item"))
    with pytest.raises(ValueError, match=r"unknown keys \['brand'\]"):
        ParquetSequenceLoader(path, 4, keys=("item", "brand"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['top_category_list'\]"):
        ParquetSequenceLoader(path, 4, keys=("item", "top_category"))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        ParquetSequenceLoader(path, 0)
    with pytest.raises(FileNotFoundError, match="no parquet shards"):
        shard_files(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        shard_files([path / "part_9.parquet"])


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_rows_without_a_target_are_rejected(tmp_path: Path) -> None:
    pd.DataFrame({"item_list": [[3, 4], [5]]}).to_parquet(tmp_path / "part_0.parquet")
    with pytest.raises(
        ValueError, match=r"row 1 of .* has 1 event\(s\); every row needs at least 2"
    ):
        ParquetSequenceLoader(tmp_path, 4, keys=("item",))
    pd.DataFrame({"item_list": [[3, 0]]}).to_parquet(tmp_path / "part_0.parquet")
    with pytest.raises(ValueError, match=r"item_list holds id 0 < 1 \(0 is padding\)"):
        ParquetSequenceLoader(tmp_path, 4, keys=("item",))


@pytest.fixture()
def long_shards(tmp_path: Path) -> Path:
    """Four shards (62, 61, 60, 58 rows) of 2 to 40 events; visitorid = global row number."""
    rng = np.random.default_rng(4)
    start = 0
    for i, n in enumerate([62, 61, 60, 58]):
        items = [rng.integers(3, 40, int(k)).tolist() for k in rng.integers(2, 41, n)]
        pd.DataFrame(
            {"item_list": items, "visitorid": np.arange(start, start + n, dtype=np.int64)}
        ).to_parquet(tmp_path / f"part_{i}.parquet")
        start += n
    return tmp_path


def _spread(loader: ParquetSequenceLoader, epoch: int = 0) -> float:
    """Mean (longest - shortest input) per batch, from the served batches."""
    loader.set_epoch(epoch)
    spreads = [int(np.ptp(b.features["item"].lengths().numpy())) for b in loader]
    return float(np.mean(spreads))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_bucketing_serves_every_row_once_in_length_sorted_batches(
    long_shards: Path, world_size: int
) -> None:
    """W = 2 splits by file, W = 3 by row (4 files); both repeat rows for balance."""
    users, counts = [], []
    for rank in range(world_size):
        kw = dict(rank=rank, world_size=world_size, seed=3, keys=("item",), max_len=30)
        plain = ParquetSequenceLoader(long_shards, 8, **kw)
        bucketed = ParquetSequenceLoader(long_shards, 8, bucket=4, **kw)
        rows_p, real_p = plain.epoch_rows(0)
        rows_b, real_b = bucketed.epoch_rows(0)
        # the same (row, real) entries, reordered; same batch count as without bucketing
        assert sorted(zip(rows_b.tolist(), real_b.tolist(), strict=True)) == sorted(
            zip(rows_p.tolist(), real_p.tolist(), strict=True)
        )
        assert len(bucketed) == len(plain)
        batches = list(bucketed)
        counts.append(len(batches))
        for b in batches:
            keep = torch.ones(b.batch_size, dtype=torch.bool) if b.mask is None else b.mask
            users += b.user[keep].tolist()
        assert _spread(bucketed) < 0.5 * _spread(plain)
    assert len(set(counts)) == 1, counts
    assert sorted(users) == list(range(241))  # every row real exactly once over the ranks


def test_bucketing_sorts_by_truncated_length(long_shards: Path) -> None:
    """With bucket spanning the whole epoch, batches are runs of the sorted truncated lengths."""
    loader = ParquetSequenceLoader(long_shards, 8, keys=("item",), max_len=10, bucket=100)
    rows, _ = loader.epoch_rows(0)
    lens = loader.input_lengths(rows)  # (R,)
    want = np.sort(lens)
    full = len(rows) // 8
    batches = sorted(lens[: full * 8].reshape(full, 8).tolist())
    assert batches == want[: full * 8].reshape(full, 8).tolist()
    np.testing.assert_array_equal(lens[full * 8 :], want[full * 8 :])  # short last batch last
    assert lens.max() == 10 and lens.min() >= 1


def test_bucketing_is_deterministic_and_varies_by_epoch(long_shards: Path) -> None:
    a = ParquetSequenceLoader(long_shards, 8, keys=("item",), seed=5, bucket=2)
    b = ParquetSequenceLoader(long_shards, 8, keys=("item",), seed=5, bucket=2)
    np.testing.assert_array_equal(a.epoch_rows(0)[0], b.epoch_rows(0)[0])
    assert not np.array_equal(a.epoch_rows(0)[0], a.epoch_rows(1)[0])
    first = [u for batch in a for u in batch.user.tolist()]
    assert first == [u for batch in b for u in batch.user.tolist()]
    assert first == a.epoch_rows(0)[0].tolist()  # row i of the rank is visitorid i (W = 1)


def test_bucket_needs_shuffle_and_is_validated(long_shards: Path) -> None:
    plain = ParquetSequenceLoader(long_shards, 8, keys=("item",), mode="eval")
    ignored = ParquetSequenceLoader(long_shards, 8, keys=("item",), mode="eval", bucket=4)
    np.testing.assert_array_equal(plain.epoch_rows(0)[0], ignored.epoch_rows(0)[0])
    with pytest.raises(ValueError, match="bucket must be an int >= 0, got -1"):
        ParquetSequenceLoader(long_shards, 8, keys=("item",), bucket=-1)
    with pytest.raises(ValueError, match="bucket must be an int >= 0, got 2.0"):
        ParquetSequenceLoader(long_shards, 8, keys=("item",), bucket=2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sort_by_length_serves_the_same_rows_sorted_with_their_masks(
    long_shards: Path, world_size: int
) -> None:
    """W = 2 splits by file, W = 3 by row; repeated balance rows keep real=False after sorting."""
    users = []
    for rank in range(world_size):
        kw = dict(rank=rank, world_size=world_size, keys=("item",), max_len=30, mode="eval")
        plain = ParquetSequenceLoader(long_shards, 8, **kw)
        ordered = ParquetSequenceLoader(long_shards, 8, sort_by_length=True, **kw)
        rows_p, real_p = plain.epoch_rows(0)
        rows_s, real_s = ordered.epoch_rows(0)
        assert sorted(zip(rows_s.tolist(), real_s.tolist(), strict=True)) == sorted(
            zip(rows_p.tolist(), real_p.tolist(), strict=True))
        lens = ordered.input_lengths(rows_s)  # truncated at max_len
        assert (np.diff(lens) >= 0).all() and lens.max() == 30
        batches = list(ordered)
        assert len(batches) == len(plain)
        for b in batches:
            served = b.features["item"].lengths().numpy()
            assert served.max() - served.min() <= 29
            keep = torch.ones(b.batch_size, dtype=torch.bool) if b.mask is None else b.mask
            users += b.user[keep].tolist()
        assert _spread(ordered) < 0.5 * _spread(plain)
    assert sorted(users) == list(range(241))  # every row real exactly once over the ranks


def test_sort_by_length_is_for_evaluation_and_must_match_on_resume(long_shards: Path) -> None:
    with pytest.raises(ValueError, match="sort_by_length=True is for evaluation loaders"):
        ParquetSequenceLoader(long_shards, 8, keys=("item",), sort_by_length=True)  # train mode
    with pytest.raises(ValueError, match="sort_by_length=True is for evaluation loaders"):
        ParquetSequenceLoader(long_shards, 8, keys=("item",), mode="eval", shuffle=True,
                              sort_by_length=True)
    kw = dict(keys=("item",), mode="eval")
    state = ParquetSequenceLoader(long_shards, 8, sort_by_length=True, **kw).state_dict()
    with pytest.raises(ValueError, match="sort_by_length=1 but this loader has sort_by_length=0"):
        ParquetSequenceLoader(long_shards, 8, **kw).load_state_dict(state)
    old = {k: v for k, v in ParquetSequenceLoader(long_shards, 8, **kw).state_dict().items()
           if k != "sort_by_length"}  # a state saved before the key existed
    ParquetSequenceLoader(long_shards, 8, **kw).load_state_dict(old)
