"""causal_conv1d and causal_conv1d_update against the readable tap-loop reference."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from torchrec_mamba.ops import causal_conv1d, causal_conv1d_update
from torchrec_mamba.ops.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref

TOL: dict[torch.dtype, dict[str, Any]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}


def _inputs(
    batch: int, dim: int, length: int, width: int, dtype: torch.dtype, bias: bool, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, length, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(dim, width, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(dim, generator=g, dtype=dtype).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("length", [1, 3, 17])
@pytest.mark.parametrize("width", [2, 4])
def test_conv_matches_reference(
    width: int, length: int, bias: bool, activation: str | None, dtype: torch.dtype
) -> None:
    x, w, b = _inputs(2, 3, length, width, dtype, bias)
    params = [t for t in (x, w, b) if t is not None]
    y = causal_conv1d(x, w, b, activation)
    y_ref = causal_conv1d_ref(x, w, b, activation)
    assert y.shape == (2, 3, length) and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, gy)
    grads_ref = torch.autograd.grad(y_ref, params, gy)
    for name, g, g_ref in zip(
        ("x", "weight", "bias")[: len(params)], grads, grads_ref, strict=True
    ):
        torch.testing.assert_close(g, g_ref, **TOL[dtype], msg=lambda m, n=name: f"grad {n}: {m}")


def test_reference_matches_definition() -> None:
    """The oracle itself against the textbook formula, element by element."""
    x, w, b = _inputs(2, 3, 6, 3, torch.float64, bias=True, seed=1)
    y = causal_conv1d_ref(x, w, b, "silu")
    for bi, d, t in itertools.product(range(2), range(3), range(6)):
        acc = b[d].item()
        for k in range(3):
            src = t - 2 + k
            if src >= 0:
                acc += w[d, k].item() * x[bi, d, src].item()
        expected = acc / (1.0 + math.exp(-acc))
        assert abs(y[bi, d, t].item() - expected) < 1e-12


def test_output_is_causal() -> None:
    """Changing a future input must not change earlier outputs."""
    x, w, _ = _inputs(1, 2, 8, 4, torch.float32, bias=False)
    x = x.detach()
    x2 = x.clone()
    x2[..., 5] += 10.0
    y, y2 = causal_conv1d(x, w.detach()), causal_conv1d(x2, w.detach())
    torch.testing.assert_close(y[..., :5], y2[..., :5], rtol=0, atol=0)
    assert not torch.allclose(y[..., 5], y2[..., 5])


def test_swish_is_silu() -> None:
    x, w, b = _inputs(2, 3, 5, 4, torch.float32, bias=True)
    torch.testing.assert_close(causal_conv1d(x, w, b, "swish"), causal_conv1d(x, w, b, "silu"))


def test_half_input_with_fp32_master_weights() -> None:
    """bf16 x with fp32 weights: fp32 compute, bf16 output close to the fp32 result."""
    x, w, b = _inputs(2, 3, 9, 4, torch.float32, bias=True)
    y = causal_conv1d(x.to(torch.bfloat16), w, b, "silu")
    assert y.dtype == torch.bfloat16
    expected = causal_conv1d_ref(x.to(torch.bfloat16).float(), w, b, "silu")
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("width", [2, 4])
def test_prefix_then_steps_equals_full_conv(width: int, prefix: int, dtype: torch.dtype) -> None:
    length = 9
    x, w, b = _inputs(2, 3, length, width, dtype, bias=True)
    full = causal_conv1d(x, w, b, "silu")
    # The cache after a prefix holds its last W inputs, zero-padded on the left.
    state = F.pad(x[..., :prefix].detach(), (width, 0))[..., -width:].clone()  # (B, D, W)
    state_ref = state.clone()
    steps, steps_ref = [], []
    for t in range(prefix, length):
        steps.append(causal_conv1d_update(x[..., t], state, w, b, "silu"))
        steps_ref.append(causal_conv1d_update_ref(x[..., t], state_ref, w, b, "silu"))
    torch.testing.assert_close(torch.stack(steps, -1), full[..., prefix:], **TOL[dtype])
    torch.testing.assert_close(torch.stack(steps_ref, -1), full[..., prefix:], **TOL[dtype])
    torch.testing.assert_close(state, x[..., length - width :].detach(), rtol=0, atol=0)
    torch.testing.assert_close(state_ref, state, rtol=0, atol=0)


def test_step_gradients_flow_across_steps() -> None:
    """Gradients of stepped outputs equal those of the full conv (the cache is autograd-aware)."""
    x, w, b = _inputs(2, 3, 7, 4, torch.float64, bias=True)
    gy = torch.randn(2, 3, 7, dtype=torch.float64)
    state = torch.zeros(2, 3, 4, dtype=torch.float64)
    steps = torch.stack(
        [causal_conv1d_update(x[..., t], state, w, b, "silu") for t in range(7)], -1
    )
    grads = torch.autograd.grad(steps, (x, w, b), gy)
    grads_full = torch.autograd.grad(causal_conv1d(x, w, b, "silu"), (x, w, b), gy)
    for g, g_full in zip(grads, grads_full, strict=True):
        torch.testing.assert_close(g, g_full, **TOL[torch.float64])


def test_update_with_fp32_cache_for_bf16_input() -> None:
    x, w, _ = _inputs(2, 3, 4, 3, torch.float32, bias=False)
    state = torch.zeros(2, 3, 3)
    y = causal_conv1d_update(x[..., 0].detach().to(torch.bfloat16), state, w.detach())
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(
        state[..., -1], x[..., 0].detach().to(torch.bfloat16).float(), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.randn(2, 3)}, ValueError, r"x must be \(B, D, L\)"),
        ({"x": torch.randn(2, 3, 0)}, ValueError, "L must be >= 1"),
        ({"x": [1.0, 2.0]}, TypeError, "x must be a torch.Tensor, got list"),
        ({"x": torch.ones(2, 3, 4, dtype=torch.int64)}, TypeError, "x must be a floating tensor"),
        ({"weight": torch.randn(4, 4)}, ValueError, r"weight must be \(D=3, W\)"),
        ({"weight": torch.randn(3)}, ValueError, r"weight must be \(D=3, W\)"),
        ({"bias": torch.randn(4)}, ValueError, r"bias must be \(D,\) = \(3,\)"),
        ({"activation": "relu"}, ValueError, "unknown activation 'relu'"),
        (
            {"weight": torch.randn(3, 4, dtype=torch.float64)},
            TypeError,
            "weight has dtype torch.float64",
        ),
        ({"bias": torch.randn(3, dtype=torch.float16)}, TypeError, "bias has dtype torch.float16"),
        (
            {"weight": torch.randn(3, 4, device="meta")},
            ValueError,
            "weight is on meta but x is on cpu",
        ),
    ],
)
def test_conv_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    args = {
        "x": torch.randn(2, 3, 5),
        "weight": torch.randn(3, 4),
        "bias": torch.randn(3),
        "activation": None,
    }
    args.update(kwargs)
    for fn in (causal_conv1d, causal_conv1d_ref):
        with pytest.raises(error, match=match):
            fn(**args)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.randn(2, 3, 1)}, ValueError, r"x must be \(B, D\), one step"),
        (
            {"conv_state": torch.zeros(2, 3, 3)},
            ValueError,
            r"conv_state must be \(B, D, W\) = \(2, 3, 4\)",
        ),
        ({"conv_state": torch.zeros(1, 3, 4)}, ValueError, r"conv_state must be \(B, D, W\)"),
        (
            {"conv_state": torch.zeros(2, 3, 4, dtype=torch.bfloat16)},
            TypeError,
            "conv_state has dtype torch.bfloat16",
        ),
        ({"conv_state": "cache"}, TypeError, "conv_state must be a torch.Tensor, got str"),
        ({"conv_state": torch.zeros(2, 3, 4, device="meta")}, ValueError, "conv_state is on meta"),
        ({"weight": torch.randn(3, 4, 1)}, ValueError, r"weight must be \(D=3, W\)"),
        ({"activation": "gelu"}, ValueError, "unknown activation 'gelu'"),
    ],
)
def test_update_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    args: dict[str, Any] = {
        "x": torch.randn(2, 3),
        "conv_state": torch.zeros(2, 3, 4),
        "weight": torch.randn(3, 4),
        "bias": None,
        "activation": None,
    }
    args.update(kwargs)
    for fn in (causal_conv1d_update, causal_conv1d_update_ref):
        with pytest.raises(error, match=match):
            fn(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("width", "length"), [(1, 5), (3, 2), (5, 9), (4, 64)])
def test_cpu_kernel_any_width_matches_reference(
    width: int, length: int, dtype: torch.dtype
) -> None:
    """The compiled CPU conv (generic and unrolled W=4 loops, L < W) and all its gradients."""
    from torchrec_mamba.ops import _scan_cpu

    if not _scan_cpu.is_available():
        pytest.skip(f"the C++ CPU kernel failed to build: {_scan_cpu.build_error()}")
    x, w, b = _inputs(2, 5, length, width, dtype, bias=True, seed=2)
    for activation in (None, "silu"):
        y = causal_conv1d(x, w, b, activation)
        assert y.grad_fn is not None and "CausalConv1dCPU" in type(y.grad_fn).__name__
        y_ref = causal_conv1d_ref(x, w, b, activation)
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), gy)
        grads_ref = torch.autograd.grad(y_ref, (x, w, b), gy)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("width", "length"), [(1, 5), (3, 2), (4, 9), (4, 130)])
def test_cpu_kernel_channels_last_matches_reference(
    width: int, length: int, dtype: torch.dtype
) -> None:
    """A (B, D, L) view of (B, L, D) memory takes the channels-last kernel: same values and
    gradients, and the output keeps that layout."""
    from torchrec_mamba.ops import _scan_cpu

    if not _scan_cpu.is_available():
        pytest.skip(f"the C++ CPU kernel failed to build: {_scan_cpu.build_error()}")
    x, w, b = _inputs(3, 19, length, width, dtype, bias=True, seed=4)
    x_cl = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    for activation in (None, "silu"):
        y = causal_conv1d(x_cl, w, b, activation)
        assert "CausalConv1dCLCPU" in type(y.grad_fn.next_functions[0][0]).__name__
        assert y.transpose(1, 2).is_contiguous(), "channels-last in, channels-last out"
        y_ref = causal_conv1d_ref(x, w, b, activation)
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        gy = torch.randn_like(y_ref)
        grads = torch.autograd.grad(y, (x_cl, w, b), gy)
        grads_ref = torch.autograd.grad(y_ref, (x, w, b), gy)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, **TOL[dtype])


def test_cpu_kernel_double_backward_raises() -> None:
    from torchrec_mamba.ops import _scan_cpu

    if not _scan_cpu.is_available():
        pytest.skip(f"the C++ CPU kernel failed to build: {_scan_cpu.build_error()}")
    x, w, b = _inputs(1, 2, 6, 4, torch.float64, bias=True)
    (gx,) = torch.autograd.grad(causal_conv1d(x, w, b, "silu").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require"):
        torch.autograd.grad(gx.sum(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [1, 3, 4])  # 4 has its own unrolled path in the kernel
@pytest.mark.parametrize(("bias", "activation"), [(True, "silu"), (False, None)])
def test_cpu_update_kernel_without_grad_matches_reference(
    width: int, dtype: torch.dtype, bias: bool, activation: str | None
) -> None:
    """Under no_grad the compiled one-step kernel updates the state exactly as the oracle."""
    x, w, b = _inputs(3, 37, 7, width, dtype, bias=bias, seed=5)  # 37: not a vector multiple
    state = torch.randn(3, 37, width, dtype=dtype)
    state_ref = state.clone()
    with torch.no_grad():
        for t in range(7):
            y = causal_conv1d_update(x[..., t], state, w, b, activation)
            y_ref = causal_conv1d_update_ref(x[..., t], state_ref, w, b, activation)
            torch.testing.assert_close(y, y_ref, **TOL[dtype])
            torch.testing.assert_close(state, state_ref, **TOL[dtype])


def test_pytorch_fallback_without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the compiled kernel is unavailable, F.conv1d and the PyTorch update still agree."""
    from torchrec_mamba.ops import _scan_cpu

    monkeypatch.setattr(_scan_cpu, "is_available", lambda: False)
    x, w, b = _inputs(2, 3, 9, 4, torch.float64, bias=True, seed=6)
    y = causal_conv1d(x, w, b, "silu")
    assert "CausalConv1dCPU" not in type(y.grad_fn).__name__
    y_ref = causal_conv1d_ref(x, w, b, "silu")
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    grads = torch.autograd.grad(y.sum(), (x, w, b))
    grads_ref = torch.autograd.grad(y_ref.sum(), (x, w, b))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float64])
    state, state_ref = (
        torch.zeros(2, 3, 4, dtype=torch.float64),
        torch.zeros(2, 3, 4, dtype=torch.float64),
    )
    with torch.no_grad():
        y1 = causal_conv1d_update(x[..., 0], state, w, b, "silu")
        y1_ref = causal_conv1d_update_ref(x[..., 0], state_ref, w, b, "silu")
    torch.testing.assert_close(y1, y1_ref, **TOL[torch.float64])
    torch.testing.assert_close(state, state_ref, **TOL[torch.float64])
