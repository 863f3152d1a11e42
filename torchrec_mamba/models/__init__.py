"""Whole models: ``SequentialRecommender(tables, encoder, tasks)`` and its factories.

* :mod:`.tables`: the per-position ``EmbeddingCollection`` (items, categories) and id checks;
* :mod:`.side`: pooled side features (``EmbeddingBagCollection``);
* :mod:`.tasks`: ``NextItemTask`` / ``NextCategoryTask`` (loss, candidates, metric names, weight);
* :mod:`.heads`: the tied full and sampled (log-Q) softmax;
* :mod:`.recommender`: ``SequentialRecommender``;
* :mod:`.mamba4rec`: the factories ``mamba4rec`` / ``sasrec`` and the ``Mamba4Rec`` constructor.

The SASRec encoder lives in :mod:`torchrec_mamba.modules`; it is re-exported here.
"""

# The old module path ``torchrec_mamba.models.sasrec`` (the SASRec encoder, now in modules/) is
# imported first so that the name ``sasrec`` below ends up bound to the factory function: a later
# ``from torchrec_mamba.models.sasrec import SASRecEncoder`` finds the module in sys.modules and
# leaves this attribute alone.
import torchrec_mamba.models.sasrec  # noqa: F401, I001  (must precede the factory import)
from torchrec_mamba.models.heads import FullSoftmaxHead, SampledSoftmaxConfig, SampledSoftmaxHead
from torchrec_mamba.models.mamba4rec import (
    Mamba4Rec,
    Mamba4RecConfig,
    Mamba4RecOutput,
    make_tasks,
    mamba4rec,
    sasrec,
)
from torchrec_mamba.models.recommender import (
    RecommenderOutput,
    SequenceTower,
    SequentialRecommender,
)
from torchrec_mamba.models.side import SideFeature
from torchrec_mamba.models.tables import SequenceTables
from torchrec_mamba.models.tasks import NextCategoryTask, NextItemTask, TiedSoftmaxTask
from torchrec_mamba.modules.sasrec import SASRecEncoder

__all__ = [
    "FullSoftmaxHead",
    "Mamba4Rec",
    "Mamba4RecConfig",
    "Mamba4RecOutput",
    "NextCategoryTask",
    "NextItemTask",
    "RecommenderOutput",
    "SASRecEncoder",
    "SampledSoftmaxConfig",
    "SampledSoftmaxHead",
    "SequenceTables",
    "SequenceTower",
    "SequentialRecommender",
    "SideFeature",
    "TiedSoftmaxTask",
    "make_tasks",
    "mamba4rec",
    "sasrec",
]
