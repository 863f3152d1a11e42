"""Layers: the Mamba mixer, the feed-forward block, both sequence encoders and their contract.

* :class:`MambaSequenceEncoder` (Mamba4Rec) and :class:`SASRecEncoder` (the baseline) both follow
  :class:`SequenceEncoder` (:mod:`.protocol`); the Mamba one is also a :class:`StreamingEncoder`.
* :mod:`.sequence` holds the padding mask, the last-position gather and jagged -> padded.
"""

from torchrec_mamba.modules.encoder import MambaEncoderLayer, MambaSequenceEncoder
from torchrec_mamba.modules.feed_forward import FastDropout, FeedForward
from torchrec_mamba.modules.mamba_block import MambaBlock, MambaState
from torchrec_mamba.modules.protocol import SequenceEncoder, StreamingEncoder, supports_step
from torchrec_mamba.modules.sasrec import SASRecEncoder, SASRecLayer
from torchrec_mamba.modules.sequence import (
    as_padded,
    gather_last,
    jagged_to_padded_dense,
    padding_mask,
)

__all__ = [
    "FastDropout",
    "FeedForward",
    "MambaBlock",
    "MambaEncoderLayer",
    "MambaSequenceEncoder",
    "MambaState",
    "SASRecEncoder",
    "SASRecLayer",
    "SequenceEncoder",
    "StreamingEncoder",
    "as_padded",
    "gather_last",
    "jagged_to_padded_dense",
    "padding_mask",
    "supports_step",
]
