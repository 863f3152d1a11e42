"""selective_state_update: stepping over a sequence must reproduce the sequential scan."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torchrec_mamba.ops import (
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)

TOL: dict[torch.dtype, dict[str, Any]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}


def _inputs(
    batch: int, dim: int, nstate: int, length: int, dtype: torch.dtype, seed: int = 0
) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    return {
        "u": rnd(batch, dim, length),
        "delta": rnd(batch, dim, length).abs() * 0.5,
        "A": -torch.rand(dim, nstate, generator=g, dtype=dtype) * 2,
        "B": rnd(batch, nstate, length),
        "C": rnd(batch, nstate, length),
        "D": rnd(dim),
        "z": rnd(batch, dim, length),
        "delta_bias": rnd(dim) * 0.3,
    }


def _step_all(fn, state: torch.Tensor, t: dict, start: int, use: dict) -> torch.Tensor:
    """Run ``fn`` over steps start..L-1; return the stacked outputs (B, D, L - start)."""
    ys = []
    for i in range(start, t["u"].shape[-1]):
        ys.append(
            fn(
                state,
                t["u"][..., i],
                t["delta"][..., i],
                t["A"],
                t["B"][..., i],
                t["C"][..., i],
                D=t["D"] if use["D"] else None,
                z=t["z"][..., i] if use["z"] else None,
                dt_bias=t["delta_bias"] if use["bias"] else None,
                dt_softplus=use["softplus"],
            )
        )
    return torch.stack(ys, dim=-1)


def _scan(t: dict, use: dict, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    sl = slice(0, stop)
    return selective_scan_ref(
        t["u"][..., sl],
        t["delta"][..., sl],
        t["A"],
        t["B"][..., sl],
        t["C"][..., sl],
        D=t["D"] if use["D"] else None,
        z=t["z"][..., sl] if use["z"] else None,
        delta_bias=t["delta_bias"] if use["bias"] else None,
        delta_softplus=use["softplus"],
        return_last_state=True,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.parametrize("has_D", [False, True])
@pytest.mark.parametrize("nstate", [4, 32])  # 32: the kernel's whole-vector path in float32
def test_steps_equal_scan(
    nstate: int, has_D: bool, has_z: bool, bias: bool, softplus: bool, dtype: torch.dtype
) -> None:
    t = _inputs(2, 5, nstate, 7, dtype)
    use = {"D": has_D, "z": has_z, "bias": bias, "softplus": softplus}
    y_ref, h_ref = _scan(t, use)
    for fn in (selective_state_update, selective_state_update_ref):
        state = torch.zeros(2, 5, nstate, dtype=dtype)
        y = _step_all(fn, state, t, 0, use)
        assert y.dtype == dtype
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        torch.testing.assert_close(state, h_ref, **TOL[dtype])


@pytest.mark.parametrize("prefix", [1, 4])
def test_prefix_scan_then_steps_equal_full_scan(prefix: int) -> None:
    """The step contract: a scan's last state, then one step per new event, equals the full scan."""
    t = _inputs(3, 4, 6, 9, torch.float64, seed=1)
    use = {"D": True, "z": True, "bias": True, "softplus": True}
    y_full, h_full = _scan(t, use)
    _, state = _scan(t, use, stop=prefix)
    y = _step_all(selective_state_update, state, t, prefix, use)
    torch.testing.assert_close(y, y_full[..., prefix:], **TOL[torch.float64])
    torch.testing.assert_close(state, h_full, **TOL[torch.float64])


def test_step_gradients_equal_scan_gradients() -> None:
    """Gradients through L steps (the state is updated autograd-aware) equal the scan's."""
    t = {k: v.requires_grad_() for k, v in _inputs(2, 3, 4, 6, torch.float64, seed=2).items()}
    use = {"D": True, "z": True, "bias": True, "softplus": True}
    names = list(t)
    y_ref, h_ref = _scan(t, use)
    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), [t[n] for n in names])
    state = torch.zeros(2, 3, 4, dtype=torch.float64)
    y = _step_all(selective_state_update, state, t, 0, use)
    grads = torch.autograd.grad((y * gy).sum() + (state * gh).sum(), [t[n] for n in names])
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(
            g, g_ref, **TOL[torch.float64], msg=lambda m, n=name: f"grad {n}: {m}"
        )


def test_bf16_input_with_fp32_state() -> None:
    t32 = _inputs(2, 3, 4, 5, torch.float32, seed=3)
    t16 = {
        k: (v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v)
        for k, v in t32.items()
    }
    use = {"D": True, "z": True, "bias": True, "softplus": True}
    state = torch.zeros(2, 3, 4)
    y = _step_all(selective_state_update, state, t16, 0, use)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    upcast = {k: v.float() for k, v in t16.items()}
    y_ref, h_ref = _scan(upcast, use)
    torch.testing.assert_close(state, h_ref, **TOL[torch.float32])
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2)


def _args(**overrides: object) -> dict:
    args: dict = {
        "state": torch.zeros(2, 3, 4),
        "x": torch.randn(2, 3),
        "dt": torch.rand(2, 3),
        "A": -torch.rand(3, 4),
        "B": torch.randn(2, 4),
        "C": torch.randn(2, 4),
        "D": None,
        "z": None,
        "dt_bias": None,
    }
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"x": torch.randn(2, 3, 1)}, ValueError, r"x must be \(B, D\), one step"),
        ({"A": torch.randn(4, 4)}, ValueError, r"A must be \(D=3, N\)"),
        ({"state": torch.zeros(2, 3, 5)}, ValueError, r"state must be \(B, D, N\) = \(2, 3, 4\)"),
        ({"dt": torch.rand(2, 4)}, ValueError, r"dt must be \(B, D\) = \(2, 3\)"),
        ({"B": torch.randn(2, 4, 1)}, ValueError, r"B must be \(B, N\) = \(2, 4\)"),
        ({"C": torch.randn(1, 4)}, ValueError, r"C must be \(B, N\)"),
        ({"D": torch.randn(4)}, ValueError, r"D must be \(D,\) = \(3,\)"),
        ({"z": torch.randn(2, 2)}, ValueError, r"z must be \(B, D\)"),
        ({"dt_bias": torch.randn(2)}, ValueError, r"dt_bias must be \(D,\)"),
        ({"x": [0.0]}, TypeError, "x must be a torch.Tensor, got list"),
        ({"C": torch.ones(2, 4, dtype=torch.int32)}, TypeError, "C must be a floating tensor"),
        (
            {"dt": torch.rand(2, 3, dtype=torch.float64)},
            TypeError,
            "dt has dtype torch.float64 but x has torch.float32",
        ),
        (
            {"A": -torch.rand(3, 4, dtype=torch.float16)},
            TypeError,
            "A has dtype torch.float16; weights must be",
        ),
        (
            {"state": torch.zeros(2, 3, 4, dtype=torch.bfloat16)},
            TypeError,
            "state has dtype torch.bfloat16",
        ),
        ({"B": torch.randn(2, 4, device="meta")}, ValueError, "B is on meta but x is on cpu"),
    ],
)
def test_errors(overrides: dict[str, Any], error: type, match: str) -> None:
    for fn in (selective_state_update, selective_state_update_ref):
        with pytest.raises(error, match=match):
            fn(**_args(**overrides))


class _Spy:
    """Wraps the compiled ops namespace and counts calls by name."""

    def __init__(self, ops: Any) -> None:
        self.ops, self.calls = ops, []

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.ops, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return fn(*args, **kwargs)

        return wrapped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nstate", [1, 5, 16, 32])  # 16, 32: whole-vector path (float32)
@pytest.mark.parametrize(
    "use",
    [
        {"D": True, "z": True, "bias": True, "softplus": True},
        {"D": False, "z": False, "bias": False, "softplus": False},
        {"D": True, "z": False, "bias": True, "softplus": False},
    ],
)
def test_cpu_kernel_without_grad_matches_reference(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, nstate: int, use: dict
) -> None:
    """Under no_grad, fp32/fp64 steps run the compiled one-pass kernel; it matches the oracle."""
    from torchrec_mamba.ops import _scan_cpu

    if not _scan_cpu.is_available():
        pytest.skip(f"the C++ CPU kernel failed to build: {_scan_cpu.build_error()}")
    spy = _Spy(_scan_cpu.kernel_ops())
    monkeypatch.setattr(_scan_cpu, "kernel_ops", lambda: spy)
    t = _inputs(3, 19, nstate, 6, dtype, seed=4)
    state = torch.randn(3, 19, nstate, dtype=dtype)
    state_ref = state.clone()
    with torch.no_grad():
        ys = _step_all(selective_state_update, state, t, 0, use)
        ys_ref = _step_all(selective_state_update_ref, state_ref, t, 0, use)
    assert spy.calls.count("selective_state_update_cpu") == 6
    torch.testing.assert_close(ys, ys_ref, **TOL[dtype])
    torch.testing.assert_close(state, state_ref, **TOL[dtype])
