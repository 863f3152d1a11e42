"""Seeded dropout and GELU + dropout: the compiled kernels against an independent oracle.

The oracle rebuilds the kernel's mask from its definition (splitmix64 of the mixed seed and the
index of each group of four elements, the 16-bit lanes of each word compared with the threshold)
in plain Python integers, and GELU from ``math.erf`` in float64; outputs and gradients are
compared for several shapes (sizes that are not multiples of 4 or of the kernel's block) and both
dtypes.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from torchrec_mamba.modules import FeedForward
from torchrec_mamba.ops import _scan_cpu, dropout, gelu_dropout
from torchrec_mamba.ops.dropout import _threshold_scale

needs_kernel = pytest.mark.skipif(
    not _scan_cpu.is_available(), reason=f"compiled kernel unavailable: {_scan_cpu.build_error()}"
)
_MASK64 = (1 << 64) - 1
SHAPES = [(1,), (3,), (4097,), (3, 2731), (2, 5, 1024)]  # 2731 * 3 > 2 blocks of 4096


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def oracle_keep(n: int, seed: int, p: float) -> torch.Tensor:
    """(n,) bool: which elements the kernel keeps for this seed, from the definition."""
    threshold, _ = _threshold_scale(p)
    s = ((seed & _MASK64) * 0xD1B54A32D192ED03) & _MASK64
    keep = []
    for g in range((n + 3) // 4):
        word = _splitmix64((s + g) & _MASK64)
        for j in range(4):
            lane = (word >> (16 * j)) & 0xFFFF
            keep.append((lane - 65536 if lane >= 32768 else lane) >= threshold)
    return torch.tensor(keep[:n])


def seed_of_next_call(torch_seed: int) -> int:
    """The seed a kernel call draws from torch's generator right after manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))


def gelu64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU and its derivative in float64 from math.erf (independent of torch's kernels)."""
    v = x.double().flatten().tolist()
    out = [0.5 * a * (1.0 + math.erf(a / math.sqrt(2.0))) for a in v]
    grad = [
        0.5 * (1.0 + math.erf(a / math.sqrt(2.0)))
        + a * math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        for a in v
    ]
    f64 = torch.float64
    return torch.tensor(out, dtype=f64).view(x.shape), torch.tensor(grad, dtype=f64).view(x.shape)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"rtol": 1e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    )


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_seeded_dropout_matches_the_oracle_mask_and_gradient(
    shape: tuple[int, ...], dtype: torch.dtype, p: float
) -> None:
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    seed = seed_of_next_call(7)
    torch.manual_seed(7)
    y = dropout(x, p, backend="cpu")
    keep = oracle_keep(x.numel(), seed, p).view(shape)
    scale = 1.0 / (1.0 - p)
    torch.testing.assert_close(y, torch.where(keep, x * scale, 0.0).to(dtype), rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(keep, g * scale, 0.0).to(dtype), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_dropout_matches_the_oracle(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    p = 0.3
    x = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype).requires_grad_(True)
    seed = seed_of_next_call(5)
    torch.manual_seed(5)
    y = gelu_dropout(x, p, backend="cpu")
    keep = oracle_keep(x.numel(), seed, p).view(shape)
    scale = 1.0 / (1.0 - p)
    value, slope = gelu64(x.detach())
    want = torch.where(keep, value * scale, 0.0)
    torch.testing.assert_close(y.double(), want, **tolerance(dtype))
    g = torch.randn_like(y)
    y.backward(g)
    want_grad = torch.where(keep, g.double() * scale * slope, 0.0)
    torch.testing.assert_close(x.grad.double(), want_grad, **tolerance(dtype))


@needs_kernel
def test_gelu_dropout_uses_the_mask_of_dropout_and_matches_torch_gelu() -> None:
    """Same seed, same mask as dropout(F.gelu(x)); values within float32 rounding of torch's."""
    x = torch.randn(64, 300, requires_grad=True)
    torch.manual_seed(1)
    fused = gelu_dropout(x, 0.2)
    g = torch.randn_like(fused)
    (gx_fused,) = torch.autograd.grad(fused, x, g)
    torch.manual_seed(1)
    plain = dropout(F.gelu(x), 0.2)
    (gx_plain,) = torch.autograd.grad(plain, x, g)
    assert torch.equal(fused != 0, plain != 0)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(gx_fused, gx_plain, rtol=1e-5, atol=2e-6)


@needs_kernel
def test_seeded_kernels_keep_nothing_per_element() -> None:
    """dropout saves no tensor for the backward; gelu_dropout saves only its input."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(100, 50, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dropout(x, 0.5, backend="cpu")
    assert saved == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gelu_dropout(x, 0.5, backend="cpu")
    assert len(saved) == 1 and saved[0].shape == x.shape


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_gelu_dropout_other_backends_drop_gelu_at_rate_p(backend: str) -> None:
    x = torch.randn(300, 400, dtype=torch.float64, requires_grad=True)
    y = gelu_dropout(x, 0.25, backend=backend)
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], F.gelu(x)[kept] / 0.75)
    g = torch.randn_like(y)
    y.backward(g)
    slope = gelu64(x.detach())[1]
    torch.testing.assert_close(x.grad, torch.where(kept, g * slope / 0.75, 0.0))


@pytest.mark.parametrize("op", [dropout, gelu_dropout], ids=["dropout", "gelu_dropout"])
def test_bad_input_is_named(op: Any) -> None:
    name = op.__name__
    with pytest.raises(ValueError, match=rf"{name}: p must be in \[0, 1\), got 1.5"):
        op(torch.ones(3), 1.5)
    with pytest.raises(
        TypeError, match=f"{name}: x must be a floating torch.Tensor, got torch.int32"
    ):
        op(torch.ones(3, dtype=torch.int32), 0.1)
    with pytest.raises(ValueError, match=rf"{name}: backend 'cpu' cannot run these tensors"):
        op(torch.ones(3, dtype=torch.bfloat16), 0.1, backend="cpu")


def test_feed_forward_training_equals_gelu_then_dropout() -> None:
    """The FFN's fused activation is the same function as GELU then its dropout (same seed)."""
    torch.manual_seed(0)
    ffn = FeedForward(8, dropout=0.3).train()
    x = torch.randn(4, 6, 8)
    torch.manual_seed(2)
    got = ffn(x)
    torch.manual_seed(2)
    h = ffn.dropout(ffn.activation(ffn.w_1(x)))
    want = ffn.layer_norm(ffn.dropout(ffn.w_2(h)) + x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    ffn.eval()
    torch.testing.assert_close(ffn(x), ffn.layer_norm(ffn.w_2(F.gelu(ffn.w_1(x))) + x))
