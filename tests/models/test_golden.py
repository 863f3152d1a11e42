"""Training numerics are unchanged by the split into tables / encoder / tasks.

The losses of three seeded Adam steps and the evaluation scores of every scenario in
``golden_scenarios.py`` must equal those recorded with the pre-refactor ``Mamba4Rec``
(``golden_losses.json``), through the old constructor and through the new factories.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from tests.models import golden_scenarios as g
from torchrec_mamba.models import SampledSoftmaxConfig, SideFeature, mamba4rec, sasrec

GOLD = json.loads(g.GOLDEN.read_text())


def _close(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("name", sorted(g.SCENARIOS))
def test_legacy_constructor_reproduces_recorded_losses(name: str) -> None:
    _close(g.run(g.SCENARIOS[name]), GOLD[name])


def _factory_model(spec: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs: dict[str, Any] = dict(
        num_categories=g.CATS if spec.get("categories") else 0,
        category_loss_weight=spec.get("category_loss_weight", 0.0),
        loss_positions=spec.get("loss_positions", "all"),
        side_features=(SideFeature("user", g.USERS),) if spec.get("side") else (),
        dropout=0.1,
    )
    if spec.get("sampled"):
        kwargs["sampled_softmax"] = SampledSoftmaxConfig(num_negatives=spec["sampled"])
        kwargs["item_counts"] = torch.arange(g.ITEMS + 1, dtype=torch.float32)
    if spec["encoder"] == "mamba":
        return mamba4rec(g.ITEMS, g.D, d_state=4, backend="reference", **kwargs)
    return sasrec(g.ITEMS, g.D, max_len=8, **kwargs)


@pytest.mark.parametrize(
    "name", [n for n, s in sorted(g.SCENARIOS.items()) if "item_loss_weight" not in s]
)
def test_factories_build_the_same_model(name: str) -> None:
    spec = g.SCENARIOS[name]
    model = _factory_model(spec)
    legacy = g.build_legacy(spec)
    assert model.state_dict().keys() == legacy.state_dict().keys()
    for key, value in legacy.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    _close(g.run(spec, model), GOLD[name])
