"""Run the doctests of the ETL package (pytest's --doctest-modules only covers torchrec_mamba/)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "torchrec_mamba_preprocessing.synthetic",
    "torchrec_mamba_preprocessing.raw",
    "torchrec_mamba_preprocessing.report",
    "torchrec_mamba_preprocessing.sessions",
    "torchrec_mamba_preprocessing.retailrocket",
    "torchrec_mamba_preprocessing.nvt_ops",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no doctest"
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
