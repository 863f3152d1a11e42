"""Whole models: Mamba4Rec on TorchRec (EC/EBC + encoder + tied heads) and the SASRec encoder."""

from torchrec_mamba.models.heads import FullSoftmaxHead, SampledSoftmaxConfig, SampledSoftmaxHead
from torchrec_mamba.models.mamba4rec import (
    Mamba4Rec,
    Mamba4RecConfig,
    Mamba4RecOutput,
    SequenceTower,
    SideFeature,
)
from torchrec_mamba.models.sasrec import SASRecEncoder

__all__ = [
    "FullSoftmaxHead",
    "Mamba4Rec",
    "Mamba4RecConfig",
    "Mamba4RecOutput",
    "SASRecEncoder",
    "SampledSoftmaxConfig",
    "SampledSoftmaxHead",
    "SequenceTower",
    "SideFeature",
]
