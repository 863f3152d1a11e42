"""evaluate_chunked equals the full-matrix train.loop.evaluate (plain, mask_seen, tiny chunks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchrec_mamba.data import SequenceData, SequenceLoader, leave_one_out
from torchrec_mamba.models import Mamba4Rec, Mamba4RecConfig
from torchrec_mamba.modules import MambaSequenceEncoder
from torchrec_mamba.serving import evaluate_chunked
from torchrec_mamba.train.distributed import DistributedContext
from torchrec_mamba.train.loop import evaluate

CTX = DistributedContext(0, 1, 0, torch.device("cpu"), None, False)


def _setup(num_users: int = 60, num_items: int = 30):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, num_items + 1, size=int(rng.integers(3, 12))).tolist()
            for _ in range(num_users)]
    split = leave_one_out(SequenceData.from_lists(seqs), max_len=8)
    torch.manual_seed(0)
    enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
    model = Mamba4Rec(Mamba4RecConfig(num_items=split.test.num_items, embedding_dim=8), enc)
    return model, SequenceLoader(split.test, batch_size=16, shuffle=False, seed=0)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("mask_seen", [False, True])
def test_equals_full_matrix_evaluate(chunk: int, mask_seen: bool) -> None:
    model, loader = _setup()
    want = evaluate(model, loader, CTX, ks=(1, 5, 10), mask_seen=mask_seen)
    got = evaluate_chunked(model, loader, CTX, ks=(1, 5, 10), mask_seen=mask_seen, chunk_size=chunk)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert model.training is True  # the previous mode is restored


def test_bad_chunk_size() -> None:
    model, loader = _setup()
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        evaluate_chunked(model, loader, CTX, chunk_size=0)


@pytest.mark.parametrize("mask_seen", [False, True])
def test_length_sorted_loader_gives_the_same_metrics(mask_seen: bool) -> None:
    """The CLI's evaluation loaders sort rows by length: the metrics are sums over rows."""
    model, loader = _setup()
    ranked = SequenceLoader(loader.part, batch_size=16, shuffle=False, seed=0, sort_by_length=True)
    assert [len(b.padded()[0][0]) for b in ranked] != [len(b.padded()[0][0]) for b in loader]
    want = evaluate(model, loader, CTX, ks=(1, 5, 10), mask_seen=mask_seen)
    got = evaluate(model, ranked, CTX, ks=(1, 5, 10), mask_seen=mask_seen)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
