"""The shared sequence helpers against loops, and the encoder contract of both encoders."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from torchrec_mamba.modules import (
    MambaSequenceEncoder,
    SASRecEncoder,
    SequenceEncoder,
    StreamingEncoder,
    gather_last,
    jagged_to_padded_dense,
    padding_mask,
)


def test_padding_mask_and_gather_against_loops() -> None:
    lengths = torch.tensor([3, 0, 1])
    mask = padding_mask(lengths, 4)
    want = torch.tensor([[j < int(n) for j in range(4)] for n in lengths])
    assert torch.equal(mask, want)
    out = torch.randn(3, 4, 2)
    got = gather_last(out, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert_close(got[b], out[b, n - 1] if n else torch.zeros(2))


def test_jagged_to_padded_dense_against_loop() -> None:
    values, offsets = torch.randn(5, 3), torch.tensor([0, 2, 2, 5])
    got = jagged_to_padded_dense(values, offsets, 3)
    want = torch.zeros(3, 3, 3)
    for b in range(3):
        rows = values[offsets[b] : offsets[b + 1]]
        want[b, : len(rows)] = rows
    assert_close(got, want)


@pytest.mark.parametrize(
    "encoder",
    [MambaSequenceEncoder(d_model=8, d_state=4, backend="reference"), SASRecEncoder(8, max_len=6)],
)
def test_both_encoders_follow_the_contract(encoder: torch.nn.Module) -> None:
    assert isinstance(encoder, SequenceEncoder)
    encoder.eval()
    x, lengths = torch.randn(2, 5, 8), torch.tensor([5, 2])
    out = encoder(x, lengths)
    assert out.shape == (2, 5, 8) and bool((out[1, 2:] == 0).all())
    assert_close(encoder.last_state(x, lengths), gather_last(out, lengths))
    assert isinstance(encoder, StreamingEncoder) == isinstance(encoder, MambaSequenceEncoder)
