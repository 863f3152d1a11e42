"""Old import path of the SASRec encoder, kept for existing code: use
:mod:`torchrec_mamba.modules.sasrec`. (``torchrec_mamba.models.sasrec`` the *attribute* is the
factory function :func:`torchrec_mamba.models.mamba4rec.sasrec`.)"""

from torchrec_mamba.modules.sasrec import SASRecEncoder, SASRecLayer

__all__ = ["SASRecEncoder", "SASRecLayer"]
