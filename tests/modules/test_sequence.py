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


@pytest.mark.parametrize("encoder_name", ["mamba", "sasrec"])
def test_encoder_refuses_another_dtype_with_both_dtypes_named(encoder_name: str) -> None:
    from torchrec_mamba.modules import MambaSequenceEncoder, SASRecEncoder

    enc = (MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
           if encoder_name == "mamba" else SASRecEncoder(d_model=8, max_len=6))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    lengths = torch.tensor([5, 2])
    msg = r"x has dtype torch.float64 but the encoder's parameters are torch.float32"
    with pytest.raises(TypeError, match=msg):
        enc(x, lengths)
    with pytest.raises(TypeError, match=msg):
        enc.last_state(x, lengths)
    # after converting the encoder, the same input works
    assert enc.double()(x, lengths).dtype == torch.float64


def test_step_refuses_another_dtype() -> None:
    from torchrec_mamba.modules import MambaSequenceEncoder

    enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference").eval()
    state = enc.allocate_state(2)
    with pytest.raises(TypeError, match=r"x_t has dtype torch.float64 but .* torch.float32"):
        enc.step(torch.randn(2, 8, dtype=torch.float64), state)
