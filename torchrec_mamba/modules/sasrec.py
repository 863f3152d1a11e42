"""SASRec-style causal Transformer encoder: the baseline next to :class:`MambaSequenceEncoder`.

Shape letters: B batch, L sequence length, D model width, H heads.

Follows RecBole's ``SASRec`` (the protocol Mamba4Rec compares against)::

    h = Dropout(LayerNorm(item_embeddings + position_embeddings))
    for each layer:
        h = LayerNorm(h + Dropout(W_o · CausalSelfAttention(h)))      # post-LN
        h = LayerNorm(h + Dropout(W_2 · GELU(W_1 · h)))               # 4x, post-LN

It takes the same inputs as the Mamba encoder (raw item embeddings, right-padded with lengths, or
a ``JaggedTensor``) and offers the same ``forward`` and ``last_state``.

Masking: RecBole masks keys that are padding or in the future. With right padding every key at
or before a real query position is real, so the causal mask alone is exactly that mask for
every real position; we therefore call ``scaled_dot_product_attention(..., is_causal=True)``,
which lets PyTorch use its memory-efficient (flash) kernels instead of materialising a
(B, H, L, L) mask. Outputs at padded positions are set to zero.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchrec_mamba.modules.feed_forward import FastDropout, FeedForward
from torchrec_mamba.modules.sequence import as_padded, gather_last, padding_mask

if TYPE_CHECKING:
    from torchrec.sparse.jagged_tensor import JaggedTensor

logger = logging.getLogger(__name__)

__all__ = ["SASRecEncoder", "SASRecLayer"]

_LN_EPS = 1e-12  # RecBole's layer_norm_eps


class SASRecLayer(nn.Module):
    """One post-LN Transformer layer: causal multi-head self-attention, then a 4x GELU FFN.

    Args:
        d_model (int): width D.
        num_heads (int): heads H; must divide D.
        dropout (float): dropout after the attention output and in the FFN.
        attn_dropout (float): dropout on the attention probabilities.
        device (torch.device, optional): parameter device. Default: None.
        dtype (torch.dtype, optional): parameter dtype. Default: None.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dropout: float,
        attn_dropout: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, **factory)
        self.out = nn.Linear(d_model, d_model, **factory)
        self.dropout = FastDropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=_LN_EPS, **factory)
        # RecBole's SASRec FFN has no dropout between the two linears.
        self.ffn = FeedForward(
            d_model,
            4 * d_model,
            dropout=dropout,
            activation_dropout=False,
            layer_norm_eps=_LN_EPS,
            **factory,
        )

    def forward(self, h: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D); position t attends to positions <= t."""
        batch, length, width = h.shape
        q, k, v = (
            self.qkv(h).view(batch, length, 3, self.num_heads, width // self.num_heads).unbind(2)
        )
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D/H) each
        ctx = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True
        )  # (B, H, L, D/H)
        ctx = ctx.transpose(1, 2).reshape(batch, length, width)  # (B, L, D)
        h = self.layer_norm(h + self.dropout(self.out(ctx)))
        return self.ffn(h)


class SASRecEncoder(nn.Module):
    """Causal self-attention sequence encoder (SASRec, RecBole flavour) over item embeddings.

    Args:
        d_model (int): width D.
        num_layers (int): Transformer layers. Default: 2.
        num_heads (int): attention heads; must divide d_model. Default: 2.
        max_len (int): longest sequence (size of the learned position table). Default: 200.
        dropout (float): hidden dropout (embeddings, attention output, FFN). Default: 0.2.
        attn_dropout (float, optional): dropout on attention probabilities. On CPU a nonzero
            value makes PyTorch fall back from its fused flash kernel to the O(L^2)-memory math
            kernel; use 0 for speed. Default: None (same as ``dropout``, as in RecBole).
        device (torch.device, optional): parameter device ("meta" works). Default: None.
        dtype (torch.dtype, optional): parameter dtype. Default: None.

    Example::

        >>> enc = SASRecEncoder(d_model=16, max_len=8).eval()
        >>> x, lengths = torch.randn(2, 6, 16), torch.tensor([6, 2])
        >>> enc(x, lengths).shape, enc.last_state(x, lengths).shape
        (torch.Size([2, 6, 16]), torch.Size([2, 16]))
    """

    def __init__(
        self,
        d_model: int,
        num_layers: int = 2,
        num_heads: int = 2,
        max_len: int = 200,
        dropout: float = 0.2,
        attn_dropout: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("max_len", max_len),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SASRecEncoder: {name} must be a positive int, got {value!r}")
        if d_model % num_heads != 0:
            raise ValueError(f"SASRecEncoder: num_heads={num_heads} must divide d_model={d_model}")
        attn_dropout = dropout if attn_dropout is None else attn_dropout
        for name, p in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"SASRecEncoder: {name} must be in [0, 1), got {p}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.max_len = max_len
        self.position_embedding = nn.Embedding(max_len, d_model, **factory)
        self.input_norm = nn.LayerNorm(d_model, eps=_LN_EPS, **factory)
        self.input_dropout = FastDropout(dropout)
        self.layers = nn.ModuleList(
            SASRecLayer(d_model, num_heads, dropout, attn_dropout, **factory)
            for _ in range(num_layers)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RecBole's init: Linear and Embedding weights N(0, 0.02), biases 0, LayerNorm (1, 0)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(self, x: Tensor | JaggedTensor, lengths: Tensor | None = None) -> Tensor:
        """Encode a batch of sequences.

        Args:
            x (Tensor | JaggedTensor): (B, L, D) right-padded raw item embeddings with
                L <= max_len, or a ``JaggedTensor`` of (total, D) embeddings.
            lengths (Tensor, optional): (B,) integer lengths in [0, L] for padded ``x``.
                Default: None (every row has length L).

        Returns:
            Tensor: (B, L, D), exactly zero at padded positions.
        """
        x, lengths = as_padded(x, lengths, self.d_model, "SASRecEncoder", self.input_norm.weight)
        return self._encode(x, lengths)

    def _encode(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        batch, length, _ = x.shape
        if length > self.max_len:
            raise ValueError(
                f"SASRecEncoder: sequence length L={length} exceeds max_len={self.max_len}; "
                "truncate the sequences or build the encoder with a larger max_len"
            )
        if length == 0:
            return x.new_zeros(batch, 0, self.d_model)
        real: Tensor | None = None
        if lengths is not None:
            real = padding_mask(lengths.to(x.device), length)[..., None]  # (B, L, 1)
            x = x.masked_fill(~real, 0.0)
        positions = self.position_embedding.weight[:length]  # (L, D)
        h = self.input_dropout(self.input_norm(x + positions))  # (B, L, D)
        for layer in self.layers:
            h = layer(h)  # (B, L, D)
        if real is not None:
            h = h.masked_fill(~real, 0.0)
        return h

    def last_state(self, x: Tensor | JaggedTensor, lengths: Tensor | None = None) -> Tensor:
        """The output at each sequence's last real position (zeros for length 0).

        Args:
            x (Tensor | JaggedTensor): as in :meth:`forward`.
            lengths (Tensor, optional): as in :meth:`forward`. Default: None.

        Returns:
            Tensor: (B, D).
        """
        x, lengths = as_padded(x, lengths, self.d_model, "SASRecEncoder", self.input_norm.weight)
        return gather_last(cast(Tensor, self._encode(x, lengths)), lengths)
