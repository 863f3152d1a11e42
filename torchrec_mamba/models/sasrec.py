"""Moved: the SASRec encoder lives in :mod:`torchrec_mamba.modules.sasrec`; re-exported here."""

from torchrec_mamba.modules.sasrec import SASRecEncoder, SASRecLayer

__all__ = ["SASRecEncoder", "SASRecLayer"]
