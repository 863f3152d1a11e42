"""Layers: the Mamba selective-SSM mixer, the feed-forward block and the Mamba4Rec encoder."""

from torchrec_mamba.modules.encoder import MambaEncoderLayer, MambaSequenceEncoder
from torchrec_mamba.modules.feed_forward import FastDropout, FeedForward
from torchrec_mamba.modules.mamba_block import MambaBlock, MambaState

__all__ = [
    "FastDropout",
    "FeedForward",
    "MambaBlock",
    "MambaEncoderLayer",
    "MambaSequenceEncoder",
    "MambaState",
]
