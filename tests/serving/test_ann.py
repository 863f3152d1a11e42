"""FaissItemIndex: exact when every list is probed, never returns excluded ids, clear errors."""

from __future__ import annotations

import sys

import pytest
import torch

from torchrec_mamba.serving import FaissItemIndex, ItemSource, chunked_topk


def _table(n: int = 600, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n + 1, d, generator=g)  # row 0 is padding


def test_missing_faiss_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'torchrec-mamba\[faiss\]'"):
        FaissItemIndex(ItemSource.from_table(_table()), nlist=4)


def test_full_probe_equals_exact_chunked_topk() -> None:
    pytest.importorskip("faiss")
    table, users = _table(), torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    index = FaissItemIndex(ItemSource.from_table(table), nlist=8, nprobe=8, chunk_size=97)
    ids, scores = index.search(users, k=10)
    exact = chunked_topk(users, ItemSource.from_table(table), 10)
    assert torch.equal(ids, exact.ids)
    torch.testing.assert_close(scores, exact.scores, rtol=1e-5, atol=1e-5)


def test_excluded_ids_are_never_indexed_and_bad_arguments_are_named() -> None:
    pytest.importorskip("faiss")
    table = _table()
    users = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    best = chunked_topk(users, ItemSource.from_table(table), 3).ids  # (4, 3)
    skip = sorted(set(best.flatten().tolist()))
    index = FaissItemIndex(ItemSource.from_table(table), nlist=4, nprobe=4, exclude=skip)
    ids, _ = index.search(users, k=20)
    assert index.num_indexed == 600 - len(skip)
    assert not set(ids.flatten().tolist()) & set(skip)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, \d+\], got 0"):
        index.search(users, k=0)
    with pytest.raises(ValueError, match=r"users must be \(B, D\) with D=8, got shape \(4, 3\)"):
        index.search(users[:, :3], k=2)
    with pytest.raises(ValueError, match="nlist=1000 exceeds the 600 indexed items"):
        FaissItemIndex(ItemSource.from_table(table), nlist=1000)
    with pytest.raises(ValueError, match="nprobe must be a positive int, got 0"):
        FaissItemIndex(ItemSource.from_table(table), nlist=4, nprobe=0)
