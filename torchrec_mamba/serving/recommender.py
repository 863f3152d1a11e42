"""`Recommender`: load a finished ``torchrec-mamba train`` run and recommend top-K items.

Shape letters: B users, L history length (at most the run's ``max_len``), D width, K items.

``Recommender.load(run_dir)`` needs only what ``train`` wrote (``run_config.json``,
``data_info.json``, ``model.pt``), never the training data; ``model.pt`` is read with
``torch.load(weights_only=True)``. Histories and results are in the ids the user trained with
(see :mod:`.vocab`). Scoring goes through :func:`~torchrec_mamba.serving.topk.chunked_topk`, so
memory is ``O(B * chunk_size)`` whatever the catalogue size, and scores are float32 whatever
dtype the training softmax used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.serving.tables import item_source
from torchrec_mamba.serving.topk import ItemSource, chunked_topk
from torchrec_mamba.serving.vocab import (
    ITEM_CATEGORIES,
    IdVocab,
    read_item_categories,
    read_vocab_csv,
)
from torchrec_mamba.train.config import MODEL_FILE

if TYPE_CHECKING:
    from torchrec_mamba.models.recommender import SequentialRecommender
    from torchrec_mamba.train.config import DataInfo, RunConfig

__all__ = ["MODEL_FILE", "Recommender"]

logger = logging.getLogger(__name__)


def _read_run(run_dir: Path) -> tuple[RunConfig, DataInfo, dict[str, Tensor]]:
    """The run's config, data facts and weights; a missing or corrupt file names itself."""
    from torchrec_mamba.train.config import DATA_INFO, RUN_CONFIG, DataInfo, RunConfig

    if not run_dir.is_dir():
        raise ValueError(f"run dir {run_dir} does not exist (written by `torchrec-mamba train`)")
    for name in (RUN_CONFIG, DATA_INFO, MODEL_FILE):
        if not (run_dir / name).is_file():
            raise ValueError(f"{run_dir / name} is missing: not a finished `torchrec-mamba train` "
                             "run dir (sharded runs keep their weights in checkpoints only)")
    try:
        config = RunConfig.load(run_dir / RUN_CONFIG)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{run_dir / RUN_CONFIG} is corrupt: {err}") from err
    try:
        info = DataInfo.load(run_dir)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{run_dir / DATA_INFO} is corrupt: {err}") from err
    try:
        state = torch.load(run_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises many kinds; all mean "corrupt"
        raise ValueError(f"{run_dir / MODEL_FILE} is corrupt or not a weights-only state_dict: "
                         f"{type(err).__name__}: {str(err)[:200]}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{run_dir / MODEL_FILE} holds a {type(state).__name__}, not a state_dict")
    return config, info, state


class Recommender:
    """A trained model with its id mapping: ``recommend(histories, k)`` in the user's own ids.

    Args:
        model (SequentialRecommender): the trained model (unsharded); switched to eval mode.
        max_len (int): the run's longest input; longer histories keep their last ``max_len``.
        items (IdVocab | None): raw <-> dense item ids. Default: None (identity, ``1..I``).
        categories (IdVocab | None): raw <-> dense category ids. Default: None (identity).
        item_categories (Tensor | None): (I + 1,) dense category of each dense item, the
            category input of a model with a category table. Default: None.
        chunk_size (int): items scored at a time. Default: 65536.
        batch_size (int): histories encoded at a time. Default: 1024.

    Example::

        >>> from torchrec_mamba.train.config import DataInfo, RunConfig, build_model
        >>> cfg = RunConfig(d_model=8, d_state=4, num_layers=1, backend="reference",
        ...                 loss_normalization="batch")
        >>> rec = Recommender(build_model(cfg, DataInfo(num_items=30)), max_len=cfg.max_len)
        >>> ids, scores = rec.recommend([[3, 4, 5], [7]], k=4, exclude_seen=True)
        >>> ids.shape, scores.dtype, bool(set(ids[0].tolist()) & {3, 4, 5})
        (torch.Size([2, 4]), torch.float32, False)
    """

    def __init__(
        self,
        model: SequentialRecommender,
        max_len: int,
        items: IdVocab | None = None,
        categories: IdVocab | None = None,
        item_categories: Tensor | None = None,
        *,
        chunk_size: int = 65536,
        batch_size: int = 1024,
    ) -> None:
        tables = model.tables
        self.model = model.eval()
        self.max_len = int(max_len)
        self.items = items or IdVocab.from_raw_ids(None, tables.num_items)
        if self.items.num_ids != tables.num_items:
            raise ValueError(f"the item vocabulary has {self.items.num_ids} ids, the model "
                             f"{tables.num_items}")
        self.categories = categories or IdVocab.from_raw_ids(None, tables.num_categories,
                                                             "category")
        self.item_categories = item_categories
        self.chunk_size = chunk_size
        self.batch_size = batch_size
        self.item_source: ItemSource = item_source(model)
        # NVTabular's null / OOV rows have no raw id: never recommend them
        self._unrankable = torch.tensor(self.items.unrankable(), dtype=torch.long)

    @classmethod
    def load(
        cls, run_dir: str | Path, device: torch.device | str | None = None, **kwargs: Any
    ) -> Recommender:
        """Rebuild a finished run's best model from its run dir (no training data needed).

        Args:
            run_dir (str | Path): ``torchrec-mamba train --output`` (or the example's model dir).
            device (torch.device | str | None): where the model goes. Default: None (CPU).
            **kwargs: ``chunk_size``, ``batch_size``.

        Returns:
            Recommender: in eval mode.

        Raises:
            ValueError: a missing or corrupt ``run_config.json``, ``data_info.json``,
                ``model.pt`` or vocabulary, named in the message.
        """
        from torchrec_mamba.train.config import build_model

        run = Path(run_dir)
        config, info, state = _read_run(run)
        # the loss normalisation does not matter for inference; build_model insists on a value
        per_row = 1.0 if config.loss_normalization == "global" else None
        with torch.random.fork_rng(devices=[]):  # the throwaway init leaves the caller's RNG be
            model = build_model(config, info, device, targets_per_row=per_row)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{run / MODEL_FILE} does not fit {run / 'run_config.json'}: "
                             f"{str(err)[:300]}") from err
        items, categories, item_categories = cls._vocabularies(run, info)
        logger.info("loaded %s: %s, %d items", run, config.model, info.num_items)
        return cls(model, config.max_len, items, categories, item_categories, **kwargs)

    @staticmethod
    def _vocabularies(
        run: Path, info: DataInfo
    ) -> tuple[IdVocab, IdVocab | None, Tensor | None]:
        vocab_dir = run / "vocabs"
        if (vocab_dir / "item.csv").is_file():  # an NVTabular run
            items = read_vocab_csv(vocab_dir / "item.csv", info.num_items, "item")
        else:
            items = IdVocab.from_raw_ids(info.raw_item_ids, info.num_items)
        categories = None
        if info.num_categories and (vocab_dir / "category.csv").is_file():
            categories = read_vocab_csv(vocab_dir / "category.csv", info.num_categories,
                                        "category")
        item_categories = None
        if info.num_categories and (run / ITEM_CATEGORIES).is_file():
            item_categories = read_item_categories(run / ITEM_CATEGORIES, info.num_items,
                                                   info.num_categories)
        return items, categories, item_categories

    # --- encoding --------------------------------------------------------------------------------
    def encode(self, histories: Sequence[Sequence[int]]) -> list[list[int]]:
        """Raw histories -> dense ids, the last ``max_len`` kept; empty or unknown -> ValueError."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise TypeError(f"histories must be a list of item-id lists, got "
                            f"{type(histories).__name__}")
        dense = self.items.encode(histories)
        for row, h in enumerate(dense):
            if not h:
                raise ValueError(f"history {row} is empty: a user needs at least one item")
        return [h[-self.max_len:] for h in dense]

    def _batch(self, dense: list[list[int]]) -> SequenceBatch:
        values = torch.tensor([i for h in dense for i in h], dtype=torch.long)  # (T,)
        lengths = torch.tensor([len(h) for h in dense], dtype=torch.int32)  # (B,)
        keys, parts = ["item"], [values]
        if self.model.tables.num_categories:
            if self.item_categories is None:
                raise ValueError("this run has a category table but no item_categories.json: "
                                 "its category input cannot be derived from item ids")
            keys.append("category")
            parts.append(self.item_categories[values].clamp(min=1))  # 0: never categorised
        kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(parts),
                                lengths=lengths.repeat(len(keys)))
        # labels only satisfy the batch contract (the inputs themselves: valid ids, unused)
        return SequenceBatch(features=kjt, labels=kjt).to(self.device)

    @property
    def device(self) -> torch.device:
        """Where the model's dense parameters live."""
        return next(self.model.tower.parameters()).device

    @torch.inference_mode()
    def user_vectors(self, histories: Sequence[Sequence[int]]) -> Tensor:
        """(B, D) float32 user representations of raw histories (see :meth:`recommend`)."""
        dense = self.encode(histories)
        out = [self.model.user_representation(self._batch(dense[i:i + self.batch_size]))
               for i in range(0, len(dense), self.batch_size)]
        return torch.cat(out).float() if out else torch.zeros(0, self.model.tables.embedding_dim)

    # --- recommending ----------------------------------------------------------------------------
    @torch.inference_mode()
    def recommend(
        self, histories: Sequence[Sequence[int]], k: int = 10, exclude_seen: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Top-K items for each history, best first, in the ids the run was trained with.

        Args:
            histories (Sequence[Sequence[int]]): B item-id lists, oldest first, each non-empty;
                longer than ``max_len`` keeps the last ``max_len``.
            k (int): items per user, ``1 <= k <= I``. Default: 10.
            exclude_seen (bool): never recommend an item of the user's history. Default: False.

        Returns:
            tuple[Tensor, Tensor]: item ids (B, K) int64 and float32 scores (B, K), best first;
            where fewer than K items are rankable the tail holds id -1 and score ``-inf``.
        """
        self._check_k(k, self.items.num_ids, "items")
        dense = self.encode(histories)
        ids, scores = [], []
        for start in range(0, len(dense), self.batch_size):
            part = dense[start:start + self.batch_size]
            user = self.model.user_representation(self._batch(part)).float()  # (b, D)
            out = chunked_topk(user, self.item_source, k, exclude=self._exclude(part, exclude_seen),
                               chunk_size=self.chunk_size)
            ids.append(self.items.decode(out.ids))
            scores.append(out.scores.cpu())
        if not ids:
            return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
        return torch.cat(ids), torch.cat(scores)

    def _exclude(self, dense: list[list[int]], seen: bool) -> Tensor | None:
        """(b, L') ids no user may get: the history (``seen``) and the unrankable rows."""
        rows = [(h if seen else []) + self._unrankable.tolist() for h in dense]
        width = max(len(r) for r in rows)
        if width == 0:
            return None
        out = torch.zeros(len(rows), width, dtype=torch.long)  # 0 = padding, ignored
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(self.device)

    @torch.inference_mode()
    def recommend_categories(
        self, histories: Sequence[Sequence[int]], k: int = 10
    ) -> tuple[Tensor, Tensor]:
        """Top-K next categories from the category head (runs with a category table only).

        Args:
            histories (Sequence[Sequence[int]]): B item-id lists, as in :meth:`recommend`.
            k (int): categories per user, ``1 <= k <= C`` (less NVTabular's null / OOV rows,
                which are never recommended). Default: 10.

        Returns:
            tuple[Tensor, Tensor]: category ids (B, K) int64 (raw when the run saved a category
            vocabulary) and float32 scores (B, K), best first.
        """
        from torchrec_mamba.models.tables import CATEGORY

        if self.model.tables.num_categories == 0:
            raise ValueError("recommend_categories needs a run with a category table; this run "
                             "was trained without categories (num_categories=0)")
        # NVTabular's null / OOV category rows have no raw id: never recommended.
        unrankable = self.categories.unrankable()
        self._check_k(k, self.model.tables.num_categories - len(unrankable), "rankable categories")
        table = self.model.table_embeddings(CATEGORY).float()  # (C, D): categories are few
        table = torch.cat([table.new_zeros(1, table.shape[1]), table])  # row 0 padding
        users = self.user_vectors(histories).to(table.device)  # (B, D)
        exclude = None
        if unrankable:
            exclude = torch.tensor(unrankable, device=table.device).expand(users.shape[0], -1)
        out = chunked_topk(users, table, k, exclude=exclude, chunk_size=self.chunk_size)
        return self.categories.decode(out.ids), out.scores.cpu()

    @staticmethod
    def _check_k(k: int, available: int, what: str) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
            raise ValueError(f"k must be an int in [1, {available}] (the run's {what}), got {k!r}")

    def __repr__(self) -> str:
        t = self.model.tables
        return (f"Recommender(items={t.num_items}, categories={t.num_categories}, "
                f"max_len={self.max_len}, encoder={type(self.model.encoder).__name__})")
