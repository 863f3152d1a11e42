"""Compiled C++ CPU selective scan (placeholder: being written)."""

from __future__ import annotations

from torch import Tensor


def is_available() -> bool:
    return False


def build_error() -> str:
    return "not built yet"


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
    delta_softplus: bool, return_last_state: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    raise RuntimeError(build_error())
