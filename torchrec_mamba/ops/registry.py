"""One kernel registry: every op of this package picks its backend here, by the same rules.

Backends, one vocabulary for every op (:data:`OP_BACKENDS` lists which ops have which):
    "fused":     the CUDA kernels of mamba-ssm / causal-conv1d (torch's own for dropout);
                 CUDA tensors only, and only when importable.
    "cpu":       our compiled C++ kernels (:mod:`._scan_cpu`); CPU tensors only.
    "chunked":   pure PyTorch, any device: the chunked parallel scan for the scan, the
                 vectorised PyTorch form of the other ops.
    "reference": the readable pure-PyTorch twin: the oracle in tests.
    "auto":      the first of fused / cpu / chunked that is available and fits the tensors.

Rules, the same for every op:
    - ``auto`` tries the backends in the order above. An op passes ``unfit``, the reasons why
      a backend cannot run these particular tensors (a dtype, a needed gradient), and ``auto``
      skips those. The choice is logged once per (op, device type, choice), with the reason
      when it is a fallback.
    - The environment variable ``TORCHREC_MAMBA_BACKEND`` is the override: where a call says
      ``auto``, its backend is tried first (and ``auto``'s order after it, so an override that
      does not fit an op degrades instead of failing).
    - A forced backend (``backend="cpu"`` etc.) is used or raises: RuntimeError saying how to
      install it when it is unavailable, ValueError when it cannot run these tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "OP_BACKENDS", "OVERRIDE_ENV", "resolve_backend"]

BACKENDS: tuple[str, ...] = ("auto", "fused", "cpu", "chunked", "reference")
OVERRIDE_ENV = "TORCHREC_MAMBA_BACKEND"
_AUTO_ORDER = ("fused", "cpu", "chunked")
_ALL = ("fused", "cpu", "chunked", "reference")
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "selective_scan": _ALL,
    "selective_state_update": _ALL,
    "causal_conv1d": _ALL,
    "causal_conv1d_update": _ALL,
    "dropout": _ALL,
    "gelu_dropout": _ALL,
}
# The attribute of ``_fused`` that holds each op's CUDA kernel, and the error it keeps.
_FUSED_ATTR = {
    "selective_scan": ("selective_scan_fn", "import_error", "mamba-ssm"),
    "selective_state_update": ("selective_state_update_fn", "import_error", "mamba-ssm"),
    "causal_conv1d": ("causal_conv1d_fn", "conv_import_error", "causal-conv1d"),
    "causal_conv1d_update": ("causal_conv1d_update_fn", "conv_import_error", "causal-conv1d"),
}
_logged: set[tuple[str, str, str]] = set()


def _cpu_kernel_error() -> str:
    """Why the compiled CPU kernels cannot be used ("" when they can)."""
    from torchrec_mamba.ops import _scan_cpu

    if _scan_cpu.is_available() and _scan_cpu.kernel_ops() is not None:
        return ""
    return _scan_cpu.build_error() or "the compiled kernel is not loaded"


def unavailable(op: str, backend: str, device: torch.device) -> tuple[str, str]:
    """Why ``backend`` of ``op`` cannot run on ``device`` here: (reason, how to fix); "" if it can.

    Example::

        >>> unavailable("selective_scan", "reference", torch.device("cpu"))
        ('', '')
        >>> unavailable("selective_scan", "cpu", torch.device("meta"))[0]
        'runs on CPU tensors only, got meta'
    """
    if backend == "fused":
        if op in _FUSED_ATTR:
            from torchrec_mamba.ops import _fused

            attr, err_attr, package = _FUSED_ATTR[op]
            if getattr(_fused, attr) is None:
                return (
                    f"needs {package}'s CUDA kernels, which are not importable here "
                    f"({getattr(_fused, err_attr)})",
                    "Install them on a CUDA machine with `pip install 'torchrec-mamba[gpu]'` "
                    "(mamba-ssm, causal-conv1d), or use backend='auto'.",
                )
        if device.type != "cuda":
            return (f"runs on CUDA tensors only, got {device.type}", "use backend='cpu' or 'auto'")
    if backend == "cpu":
        if device.type != "cpu":
            return (
                f"runs on CPU tensors only, got {device.type}",
                "use backend='chunked' or 'auto'",
            )
        error = _cpu_kernel_error()
        if error:
            return (
                f"needs the compiled C++ kernel, which failed to build ({error})",
                "It is JIT-compiled with torch.utils.cpp_extension: install a C++ compiler "
                "(`apt-get install g++`) and ninja (`pip install ninja`), or use "
                "backend='chunked'.",
            )
    return "", ""


def _check_names(op: str, backend: str) -> None:
    if op not in OP_BACKENDS:
        raise ValueError(f"resolve_backend: unknown op {op!r}; choose one of {tuple(OP_BACKENDS)}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS}")


# auto's choices, keyed on everything they depend on: the op, the device type, the override, the
# reasons given, and the identity of the loaded kernels (a kernel that fails to load, or a test
# that swaps one out, changes the key). A serving step calls auto about ten times; without the
# cache that was ~45 us of a 280 us single-user update.
_auto_cache: dict[tuple[object, ...], str] = {}


def _kernel_token(op: str, device: torch.device) -> tuple[int, int, bool]:
    from torchrec_mamba.ops import _fused, _scan_cpu

    fused = getattr(_fused, _FUSED_ATTR[op][0], None) if op in _FUSED_ATTR else None
    if device.type != "cpu":
        return id(fused), 0, False
    return id(fused), id(_scan_cpu.kernel_ops()), _scan_cpu.is_available()


def _auto(op: str, device: torch.device, unfit: Mapping[str, str]) -> str:
    override = os.environ.get(OVERRIDE_ENV, "").strip().lower()
    key = (op, device.type, override, tuple(sorted(unfit.items())), _kernel_token(op, device))
    cached = _auto_cache.get(key)
    if cached is not None:
        return cached
    choice = _auto_uncached(op, device, unfit, override)
    _auto_cache[key] = choice
    return choice


def _auto_uncached(op: str, device: torch.device, unfit: Mapping[str, str], override: str) -> str:
    if override and override not in BACKENDS:
        raise ValueError(
            f"{op}: {OVERRIDE_ENV}={override!r} is not a backend; choose one of {BACKENDS}"
        )
    order = [b for b in (override, *_AUTO_ORDER) if b and b != "auto"]
    skipped: list[str] = []
    choice = "chunked"
    for candidate in dict.fromkeys(order):  # unique, in order
        reason = unavailable(op, candidate, device)[0] or unfit.get(candidate, "")
        if not reason:
            choice = candidate
            break
        # Only the backends meant for this device type make the choice a fallback.
        if not reason.startswith("runs on "):
            skipped.append(f"{candidate}: {reason}")
    key = (op, device.type, choice)
    if key not in _logged:
        _logged.add(key)
        if skipped:
            logger.info(
                "%s: backend 'auto' falls back to %r for %s tensors (%s)",
                op, choice, device.type, "; ".join(skipped),
            )  # fmt: skip
        else:
            logger.info("%s: backend 'auto' chose %r for %s tensors", op, choice, device.type)
    return choice


def resolve_backend(
    op: str,
    backend: str | torch.device,
    device: torch.device | None = None,
    unfit: Mapping[str, str] | None = None,
) -> str:
    """Map ``backend`` (possibly "auto") to the concrete backend ``op`` runs on ``device``.

    The legacy form ``resolve_backend(backend, device)`` means ``op="selective_scan"``.

    Args:
        op (str): one of :data:`OP_BACKENDS`, e.g. "selective_scan" or "dropout".
        backend (str): one of :data:`BACKENDS`.
        device (torch.device): where the op's tensors live.
        unfit (Mapping[str, str], optional): backend -> why it cannot run these tensors; "auto"
            skips those, a forced one raises ValueError. Default: None (every backend fits).

    Example::

        >>> resolve_backend("causal_conv1d", "reference", torch.device("cpu"))
        'reference'
        >>> resolve_backend("dropout", "auto", torch.device("meta"))
        'chunked'

    Returns:
        str: "fused", "cpu", "chunked" or "reference".

    Raises:
        ValueError: an unknown op or backend, or a forced backend that cannot run these tensors.
        RuntimeError: a forced backend that is unavailable here; the message says how to fix it.
    """
    if device is None and isinstance(backend, torch.device) and op in BACKENDS:
        op, backend, device = "selective_scan", op, backend  # type: ignore[assignment]  # legacy
    if not isinstance(backend, str) or not isinstance(device, torch.device):
        raise TypeError(
            f"resolve_backend: expected (op: str, backend: str, device: torch.device), got "
            f"({op!r}, {backend!r}, {device!r})"
        )
    _check_names(op, backend)
    unfit = unfit or {}
    if backend == "auto":
        return _auto(op, device, unfit)
    if backend not in OP_BACKENDS[op]:
        raise ValueError(
            f"{op}: backend {backend!r} is not offered; choose one of {OP_BACKENDS[op]}"
        )
    reason, fix = unavailable(op, backend, device)
    if reason:
        raise RuntimeError(f"{op}: backend {backend!r} {reason}; {fix}")
    if unfit.get(backend):
        raise ValueError(
            f"{op}: backend {backend!r} cannot run these tensors: {unfit[backend]}; "
            "use backend='auto'"
        )
    return backend
