"""The Mamba4Rec sequence encoder: a stack of Mamba layers with a streaming ``step`` mode.

Shape letters: B batch, L sequence length, D model width, E inner width, N state size,
W conv width.

The layer stack is exactly Mamba4Rec's (Liu et al., 2024, official code)::

    h = LayerNorm(Dropout(item_embeddings))
    for each layer:
        m = Mamba(h)
        h = LayerNorm(Dropout(m) + h)     # "+ h" only when num_layers > 1
        h = FeedForward(h)                # 4x, GELU, dropout, residual, LayerNorm

The user representation is the output at the last real position (:meth:`last_state`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from torchrec_mamba.modules.feed_forward import FastDropout, FeedForward
from torchrec_mamba.modules.mamba_block import MambaBlock, MambaState
from torchrec_mamba.modules.sequence import as_padded, check_like, gather_last, padding_mask

if TYPE_CHECKING:
    from torchrec.sparse.jagged_tensor import JaggedTensor

logger = logging.getLogger(__name__)

# as_padded and gather_last live in modules.sequence; re-exported here for old imports.
__all__ = ["MambaEncoderLayer", "MambaSequenceEncoder", "as_padded", "gather_last"]

_LN_EPS = 1e-12  # Mamba4Rec's LayerNorm epsilon


class MambaEncoderLayer(nn.Module):
    """One Mamba4Rec layer: Mamba -> dropout -> (+ residual) -> LayerNorm -> FeedForward.

    Args:
        d_model (int): width D.
        d_state (int): SSM state size N.
        d_conv (int): conv width W.
        expand (int): inner width factor.
        dropout (float): dropout probability.
        residual (bool): add the layer input before the LayerNorm (Mamba4Rec: num_layers > 1).
        backend (str): selective-scan backend.
        device (torch.device, optional): parameter device. Default: None.
        dtype (torch.dtype, optional): parameter dtype. Default: None.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        d_conv: int,
        expand: int,
        dropout: float,
        residual: bool,
        backend: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.mamba: MambaBlock = MambaBlock(
            d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend, **factory
        )
        self.dropout = FastDropout(dropout)
        self.layer_norm: nn.LayerNorm = nn.LayerNorm(d_model, eps=_LN_EPS, **factory)
        self.ffn: FeedForward = FeedForward(
            d_model, 4 * d_model, dropout=dropout, layer_norm_eps=_LN_EPS, **factory
        )
        self.residual = residual

    def _post(self, mixed: Tensor, h: Tensor) -> Tensor:
        mixed = self.dropout(mixed)
        if self.residual:
            mixed = mixed + h
        return self.ffn(self.layer_norm(mixed))

    def forward(
        self, h: Tensor, lengths: Tensor | None = None, return_state: bool = False
    ) -> tuple[Tensor, MambaState | None]:
        """(B, L, D) -> ((B, L, D), state at lengths - 1 or None)."""
        if return_state:
            mixed, state = self.mamba(h, lengths, return_state=True)
            return self._post(mixed, h), state
        return self._post(self.mamba(h), h), None

    def step(self, h_t: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """(B, D) -> ((B, D), state updated in place)."""
        mixed, state = self.mamba.step(h_t, state)
        return self._post(mixed, h_t), state


class MambaSequenceEncoder(nn.Module):
    """Mamba4Rec sequence encoder over item embeddings, with an O(1)-per-event ``step``.

    Takes raw item embeddings (it applies the input dropout and LayerNorm itself) as a
    right-padded (B, L, D) tensor with lengths, or as a torchrec ``JaggedTensor``. Outputs at
    padded positions are exactly zero and real positions never depend on padded values.

    Args:
        d_model (int): width D.
        num_layers (int): number of Mamba layers. Default: 1.
        d_state (int): SSM state size N. Default: 32.
        d_conv (int): conv width W. Default: 4.
        expand (int): Mamba inner width factor. Default: 2.
        dropout (float): dropout probability everywhere. Default: 0.2.
        backend (str): selective-scan backend ("auto", "fused", "cpu", "chunked", "reference").
            Default: "auto".
        init (str): "mamba4rec": the paper code's init applied to the whole stack (every Linear,
            the Mamba projections included, N(0, 0.02) with zero bias, so softplus(dt_bias) =
            ln 2); "mamba": Mamba blocks keep mamba-ssm's own init (log-uniform dt in
            [0.001, 0.1]); the FeedForward and LayerNorms get the paper's init either way.
            Default: "mamba4rec".
        device (torch.device, optional): parameter device ("meta" works; materialise with
            ``to_empty`` then :meth:`reset_parameters`). Default: None.
        dtype (torch.dtype, optional): parameter dtype. Default: None.

    Example::

        >>> enc = MambaSequenceEncoder(d_model=16, d_state=4, backend="reference").eval()
        >>> x, lengths = torch.randn(2, 6, 16), torch.tensor([6, 2])
        >>> out = enc(x, lengths)
        >>> out.shape, enc.last_state(x, lengths).shape
        (torch.Size([2, 6, 16]), torch.Size([2, 16]))
        >>> _, state = enc(x, lengths, return_state=True)      # serve: keep each user's state
        >>> y_t, state = enc.step(torch.randn(2, 16), state)   # ... and fold in a new event
        >>> y_t.shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        d_model: int,
        num_layers: int = 1,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        dropout: float = 0.2,
        backend: str = "auto",
        init: Literal["mamba4rec", "mamba"] = "mamba4rec",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(
                f"MambaSequenceEncoder: num_layers must be a positive int, got {num_layers!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MambaSequenceEncoder: dropout must be in [0, 1), got {dropout}")
        if init not in ("mamba4rec", "mamba"):
            raise ValueError(
                f"MambaSequenceEncoder: init must be 'mamba4rec' or 'mamba', got {init!r}"
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.num_layers = num_layers
        self.init = init
        self.input_dropout = FastDropout(dropout)
        self.input_norm = nn.LayerNorm(d_model, eps=_LN_EPS, **factory)
        self.layers = nn.ModuleList(
            MambaEncoderLayer(
                d_model,
                d_state,
                d_conv,
                expand,
                dropout,
                residual=num_layers > 1,
                backend=backend,
                **factory,
            )
            for _ in range(num_layers)
        )
        self._backend = backend
        self.reset_parameters()

    def _layers(self) -> list[MambaEncoderLayer]:
        return [cast(MambaEncoderLayer, layer) for layer in self.layers]

    @property
    def backend(self) -> str:
        """The selective-scan backend of every layer; assign to switch all of them."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = value
        for layer in self._layers():
            layer.mamba.backend = value

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every parameter according to ``init`` (see the class docstring)."""
        self.input_norm.reset_parameters()
        for layer in self._layers():
            layer.mamba.reset_parameters()
            layer.layer_norm.reset_parameters()
            layer.ffn.reset_parameters()
            if self.init == "mamba4rec":
                for linear in (
                    layer.mamba.in_proj,
                    layer.mamba.x_proj,
                    layer.mamba.dt_proj,
                    layer.mamba.out_proj,
                ):
                    nn.init.normal_(linear.weight, mean=0.0, std=0.02)
                    if linear.bias is not None:
                        nn.init.zeros_(linear.bias)

    def forward(
        self,
        x: Tensor | JaggedTensor,
        lengths: Tensor | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, list[MambaState]]:
        """Encode a batch of sequences.

        Args:
            x (Tensor | JaggedTensor): (B, L, D) right-padded raw item embeddings, or a
                ``JaggedTensor`` of (total, D) embeddings (padded here to its longest length).
            lengths (Tensor, optional): (B,) integer lengths in [0, L] for padded ``x``.
                Default: None (every row has length L).
            return_state (bool): also return, per layer, the :class:`MambaState` after each
                sequence's last real position, ready for :meth:`step`. Default: False.

        Returns:
            Tensor: (B, L, D) outputs, exactly zero at padded positions; with
            ``return_state``, also a list of ``num_layers`` states.
        """
        x, lengths = as_padded(x, lengths, self.d_model, "MambaSequenceEncoder", self.input_norm.weight)
        return self._encode(x, lengths, return_state)

    def _encode(
        self, x: Tensor, lengths: Tensor | None, return_state: bool
    ) -> Tensor | tuple[Tensor, list[MambaState]]:
        batch, length, _ = x.shape
        if length == 0:
            out = x.new_zeros(batch, 0, self.d_model)
            return (out, self.allocate_state(batch, device=x.device)) if return_state else out
        real: Tensor | None = None
        if lengths is not None:
            real = padding_mask(lengths.to(x.device), length)[..., None]  # (B, L, 1)
            # Zero the padding first so nothing (not even NaN) there can reach a real position.
            x = x.masked_fill(~real, 0.0)
        h = self.input_norm(self.input_dropout(x))  # (B, L, D)
        states: list[MambaState] = []
        for layer in self._layers():
            h, state = layer(h, lengths, return_state)  # (B, L, D)
            if state is not None:
                states.append(state)
        if real is not None:
            h = h.masked_fill(~real, 0.0)
        return (h, states) if return_state else h

    def last_state(self, x: Tensor | JaggedTensor, lengths: Tensor | None = None) -> Tensor:
        """The user representation: the output at each sequence's last real position.

        Args:
            x (Tensor | JaggedTensor): as in :meth:`forward`.
            lengths (Tensor, optional): as in :meth:`forward`. Default: None.

        Returns:
            Tensor: (B, D). A row of length 0 (a cold user, no history) is all zeros, which
            scores every item 0 under a dot-product head.
        """
        x, lengths = as_padded(x, lengths, self.d_model, "MambaSequenceEncoder", self.input_norm.weight)
        out = cast(Tensor, self._encode(x, lengths, return_state=False))  # (B, L, D)
        return gather_last(out, lengths)

    def allocate_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[MambaState]:
        """Empty-history states, one :class:`MambaState` per layer (see ``MambaBlock.allocate_state``).

        Args:
            batch_size (int): number of sequences B.
            device (torch.device, optional): Default: the parameters' device.
            dtype (torch.dtype, optional): conv-state dtype. Default: the parameters' dtype.

        Returns:
            list: ``num_layers`` states with conv_state (B, E, W) and ssm_state (B, E, N).
        """
        return [
            layer.mamba.allocate_state(batch_size, device=device, dtype=dtype)
            for layer in self._layers()
        ]

    def step(self, x_t: Tensor, state: list[MambaState]) -> tuple[Tensor, list[MambaState]]:
        """Fold one new event per sequence into ``state`` (in place) and return its output.

        Call it in eval mode (dropout would otherwise apply, as in training). Following a
        ``forward(x, lengths, return_state=True)`` by steps gives the same outputs as a forward
        pass over the longer sequences.

        Args:
            x_t (Tensor): (B, D) raw embedding of each sequence's new event.
            state (list): per-layer states from :meth:`allocate_state` or
                ``forward(..., return_state=True)``; updated in place.

        Returns:
            tuple: y_t (B, D), the output at the new position (the new user representation),
            and the (same, updated) state.
        """
        if not isinstance(x_t, Tensor) or x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            shape = tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__
            raise ValueError(
                f"MambaSequenceEncoder.step: x_t must be (B, D) with D={self.d_model}, got {shape}"
            )
        check_like(x_t, self.input_norm.weight, "MambaSequenceEncoder.step", "x_t")
        if not isinstance(state, (list, tuple)) or len(state) != self.num_layers:
            got = len(state) if isinstance(state, (list, tuple)) else type(state).__name__
            raise ValueError(
                f"MambaSequenceEncoder.step: state must be a list of num_layers={self.num_layers} "
                f"MambaState, got {got}"
            )
        h = self.input_norm(self.input_dropout(x_t))  # (B, D)
        new_state: list[MambaState] = []
        for layer, layer_state in zip(self._layers(), state, strict=True):
            h, layer_state = layer.step(h, layer_state)  # (B, D)
            new_state.append(layer_state)
        return h, new_state
