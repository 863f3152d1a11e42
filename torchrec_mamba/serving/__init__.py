"""Serving: chunked top-K over a catalogue of any size, and streaming per-user Mamba states.

* :class:`Recommender` (:mod:`.recommender`): load a finished ``train`` run, recommend top-K
  items (and categories) in the ids the user trained with.
* :func:`chunked_topk` / :class:`ItemSource` (:mod:`.topk`): top-K items and target ranks, one
  chunk of the item table at a time (never a (B, all items) matrix).
* :func:`evaluate_chunked` (:mod:`.evaluate`): ``train.loop.evaluate`` with chunked scoring.
* :class:`UserStateStore` (:mod:`.state_store`): each user's per-layer recurrent state, updated
  in O(1) per event through ``MambaSequenceEncoder.step``; atomic, checksummed save / load.
* :class:`FaissItemIndex` (:mod:`.ann`): optional approximate top-K through a faiss IVF index of
  the item table (the ``[faiss]`` extra).

Names load on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchrec_mamba._lazy import lazy_exports

_LAZY = {
    "ChunkedTopK": "torchrec_mamba.serving.topk",
    "ItemSource": "torchrec_mamba.serving.topk",
    "chunked_topk": "torchrec_mamba.serving.topk",
    "UserStateStore": "torchrec_mamba.serving.state_store",
    "StateFileError": "torchrec_mamba.serving.state_store",
    "evaluate_chunked": "torchrec_mamba.serving.evaluate",
    "item_source": "torchrec_mamba.serving.tables",
    "Recommender": "torchrec_mamba.serving.recommender",
    "IdVocab": "torchrec_mamba.serving.vocab",
    "FaissItemIndex": "torchrec_mamba.serving.ann",
}

__all__ = [
    "ChunkedTopK",
    "FaissItemIndex",
    "IdVocab",
    "ItemSource",
    "Recommender",
    "StateFileError",
    "UserStateStore",
    "chunked_topk",
    "evaluate_chunked",
    "item_source",
]

if TYPE_CHECKING:
    from torchrec_mamba.serving.ann import FaissItemIndex
    from torchrec_mamba.serving.evaluate import evaluate_chunked
    from torchrec_mamba.serving.recommender import Recommender
    from torchrec_mamba.serving.state_store import StateFileError, UserStateStore
    from torchrec_mamba.serving.tables import item_source
    from torchrec_mamba.serving.topk import ChunkedTopK, ItemSource, chunked_topk
    from torchrec_mamba.serving.vocab import IdVocab


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
