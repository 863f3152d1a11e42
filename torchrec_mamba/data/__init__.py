"""Sequence data: readers for public formats, leave-one-out splits, and `SequenceBatch` loaders.

Typical use::

    data = load_sequences("sasrec:../shared/data/amazon-beauty/Beauty.txt")
    split = leave_one_out(data, max_len=50)
    train = SequenceLoader(split.train, batch_size=256, shuffle=True, seed=0)
"""

from torchrec_mamba.data.batch import SequenceBatch, jagged_to_padded
from torchrec_mamba.data.loader import Loader, SequenceLoader
from torchrec_mamba.data.parquet import ParquetSequenceLoader, read_vocab_sizes
from torchrec_mamba.data.readers import (
    READERS,
    SequenceData,
    load_sequences,
    read_csv,
    read_movielens,
    read_sasrec,
)
from torchrec_mamba.data.split import SplitData, SplitPart, leave_one_out, windows_from_sequences

__all__ = [
    "READERS",
    "Loader",
    "ParquetSequenceLoader",
    "SequenceBatch",
    "SequenceData",
    "SequenceLoader",
    "SplitData",
    "SplitPart",
    "jagged_to_padded",
    "leave_one_out",
    "load_sequences",
    "read_csv",
    "read_movielens",
    "read_sasrec",
    "read_vocab_sizes",
    "windows_from_sequences",
]
