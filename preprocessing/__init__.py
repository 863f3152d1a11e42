"""NVTabular ETL for RetailRocket-format event logs (installed as ``torchrec_mamba_preprocessing``).

Modules (none imports NVTabular at import time except ``nvt_ops``):

* :mod:`~torchrec_mamba_preprocessing.synthetic`: seeded synthetic RetailRocket raw files;
* :mod:`~torchrec_mamba_preprocessing.raw`: reading and validating the raw files, the category in
  force at event time, category-tree roots;
* :mod:`~torchrec_mamba_preprocessing.sessions`: sessions, time / leave-one-out splits, partitions;
* :mod:`~torchrec_mamba_preprocessing.retailrocket`: the NVTabular workflow and ``run_etl``;
* :mod:`~torchrec_mamba_preprocessing.pandas_reference`: the same ETL in plain pandas (oracle and
  benchmark baseline);
* :mod:`~torchrec_mamba_preprocessing.report`: the counts of what was kept and dropped.

Quick start::

    python -m torchrec_mamba_preprocessing.synthetic --out data/rr_raw
    python -m torchrec_mamba_preprocessing.retailrocket --raw data/rr_raw --out data/rr_etl
"""
