"""Sequence helpers shared by the encoders and the models, each written once.

Shape letters: B batch, L sequence length, D width, T total positions of a jagged batch.

* :func:`padding_mask`: which positions of a right-padded batch are real;
* :func:`gather_last`: each row's output at its last real position (the user representation);
* :func:`jagged_to_padded_dense`: (T, D) jagged values -> (B, L, D) right-padded with zeros;
* :func:`as_padded`: validate a padded tensor or a ``JaggedTensor`` and return it padded.

Ids follow the package rule: real ids are ``>= 1``, 0 is padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from torchrec_mamba.modules.mamba_block import check_lengths, check_padded

if TYPE_CHECKING:
    from torchrec.sparse.jagged_tensor import JaggedTensor

__all__ = ["as_padded", "check_like", "gather_last", "jagged_to_padded_dense", "padding_mask"]


def padding_mask(lengths: Tensor, length: int) -> Tensor:
    """``True`` at the real positions of a right-padded batch.

    Args:
        lengths (Tensor): (B,) integer lengths in ``[0, length]``.
        length (int): padded length L.

    Example::

        >>> padding_mask(torch.tensor([2, 0, 3]), 3).int().tolist()
        [[1, 1, 0], [0, 0, 0], [1, 1, 1]]

    Returns:
        Tensor: (B, L) bool.
    """
    return torch.arange(length, device=lengths.device) < lengths[:, None]  # (B, L)


def gather_last(out: Tensor, lengths: Tensor | None) -> Tensor:
    """The row of ``out`` at each sequence's last real position; zeros for length 0.

    Args:
        out (Tensor): (B, L, D) per-position outputs.
        lengths (Tensor, optional): (B,) lengths; None means every row has length L.

    Example::

        >>> out = torch.arange(12.0).view(2, 3, 2)
        >>> gather_last(out, torch.tensor([2, 0])).tolist()
        [[2.0, 3.0], [0.0, 0.0]]

    Returns:
        Tensor: (B, D).
    """
    batch, length, width = out.shape
    if length == 0:
        return out.new_zeros(batch, width)
    if lengths is None:
        return out[:, -1]
    lengths = lengths.to(out.device, torch.long)
    idx = (lengths - 1).clamp(min=0)  # (B,)
    last = out[torch.arange(batch, device=out.device), idx]  # (B, D)
    return last * (lengths > 0).to(out.dtype)[:, None]


def jagged_to_padded_dense(values: Tensor, offsets: Tensor, max_len: int) -> Tensor:
    """Right-pad jagged rows of vectors with zeros (FBGEMM's kernel; differentiable).

    Args:
        values (Tensor): (T, D) concatenated rows.
        offsets (Tensor): (B + 1,) row offsets into ``values``.
        max_len (int): padded length L (longer rows are cut at L).

    Example::

        >>> v = torch.arange(6.0).view(3, 2)
        >>> jagged_to_padded_dense(v, torch.tensor([0, 2, 3]), 2)[1].tolist()
        [[4.0, 5.0], [0.0, 0.0]]

    Returns:
        Tensor: (B, L, D).
    """
    return torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_len], 0.0)


def check_like(x: Tensor, param: Tensor, owner: str, name: str = "x") -> None:
    """Raise ``TypeError`` when ``x`` is not on ``param``'s device or not of its dtype.

    A mixed dtype would otherwise surface deep inside a kernel (``RuntimeError: mixed dtype``)
    without saying which tensor. Under ``torch.autocast`` the dtype may differ.

    Example::

        >>> check_like(torch.zeros(2, dtype=torch.float64), torch.zeros(1), "Enc")
        Traceback (most recent call last):
        ...
        TypeError: Enc: x has dtype torch.float64 but the encoder's parameters are torch.float32; pass x.to(torch.float32) or convert the encoder with .to(torch.float64)
    """
    if x.device != param.device and param.device.type != "meta":
        raise TypeError(
            f"{owner}: {name} is on {x.device} but the encoder's parameters are on "
            f"{param.device}; move one of them with .to()"
        )
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    if x.dtype != param.dtype and not autocast:
        raise TypeError(
            f"{owner}: {name} has dtype {x.dtype} but the encoder's parameters are "
            f"{param.dtype}; pass {name}.to({param.dtype}) or convert the encoder with "
            f".to({x.dtype})"
        )


def as_padded(
    x: Tensor | JaggedTensor,
    lengths: Tensor | None,
    d_model: int,
    owner: str,
    param: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Validate a sequence batch and return it right-padded, with its lengths.

    Args:
        x (Tensor | JaggedTensor): (B, L, D) right-padded embeddings, or a torchrec
            ``JaggedTensor`` with (total, D) values and B lengths.
        lengths (Tensor, optional): (B,) integer lengths for a padded ``x``; must be None for a
            ``JaggedTensor``, which carries its own.
        d_model (int): expected width D.
        owner (str): name used in error messages.
        param (Tensor, optional): a parameter of the encoder; ``x`` must match its dtype and
            device (:func:`check_like`). Default: None (not checked).

    Returns:
        tuple: padded (B, L, D) (L = the longest length for jagged input, zeros after each
        length) and lengths (B,) or None.

    Raises:
        TypeError: wrong types or dtypes.
        ValueError: wrong shapes or lengths outside [0, L].
    """
    if isinstance(x, Tensor):
        check_padded(x, d_model, owner)
        if param is not None:
            check_like(x, param, owner)
        if lengths is not None:
            check_lengths(lengths, x.shape[0], x.shape[1], owner)
        return x, lengths
    from torchrec.sparse.jagged_tensor import JaggedTensor

    if not isinstance(x, JaggedTensor):
        raise TypeError(
            f"{owner}: x must be a (B, L, D) torch.Tensor or a torchrec JaggedTensor, "
            f"got {type(x).__name__}"
        )
    if lengths is not None:
        raise ValueError(
            f"{owner}: pass lengths only with a padded tensor; a JaggedTensor carries its own"
        )
    values = x.values()
    if not values.is_floating_point():
        raise TypeError(
            f"{owner}: JaggedTensor values must be floating embeddings, got dtype {values.dtype}"
        )
    if param is not None:
        check_like(values, param, owner, "JaggedTensor values")
    if values.dim() != 2 or values.shape[-1] != d_model:
        raise ValueError(
            f"{owner}: JaggedTensor values must be (total, D) with D={d_model}, "
            f"got shape {tuple(values.shape)}"
        )
    jt_lengths = x.lengths()
    batch = jt_lengths.numel()
    max_len = int(jt_lengths.max()) if batch > 0 else 0
    if max_len == 0:
        return values.new_zeros(batch, 0, d_model), jt_lengths
    return jagged_to_padded_dense(values, x.offsets(), max_len), jt_lengths  # (B, L, D)
