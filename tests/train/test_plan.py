"""The fleet planner: TorchRec's planner on a small CUDA topology, memory counted by hand."""

from __future__ import annotations

import pytest

from torchrec_mamba.train.plan import main, plan_fleet


def _rows(total: int, ranks: int) -> list[int]:
    """TorchRec's row-wise split: ceil(total / ranks) rows per rank, the rest on the last."""
    block = -(-total // ranks)
    return [block] * (ranks - 1) + [total - block * (ranks - 1)]


@pytest.mark.parametrize(("optimizer", "state"), [("rowwise_adagrad", None), ("adam", 2.0), ("sgd", 0.0)])
def test_row_wise_memory_per_device(optimizer: str, state: float | None) -> None:
    fleet = plan_fleet(10_000, 32, gpus=4, hbm_gb=1, gpus_per_node=2, optimizer=optimizer,
                       sharding_types=["row_wise"])
    rows = _rows(10_001, 4)
    assert [d.weight_bytes for d in fleet.devices] == [r * 32 * 4 for r in rows]
    want = [r * 4 for r in rows] if state is None else [int(r * 32 * 4 * state) for r in rows]
    assert [d.optimizer_bytes for d in fleet.devices] == want
    # the planner's own estimate counts the same optimizer state (plus small I/O buffers)
    for d in fleet.devices:
        assert d.total_bytes <= d.planner_hbm_bytes <= d.total_bytes * 1.05 + 2**20
    assert "row_wise" in fleet.sharding["item"]


def test_category_table_and_text() -> None:
    fleet = plan_fleet(5_000, 16, gpus=2, hbm_gb=1, num_categories=50, gpus_per_node=2)
    assert set(fleet.tables) == {"item", "category"}
    assert fleet.tables["category"] == (51, 16)
    total = sum(d.weight_bytes for d in fleet.devices)
    assert total == (5_001 + 51) * 16 * 4  # every row placed exactly once
    text = fleet.text()
    assert "item 5,001 x 16" in text and "busiest device" in text


def test_too_small_fleet_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no sharding plan fits 2 GPUs x 0.001 GiB"):
        plan_fleet(10_000_000, 64, gpus=2, hbm_gb=0.001, compute_kernels=["fused"])


def test_short_hbm_moves_rows_to_host_memory() -> None:
    """Without a kernel constraint the planner may keep rows in host DDR (UVM)."""
    fleet = plan_fleet(10_000_000, 64, gpus=2, hbm_gb=0.5)
    assert "fused_uvm" in fleet.sharding["item"]
    for d in fleet.devices:
        assert d.planner_hbm_bytes < 0.5 * 2**30 < d.total_bytes <= d.planner_ddr_bytes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_items": 0}, "num_items must be an int >= 1, got 0"),
        ({"gpus": 0}, "gpus must be an int >= 1"),
        ({"hbm_gb": 0}, "hbm_gb must be > 0"),
        ({"optimizer": "lion"}, "optimizer must be one of"),
        ({"sharding_types": ["data_parallel"]}, "sharding type 'data_parallel' is not one of"),
        ({"reserve": 1.0}, r"reserve must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"num_items": 100, "dim": 8, "gpus": 2, "hbm_gb": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        plan_fleet(**args)


def test_cli_prints_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--items", "1000", "--dim", "8", "--gpus", "2", "--hbm-gb", "1"]) == 0
    out = capsys.readouterr().out
    assert "item 1,001 x 8" in out and "rowwise_adagrad" in out
    assert main(["--items", "10000000", "--gpus", "2", "--hbm-gb", "0.001", "--kernel", "fused"]) == 2
    assert "error: no sharding plan fits" in capsys.readouterr().out
