"""Streaming serving state: each user's per-layer Mamba state, updated in O(1) per event.

Shape letters: B users in a call, U users held, D width, E inner width, W conv width, N state
size, L history length, K recommended items.

A user's state is what :meth:`MambaSequenceEncoder.step` needs to fold in one more event (per
layer a conv window (E, W) and an SSM state (E, N)) plus the current user representation (D,),
the encoder output after the user's latest event. The store keeps them for every user in a few
contiguous (capacity, ...) tensors; a batched :meth:`UserStateStore.update` gathers the rows of
the users in the call (one ``index_select`` per tensor), runs one batched ``step`` and scatters
the rows back (``index_copy_``); when the users of a call hold consecutive slots (users added
together and updated together, the usual micro-batch), it steps those rows in place with no copy
at all. Rows of users outside the call are never read or written.

The encoder input of an event is produced by ``input_fn(item_ids, category_ids)``: by default
the item embedding; :meth:`UserStateStore.from_model` builds the exact input of the model's
tower (item embedding, plus the category embedding when the model has a category table), read
through the model's EmbeddingCollection so that it also works with a sharded table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torchrec_mamba.modules.encoder import MambaSequenceEncoder
from torchrec_mamba.modules.mamba_block import MambaState
from torchrec_mamba.serving.state_file import StateFileError
from torchrec_mamba.serving.state_persist import StatePersistence
from torchrec_mamba.serving.tables import InputFn, event_input, item_source
from torchrec_mamba.serving.topk import ItemSource, chunked_topk
from torchrec_mamba.serving.vocab import IdVocab

if TYPE_CHECKING:
    from torchrec_mamba.models.recommender import SequentialRecommender
    from torchrec_mamba.serving.recommender import Recommender

__all__ = ["StateFileError", "UserStateStore"]

logger = logging.getLogger(__name__)



def _ids(values: Sequence[int] | Tensor, name: str) -> Tensor:
    t = torch.as_tensor(values)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D sequence of ints, got {t.dtype} shape {tuple(t.shape)}")
    return t.long()


class UserStateStore(StatePersistence):
    """Per-user recurrent states of a Mamba encoder, with batched updates and chunked top-K.

    The encoder is switched to eval mode (streaming equals re-encoding only without dropout).

    Args:
        encoder (MambaSequenceEncoder): the encoder (``allocate_state`` / ``step``).
        items (ItemSource | Tensor): the catalogue for :meth:`recommend` and the default input;
            a tensor is an ``(I + 1, D)`` table (row 0 padding).
        input_fn (Callable | None): ``(item_ids (B,), category_ids (B,) | None) -> (B, D)`` encoder
            input of one event. Default: None (``items.lookup(item_ids)``).
        capacity (int): initial user rows (grows by doubling). Default: 1024.
        chunk_size (int): items per chunk in :meth:`recommend`. Default: 65536.

    Example::

        >>> from torchrec_mamba.modules import MambaSequenceEncoder
        >>> enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
        >>> store = UserStateStore(enc, torch.randn(21, 8))      # 20 items, row 0 padding
        >>> store.update([7, 42], [3, 5])                        # user 7 saw item 3, user 42 item 5
        >>> store.update([7], [4])
        >>> store.num_events([7, 42]).tolist()
        [2, 1]
        >>> ids, scores = store.recommend([7, 42], k=3)
        >>> ids.shape, scores.shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
    """

    def __init__(
        self,
        encoder: MambaSequenceEncoder,
        items: ItemSource | Tensor,
        input_fn: InputFn | None = None,
        *,
        capacity: int = 1024,
        chunk_size: int = 65536,
    ) -> None:
        for attr in ("allocate_state", "step", "d_model"):
            if not hasattr(encoder, attr):
                raise TypeError(f"encoder must have {attr!r} (a MambaSequenceEncoder), got {type(encoder).__name__}")
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.encoder = encoder.eval()
        self.items = items if isinstance(items, ItemSource) else ItemSource.from_table(items)
        self.input_fn: InputFn = input_fn or (lambda item_ids, _cat: self.items.lookup(item_ids))
        self.chunk_size = chunk_size
        #: raw <-> dense item ids (set by :meth:`from_recommender`); None: dense ids in and out
        self.ids: IdVocab | None = None
        self._slot: dict[int, int] = {}
        template = encoder.allocate_state(capacity)
        self._conv = [s.conv_state for s in template]  # per layer (cap, E, W)
        self._ssm = [s.ssm_state for s in template]  # per layer (cap, E, N)
        param = next(encoder.parameters())
        self._repr = torch.zeros(capacity, encoder.d_model, device=param.device, dtype=param.dtype)
        self._count = torch.zeros(capacity, dtype=torch.long, device=param.device)

    @classmethod
    def from_model(cls, model: SequentialRecommender, **kwargs: Any) -> UserStateStore:
        """A store serving a (possibly sharded) ``SequentialRecommender`` with a Mamba encoder.

        The event input is the tower's (item + category embedding, times ``input_scale``: see
        :func:`~torchrec_mamba.serving.tables.event_input`); ids are the model's dense ids.

        Args:
            model (SequentialRecommender): the model (side features are not supported yet).
            **kwargs: ``capacity``, ``chunk_size``.

        Returns:
            UserStateStore: events must carry ``category_ids`` when the model has categories.
        """
        if not isinstance(model.encoder, MambaSequenceEncoder):
            raise TypeError(
                f"streaming needs a MambaSequenceEncoder, the model has {type(model.encoder).__name__}"
            )
        return cls(model.encoder, item_source(model), event_input(model), **kwargs)

    @classmethod
    def from_recommender(cls, recommender: Recommender, **kwargs: Any) -> UserStateStore:
        """A store serving a loaded run, in the run's raw ids (in and out) like its Recommender.

        Item ids given to :meth:`update` / :meth:`ingest` and returned by :meth:`recommend` are
        the ids the run was trained with; a category run derives each event's category from the
        run's ``item_categories.json``.

        Example::

            >>> import tempfile
            >>> from torchrec_mamba.serving import Recommender
            >>> from torchrec_mamba.train.config import DataInfo, RunConfig, build_model
            >>> cfg = RunConfig(d_model=8, d_state=4, num_layers=1, backend="reference",
            ...                 loss_normalization="batch")
            >>> rec = Recommender(build_model(cfg, DataInfo(num_items=9)), max_len=50)
            >>> store = UserStateStore.from_recommender(rec)
            >>> store.update([1, 2], [4, 7])
            >>> ids, _ = store.recommend([1, 2], k=3)
            >>> torch.equal(ids, rec.recommend([[4], [7]], k=3)[0])
            True
        """
        model = recommender.model
        if not isinstance(model.encoder, MambaSequenceEncoder):
            raise TypeError(
                f"streaming needs a MambaSequenceEncoder, the run has {type(model.encoder).__name__}"
            )
        store = cls(model.encoder, recommender.item_source,
                    event_input(model, recommender.item_categories), **kwargs)
        store.ids = recommender.items
        return store

    # --- bookkeeping ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, user_id: int) -> bool:
        return int(user_id) in self._slot

    @property
    def user_ids(self) -> list[int]:
        """Users held, in slot order."""
        return list(self._slot)

    def _grow(self, needed: int) -> None:
        cap = self._repr.shape[0]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)

        def grown(t: Tensor) -> Tensor:
            out = t.new_zeros((new_cap, *t.shape[1:]))
            out[:cap] = t
            return out

        self._conv = [grown(t) for t in self._conv]
        self._ssm = [grown(t) for t in self._ssm]
        self._repr, self._count = grown(self._repr), grown(self._count)

    def _slot_list(self, user_ids: list[int], create: bool) -> list[int]:
        """Slot of each user; new users get fresh (empty-history) rows when ``create``."""
        slots = []
        for uid in user_ids:
            slot = self._slot.get(uid)
            if slot is None:
                if not create:
                    raise ValueError(f"unknown user id {uid}: no event was added for it")
                slot = self._slot[uid] = len(self._slot)
            slots.append(slot)
        self._grow(len(self._slot))
        return slots

    def _slots(self, user_ids: Tensor, create: bool) -> Tensor:
        """(B,) slots as a tensor (see :meth:`_slot_list`)."""
        slots = self._slot_list(user_ids.tolist(), create)
        return torch.tensor(slots, dtype=torch.long, device=self._repr.device)

    # --- streaming -----------------------------------------------------------------------------
    @torch.inference_mode()
    def update(
        self,
        user_ids: Sequence[int] | Tensor,
        item_ids: Sequence[int] | Tensor,
        category_ids: Sequence[int] | Tensor | None = None,
    ) -> None:
        """Fold one new event into each listed user's state (one batched ``encoder.step``).

        Args:
            user_ids (Sequence[int] | Tensor): (B,) distinct user ids (any int64; new users start
                from an empty history).
            item_ids (Sequence[int] | Tensor): (B,) the event's item id per user, in ``1..I``.
            category_ids (Sequence[int] | Tensor | None): (B,) category per event, for models
                with a category table. Default: None.
        """
        # Checks run on Python lists: for the few users of a serving call, a handful of tensor
        # ops here would cost more than the step itself.
        if self.ids is not None:
            item_ids = self.ids.encode([_ids(item_ids, "item_ids").tolist()])[0]
        users, items = _ids(user_ids, "user_ids").tolist(), _ids(item_ids, "item_ids")
        if len(users) != items.numel():
            raise ValueError(f"user_ids and item_ids differ in length: {len(users)} vs {items.numel()}")
        if not users:
            return
        if len(set(users)) != len(users):
            dup = next(u for u in users if users.count(u) > 1)
            raise ValueError(f"user id {dup} appears twice in one update: one event per user per call")
        if len(users) <= 64:
            item_list = items.tolist()
            lo, hi = min(item_list), max(item_list)
        else:
            lo, hi = int(items.min()), int(items.max())
        if lo < 1 or hi > self.items.num_items:
            raise ValueError(f"item id {lo if lo < 1 else hi} out of range [1, {self.items.num_items}]")
        cats = None if category_ids is None else _ids(category_ids, "category_ids")
        if cats is not None and cats.numel() != len(users):
            raise ValueError(f"category_ids must have {len(users)} entries, got {cats.numel()}")
        device = self._repr.device
        x = self.input_fn(items.to(device), None if cats is None else cats.to(device))  # (B, D)
        slot_list = self._slot_list(users, create=True)  # after every check: nothing half-applied
        first, n = slot_list[0], len(slot_list)
        if slot_list == list(range(first, first + n)):
            rows = slice(first, first + n)  # consecutive slots: step the rows in place, no copies
            state = [MambaState(c[rows], s[rows]) for c, s in zip(self._conv, self._ssm, strict=True)]
            y, new_state = self.encoder.step(x.to(self._repr.dtype), state)  # (B, D)
            for old, new in zip(state, new_state, strict=True):
                for dst, src in zip(old, new, strict=True):
                    if src.data_ptr() != dst.data_ptr():  # a step that returned fresh tensors
                        dst.copy_(src)
            self._repr[rows] = y
            self._count[rows] += 1
            return
        slots = torch.tensor(slot_list, dtype=torch.long, device=device)  # (B,)
        state = self._gather(slots)  # per layer (B, E, W), (B, E, N): copies, stepped in place
        y, state = self.encoder.step(x.to(self._repr.dtype), state)  # (B, D)
        for full, layer_state in zip(zip(self._conv, self._ssm, strict=True), state, strict=True):
            for dst, src in zip(full, layer_state, strict=True):
                # 2-D views: one row copy per user (3-D index_copy_ is ~2x slower)
                dst.view(dst.shape[0], -1).index_copy_(0, slots, src.reshape(n, -1))
        self._repr.index_copy_(0, slots, y)
        self._count.index_add_(0, slots, torch.ones_like(slots))

    def _gather(self, slots: Tensor) -> list[MambaState]:
        """Copies of the rows ``slots`` into reused buffers (a fresh multi-MB tensor per call
        costs page faults: 4x the copy itself)."""
        n = slots.numel()
        bufs = getattr(self, "_bufs", None)
        if bufs is None or bufs[0][0].shape[0] < n:
            bufs = self._bufs = [
                (c.new_empty((n, *c.shape[1:])), s.new_empty((n, *s.shape[1:])))
                for c, s in zip(self._conv, self._ssm, strict=True)
            ]
        state = []
        for (conv_buf, ssm_buf), c, s in zip(bufs, self._conv, self._ssm, strict=True):
            conv, ssm = conv_buf[:n], ssm_buf[:n]
            torch.index_select(c.view(c.shape[0], -1), 0, slots, out=conv.view(n, -1))
            torch.index_select(s.view(s.shape[0], -1), 0, slots, out=ssm.view(n, -1))
            state.append(MambaState(conv, ssm))
        return state

    @torch.inference_mode()
    def ingest(
        self,
        user_ids: Sequence[int] | Tensor,
        histories: Sequence[Sequence[int]],
        category_histories: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Set users' states from whole histories in one batched forward pass (a warm start).

        Replaces whatever the users had; afterwards :meth:`update` continues exactly as if the
        histories had been streamed event by event.

        Args:
            user_ids (Sequence[int] | Tensor): (B,) distinct user ids.
            histories (Sequence[Sequence[int]]): B item-id lists, oldest first (may be empty).
            category_histories (Sequence[Sequence[int]] | None): the matching category ids, for
                models with a category table. Default: None.
        """
        users = _ids(user_ids, "user_ids").tolist()
        if len(histories) != len(users) or len(set(users)) != len(users):
            raise ValueError(
                f"ingest needs distinct user ids and one history each, got {len(users)} users "
                f"({len(set(users))} distinct) and {len(histories)} histories"
            )
        if not users:
            return
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)  # (B,)
        if self.ids is not None:
            histories = self.ids.encode(histories)
        flat = torch.tensor([i for h in histories for i in h], dtype=torch.long)  # (T,)
        if flat.numel() and (int(flat.min()) < 1 or int(flat.max()) > self.items.num_items):
            bad = int(flat.min()) if int(flat.min()) < 1 else int(flat.max())
            raise ValueError(f"item id {bad} out of range [1, {self.items.num_items}]")
        cats = None
        if category_histories is not None:
            cats = torch.tensor([c for h in category_histories for c in h], dtype=torch.long)
            if cats.shape != flat.shape:
                raise ValueError("category_histories must match histories id for id")
        device, n = self._repr.device, len(users)
        x = self.input_fn(flat.to(device), None if cats is None else cats.to(device))  # (T, D)
        width = max(int(lengths.max()), 1)
        padded = x.new_zeros(n, width, x.shape[-1])  # (B, L, D)
        padded[torch.arange(width)[None, :] < lengths[:, None]] = x.to(padded.dtype)
        out, states = self.encoder(padded, lengths.to(device), return_state=True)  # (B, L, D)
        last = out[torch.arange(n), (lengths - 1).clamp(min=0)] * (lengths > 0)[:, None]  # (B, D)
        slots = torch.tensor(self._slot_list(users, create=True), dtype=torch.long, device=device)
        for full, layer_state in zip(zip(self._conv, self._ssm, strict=True), states, strict=True):
            for dst, src in zip(full, layer_state, strict=True):
                dst.view(dst.shape[0], -1).index_copy_(0, slots, src.to(dst.dtype).reshape(n, -1))
        self._repr.index_copy_(0, slots, last.to(self._repr.dtype))
        self._count.index_copy_(0, slots, lengths.to(device))

    def forget(self, user_ids: Sequence[int] | Tensor) -> None:
        """Reset users to an empty history (their rows are zeroed and kept)."""
        slots = self._slots(_ids(user_ids, "user_ids"), create=False)
        for t in (*self._conv, *self._ssm, self._repr, self._count):
            t.index_fill_(0, slots, 0)

    def num_events(self, user_ids: Sequence[int] | Tensor) -> Tensor:
        """(B,) events folded into each user's state."""
        return self._count[self._slots(_ids(user_ids, "user_ids"), create=False)].clone()

    def user_vectors(self, user_ids: Sequence[int] | Tensor) -> Tensor:
        """(B, D) current user representations (the encoder output after the latest event)."""
        return self._repr[self._slots(_ids(user_ids, "user_ids"), create=False)].clone()

    def state(self, user_id: int) -> list[tuple[Tensor, Tensor]]:
        """Copies of one user's per-layer ``(conv_state (E, W), ssm_state (E, N))``."""
        slot = int(self._slots(_ids([user_id], "user_ids"), create=False)[0])
        return [(c[slot].clone(), s[slot].clone()) for c, s in zip(self._conv, self._ssm, strict=True)]

    @torch.inference_mode()
    def recommend(
        self, user_ids: Sequence[int] | Tensor, k: int = 10, exclude: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Top-K items for each user from its current state (chunked: never (B, all items)).

        Args:
            user_ids (Sequence[int] | Tensor): (B,) known users.
            k (int): items per user. Default: 10.
            exclude (Tensor | None): (B, L) item ids not to recommend (0 = padding; raw ids
                in a :meth:`from_recommender` store, rows of equal length). Default: None.

        Returns:
            tuple[Tensor, Tensor]: item ids (B, K) int64 and scores (B, K), best first.
        """
        if exclude is not None and self.ids is not None:
            exclude = torch.tensor(self.ids.encode(exclude.tolist()), dtype=torch.long)
        out = chunked_topk(self.user_vectors(user_ids), self.items, k, exclude=exclude,
                           chunk_size=self.chunk_size)
        return (out.ids if self.ids is None else self.ids.decode(out.ids)), out.scores
