"""SASRecEncoder: against an explicit-mask attention oracle, causality, padding, misuse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_mamba.modules.sasrec import SASRecEncoder

D = 8


def make(num_layers: int = 2, num_heads: int = 2, **kw: object) -> SASRecEncoder:
    torch.manual_seed(0)
    return SASRecEncoder(D, num_layers=num_layers, num_heads=num_heads, max_len=10, **kw)  # type: ignore[arg-type]


def oracle(enc: SASRecEncoder, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """RecBole's SASRec forward with an explicit causal + key-padding mask and a plain softmax."""
    batch, length, width = x.shape
    h = F.layer_norm(
        x + enc.position_embedding.weight[:length],
        (width,),
        enc.input_norm.weight,
        enc.input_norm.bias,
        1e-12,
    )
    real = torch.arange(length) < lengths[:, None]  # (B, L)
    allowed = torch.ones(length, length).tril().bool()[None] & real[:, None, :]  # (B, Lq, Lk)
    for layer in enc.layers:
        heads = layer.num_heads
        q, k, v = layer.qkv(h).split(width, dim=-1)
        q, k, v = (t.view(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)  # (B, H, L, L)
        scores = scores.masked_fill(~allowed[:, None], -10000.0)  # RecBole's additive mask value
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
        h = layer.layer_norm(layer.out(ctx) + h)
        ffn = layer.ffn
        h = ffn.layer_norm(ffn.w_2(F.gelu(ffn.w_1(h))) + h)
    return h


def test_matches_explicit_mask_oracle_at_real_positions() -> None:
    enc = make().eval()
    x = torch.randn(3, 6, D)
    lengths = torch.tensor([6, 3, 1])
    out = enc(x, lengths)
    real = torch.arange(6) < lengths[:, None]
    assert_close(out[real], oracle(enc, x, lengths)[real], atol=1e-5, rtol=1e-4)
    assert not out[~real].any()


def test_causal_and_padding_invariant() -> None:
    enc = make().eval()
    x = torch.randn(2, 7, D)
    lengths = torch.tensor([5, 2])
    out = enc(x, lengths)
    x2 = x.clone()
    x2[torch.arange(7) >= lengths[:, None]] = torch.randn(1, D) * 100
    assert_close(enc(x2, lengths), out)
    x3 = x.clone()
    x3[:, 4:] = 0.0  # changing the future leaves earlier positions alone
    assert_close(enc(x3)[:, :4], enc(x)[:, :4])


def test_last_state_jagged_and_cold_users() -> None:
    enc = make().eval()
    lengths = torch.tensor([2, 0, 4])
    values = torch.randn(6, D)
    jt = JaggedTensor(values=values, lengths=lengths)
    padded = torch.ops.fbgemm.jagged_to_padded_dense(values, [jt.offsets()], [4], 0.0)
    assert_close(enc(jt), enc(padded, lengths))
    last = enc.last_state(jt)
    out = enc(padded, lengths)
    assert_close(last[0], out[0, 1])
    assert_close(last[2], out[2, 3])
    assert_close(last[1], torch.zeros(D))
    assert torch.isfinite(last).all()


def test_gradients_and_dropout() -> None:
    enc = make(dropout=0.3)
    x = torch.randn(2, 5, D)
    lengths = torch.tensor([5, 3])
    enc.train()
    assert not torch.allclose(enc(x, lengths), enc(x, lengths))
    enc.last_state(x, lengths).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("position_embedding"):  # rows past L get no gradient, by design
            assert p.grad.abs().sum() > 0, name
    assert enc.position_embedding.weight.grad[:5].abs().sum() > 0  # type: ignore[index]
    enc.eval()
    assert_close(enc(x, lengths), enc(x, lengths))


def test_meta_construction() -> None:
    enc = SASRecEncoder(D, max_len=10, device="meta")
    assert all(p.is_meta for p in enc.parameters())
    enc.to_empty(device="cpu")
    enc.reset_parameters()
    assert torch.isfinite(enc(torch.randn(1, 4, D))).all()
    assert 0.0 < enc.position_embedding.weight.std().item() < 0.05


def test_errors_name_the_bad_value() -> None:
    enc = make()
    x = torch.randn(2, 4, D)
    with pytest.raises(ValueError, match="L=11 exceeds max_len=10"):
        enc(torch.randn(1, 11, D))
    with pytest.raises(ValueError, match=r"max\(lengths\)=5"):
        enc(x, torch.tensor([5, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        enc(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="width 3 but d_model=8"):
        enc(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="num_heads=3 must divide d_model=8"):
        SASRecEncoder(D, num_heads=3)
    with pytest.raises(ValueError, match="max_len must be a positive int, got 0"):
        SASRecEncoder(D, max_len=0)
    with pytest.raises(ValueError, match="attn_dropout must be in"):
        SASRecEncoder(D, attn_dropout=-0.1)
