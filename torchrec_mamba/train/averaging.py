"""An exponential moving average of a model's weights (Polyak averaging), sharded tables included.

After every optimizer step the average moves towards the live weights,
``avg <- avg + (1 - d) * (live - avg)``, with the warm-up decay ``d = min(decay, (1 + n) / (10 + n))``
after ``n`` earlier updates, so the first updates do not drag the average towards the
initialisation. :func:`~torchrec_mamba.train.loop.fit` evaluates, selects and saves the averaged
weights and keeps training the live ones.

Which weights: every floating tensor of ``model.state_dict()``, deduplicated by storage (a tied
output head is averaged once). A ``DistributedModelParallel`` model's tables are ShardedTensors;
each rank averages its own local shards in place (the shards are views of the fused tables), so
the average costs one extra copy of the rank's part of the model and no communication.

Why: our validation curves plateau with epoch-to-epoch noise of about 1% (Beauty, see
``docs/benchmarks.md``); averaging the weights along the plateau smooths that noise away, so the
early stop and the selected epoch depend less on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

__all__ = ["WeightAverage"]


def _live_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's floating weights as tensors sharing storage with it, each storage once."""
    out: list[torch.Tensor] = []
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for value in model.state_dict().values():
        if isinstance(value, ShardedTensor):
            parts = [shard.tensor for shard in value.local_shards()]
        elif isinstance(value, torch.Tensor):
            parts = [value]
        else:  # extra state of a module
            continue
        for t in parts:
            if not t.is_floating_point() or t.numel() == 0:
                continue
            key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                out.append(t)
    return out


class WeightAverage:
    """An exponential moving average of ``model``'s weights, kept in float32 or float64.

    Args:
        model (nn.Module): a plain model or a ``DistributedModelParallel`` around one; the
            average starts as a copy of its current weights.
        decay (float): per-step decay in (0, 1); the average spans about ``1 / (1 - decay)``
            optimizer steps.

    Example::

        >>> m = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = m.weight.zero_()
        >>> avg = WeightAverage(m, decay=0.5)
        >>> with torch.no_grad():
        ...     _ = m.weight.fill_(1.0)
        >>> avg.update()  # warm-up: decay min(0.5, 1 / 10), so the average is 0.1 * 0 + 0.9 * 1
        >>> with avg.applied():  # the model holds the average ...
        ...     round(float(m.weight[0, 0].detach()), 6)
        0.9
        >>> float(m.weight[0, 0].detach())  # ... and the live weights afterwards
        1.0
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"weight-average decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self._live = _live_tensors(model)
        # float32 at least: a bf16 average with decay 0.999 would round most updates away
        self.shadow = [t.detach().to(torch.promote_types(t.dtype, torch.float32), copy=True)
                       for t in self._live]
        self._exact = all(s.dtype == t.dtype for s, t in zip(self.shadow, self._live, strict=True))

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses (warm-up included)."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the live weights; call after every optimizer step."""
        live = self._live if self._exact else [t.to(s.dtype) for s, t in zip(self.shadow, self._live, strict=True)]
        torch._foreach_lerp_(self.shadow, live, 1.0 - self.current_decay())
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Put the averaged weights into the model for the ``with`` body, then the live ones back."""
        with torch.no_grad():
            backup = [t.clone() for t in self._live]
            for t, s in zip(self._live, self.shadow, strict=True):
                t.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(self._live, backup, strict=True):
                    t.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """Decay, update count and the averaged tensors (this rank's shards), for checkpoints."""
        return {"decay": self.decay, "updates": self.updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the model must be built (and sharded) as when it was saved.

        Raises:
            ValueError: the saved average has other tensors than this model, or another decay.
        """
        shadow = state.get("shadow")
        if not isinstance(shadow, list) or len(shadow) != len(self.shadow):
            got = len(shadow) if isinstance(shadow, list) else type(shadow).__name__
            raise ValueError(
                f"the saved weight average holds {got} tensors, this model {len(self.shadow)}: "
                "was it saved from the same model and sharding?"
            )
        for i, (saved, own) in enumerate(zip(shadow, self.shadow, strict=True)):
            if not isinstance(saved, torch.Tensor) or saved.shape != own.shape:
                shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
                raise ValueError(
                    f"the saved weight average's tensor {i} has shape {shape}, this model's "
                    f"{tuple(own.shape)}: was it saved from the same model and sharding?"
                )
        if float(state["decay"]) != self.decay:
            raise ValueError(
                f"the checkpoint averaged weights with decay {state['decay']}, this run asks for "
                f"{self.decay}"
            )
        with torch.no_grad():
            for saved, own in zip(shadow, self.shadow, strict=True):
                own.copy_(saved)
        self.updates = int(state["updates"])
