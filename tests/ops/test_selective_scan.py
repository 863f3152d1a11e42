"""Selective scan backends against the sequential reference, and the dispatcher's error messages.

Every backend is compared with :func:`selective_scan_ref` on the output, the last state and the
gradient of every input (u, delta, A, B, C, D, z, delta_bias), with one tolerance per dtype.
The loss also depends on the last state, so its gradient path is checked too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from torchrec_mamba.ops import (
    _fused,
    _scan_cpu,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOL: dict[torch.dtype, dict[str, Any]] = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-10},
    torch.float32: {"rtol": 5e-5, "atol": 5e-5},
    # Both sides compute in fp32; the bf16 casts of y and of the gradients can differ by one ulp.
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}
Inputs = dict[str, Any]  # name -> Tensor or None, splatted into the op


@pytest.fixture(scope="module")
def cpu_kernel() -> None:
    """Skip (saying why) only when the C++ kernel failed to build on this machine."""
    if not _scan_cpu.is_available():
        pytest.skip(f"the C++ CPU kernel failed to build: {_scan_cpu.build_error()}")


@pytest.fixture(params=["cpu", "chunked"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "cpu":
        request.getfixturevalue("cpu_kernel")
    return request.param


def make_inputs(
    batch: int,
    dim: int,
    length: int,
    nstate: int,
    dtype: torch.dtype = torch.float32,
    *,
    has_D: bool = True,
    has_z: bool = True,
    has_bias: bool = True,
    softplus: bool = True,
    weight_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Inputs:
    """Random leaf tensors in the shapes of the op; delta is positive when softplus is off."""
    g = torch.Generator().manual_seed(seed)
    wdt = weight_dtype or dtype

    def rnd(*shape: int, dt: torch.dtype = dtype, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return x.to(dt).requires_grad_()

    if softplus:
        delta = rnd(batch, dim, length, scale=0.5, shift=-1.0)  # (B, D, L)
    else:
        delta = torch.rand(batch, dim, length, generator=g, dtype=torch.float64) * 0.5 + 0.05
        delta = delta.to(dtype).requires_grad_()
    A = -(torch.rand(dim, nstate, generator=g, dtype=torch.float64) * 1.5 + 0.05)  # (D, N)
    return {
        "u": rnd(batch, dim, length),
        "delta": delta,
        "A": A.to(wdt).requires_grad_(),
        "B": rnd(batch, nstate, length),
        "C": rnd(batch, nstate, length),
        "D": rnd(dim, dt=wdt) if has_D else None,
        "z": rnd(batch, dim, length) if has_z else None,
        "delta_bias": rnd(dim, dt=wdt, scale=0.3) if has_bias else None,
    }


def run_scan(
    fn: Callable[..., Any], inputs: Inputs, softplus: bool, seed: int = 1
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Forward with the last state, then the gradients of a random projection of both outputs."""
    y, last = fn(**inputs, delta_softplus=softplus, return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    names = [k for k in NAMES if inputs[k] is not None and inputs[k].requires_grad]
    grads = torch.autograd.grad((y * gy).sum() + (last * gl).sum(), [inputs[k] for k in names])
    return y, last, dict(zip(names, grads, strict=True))


def with_backend(backend: str) -> Callable[..., tuple[Tensor, Tensor]]:
    return lambda **kw: selective_scan(**kw, backend=backend)


def assert_matches(
    got: tuple[Tensor, Tensor, dict[str, Tensor]],
    want: tuple[Tensor, Tensor, dict[str, Tensor]],
    tol: dict[str, Any],
    scaled: bool = False,
) -> None:
    """Compare y, the last state and every gradient; ``scaled`` makes atol relative to max |want|.

    Scaling is for large values (extreme inputs), where an element that cancels to near zero
    still carries an absolute rounding error of the size of its neighbours.
    """
    pairs = [("y", got[0], want[0]), ("last_state", got[1], want[1])]
    assert got[2].keys() == want[2].keys()
    pairs += [(f"d{name}", got[2][name], grad) for name, grad in want[2].items()]
    for label, a, b in pairs:
        kw = dict(tol)
        if scaled and b.numel():
            kw["atol"] = tol["atol"] * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, **kw, msg=lambda m: f"{label}: {m}")  # noqa: B023


# N = 16, 32 and 64 take compile-time-size paths in the C++ kernel; the others the generic one.
SHAPES = [
    (2, 3, 1, 4),
    (2, 4, 2, 3),
    (1, 5, 37, 7),
    (3, 2, 16, 16),
    (9, 3, 5, 5),
    (2, 2, 9, 32),
    (1, 2, 6, 64),
]
FLAGS = [  # (D, z, delta_bias, softplus)
    (True, True, True, True),
    (False, False, False, False),
    (True, False, False, False),
    (False, True, False, True),
    (False, False, True, True),
    (False, False, True, False),
    (False, False, False, True),
    (True, True, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-D{}-L{}-N{}".format(*s))
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "D{:d}z{:d}bias{:d}sp{:d}".format(*f))
def test_matches_reference(
    backend: str, dtype: torch.dtype, shape: tuple[int, int, int, int], flags: tuple[bool, ...]
) -> None:
    has_D, has_z, has_bias, softplus = flags
    inputs = make_inputs(
        *shape, dtype, has_D=has_D, has_z=has_z, has_bias=has_bias, softplus=softplus
    )
    got = run_scan(with_backend(backend), inputs, softplus)
    want = run_scan(selective_scan_ref, inputs, softplus)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_matches(got, want, TOL[dtype])


# The cpu backward recomputes the states chunk by chunk (64 steps) from checkpoints the forward
# keeps: lengths at, just past and across chunk boundaries; D = 19 leaves a partial channel
# block (16 or 8 lanes); B = 1 splits the channels into groups across threads.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "shape", [(1, 19, 64, 5), (3, 19, 65, 32), (2, 33, 130, 16), (1, 40, 200, 3)]
)
def test_chunk_boundaries(backend: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    inputs = make_inputs(*shape, dtype)
    got = run_scan(with_backend(backend), inputs, True)
    want = run_scan(selective_scan_ref, inputs, True)
    assert_matches(got, want, TOL[dtype])


@pytest.mark.parametrize("length", [1, 9, 130])
def test_channels_last_views(cpu_kernel: None, length: int) -> None:
    """fp32 u, delta and z as (B, D, L) views of (B, L, D) memory (the Mamba block's layout):
    read in place, results in that layout, everything equal to the reference."""
    base = make_inputs(2, 19, length, 6)

    def channels_last(t: Tensor) -> Tensor:
        return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()

    views = {k: channels_last(v) if k in ("u", "delta", "z") else v for k, v in base.items()}
    got = run_scan(with_backend("cpu"), views, True)
    want = run_scan(selective_scan_ref, base, True)
    assert_matches(got, want, TOL[torch.float32])
    if length > 1:
        assert got[0].transpose(1, 2).is_contiguous(), "y keeps u's channels-last layout"
        for name in ("u", "delta", "z"):
            assert got[2][name].transpose(1, 2).is_contiguous(), f"d{name} keeps its layout"


def test_no_checkpoints_without_grad(cpu_kernel: None) -> None:
    """Inference keeps no state checkpoints; a backward with wrong ones is refused, not wrong."""
    t = {k: None if v is None else v.detach() for k, v in make_inputs(2, 3, 70, 4).items()}
    bt, ct = t["B"].transpose(1, 2).contiguous(), t["C"].transpose(1, 2).contiguous()
    args = (t["u"], t["delta"], t["A"], bt, ct, t["D"], t["z"], t["delta_bias"], True)
    ops = _scan_cpu.kernel_ops()
    assert ops.selective_scan_fwd(*args, False)[2].numel() == 0
    assert ops.selective_scan_fwd(*args, True)[2].numel() > 0
    with pytest.raises(RuntimeError, match="checkpoints must come from selective_scan_fwd"):
        ops.selective_scan_bwd(*args, torch.empty(0), torch.ones_like(t["u"]), None)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
def test_bf16_inputs(backend: str, weight_dtype: torch.dtype) -> None:
    inputs = make_inputs(2, 4, 19, 6, torch.bfloat16, weight_dtype=weight_dtype)
    got = run_scan(with_backend(backend), inputs, True)
    want = run_scan(selective_scan_ref, inputs, True)
    assert got[0].dtype == torch.bfloat16, "y comes back in u's dtype"
    assert got[1].dtype == torch.float32, "the last state is kept in fp32"
    for name, grad in got[2].items():
        assert grad.dtype == inputs[name].dtype, f"d{name} must be in {name}'s dtype"
    assert_matches(got, want, TOL[torch.bfloat16])


def test_non_contiguous_inputs(backend: str) -> None:
    batch, dim, length, nstate = 2, 3, 11, 5
    base = make_inputs(batch, dim, length, nstate, torch.float64)
    g = torch.Generator().manual_seed(3)

    def strided(x: Tensor) -> Tensor:
        """A leaf with the values of x, laid out non-contiguously (transposed or strided)."""
        x = x.detach()
        if x.dim() == 1:
            wide = torch.randn(2 * x.numel(), generator=g, dtype=x.dtype)
            wide[::2] = x
            view = wide[::2]
        else:
            view = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        return view.requires_grad_()

    views = {k: None if v is None else strided(v) for k, v in base.items()}
    assert not any(v.is_contiguous() for v in views.values() if v is not None)
    got = run_scan(with_backend(backend), views, True)
    want = run_scan(selective_scan_ref, base, True)
    assert_matches(got, want, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_extreme_inputs(backend: str, dtype: torch.dtype) -> None:
    """delta ~ 50 through softplus, A ~ -1e-6 (no decay) and A ~ -1e3 (instant decay)."""
    batch, dim, length, nstate = 2, 3, 64, 4
    inputs = make_inputs(batch, dim, length, nstate, dtype)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        delta = torch.randn(batch, dim, length, generator=g, dtype=torch.float64) + 50.0
        inputs["delta"].copy_(delta)  # softplus(delta) ~ delta
        inputs["A"][0].fill_(-1e-6)
        inputs["A"][1].copy_(-torch.rand(nstate, generator=g, dtype=torch.float64) * 2e-6 - 1e-7)
        inputs["A"][2].fill_(-1e3)  # exp(dt * A) underflows to 0
    got = run_scan(with_backend(backend), inputs, True)
    want = run_scan(selective_scan_ref, inputs, True)
    for t in (got[0], got[1], *got[2].values()):
        assert torch.isfinite(t).all()
    assert got[1].abs().max() > 100, "with no decay the state grows to sum(dt * B * u)"
    assert_matches(got, want, TOL[dtype], scaled=True)


_LONG_CACHE: dict[torch.dtype, tuple[Inputs, tuple[Tensor, Tensor, dict[str, Tensor]]]] = {}


def _long_reference(dtype: torch.dtype) -> tuple[Inputs, tuple[Tensor, Tensor, dict[str, Tensor]]]:
    """L=4096 inputs and their reference results, computed once per dtype (the loop is slow)."""
    if dtype not in _LONG_CACHE:
        inputs = make_inputs(1, 2, 4096, 3, dtype)
        _LONG_CACHE[dtype] = (inputs, run_scan(selective_scan_ref, inputs, True))
    return _LONG_CACHE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_long_sequence(backend: str, dtype: torch.dtype) -> None:
    """L=4096: outputs, the final state after 4096 steps, and every gradient."""
    inputs, want = _long_reference(dtype)
    got = run_scan(with_backend(backend), inputs, True)
    assert got[1].shape == (1, 2, 3)
    assert torch.isfinite(got[1]).all() and got[1].abs().max() > 0
    assert_matches(got, want, TOL[dtype])


def test_output_only_and_partial_grads(backend: str) -> None:
    """Without return_last_state y is a plain tensor; only some inputs need gradients."""
    inputs = make_inputs(2, 3, 9, 4, torch.float64)
    for name in ("delta", "B", "D", "delta_bias"):
        inputs[name] = inputs[name].detach()
    y = selective_scan(**inputs, delta_softplus=True, backend=backend)
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    assert isinstance(y, Tensor) and isinstance(y_ref, Tensor)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    leaves = [inputs[k] for k in ("u", "A", "C", "z")]
    grads = torch.autograd.grad(y.sum(), leaves)
    grads_ref = torch.autograd.grad(y_ref.sum(), leaves)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float64])
    with torch.no_grad():
        torch.testing.assert_close(
            selective_scan(**inputs, backend=backend), selective_scan_ref(**inputs)
        )


@pytest.mark.parametrize(
    "shape",
    [(0, 3, 5, 4), (2, 0, 5, 4), (2, 3, 5, 0), (1, 1, 1, 1)],
    ids=["B0", "D0", "N0", "1111"],
)
def test_degenerate_sizes(backend: str, shape: tuple[int, int, int, int]) -> None:
    inputs = make_inputs(*shape, torch.float64)
    got = run_scan(with_backend(backend), inputs, True)
    assert got[0].shape == shape[:3] and got[1].shape == (shape[0], shape[1], shape[3])
    assert_matches(got, run_scan(selective_scan_ref, inputs, True), TOL[torch.float64])


def test_gradient_through_last_state_only(backend: str) -> None:
    """y unused: the backward starts from d last_state alone (D and z get zero gradients)."""
    inputs = make_inputs(2, 3, 8, 4, torch.float64)
    leaves = [v for v in inputs.values() if v is not None]
    grads = {}
    for name, fn in (("got", with_backend(backend)), ("want", selective_scan_ref)):
        _, last = fn(**inputs, delta_softplus=True, return_last_state=True)
        grads[name] = torch.autograd.grad(last.square().sum(), leaves, materialize_grads=True)
    for got, want in zip(grads["got"], grads["want"], strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_cpu_gradcheck(cpu_kernel: None) -> None:
    """Finite differences, independent of the reference."""
    inputs = make_inputs(1, 2, 5, 3, torch.float64)
    names = list(inputs)

    def fn(*args: Tensor) -> tuple[Tensor, Tensor]:
        kw = dict(zip(names, args, strict=True))
        return selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="cpu")

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-6)


def test_cpu_double_backward_raises(cpu_kernel: None) -> None:
    """The hand-written backward builds no graph, so second derivatives must fail loudly."""
    inputs = make_inputs(1, 2, 4, 3, torch.float64)
    y = selective_scan(**inputs, backend="cpu")
    # The square makes d loss / dy depend on the inputs, as in any second-order use.
    (du,) = torch.autograd.grad(y.square().sum(), [inputs["u"]], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        du.sum().backward()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_thread_counts(cpu_kernel: None, threads: int) -> None:
    """The backward splits channels into groups when the batch is small: every split agrees."""
    inputs = make_inputs(9, 5, 13, 6, torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_scan(with_backend("cpu"), inputs, True)
    finally:
        torch.set_num_threads(before)
    assert_matches(got, run_scan(selective_scan_ref, inputs, True), TOL[torch.float64])


# ---------------------------------------------------------------- dispatcher and loader


def test_auto_picks_cpu_kernel(cpu_kernel: None) -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_auto_falls_back_to_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_scan_cpu, "is_available", lambda: False)
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"


def test_forced_cpu_unavailable_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_scan_cpu, "is_available", lambda: False)
    monkeypatch.setattr(_scan_cpu, "build_error", lambda: "no compiler here")
    inputs = make_inputs(1, 2, 3, 2)
    with pytest.raises(RuntimeError, match=r"no compiler here.*apt-get install g\+\+"):
        selective_scan(**inputs, backend="cpu")


def test_fused_on_cpu_says_how_to_install() -> None:
    if _fused.selective_scan_fn is not None:
        pytest.skip("mamba-ssm is importable here; see test_fused_needs_cuda_tensors")
    inputs = make_inputs(1, 2, 3, 2)
    with pytest.raises(RuntimeError, match=r"pip install 'torchrec-mamba\[gpu\]'"):
        selective_scan(**inputs, backend="fused")


def test_fused_needs_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "selective_scan_fn", object())
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        resolve_backend("fused", torch.device("cpu"))


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        selective_scan(**make_inputs(1, 2, 3, 2), backend="cuda")


BAD_SHAPES = {
    "u": ((2, 3), r"u must be \(B, D, L\)"),
    "delta": ((2, 3, 6), r"delta must be \(B, D, L\) = \(2, 3, 5\)"),
    "A": ((4, 4), r"A must be \(D=3, N\)"),
    "B": ((2, 4, 6), r"B must be \(B, N, L\) = \(2, 4, 5\)"),
    "C": ((2, 5, 5), r"C must be \(B, N, L\) = \(2, 4, 5\)"),
    "D": ((4,), r"D must be \(D,\) = \(3,\)"),
    "z": ((1, 3, 5), r"z must be \(B, D, L\) = \(2, 3, 5\)"),
    "delta_bias": ((3, 1), r"delta_bias must be \(D,\) = \(3,\)"),
}


@pytest.mark.parametrize("name", list(BAD_SHAPES))
def test_wrong_shape(name: str) -> None:
    shape, message = BAD_SHAPES[name]
    inputs = make_inputs(2, 3, 5, 4)
    inputs[name] = torch.randn(*shape)
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)


def test_zero_length() -> None:
    inputs = make_inputs(2, 3, 1, 4)
    inputs = {
        k: None if v is None else v.detach()[..., :0] if v.dim() == 3 else v
        for k, v in inputs.items()
    }
    with pytest.raises(ValueError, match="L must be >= 1, got L=0"):
        selective_scan(**inputs)


def test_mismatched_activation_dtype() -> None:
    inputs = make_inputs(2, 3, 5, 4)
    inputs["delta"] = inputs["delta"].double()
    with pytest.raises(TypeError, match="delta has dtype torch.float64 but u has torch.float32"):
        selective_scan(**inputs)


def test_weight_dtype_must_be_fp32_or_u_dtype() -> None:
    inputs = make_inputs(2, 3, 5, 4, torch.bfloat16)
    inputs["A"] = inputs["A"].double()
    with pytest.raises(TypeError, match="A has dtype torch.float64; weights must be float32"):
        selective_scan(**inputs)


def test_integer_dtype() -> None:
    inputs = make_inputs(2, 3, 5, 4)
    inputs["u"] = torch.ones(2, 3, 5, dtype=torch.int64)
    with pytest.raises(TypeError, match="u must be a floating tensor"):
        selective_scan(**inputs)


def test_not_a_tensor() -> None:
    inputs: dict = make_inputs(2, 3, 5, 4)
    inputs["C"] = [[1.0]]
    with pytest.raises(TypeError, match="C must be a torch.Tensor, got list"):
        selective_scan(**inputs)


def test_mixed_devices() -> None:
    inputs = make_inputs(2, 3, 5, 4)
    inputs["A"] = torch.empty(3, 4, device="meta")
    with pytest.raises(ValueError, match="A is on meta but u is on cpu"):
        selective_scan(**inputs)


def test_loader_failure_is_logged_once(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    loader = _scan_cpu.KernelLoader(tmp_path / "missing.cpp", name="torchrec_mamba_test_missing")
    with caplog.at_level(logging.WARNING, logger=_scan_cpu.__name__):
        assert not loader.is_available()
        assert not loader.is_available()
    assert "missing.cpp" in loader.build_error()
    warnings = [r for r in caplog.records if "C++ CPU kernel is unavailable" in r.getMessage()]
    assert len(warnings) == 1


def test_loader_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_scan_cpu.DISABLE_ENV, "1")
    loader = _scan_cpu.KernelLoader(name="torchrec_mamba_test_disabled")
    assert not loader.is_available()
    assert _scan_cpu.DISABLE_ENV in loader.build_error()


def test_loader_builds_once_across_threads() -> None:
    calls: list[int] = []

    class Counting(_scan_cpu.KernelLoader):
        def _build(self) -> object:
            calls.append(1)
            time.sleep(0.05)  # widen the race window
            return object()

    loader = Counting()
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(loader.is_available())) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("flags", "cap", "tag"),
    [
        ({"avx512f", "avx2", "fma"}, "", "avx512"),
        ({"avx512f", "avx2", "fma"}, "avx2", "avx2"),
        ({"avx512f", "avx2", "fma"}, "generic", "generic"),
        ({"avx2", "fma"}, "", "avx2"),
        ({"avx2"}, "", "generic"),
        (set(), "avx512", "generic"),
    ],
)
def test_isa_choice_follows_cpu_flags_and_cap(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], cap: str, tag: str
) -> None:
    """AVX-512 code only for CPUs that list avx512f; TORCHREC_MAMBA_CPU_ISA caps the choice."""
    monkeypatch.setattr(_scan_cpu, "_cpu_flags", lambda: flags)
    monkeypatch.setenv(_scan_cpu.ISA_ENV, cap)
    got, cflags = _scan_cpu._arch_flags()
    assert got == tag
    assert ("-mavx512f" in cflags) == (tag == "avx512")


def test_the_cpu_kernel_builds_where_a_compiler_exists() -> None:
    """Every kernel test skips when the build fails, so a compile error must fail here instead
    of passing the suite with the slow fallback (set TORCHREC_MAMBA_NO_CPU_KERNEL=1 to opt out)."""
    import os
    import shutil

    if os.environ.get(_scan_cpu.DISABLE_ENV, "") not in ("", "0"):
        pytest.skip(f"{_scan_cpu.DISABLE_ENV} is set")
    if not any(shutil.which(cc) for cc in ("c++", "g++")):
        pytest.skip("no C++ compiler on PATH")
    assert _scan_cpu.is_available(), _scan_cpu.build_error()
