"""The fused CUDA kernels (mamba-ssm, causal-conv1d) against the readable references.

Skipped cleanly unless a CUDA device is present and the optional kernels import; CI has neither.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torchrec_mamba.ops import _fused, selective_scan, selective_scan_ref
from torchrec_mamba.ops.causal_conv1d import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from torchrec_mamba.ops.state_update import selective_state_update, selective_state_update_ref

HAS_CUDA = torch.cuda.is_available()
needs_mamba = pytest.mark.skipif(
    not (HAS_CUDA and _fused.selective_scan_fn is not None),
    reason=f"needs CUDA and mamba-ssm's kernels (cuda={HAS_CUDA}; {_fused.import_error or 'imported'})",
)
needs_conv = pytest.mark.skipif(
    not (HAS_CUDA and _fused.causal_conv1d_fn is not None),
    reason=f"needs CUDA and causal-conv1d's kernels (cuda={HAS_CUDA}; {_fused.conv_import_error or 'imported'})",
)
pytestmark = pytest.mark.gpu

# The CUDA kernels sum in a different order than the sequential references.
TOL: dict[torch.dtype, dict[str, Any]] = {
    torch.float32: {"rtol": 3e-4, "atol": 3e-4},
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
}


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype)


@needs_mamba
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("length", [1, 17, 200])
def test_fused_scan_matches_reference(
    length: int, full: bool, dtype: torch.dtype
) -> None:  # pragma: no cover
    torch.manual_seed(0)
    batch, dim, nstate = 2, 16, 8
    acts = [_randn(batch, dim, length, dtype=dtype), (_randn(batch, dim, length) * 0.5).to(dtype)]
    u, delta = (t.requires_grad_() for t in acts)
    A = (-torch.rand(dim, nstate, device="cuda") * 2).requires_grad_()
    B = _randn(batch, nstate, length, dtype=dtype).requires_grad_()
    C = _randn(batch, nstate, length, dtype=dtype).requires_grad_()
    D = _randn(dim).requires_grad_() if full else None
    z = _randn(batch, dim, length, dtype=dtype).requires_grad_() if full else None
    bias = (_randn(dim) * 0.3).requires_grad_() if full else None
    leaves = [t for t in (u, delta, A, B, C, D, z, bias) if t is not None]
    kwargs = {"D": D, "z": z, "delta_bias": bias, "delta_softplus": True, "return_last_state": True}
    y, h = selective_scan(u, delta, A, B, C, backend="fused", **kwargs)
    y_ref, h_ref = selective_scan_ref(u, delta, A, B, C, **kwargs)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOL[dtype])
    torch.testing.assert_close(h.float(), h_ref.float(), **TOL[dtype])
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, gy)
    grads_ref = torch.autograd.grad(y_ref, leaves, gy)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        scale = g_ref.float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.float() / scale, g_ref.float() / scale, **TOL[dtype])


@needs_mamba
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_state_update_matches_reference(dtype: torch.dtype) -> None:  # pragma: no cover
    torch.manual_seed(1)
    batch, dim, nstate = 3, 32, 16
    x, dt, z = (
        _randn(batch, dim, dtype=dtype),
        _randn(batch, dim, dtype=dtype),
        _randn(batch, dim, dtype=dtype),
    )
    A, D, dt_bias = -torch.rand(dim, nstate, device="cuda"), _randn(dim), _randn(dim)
    B, C = _randn(batch, nstate, dtype=dtype), _randn(batch, nstate, dtype=dtype)
    state = _randn(batch, dim, nstate)
    state_ref = state.clone()
    with torch.no_grad():  # the Triton kernel runs only when no gradient is needed
        y = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
        y_ref = selective_state_update_ref(
            state_ref, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True
        )
    torch.testing.assert_close(y.float(), y_ref.float(), **TOL[dtype])
    torch.testing.assert_close(state, state_ref, **TOL[torch.float32])


@needs_conv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("width", [2, 4])
def test_fused_conv_matches_reference(
    width: int, activation: str | None, dtype: torch.dtype
) -> None:  # pragma: no cover
    torch.manual_seed(2)
    x = _randn(2, 64, 33, dtype=dtype).requires_grad_()
    w = _randn(64, width, dtype=dtype).requires_grad_()
    b = _randn(64, dtype=dtype).requires_grad_()
    y = causal_conv1d(x, w, b, activation)
    y_ref = causal_conv1d_ref(x, w, b, activation)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOL[dtype])
    gy = torch.randn_like(y)
    grads, grads_ref = (
        torch.autograd.grad(y, (x, w, b), gy),
        torch.autograd.grad(y_ref, (x, w, b), gy),
    )
    for g, g_ref in zip(grads, grads_ref, strict=True):
        scale = g_ref.float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.float() / scale, g_ref.float() / scale, **TOL[dtype])


@needs_conv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_conv_update_matches_reference(dtype: torch.dtype) -> None:  # pragma: no cover
    torch.manual_seed(3)
    x, w, b = _randn(2, 64, 9, dtype=dtype), _randn(64, 4, dtype=dtype), _randn(64, dtype=dtype)
    state, state_ref = (
        torch.zeros(2, 64, 4, device="cuda", dtype=dtype),
        torch.zeros(2, 64, 4, device="cuda", dtype=dtype),
    )
    with torch.no_grad():  # the CUDA update kernel runs only when no gradient is needed
        ys = [causal_conv1d_update(x[..., t], state, w, b, "silu") for t in range(9)]
        ys_ref = [causal_conv1d_update_ref(x[..., t], state_ref, w, b, "silu") for t in range(9)]
    torch.testing.assert_close(
        torch.stack(ys, -1).float(), torch.stack(ys_ref, -1).float(), **TOL[dtype]
    )
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)
    torch.testing.assert_close(
        torch.stack(ys, -1).float(), causal_conv1d_ref(x, w, b, "silu").float(), **TOL[dtype]
    )
