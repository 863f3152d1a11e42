"""Shared fixtures of the RetailRocket ETL tests: tiny raw folders and one ETL run per config."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rr_common import (  # noqa: E402
    EVENTS_HEADER,
    HANDMADE_EVENTS,
    HANDMADE_PROPS_1,
    HANDMADE_PROPS_2,
    HANDMADE_TREE,
    LOO_SPLIT,
    PROPS_HEADER,
    TIME_SPLIT,
    TREE_HEADER,
)
from torchrec_mamba_preprocessing.synthetic import SyntheticConfig, write_retailrocket  # noqa: E402


@pytest.fixture(scope="session")
def write_raw() -> Callable[..., Path]:
    """Write a raw RetailRocket folder from lists of csv lines (headers added)."""

    def write(
        folder: Path,
        events: list[str] | None = None,
        props1: list[str] | None = None,
        props2: list[str] | None = None,
        tree: list[str] | None = None,
        *,
        events_header: str = EVENTS_HEADER,
        props_header: str = PROPS_HEADER,
        tree_header: str = TREE_HEADER,
    ) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "events.csv": (events_header, HANDMADE_EVENTS if events is None else events),
            "item_properties_part1.csv": (
                props_header,
                HANDMADE_PROPS_1 if props1 is None else props1,
            ),
            "item_properties_part2.csv": (
                props_header,
                HANDMADE_PROPS_2 if props2 is None else props2,
            ),
            "category_tree.csv": (tree_header, HANDMADE_TREE if tree is None else tree),
        }
        for name, (header, lines) in files.items():
            (folder / name).write_text("\n".join([header, *lines]) + "\n")
        return folder

    return write


@pytest.fixture(scope="session")
def synth_cfg() -> SyntheticConfig:
    """A tiny synthetic RetailRocket over 4 weeks (so every split of a 7+7-day split has rows)."""
    return SyntheticConfig(num_events=6_000, num_days=28, uncategorised_fraction=0.1, seed=5)


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory: pytest.TempPathFactory, synth_cfg: SyntheticConfig) -> Path:
    out = tmp_path_factory.mktemp("rr_raw")
    write_retailrocket(out, synth_cfg)
    return out


def _run(raw: Path, out: Path, **kw: object):  # noqa: ANN202
    from torchrec_mamba_preprocessing.retailrocket import ETLConfig, run_etl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_etl(raw, out, ETLConfig(**kw))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def etl_time(tmp_path_factory: pytest.TempPathFactory, synth_raw: Path):  # noqa: ANN201
    """(output folder, report) of a time split by session, 4 shards for world size 2."""
    out = tmp_path_factory.mktemp("rr_etl_time")
    return out, _run(synth_raw, out, **TIME_SPLIT)


@pytest.fixture(scope="session")
def etl_loo(tmp_path_factory: pytest.TempPathFactory, synth_raw: Path):  # noqa: ANN201
    """(output folder, report) of a leave-one-out split by visitor, 3 shards."""
    out = tmp_path_factory.mktemp("rr_etl_loo")
    return out, _run(synth_raw, out, **LOO_SPLIT)
