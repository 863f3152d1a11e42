"""selective_scan(..., delta_proj=W): the time step is W @ delta_low, fused into the CPU kernel.

The oracle is the sequential reference scan fed with ``einsum(W, delta_low)`` computed by torch:
outputs, the last state and the gradient of every input (the low-rank delta and W included) must
match, for the fused float32 kernel and for the composed paths (float64, the chunked backend).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from torchrec_mamba.ops import _scan_cpu, selective_scan, selective_scan_ref

NAMES = ("u", "delta", "delta_proj", "A", "B", "C", "D", "z", "delta_bias")
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-10},
    torch.float32: {"rtol": 5e-5, "atol": 5e-5},
}


@pytest.fixture(params=["cpu", "chunked"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "cpu" and not _scan_cpu.is_available():
        pytest.skip(f"the C++ CPU kernel failed to build: {_scan_cpu.build_error()}")
    return request.param


def make_inputs(batch: int, dim: int, length: int, nstate: int, rank: int, dtype: torch.dtype,
                *, channels_last: bool = False, flags: tuple[bool, bool, bool] = (True, True, True),
                positive: bool = False, seed: int = 0) -> dict[str, Any]:
    """Leaf tensors; with channels_last, delta is a (B, R, L) view of a wider (B, L, R + 5)
    tensor (the Mamba block's slice of x_proj's output) and u / z are channels-last views.
    positive: delta and delta_proj > 0, so the time step is positive without softplus."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    def step(*shape: int, scale: float) -> Tensor:
        x = rnd(*shape, scale=scale)
        return x.abs() * 0.3 + 0.05 if positive else x

    has_D, has_z, has_bias = flags
    if channels_last:
        wide = step(batch, length, rank + 5, scale=0.5).requires_grad_()
        delta = wide[:, :, 2:2 + rank].transpose(1, 2)  # (B, R, L), strides (L(R+5), 1, R+5)
        u_leaf = rnd(batch, length, dim).requires_grad_()
        u = u_leaf.transpose(1, 2)
    else:
        wide = delta = step(batch, rank, length, scale=0.5).requires_grad_()
        u_leaf = u = rnd(batch, dim, length).requires_grad_()
    A = -(torch.rand(dim, nstate, generator=g, dtype=torch.float64) * 1.5 + 0.05)
    return {
        "u": u, "delta": delta,
        "delta_proj": step(dim, rank, scale=0.7).requires_grad_(),
        "A": A.to(dtype).requires_grad_(),
        "B": rnd(batch, nstate, length).requires_grad_(),
        "C": rnd(batch, nstate, length).requires_grad_(),
        "D": rnd(dim).requires_grad_() if has_D else None,
        "z": rnd(batch, dim, length).requires_grad_() if has_z else None,
        "delta_bias": ((step(dim, scale=0.3) if positive else rnd(dim, scale=0.3, shift=-1.0))
                       .requires_grad_() if has_bias else None),
        "_leaves": {"u": u_leaf, "delta": wide},
    }  # fmt: skip


def run(inputs: dict[str, Any], fn: Any, softplus: bool) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    kwargs = {k: inputs[k] for k in NAMES}
    y, last = fn(**kwargs, delta_softplus=softplus, return_last_state=True)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    leaves = {**{k: inputs[k] for k in NAMES if inputs[k] is not None}, **inputs["_leaves"]}
    names = sorted(leaves)
    grads = torch.autograd.grad((y * gy).sum() + (last * gl).sum(), [leaves[k] for k in names])
    return y, last, dict(zip(names, grads, strict=True))


def oracle(**kw: Any) -> Any:
    """The reference scan on the product computed by torch (independent of every backend)."""
    w = kw.pop("delta_proj")
    kw["delta"] = torch.einsum("dr,brl->bdl", w, kw["delta"])
    return selective_scan_ref(**kw)


def assert_matches(got: Any, want: Any, tol: dict[str, float]) -> None:
    torch.testing.assert_close(got[0], want[0], **tol, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(got[1], want[1], **tol, msg=lambda m: f"last state: {m}")
    assert got[2].keys() == want[2].keys()
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, **tol, msg=lambda m: f"d{name}: {m}")  # noqa: B023


# D = 19 and 33 leave partial channel blocks; B = 1 and 2 split channels into thread groups;
# L = 65 and 130 cross the backward's 64-step chunks; N = 32 takes the fixed-size path.
SHAPES = [(2, 3, 1, 4, 1), (1, 19, 65, 5, 3), (2, 33, 130, 32, 4), (9, 16, 40, 16, 2),
          (1, 40, 200, 3, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-D{}-L{}-N{}-R{}".format(*s))
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_delta_proj_matches_the_reference(
    backend: str, dtype: torch.dtype, shape: tuple[int, ...], channels_last: bool
) -> None:
    inputs = make_inputs(*shape, dtype, channels_last=channels_last)
    got = run(inputs, lambda **kw: selective_scan(**kw, backend=backend), True)
    want = run(inputs, oracle, True)
    assert got[0].dtype == dtype
    assert_matches(got, want, TOL[dtype])


@pytest.mark.parametrize("flags", [(False, False, False), (True, False, True), (False, True, False)],
                         ids=lambda f: "D{:d}z{:d}bias{:d}".format(*f))
@pytest.mark.parametrize("softplus", [True, False])
def test_delta_proj_optional_inputs(backend: str, flags: tuple[bool, ...], softplus: bool) -> None:
    inputs = make_inputs(2, 19, 70, 6, 3, torch.float32, flags=flags, positive=not softplus)
    got = run(inputs, lambda **kw: selective_scan(**kw, backend=backend), softplus)
    assert_matches(got, run(inputs, oracle, softplus), TOL[torch.float32])


def test_fused_kernel_writes_no_full_time_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp32 cpu path goes to the fused op: F.linear (the composed product) never runs."""
    if not _scan_cpu.is_available():
        pytest.skip("no C++ kernel")
    import sys

    scan_mod = sys.modules["torchrec_mamba.ops.selective_scan"]  # the package exports the function

    def no_linear(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the fused path must not compose the time step")

    monkeypatch.setattr(scan_mod.F, "linear", no_linear)
    inputs = make_inputs(2, 19, 70, 6, 3, torch.float32, channels_last=True)
    got = run(inputs, lambda **kw: selective_scan(**kw, backend="cpu"), True)
    monkeypatch.undo()
    assert_matches(got, run(inputs, oracle, True), TOL[torch.float32])
    assert got[2]["u"].is_contiguous()  # du of a channels-last u: the leaf's own layout


def test_delta_proj_errors_name_the_shapes() -> None:
    inputs = make_inputs(2, 8, 5, 3, 2, torch.float32)
    kw = {k: inputs[k] for k in NAMES}
    with pytest.raises(ValueError, match=r"delta_proj must be \(D=8, R\) with R >= 1, got shape \(4, 2\)"):
        selective_scan(**{**kw, "delta_proj": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match=r"delta must be \(B, R, L\) with delta_proj \(D, R\) = \(2, 2, 5\)"):
        selective_scan(**{**kw, "delta": torch.zeros(2, 8, 5)})
    with pytest.raises(TypeError, match="delta_proj must be a torch.Tensor, got list"):
        selective_scan(**{**kw, "delta_proj": [[1.0, 2.0]] * 8})
    with pytest.raises(TypeError, match="delta_proj has dtype torch.float64; weights must be"):
        selective_scan(**{**kw, "delta_proj": torch.zeros(8, 2, dtype=torch.float64)})


def test_cpu_delta_proj_needs_float32_and_a_dense_weight() -> None:
    """The CPU path's own errors: fp64 activations (the dispatcher composes those instead) and,
    in the kernel, a dt_w that is not a contiguous (D, R) float32 tensor."""
    if not _scan_cpu.is_available():
        pytest.skip("no C++ kernel")
    inputs = make_inputs(2, 8, 5, 3, 2, torch.float64)
    kw = {k: inputs[k] for k in NAMES if k != "delta_proj"}
    with pytest.raises(TypeError, match="delta_proj needs float32 activations, got torch.float64"):
        _scan_cpu.selective_scan(**kw, delta_softplus=True, return_last_state=False,
                                 delta_proj=inputs["delta_proj"])
    f32 = make_inputs(2, 8, 5, 3, 2, torch.float32)
    u, dt_low = f32["u"].detach(), f32["delta"].detach()
    bt = f32["B"].detach().transpose(1, 2).contiguous()
    ct = f32["C"].detach().transpose(1, 2).contiguous()
    ops = _scan_cpu.kernel_ops()
    rest = (f32["A"].detach(), bt, ct, None, None, None, True, False)
    with pytest.raises(RuntimeError, match=r"dt_w must be a contiguous float32 \(D, R\) CPU tensor"):
        ops.selective_scan_proj_fwd(u, dt_low, torch.zeros(2, 8).t(), *rest)  # strided
    with pytest.raises(RuntimeError, match=r"dt_low must have shape \[2, 3, 5\]"):
        ops.selective_scan_proj_fwd(u, dt_low, torch.zeros(8, 3), *rest)  # rank 3, input rank 2
