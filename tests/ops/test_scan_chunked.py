"""The chunked selective scan: chunk boundaries, batch blocks, extreme inputs, its backward."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torchrec_mamba.ops import _scan_chunked, selective_scan, selective_scan_ref
from torchrec_mamba.ops._scan_chunked import linear_scan_

TOL: dict[torch.dtype, dict[str, Any]] = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(
    batch: int, dim: int, nstate: int, length: int, dtype: torch.dtype, seed: int = 0
) -> list:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    return [
        rnd(batch, dim, length).requires_grad_(),
        rnd(batch, dim, length).requires_grad_(),
        (-torch.rand(dim, nstate, generator=g, dtype=dtype) * 2).requires_grad_(),
        rnd(batch, nstate, length).requires_grad_(),
        rnd(batch, nstate, length).requires_grad_(),
        rnd(dim).requires_grad_(),
        rnd(batch, dim, length).requires_grad_(),
        (rnd(dim) * 0.3).requires_grad_(),
    ]


def _compare(
    args: list, dtype: torch.dtype, chunk_size: int | None = None, softplus: bool = True
) -> None:
    y, h = _scan_chunked.selective_scan(*args, softplus, True, chunk_size=chunk_size)
    y_ref, h_ref = selective_scan_ref(*args, delta_softplus=softplus, return_last_state=True)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(h, h_ref, **TOL[dtype])
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    leaves = [a for a in args if a is not None]
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), leaves)
    names = [n for n, a in zip(NAMES, args, strict=True) if a is not None]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **TOL[dtype], msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("length", "chunk"),
    [(1, 4), (3, 4), (4, 4), (5, 4), (14, 4), (7, 1), (9, 9), (10, 3), (23, None)],
)
def test_chunk_boundaries(length: int, chunk: int | None, dtype: torch.dtype) -> None:
    """L below, at, just past and well past multiples of the chunk size; every gradient."""
    _compare(_inputs(2, 3, 4, length, dtype), dtype, chunk)


def test_without_optional_inputs() -> None:
    args = _inputs(2, 3, 4, 11, torch.float64)
    args[5:] = [None, None, None]
    _compare(args, torch.float64, 4, softplus=False)


def test_batch_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny block budget splits the batch into one-row blocks; results must not change."""
    monkeypatch.setitem(_scan_chunked.BLOCK_ELEMENTS, "cpu", 1)
    assert len(_scan_chunked._batch_blocks(torch.zeros(3, 2, 5), 4, 4)) == 3
    _compare(_inputs(3, 2, 4, 10, torch.float64), torch.float64, 4)


@pytest.mark.parametrize(
    ("name", "delta_shift", "a_value"),
    [
        ("large delta", 50.0, None),
        ("tiny A", 0.0, -1e-6),
        ("large A", 0.0, -100.0),
        ("both", 50.0, -100.0),
    ],
)
def test_extreme_inputs_stay_finite(name: str, delta_shift: float, a_value: float | None) -> None:
    """Long chunks of strong or negligible decay: finite and equal to the reference in fp32."""
    args = _inputs(2, 4, 3, 130, torch.float32, seed=3)
    with torch.no_grad():
        args[1].add_(delta_shift)
        if a_value is not None:
            args[2].fill_(a_value)
    y, h = _scan_chunked.selective_scan(*args, True, True, chunk_size=64)
    assert torch.isfinite(y).all() and torch.isfinite(h).all(), name
    grads = torch.autograd.grad(y.sum() + h.sum(), args)
    assert all(torch.isfinite(g).all() for g in grads), name
    y_ref, h_ref = selective_scan_ref(*args, delta_softplus=True, return_last_state=True)
    grads_ref = torch.autograd.grad(y_ref.sum() + h_ref.sum(), args)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-3)


def test_bf16_inputs_accumulate_in_fp32() -> None:
    args = [a.detach() for a in _inputs(2, 3, 4, 12, torch.float32, seed=4)]
    half = [a.to(torch.bfloat16) if i in (0, 1, 3, 4, 6) else a for i, a in enumerate(args)]
    y, h = selective_scan(*half, delta_softplus=True, return_last_state=True, backend="chunked")
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y_ref, h_ref = selective_scan_ref(*half, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(h, h_ref, **TOL[torch.float32])
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)


def test_gradcheck_fp64() -> None:
    """The hand-written backward against finite differences, with chunk boundaries inside."""
    args = _inputs(1, 2, 3, 7, torch.float64)

    def fn(*a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _scan_chunked.selective_scan(*a, True, True, chunk_size=3)

    assert torch.autograd.gradcheck(fn, tuple(args))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize(("length", "chunk"), [(1, 1), (6, 2), (12, 4), (12, 12)])
def test_linear_scan_matches_loop(length: int, chunk: int, with_init: bool, reverse: bool) -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.rand(length, 3, generator=g, dtype=torch.float64)
    x = torch.randn(length, 3, generator=g, dtype=torch.float64)
    init = torch.randn(3, generator=g, dtype=torch.float64) if with_init else None
    expected = torch.empty_like(x)
    if not reverse:
        h = init if init is not None else torch.zeros(3, dtype=torch.float64)
        for i in range(length):
            h = a[i] * h + x[i]
            expected[i] = h
    else:
        lam = x[-1] + (init if init is not None else 0.0)
        expected[-1] = lam
        for i in range(length - 2, -1, -1):
            lam = a[i + 1] * lam + x[i]
            expected[i] = lam
    out = x.clone()
    linear_scan_(a, out, chunk, init=init, reverse=reverse)
    torch.testing.assert_close(out, expected, **TOL[torch.float64])


def test_bad_chunk_size() -> None:
    args = [a.detach() for a in _inputs(1, 2, 3, 4, torch.float32)]
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        _scan_chunked.selective_scan(*args, False, False, chunk_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_on_cuda() -> None:  # pragma: no cover - CUDA only
    args = [a.detach().cuda().requires_grad_() for a in _inputs(2, 8, 4, 37, torch.float32)]
    y, h = selective_scan(*args, delta_softplus=True, return_last_state=True, backend="chunked")
    y_ref, h_ref = selective_scan_ref(*args, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(h, h_ref, **TOL[torch.float32])
    grads = torch.autograd.grad(y.sum() + h.sum(), args)
    grads_ref = torch.autograd.grad(y_ref.sum() + h_ref.sum(), args)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
