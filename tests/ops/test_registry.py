"""The one kernel registry: every op picks its backend by the same rules, override and logging."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from torchrec_mamba.ops import (
    OP_BACKENDS,
    OVERRIDE_ENV,
    _fused,
    _scan_cpu,
    causal_conv1d,
    causal_conv1d_update,
    dropout,
    registry,
    resolve_backend,
    selective_state_update,
)
from torchrec_mamba.ops.causal_conv1d import causal_conv1d_ref

CPU = torch.device("cpu")
LOGGER = registry.__name__


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the once-per-(op, device, choice) log and auto's choices afresh, and no
    override."""
    monkeypatch.setattr(registry, "_logged", set())
    monkeypatch.setattr(registry, "_auto_cache", {})
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)


def no_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_scan_cpu, "is_available", lambda: False)
    monkeypatch.setattr(_scan_cpu, "build_error", lambda: "no compiler here")


@pytest.mark.parametrize("op", list(OP_BACKENDS))
def test_every_op_resolves_the_same_way(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    want = "cpu" if _scan_cpu.is_available() else "chunked"
    assert resolve_backend(op, "auto", CPU) == want
    assert resolve_backend(op, "reference", CPU) == "reference"
    assert resolve_backend(op, "auto", CPU, {"cpu": "fp16"}) == "chunked"
    no_cpu_kernel(monkeypatch)
    assert resolve_backend(op, "auto", CPU) == "chunked"
    with pytest.raises(RuntimeError, match=rf"{op}: backend 'cpu' needs the compiled C\+\+ kernel.*"
                       r"no compiler here.*apt-get install g\+\+"):  # fmt: skip
        resolve_backend(op, "cpu", CPU)


@pytest.mark.parametrize("op", ["selective_scan", "causal_conv1d", "selective_state_update"])
def test_forced_fused_says_how_to_install(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("selective_scan_fn", "selective_state_update_fn", "causal_conv1d_fn"):
        monkeypatch.setattr(_fused, attr, None)
    with pytest.raises(
        RuntimeError, match=rf"{op}: backend 'fused'.*pip install 'torchrec-mamba\[gpu\]'"
    ):
        resolve_backend(op, "fused", CPU)


def test_forced_backend_that_does_not_fit_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"backend 'cpu' cannot run these tensors: fp16"):
        resolve_backend("dropout", "cpu", CPU, {"cpu": "fp16"})


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        resolve_backend("softmax", "auto", CPU)
    with pytest.raises(ValueError, match="causal_conv1d: unknown backend 'triton'"):
        resolve_backend("causal_conv1d", "triton", CPU)
    with pytest.raises(TypeError, match="expected \\(op: str, backend: str, device"):
        resolve_backend("dropout", "auto", "cpu")  # type: ignore[arg-type]


def test_legacy_two_argument_form_means_the_scan() -> None:
    assert resolve_backend("reference", CPU) == "reference"  # type: ignore[arg-type]


def test_fallback_is_logged_once_per_op(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    no_cpu_kernel(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(3):
            for op in ("selective_scan", "causal_conv1d"):
                resolve_backend(op, "auto", CPU)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 2, lines
    assert lines[0].startswith("selective_scan: backend 'auto' falls back to 'chunked' for cpu")
    assert "cpu: needs the compiled C++ kernel" in lines[0] and "no compiler here" in lines[0]
    assert lines[1].startswith("causal_conv1d: backend 'auto' falls back to 'chunked'")


def test_override_env_is_tried_first_for_every_op(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(OVERRIDE_ENV, "reference")
    for op in OP_BACKENDS:
        assert resolve_backend(op, "auto", CPU) == "reference"
    assert resolve_backend("selective_scan", "chunked", CPU) == "chunked"  # forced wins
    # An override that cannot run an op's tensors degrades along auto's order, logged once.
    monkeypatch.setenv(OVERRIDE_ENV, "fused")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        got = resolve_backend("causal_conv1d", "auto", CPU)
    assert got in ("cpu", "chunked")
    monkeypatch.setenv(OVERRIDE_ENV, "gpu")
    with pytest.raises(ValueError, match=f"{OVERRIDE_ENV}='gpu' is not a backend"):
        resolve_backend("dropout", "auto", CPU)


def test_override_env_reaches_the_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the override set to reference, each op's output equals its reference's."""
    seen: list[str] = []
    original = registry.resolve_backend

    def spy(*args: object, **kwargs: object) -> str:
        choice = original(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(choice)
        return choice

    for name in ("causal_conv1d", "state_update", "dropout", "selective_scan"):
        module = importlib.import_module(f"torchrec_mamba.ops.{name}")
        monkeypatch.setattr(module, "resolve_backend", spy)
    monkeypatch.setenv(OVERRIDE_ENV, "reference")
    x, w = torch.randn(2, 3, 7), torch.randn(3, 4)
    torch.testing.assert_close(causal_conv1d(x, w), causal_conv1d_ref(x, w), rtol=0, atol=0)
    causal_conv1d_update(x[..., 0], torch.zeros(2, 3, 4), w)
    selective_state_update(
        torch.zeros(2, 3, 5), x[..., 0], x[..., 1], -torch.ones(3, 5), torch.randn(2, 5),
        torch.randn(2, 5),
    )  # fmt: skip
    dropout(torch.ones(10), 0.5)
    assert seen == ["reference"] * 4


def test_dropout_backends_drop_at_rate_p() -> None:
    x = torch.ones(200, 300, dtype=torch.float64)
    for backend in ("chunked", "reference") + (("cpu",) if _scan_cpu.is_available() else ()):
        torch.manual_seed(0)
        y = dropout(x, 0.25, backend=backend)
        kept = y != 0
        assert abs(kept.double().mean().item() - 0.75) < 0.01, backend
        torch.testing.assert_close(y[kept], x[kept] / 0.75)


def test_state_update_under_grad_skips_the_kernels() -> None:
    """auto skips the no-backward kernels when a gradient is needed; forcing one raises."""
    x = torch.randn(2, 3, requires_grad=True)
    args = (torch.zeros(2, 3, 4), x, torch.rand(2, 3), -torch.ones(3, 4), torch.randn(2, 4),
            torch.randn(2, 4))  # fmt: skip
    y = selective_state_update(*args)
    y.sum().backward()
    assert x.grad is not None
    if _scan_cpu.is_available():
        with pytest.raises(ValueError, match="a gradient is needed and the kernel has no backward"):
            selective_state_update(*args, backend="cpu")


def test_auto_choice_is_cached_but_follows_what_it_depends_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached choice changes with kernel availability, the override and the unfit reasons."""
    want = "cpu" if _scan_cpu.is_available() else "chunked"
    assert resolve_backend("dropout", "auto", CPU) == want
    assert resolve_backend("dropout", "auto", CPU) == want  # served from the cache
    assert len(registry._auto_cache) == 1
    assert resolve_backend("dropout", "auto", CPU, {"cpu": "fp16"}) == "chunked"
    monkeypatch.setenv(OVERRIDE_ENV, "reference")
    assert resolve_backend("dropout", "auto", CPU) == "reference"
    monkeypatch.delenv(OVERRIDE_ENV)
    no_cpu_kernel(monkeypatch)
    assert resolve_backend("dropout", "auto", CPU) == "chunked"
