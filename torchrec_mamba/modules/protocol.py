"""The contract every sequence encoder follows, so models and serving can take any of them.

Shape letters: B batch, L sequence length, D model width.

A :class:`SequenceEncoder` maps raw item embeddings (right-padded with lengths, or a torchrec
``JaggedTensor``) to per-position states, exactly zero at padded positions, and gives the state at
each row's last real position. A :class:`StreamingEncoder` also folds one new event into a
per-user state in O(1) (``allocate_state`` / ``step``); a prefix followed by steps equals the full
forward pass. ``MambaSequenceEncoder`` is both; ``SASRecEncoder`` is a plain ``SequenceEncoder``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["SequenceEncoder", "StreamingEncoder", "supports_step"]


@runtime_checkable
class SequenceEncoder(Protocol):
    """``forward(x, lengths) -> (B, L, D)`` and ``last_state(x, lengths) -> (B, D)``.

    Attributes:
        d_model (int): width D of inputs and outputs.

    Example::

        >>> from torchrec_mamba.modules import MambaSequenceEncoder, SASRecEncoder
        >>> isinstance(SASRecEncoder(d_model=8, max_len=4), SequenceEncoder)
        True
        >>> supports_step(SASRecEncoder(d_model=8, max_len=4))
        False
        >>> supports_step(MambaSequenceEncoder(d_model=8, d_state=4, backend="reference"))
        True
    """

    d_model: int

    def __call__(self, x: Any, lengths: Tensor | None = None) -> Any: ...

    def last_state(self, x: Any, lengths: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class StreamingEncoder(SequenceEncoder, Protocol):
    """A :class:`SequenceEncoder` with a recurrent state: ``allocate_state`` and ``step``."""

    def allocate_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Any: ...

    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]: ...


def supports_step(encoder: object) -> bool:
    """Whether ``encoder`` offers the streaming ``allocate_state`` / ``step`` pair."""
    return isinstance(encoder, StreamingEncoder)
