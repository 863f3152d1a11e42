"""torchrec-mamba: Mamba4Rec selective state space sequence encoders for TorchRec and Merlin.

Importing the package is cheap: the public classes below load on first access, and the C++ scan
kernel compiles only when a scan first asks for the "cpu" backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchrec_mamba._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "MambaSequenceEncoder": "torchrec_mamba.modules.encoder",
    "MambaBlock": "torchrec_mamba.modules.mamba_block",
    "SASRecEncoder": "torchrec_mamba.modules.sasrec",
    "SequenceEncoder": "torchrec_mamba.modules.protocol",
    "SequentialRecommender": "torchrec_mamba.models.recommender",
    "Mamba4Rec": "torchrec_mamba.models.mamba4rec",
    "mamba4rec": "torchrec_mamba.models.mamba4rec",
    "sasrec": "torchrec_mamba.models.mamba4rec",
    "NextItemTask": "torchrec_mamba.models.tasks",
    "NextCategoryTask": "torchrec_mamba.models.tasks",
    "Recommender": "torchrec_mamba.serving.recommender",
    "RunConfig": "torchrec_mamba.train.config",
    "build_model": "torchrec_mamba.train.config",
}

__all__ = [
    "Mamba4Rec",
    "MambaBlock",
    "MambaSequenceEncoder",
    "NextCategoryTask",
    "NextItemTask",
    "Recommender",
    "RunConfig",
    "SASRecEncoder",
    "SequenceEncoder",
    "SequentialRecommender",
    "__version__",
    "build_model",
    "mamba4rec",
    "sasrec",
]

if TYPE_CHECKING:
    from torchrec_mamba.models.mamba4rec import Mamba4Rec, mamba4rec, sasrec
    from torchrec_mamba.models.recommender import SequentialRecommender
    from torchrec_mamba.models.tasks import NextCategoryTask, NextItemTask
    from torchrec_mamba.modules.encoder import MambaSequenceEncoder
    from torchrec_mamba.modules.mamba_block import MambaBlock
    from torchrec_mamba.modules.protocol import SequenceEncoder
    from torchrec_mamba.modules.sasrec import SASRecEncoder
    from torchrec_mamba.serving.recommender import Recommender
    from torchrec_mamba.train.config import RunConfig, build_model


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
