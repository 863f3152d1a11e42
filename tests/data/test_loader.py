"""SequenceLoader: batch contents, determinism, exact resume, and rank balance."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.data.loader import SequenceLoader
from torchrec_mamba.data.readers import SequenceData, read_csv
from torchrec_mamba.data.split import SplitPart, leave_one_out, windows_from_sequences


def _data(num_users: int = 37, seed: int = 0) -> SequenceData:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, 50, int(n)).tolist() for n in rng.integers(3, 15, num_users)]
    return SequenceData.from_lists(seqs)


def _rows_of(batch: SequenceBatch, key: str = "item") -> list[tuple[list[int], list[int]]]:
    """(input, labels) per row, decoded from the jagged tensors independently of padded()."""
    f, y = batch.features[key], batch.labels[key]
    return [(a.tolist(), b.tolist()) for a, b in zip(f.to_dense(), y.to_dense(), strict=True)]


def _users(loader: SequenceLoader) -> list[int]:
    return [u for b in loader for u in b.user.tolist()]  # type: ignore[union-attr]


def test_train_batches_hold_shifted_windows() -> None:
    data = _data()
    split = leave_one_out(data, max_len=4)
    loader = SequenceLoader(split.train, batch_size=8, shuffle=False, seed=0)
    seen = []
    for batch in loader:
        batch.validate(num_items=data.num_items)
        for u, (inp, lab) in zip(batch.user.tolist(), _rows_of(batch), strict=True):  # type: ignore[union-attr]
            train = data.sequences[u][:-2].tolist()
            assert inp == train[:-1][-4:] and lab == train[1:][-4:]
            seen.append(u)
    assert seen == split.train.user_index.tolist()


def test_eval_batches_end_with_the_target() -> None:
    data = _data()
    split = leave_one_out(data, max_len=5)
    loader = SequenceLoader(split.test, batch_size=16, shuffle=False, seed=0)
    for batch in loader:
        for u, (inp, lab), target in zip(
            batch.user.tolist(),
            _rows_of(batch),
            batch.targets().tolist(),
            strict=True,  # type: ignore[union-attr]
        ):
            s = data.sequences[u].tolist()
            assert inp == s[:-1][-5:] and lab[-1] == target == s[-1] and lab[:-1] == inp[1:]
        assert batch.mask is None


def test_shuffle_is_deterministic_per_seed_and_epoch() -> None:
    part = leave_one_out(_data(), max_len=4).train
    a = SequenceLoader(part, batch_size=5, shuffle=True, seed=3)
    b = SequenceLoader(part, batch_size=5, shuffle=True, seed=3)
    c = SequenceLoader(part, batch_size=5, shuffle=True, seed=4)
    first = _users(a)
    assert first == _users(b)
    assert first != _users(c)
    assert sorted(first) == sorted(part.user_index.tolist())  # each row once
    second = _users(a)  # epoch advanced by itself
    assert a.epoch == 2 and second != first and sorted(second) == sorted(first)
    b.set_epoch(1)
    assert _users(b) == second
    plain = SequenceLoader(part, batch_size=5, shuffle=False, seed=3)
    assert _users(plain) == part.user_index.tolist() == _users(plain)


@pytest.mark.parametrize("stop_after", [0, 3, 6, 7])
def test_resume_mid_epoch_is_exact(stop_after: int) -> None:
    part = leave_one_out(_data(), max_len=4).train
    full = SequenceLoader(part, batch_size=4, shuffle=True, seed=11)
    n = len(full)
    assert n == 8  # stop_after = 7 is the last batch of the epoch
    reference = [_rows_of(b) for epoch in range(2) for b in (full.set_epoch(epoch) or full)]
    first = SequenceLoader(part, batch_size=4, shuffle=True, seed=11)
    got = []
    for i, batch in enumerate(first):
        if i == stop_after:
            break
        got.append(_rows_of(batch))
    # the batch at stop_after was handed out (and, say, lost in a crash): state counts it
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batch_index"] == min(stop_after + 1, n)
    resumed = SequenceLoader(part, batch_size=4, shuffle=True, seed=11)
    resumed.load_state_dict(state)
    for epoch in range(resumed.epoch, 2):
        resumed.set_epoch(epoch)  # same epoch as the state: keeps the position
        got.extend(_rows_of(b) for b in resumed)
    expected = reference[:stop_after] + reference[min(stop_after + 1, n) :]
    assert got == expected


def test_epoch_handed_out_without_stop_iteration_finishes_with_an_empty_pass() -> None:
    part = leave_one_out(_data(), max_len=4).train
    loader = SequenceLoader(part, batch_size=10, shuffle=True, seed=0)
    batches = list(itertools.islice(loader, len(loader)))  # exactly len() batches, no StopIteration
    assert len(batches) == len(loader) and loader.state_dict()["batch_index"] == len(loader)
    assert list(loader) == [] and loader.epoch == 1
    nxt = [b.user.tolist() for b in loader]  # type: ignore[union-attr]
    ref = SequenceLoader(part, batch_size=10, shuffle=True, seed=0)
    ref.set_epoch(1)
    assert nxt == [b.user.tolist() for b in ref]  # type: ignore[union-attr]


def test_load_state_dict_rejects_other_settings() -> None:
    part = leave_one_out(_data(), max_len=4).train
    state = SequenceLoader(part, batch_size=4, shuffle=True, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved seed=1 but this loader has seed=2"):
        SequenceLoader(part, batch_size=4, shuffle=True, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved world_size=1 but this loader has world_size=2"):
        SequenceLoader(part, batch_size=4, shuffle=True, seed=1, world_size=2).load_state_dict(
            state
        )
    with pytest.raises(ValueError, match="lacks 'num_rows'"):
        SequenceLoader(part, batch_size=4, shuffle=True, seed=1).load_state_dict({"seed": 1})
    bad = dict(state, batch_index=999)
    with pytest.raises(ValueError, match="invalid loader position"):
        SequenceLoader(part, batch_size=4, shuffle=True, seed=1).load_state_dict(bad)


@pytest.mark.parametrize("num_rows", [1, 5, 29, 32, 37])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_ranks_get_equal_batches_and_cover_every_row(
    num_rows: int, world_size: int, batch_size: int
) -> None:
    part = windows_from_sequences(
        "test",
        [np.array([1, 2, 3])] * num_rows,
        num_items=3,
        max_len=5,
        user_index=np.arange(num_rows) + 100,
    )
    per_rank = []
    for rank in range(world_size):
        loader = SequenceLoader(
            part, batch_size, shuffle=True, seed=5, rank=rank, world_size=world_size
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append(batches)
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, f"ranks disagree on the number of batches: {counts}"
    # batch by batch, every rank has the same batch size (no rank waits at a collective)
    for step in zip(*per_rank, strict=True):
        assert len({b.batch_size for b in step}) == 1
    real: list[int] = []
    repeated = 0
    for batches in per_rank:
        for b in batches:
            mask = torch.ones(b.batch_size, dtype=torch.bool) if b.mask is None else b.mask
            real += b.user[mask].tolist()  # type: ignore[index]
            repeated += int((~mask).sum())
    assert sorted(real) == list(range(100, 100 + num_rows))  # each real row exactly once
    assert repeated == -(-num_rows // world_size) * world_size - num_rows


@pytest.mark.parametrize("world_size", [1, 3])
def test_drop_last_keeps_only_full_batches(world_size: int) -> None:
    part = windows_from_sequences(
        "train", [np.array([1, 2])] * 29, num_items=2, max_len=5, user_index=np.arange(29)
    )
    users = []
    for rank in range(world_size):
        loader = SequenceLoader(
            part, 4, shuffle=True, seed=0, drop_last=True, rank=rank, world_size=world_size
        )
        batches = list(loader)
        assert len(batches) == len(loader) == 29 // (4 * world_size)
        assert all(b.batch_size == 4 and b.mask is None for b in batches)
        users += [u for b in batches for u in b.user.tolist()]  # type: ignore[union-attr]
    assert len(users) == len(set(users)) == len(batches) * 4 * world_size


def test_with_category(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    p.write_text(
        "user,item,timestamp,cat\n1,10,1,7\n1,20,2,8\n1,30,3,7\n1,40,4,9\n1,50,5,8\n2,20,1,8\n2,40,2,9\n2,10,3,7\n"
    )
    data = read_csv(p, category_col="cat")
    split = leave_one_out(data, max_len=10)
    batch = next(iter(SequenceLoader(split.test, 2, shuffle=False, seed=0, with_category=True)))
    assert batch.features.keys() == ["item", "category"] == batch.labels.keys()
    batch.validate(num_items=data.num_items, num_categories=data.num_categories)
    cat = data.item_category
    assert cat is not None
    for (items, item_labels), (cats, cat_labels) in zip(
        _rows_of(batch), _rows_of(batch, "category"), strict=True
    ):
        assert cats == cat[items].tolist() and cat_labels == cat[item_labels].tolist()
    with pytest.raises(
        ValueError, match="with_category=True but part 'test' has no item categories"
    ):
        SequenceLoader(leave_one_out(_data(), 3).test, 2, shuffle=False, seed=0, with_category=True)


def test_argument_errors() -> None:
    part = leave_one_out(_data(), max_len=4).train
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        SequenceLoader(part, 0, shuffle=False, seed=0)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        SequenceLoader(part, 4, shuffle=False, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        SequenceLoader(part, 4, shuffle=False, seed=-1)
    with pytest.raises(TypeError, match="split_part must be a SplitPart, got list"):
        SequenceLoader([], 4, shuffle=False, seed=0)  # type: ignore[arg-type]
    loader = SequenceLoader(part, 4, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        loader.set_epoch(-1)


def test_batch_building_is_fast() -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 10_000, 60) for _ in range(2048)]
    part = windows_from_sequences("train", seqs, num_items=9_999, max_len=50)
    loader = SequenceLoader(part, batch_size=256, shuffle=True, seed=0)
    rows, _ = loader.epoch_rows(0)
    loader.make_batch(rows[:256])  # warm-up
    times = []
    for i in range(8):
        start = time.perf_counter()
        batch = loader.make_batch(rows[i * 256 : (i + 1) * 256])
        times.append(time.perf_counter() - start)
    assert batch.batch_size == 256 and int(batch.lengths().max()) == 50
    assert float(np.median(times)) < 2e-3, f"median batch build {np.median(times) * 1e3:.2f} ms"


def test_part_type_is_reexported() -> None:
    from torchrec_mamba import data

    assert data.SequenceLoader is SequenceLoader and data.SplitPart is SplitPart


def _bucket_part(n: int = 97) -> SplitPart:
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, 20, size=int(k)) for k in rng.integers(2, 30, size=n)]
    return windows_from_sequences("train", seqs, num_items=20, max_len=25)


@pytest.mark.parametrize("world_size", [1, 2])
def test_bucketing_serves_every_row_once_in_length_sorted_batches(world_size: int) -> None:
    part = _bucket_part()
    lengths = np.diff(part.offsets)
    spreads, plain_spreads = [], []
    served = []
    for rank in range(world_size):
        bucketed = SequenceLoader(part, 8, shuffle=True, seed=1, rank=rank, world_size=world_size, bucket=4)
        plain = SequenceLoader(part, 8, shuffle=True, seed=1, rank=rank, world_size=world_size)
        rows_b, _ = bucketed.epoch_rows(0)
        rows_p, _ = plain.epoch_rows(0)
        # same rows per rank, only reordered; same batch count on every rank
        assert sorted(rows_b.tolist()) == sorted(rows_p.tolist())
        assert len(bucketed) == len(plain)
        served.extend(rows_b.tolist())
        for i in range(len(bucketed)):
            spreads.append(np.ptp(lengths[rows_b[i * 8 : (i + 1) * 8]]))
            plain_spreads.append(np.ptp(lengths[rows_p[i * 8 : (i + 1) * 8]]))
    assert set(served) == set(range(len(part)))
    assert np.mean(spreads) < 0.5 * np.mean(plain_spreads)


def test_bucketing_is_deterministic_and_varies_by_epoch() -> None:
    part = _bucket_part()
    a = SequenceLoader(part, 8, shuffle=True, seed=5, bucket=3)
    b = SequenceLoader(part, 8, shuffle=True, seed=5, bucket=3)
    np.testing.assert_array_equal(a.epoch_rows(0)[0], b.epoch_rows(0)[0])
    assert not np.array_equal(a.epoch_rows(0)[0], a.epoch_rows(1)[0])


def test_bucket_must_be_non_negative_and_match_on_resume() -> None:
    part = _bucket_part()
    with pytest.raises(ValueError, match="bucket must be an int >= 0, got -1"):
        SequenceLoader(part, 8, shuffle=True, seed=0, bucket=-1)
    state = SequenceLoader(part, 8, shuffle=True, seed=0, bucket=2).state_dict()
    with pytest.raises(ValueError, match="saved bucket=2 but this loader has bucket=0"):
        SequenceLoader(part, 8, shuffle=True, seed=0).load_state_dict(state)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sort_by_length_serves_the_same_rows_sorted_with_their_masks(world_size: int) -> None:
    part = _bucket_part()
    lengths = np.diff(part.offsets)
    for rank in range(world_size):
        plain = SequenceLoader(part, 8, shuffle=False, seed=0, rank=rank, world_size=world_size)
        ranked = SequenceLoader(part, 8, shuffle=False, seed=0, rank=rank, world_size=world_size,
                                sort_by_length=True)
        rows_p, real_p = plain.epoch_rows(0)
        rows_s, real_s = ranked.epoch_rows(0)
        assert len(ranked) == len(plain)
        assert np.all(np.diff(lengths[rows_s]) >= 0)
        # the same (row, real) pairs: a repeated filler row stays masked wherever it lands
        assert sorted(zip(rows_s.tolist(), real_s.tolist(), strict=True)) == sorted(
            zip(rows_p.tolist(), real_p.tolist(), strict=True))
        padded_plain = sum(b.padded()[0].numel() for b in plain)
        padded_sorted = sum(b.padded()[0].numel() for b in ranked)
        assert padded_sorted < 0.8 * padded_plain


def test_sort_by_length_is_for_evaluation_and_must_match_on_resume() -> None:
    part = _bucket_part()
    with pytest.raises(ValueError, match="sort_by_length=True is for evaluation loaders"):
        SequenceLoader(part, 8, shuffle=True, seed=0, sort_by_length=True)
    state = SequenceLoader(part, 8, shuffle=False, seed=0, sort_by_length=True).state_dict()
    with pytest.raises(ValueError, match="sort_by_length=1 but this loader has sort_by_length=0"):
        SequenceLoader(part, 8, shuffle=False, seed=0).load_state_dict(state)
    # a state saved before the option existed loads into a plain loader
    old = {k: v for k, v in SequenceLoader(part, 8, shuffle=False, seed=0).state_dict().items()
           if k != "sort_by_length"}
    SequenceLoader(part, 8, shuffle=False, seed=0).load_state_dict(old)
