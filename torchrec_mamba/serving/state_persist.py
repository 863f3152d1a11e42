"""Save / load of a :class:`~torchrec_mamba.serving.state_store.UserStateStore` (a mixin).

The file is written atomically behind a sha256 checksum (:mod:`.state_file`) and read back with
``torch.load(weights_only=True)``; a truncated, corrupted, foreign or mismatching file is refused
with a :class:`~torchrec_mamba.serving.state_file.StateFileError`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torchrec_mamba.serving.state_file import StateFileError, read_checked, write_atomic

if TYPE_CHECKING:
    from torchrec_mamba.modules.encoder import MambaSequenceEncoder
    from torchrec_mamba.serving.recommender import Recommender
    from torchrec_mamba.serving.tables import InputFn
    from torchrec_mamba.serving.topk import ItemSource

__all__ = ["StatePersistence"]

logger = logging.getLogger(__name__)

_FORMAT = 1


class StatePersistence:
    """``save(path)`` / ``load(path, ...)`` for ``UserStateStore`` (which provides the state)."""

    encoder: Any
    _conv: list[Tensor]
    _ssm: list[Tensor]
    _repr: Tensor
    _count: Tensor
    _slot: dict[int, int]

    def _meta(self) -> dict[str, Any]:
        return {
            "d_model": int(self.encoder.d_model),
            "num_layers": len(self._conv),
            "conv_shape": list(self._conv[0].shape[1:]),
            "ssm_shape": list(self._ssm[0].shape[1:]),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write every user's state atomically, behind a sha256 checksum (:mod:`.state_file`)."""
        n = len(self._slot)
        payload = {
            "format": _FORMAT,
            "meta": self._meta(),
            "user_ids": torch.tensor(list(self._slot), dtype=torch.long),
            "conv": [t[:n].cpu() for t in self._conv],
            "ssm": [t[:n].cpu() for t in self._ssm],
            "repr": self._repr[:n].cpu(),
            "count": self._count[:n].cpu(),
        }
        out = write_atomic(path, payload)
        logger.info("saved %d user states to %s", n, out)
        return out

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        encoder: MambaSequenceEncoder | Recommender,
        items: ItemSource | Tensor | None = None,
        input_fn: InputFn | None = None,
        **kwargs: Any,
    ) -> Any:
        """Read a :meth:`save` file (``weights_only``; truncated or corrupted files are refused).

        Args:
            path (str | os.PathLike): the file.
            encoder, items, input_fn, **kwargs: as in the constructor; the encoder must have the
                state shapes the file was saved with. ``encoder`` may instead be a
                :class:`~torchrec_mamba.serving.Recommender` (``load(path, recommender)``): the
                store is then built as :meth:`from_recommender` builds it.

        Returns:
            UserStateStore: holding the saved users.

        Raises:
            StateFileError: missing, truncated, corrupted, foreign or mismatching file.
        """
        payload = read_checked(path)
        from torchrec_mamba.modules.encoder import MambaSequenceEncoder

        if isinstance(encoder, MambaSequenceEncoder):
            if items is None:
                raise ValueError("UserStateStore.load(path, encoder, items): items is required")
            store = cls(encoder, items, input_fn, **kwargs)  # type: ignore[call-arg]
        else:
            store = cls.from_recommender(encoder, **kwargs)  # type: ignore[attr-defined]
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise StateFileError(f"{path}: unknown state format {payload.get('format')!r}")
        if payload["meta"] != store._meta():
            raise StateFileError(
                f"{path} holds states of shape {payload['meta']}, this encoder needs {store._meta()}"
            )
        users = payload["user_ids"].tolist()
        store._grow(len(users))  # type: ignore[attr-defined]
        store._slot = {u: i for i, u in enumerate(users)}
        n, device = len(users), store._repr.device
        for dst, src in zip((*store._conv, *store._ssm), (*payload["conv"], *payload["ssm"]), strict=True):
            dst[:n] = src.to(device)
        store._repr[:n] = payload["repr"].to(device)
        store._count[:n] = payload["count"].to(device)
        return store
