"""Parquet shard discovery and the Merlin schema's vocabulary sizes (used by the parquet loader).

:func:`shard_files` lists a split folder's ``part_{i}.parquet`` files in numeric order;
:func:`read_vocab_sizes` gives the embedding-table sizes (ids 0 padding, 1 null, 2 OOV included)
from the ``.merlin/schema.json`` NVTabular writes next to the shards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["read_vocab_sizes", "shard_files"]


def shard_files(path_or_files: str | Path | Sequence[str | Path]) -> list[Path]:
    """The parquet shards of a split folder (``part_{i}.parquet`` in numeric order) or a file list.

    Args:
        path_or_files (str | Path | Sequence[str | Path]): a split folder, one file, or files.

    Returns:
        list[Path]: the files, in order.
    """
    if isinstance(path_or_files, (str, Path)):
        p = Path(path_or_files)
        if p.is_dir():
            files = sorted(p.glob("part_*.parquet"), key=lambda f: int(f.stem.rsplit("_", 1)[1]))
            if not files:
                files = sorted(p.glob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"no parquet shards in {p}")
            return files
        paths = [p]
    else:
        paths = [Path(f) for f in path_or_files]
    if not paths:
        raise ValueError("no parquet files given")
    missing = [str(f) for f in paths if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"parquet shard(s) not found: {missing}")
    return paths


def read_vocab_sizes(path: str | Path) -> dict[str, int]:
    """Embedding rows per categorical column (largest id + 1, so 0/1/2 are included).

    Args:
        path (str | Path): a split folder (with ``.merlin/schema.json``), or the ETL output folder
            (its ``train`` split is read), or a ``schema.json`` file.

    Returns:
        dict[str, int]: e.g. ``{"item": 9230, "category": 276, "top_category": 8, "event": 6}``.
    """
    p = Path(path)
    candidates = (
        [p]
        if p.is_file()
        else [p / ".merlin" / "schema.json", p / "train" / ".merlin" / "schema.json"]
    )
    for c in candidates:
        if c.is_file():
            schema = json.loads(c.read_text())
            sizes = {}
            for feat in schema.get("feature", []):
                dom = feat.get("intDomain") or {}
                if dom.get("isCategorical") and "max" in dom:
                    name = feat["name"].removesuffix("_list")
                    sizes[name] = int(dom["max"]) + 1
            if not sizes:
                raise ValueError(f"{c}: no categorical int domains in the schema")
            return sizes
    raise FileNotFoundError(f"no Merlin schema (.merlin/schema.json) under {p}")


def _num_rows(f: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(f).metadata.num_rows)
