"""Raw <-> dense id mapping of a trained run: the ids the user trained with, both ways.

A run trained from a text file (``sasrec:`` / ``movielens:`` / ``csv:``) re-indexes the items to
``1..I`` and saves the dense -> raw mapping in ``data_info.json`` (``raw_item_ids``, entry 0 is
padding). An NVTabular run (``examples/retailrocket``) saves ``vocabs/item.csv`` and
``vocabs/category.csv`` (``raw,id,count``; ids 1 and 2 are NVTabular's null and out-of-vocabulary
rows, which have no raw id and are never recommended) and ``item_categories.json`` (the dense
category of each dense item, the model's category input when a history gives only items).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ITEM_CATEGORIES", "IdVocab", "read_vocab_csv"]

#: The dense category of each dense item (``[0, c_1, ..., c_I]``), saved by the example.
ITEM_CATEGORIES = "item_categories.json"


@dataclass(frozen=True)
class IdVocab:
    """Dense ids ``0..K`` of a table and the raw id of each (``None``: padding, null or OOV).

    Args:
        raw_ids (Sequence[int | None]): (K + 1,) raw id of each dense id; entry 0 is padding.
        name (str): ``"item"`` or ``"category"``, used in messages. Default: ``"item"``.

    Example::

        >>> v = IdVocab.from_raw_ids([-1, 30, 10, 20], 3)        # data_info.json's raw_item_ids
        >>> v.encode([[10, 30]]), v.decode(torch.tensor([[3, 0]])).tolist()
        ([[2, 1]], [[20, -1]])
        >>> v.encode([[99]])
        Traceback (most recent call last):
        ...
        ValueError: history 0: unknown item id 99 (not in the trained run's 3 items)
    """

    raw_ids: tuple[int | None, ...]
    name: str = "item"

    @staticmethod
    def from_raw_ids(raw_ids: Sequence[int] | None, num_ids: int, name: str = "item") -> IdVocab:
        """From ``data_info.json``'s list (entry 0 padding); None is the identity ``1..K``."""
        if raw_ids is None:
            return IdVocab((None, *range(1, num_ids + 1)), name)
        if len(raw_ids) != num_ids + 1:
            raise ValueError(f"raw_{name}_ids has {len(raw_ids)} entries, expected {num_ids + 1}")
        return IdVocab((None, *(int(r) for r in raw_ids[1:])), name)

    def __post_init__(self) -> None:
        known = [r for r in self.raw_ids if r is not None]
        if len(set(known)) != len(known):
            raise ValueError(f"the {self.name} vocabulary maps one raw id to two dense ids")

    @property
    def num_ids(self) -> int:
        """K, the largest dense id."""
        return len(self.raw_ids) - 1

    @property
    def _index(self) -> dict[int, int]:
        index = self.__dict__.get("_index_cache")
        if index is None:
            index = {r: i for i, r in enumerate(self.raw_ids) if r is not None}
            object.__setattr__(self, "_index_cache", index)
        return index

    def unrankable(self) -> list[int]:
        """Dense ids ``>= 1`` without a raw id (NVTabular's null / OOV rows)."""
        return [i for i, r in enumerate(self.raw_ids) if r is None and i > 0]

    def encode(self, histories: Sequence[Sequence[int]]) -> list[list[int]]:
        """Raw id lists -> dense id lists; an unknown raw id is a ``ValueError`` naming it."""
        index, out = self._index, []
        for row, history in enumerate(histories):
            if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
                raise TypeError(f"history {row} must be a list of {self.name} ids, "
                                f"got {type(history).__name__}")
            dense = []
            for raw in history:
                if isinstance(raw, bool) or not isinstance(raw, int):
                    raise TypeError(f"history {row}: {self.name} id {raw!r} is not an int")
                i = index.get(int(raw))
                if i is None:
                    raise ValueError(f"history {row}: unknown {self.name} id {raw} (not in the "
                                     f"trained run's {len(index)} {self.name}s)")
                dense.append(i)
            out.append(dense)
        return out

    def decode(self, dense: Tensor) -> Tensor:
        """Dense ids (any shape) -> raw ids (int64); 0 (no item) and ids without a raw id -> -1."""
        table = self.__dict__.get("_decode_cache")
        if table is None:  # built once: an (I + 1) list -> tensor per call cost O(I) per batch
            table = torch.tensor([-1 if r is None else r for r in self.raw_ids], dtype=torch.long)
            object.__setattr__(self, "_decode_cache", table)
        return table[dense.cpu().long()]


def read_vocab_csv(path: Path, num_ids: int, name: str) -> IdVocab:
    """An NVTabular ``vocabs/<col>.csv`` (``raw,id,count``) as an :class:`IdVocab` of K ids."""
    raw_ids: list[int | None] = [None] * (num_ids + 1)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            for line, rec in enumerate(reader, start=2):
                dense = int(rec["id"])
                if not 1 <= dense <= num_ids:
                    raise ValueError(f"{path}:{line}: id {dense} outside the table 1..{num_ids}")
                raw_ids[dense] = int(rec["raw"])
    except (KeyError, TypeError, ValueError, csv.Error) as err:
        raise ValueError(f"{path}: not a raw,id,count vocabulary ({err})") from err
    return IdVocab(tuple(raw_ids), name)


def read_item_categories(path: Path, num_items: int, num_categories: int) -> Tensor:
    """``item_categories.json`` -> (I + 1,) int64 dense category of each dense item."""
    try:
        values = json.loads(path.read_text())
        out = torch.tensor(values, dtype=torch.long)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a JSON list of category ids ({err})") from err
    if out.shape != (num_items + 1,) or (out.numel() and (out.min() < 0 or out.max() > num_categories)):
        raise ValueError(f"{path}: expected {num_items + 1} category ids in [0, {num_categories}]")
    return out
