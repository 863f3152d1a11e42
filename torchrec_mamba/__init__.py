"""torchrec-mamba: Mamba4Rec selective state space sequence encoders for TorchRec and Merlin."""

__version__ = "0.1.0"
