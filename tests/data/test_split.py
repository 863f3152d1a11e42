"""Leave-one-out split against a plain-Python statement of the protocol."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from torchrec_mamba.data.readers import SequenceData, read_sasrec
from torchrec_mamba.data.split import SplitPart, leave_one_out, windows_from_sequences


def _reference(
    seqs: list[list[int]], max_len: int
) -> dict[str, list[tuple[int, list[int], list[int]]]]:
    """(user row, input, labels) per part, straight from the protocol text."""
    out: dict[str, list[tuple[int, list[int], list[int]]]] = {"train": [], "valid": [], "test": []}
    for u, s in enumerate(seqs):
        n = len(s)
        train = s[:-2] if n >= 3 else s
        if len(train) >= 2:
            out["train"].append((u, train[:-1][-max_len:], train[1:][-max_len:]))
        if n >= 3:
            out["valid"].append((u, s[:-2][-max_len:], (s[:-2] + [s[-2]])[1:][-max_len:]))
            out["test"].append((u, s[:-1][-max_len:], s[1:][-max_len:]))
    return out


def _rows(part: SplitPart) -> list[tuple[int, list[int], list[int]]]:
    return [
        (int(part.user_index[r]), part.row(r)[:-1].tolist(), part.row(r)[1:].tolist())
        for r in range(len(part))
    ]


@pytest.mark.parametrize("max_len", [1, 2, 3, 50])
def test_matches_protocol_reference(max_len: int) -> None:
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 30, int(n)).tolist() for n in rng.integers(1, 12, 60)]
    data = SequenceData.from_lists(seqs)
    dense = [s.tolist() for s in data.sequences]
    split = leave_one_out(data, max_len=max_len)
    expected = _reference(dense, max_len)
    for name in ("train", "valid", "test"):
        assert _rows(getattr(split, name)) == expected[name], name
    # the target of each eval row is the held-out item
    np.testing.assert_array_equal(
        split.test.targets(), [dense[u][-1] for u, _, _ in expected["test"]]
    )
    np.testing.assert_array_equal(
        split.valid.targets(), [dense[u][-2] for u, _, _ in expected["valid"]]
    )
    lengths = np.array([len(s) for s in dense])
    assert split.stats["users"] == 60
    assert (
        split.stats["eval_users"]
        == int((lengths >= 3).sum())
        == len(split.test)
        == len(split.valid)
    )
    assert split.stats["short_users"] == int((lengths < 3).sum())
    train_full = np.where(lengths >= 3, lengths - 2, lengths)
    assert (
        split.stats["train_rows_without_pairs"]
        == int((train_full < 2).sum())
        == 60 - len(split.train)
    )
    assert split.stats["truncated_test"] == int((lengths > max_len + 1).sum())
    assert split.train.num_pairs == sum(len(x) for _, x, _ in expected["train"])


def test_small_worked_example() -> None:
    data = SequenceData.from_lists([[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11], [12]])
    split = leave_one_out(data, max_len=2)
    assert _rows(split.train) == [(0, [2, 3], [3, 4]), (2, [10], [11])]
    assert _rows(split.valid) == [(0, [3, 4], [4, 5]), (1, [7], [8])]
    assert _rows(split.test) == [(0, [4, 5], [5, 6]), (1, [7, 8], [8, 9])]
    assert split.stats["short_users"] == 2  # [10, 11] trains only, [12] has no pair at all
    assert split.stats["train_rows_without_pairs"] == 2  # user 1 (train = [7]) and user 3
    assert split.num_items == 12 and split.max_len == 2


def test_categories_pass_through(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    p.write_text("user,item,timestamp,cat\n1,1,1,5\n1,2,2,6\n1,3,3,5\n1,4,4,6\n")
    from torchrec_mamba.data.readers import read_csv

    split = leave_one_out(read_csv(p, category_col="cat"), max_len=5)
    assert split.test.item_category is not None and split.test.num_categories == 2
    assert split.test.item_category.tolist() == [0, 1, 2, 1, 2]


def test_errors() -> None:
    data = SequenceData.from_lists([[1, 2, 3]])
    with pytest.raises(ValueError, match="max_len must be an int >= 1, got 0"):
        leave_one_out(data, max_len=0)
    empty = SequenceData(
        sequences=[np.array([1, 2, 3]), np.zeros(0, dtype=np.int64)],
        num_items=3,
        user_ids=np.array([5, 6]),
        raw_item_ids=np.array([-1, 1, 2, 3]),
        source="mem",
    )
    with pytest.raises(ValueError, match=r"mem: user row 1 \(raw id 6\) has an empty sequence"):
        leave_one_out(empty, max_len=3)
    with pytest.raises(ValueError, match=r"ids must be in \[1, 2\], got \[1, 3\]"):
        windows_from_sequences("x", [np.array([1, 3])], num_items=2, max_len=3)
    with pytest.raises(ValueError, match=r"window lengths must be in \[2, max_len \+ 1 = 2\]"):
        SplitPart("x", np.array([1, 2, 1]), np.array([0, 3]), np.array([0]), num_items=2, max_len=1)
    with pytest.raises(ValueError, match="offsets end at 2 but there are 3 values"):
        SplitPart("x", np.array([1, 2, 1]), np.array([0, 2]), np.array([0]), num_items=2, max_len=5)


def test_nothing_left_to_evaluate_counts_the_short_users(tmp_path: Path) -> None:
    p = tmp_path / "short.txt"
    p.write_text("1 5 6\n2 7\n3 5 7\n4 6\n5 5\n")  # 2 users with 2 events, 3 with 1
    data = read_sasrec(p)
    message = (
        rf"{re.escape(str(p))}: nothing left to evaluate: all 5 users have fewer than 3 events "
        r"\(2 with 2, 3 with 1\); leave-one-out needs 3 per user"
    )
    with pytest.raises(ValueError, match=message):
        leave_one_out(data, max_len=4)
    split = leave_one_out(data, max_len=4, require_eval=False)
    assert (len(split.train), len(split.valid), len(split.test)) == (2, 0, 0)
    assert (split.stats["short_users"], split.stats["eval_users"]) == (5, 0)
    # one user with 3 events is enough to evaluate
    one = SequenceData.from_lists([[1, 2, 3], [4, 5]])
    assert leave_one_out(one, max_len=4).stats["eval_users"] == 1


@pytest.mark.data
def test_beauty_split(shared_data: Path) -> None:
    path = shared_data / "amazon-beauty" / "Beauty.txt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    data = read_sasrec(path)
    split = leave_one_out(data, max_len=50)
    assert len(split.test) == len(split.valid) == 22363
    assert split.stats["short_users"] == 0
    # 198,502 events - 2 held out per user - 1 first input per user = training pairs
    # (less the ids cut by max_len from the 127 longest training rows)
    assert split.train.num_pairs == 198502 - 3 * 22363 - sum(
        max(0, len(s) - 2 - 51) for s in data.sequences
    )
    np.testing.assert_array_equal(split.test.targets(), [s[-1] for s in data.sequences])
