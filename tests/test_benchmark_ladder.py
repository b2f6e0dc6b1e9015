"""The unfreeze-rate ladder benchmark (benchmarks/ladder.py) runs end to end: on CPU here with a tiny
size; the same script takes `--device cuda --size 128 --fp16` on a GPU."""
import json

import pytest


@pytest.fixture(scope="module")
def ladder(load_benchmark):
    return load_benchmark("ladder")


def test_quick_ladder_writes_every_column(ladder, tmp_path):
    out = tmp_path / "ladder"
    ladder.main(["--quick", "--workers", "1", "--out", str(out)])
    runs = json.loads(out.with_suffix(".json").read_text())
    kinds = sorted({(r["kind"], r["rate"]) for r in runs}, key=str)
    assert len(runs) == 2 + len(ladder.GRID) and ("fine_tune", None) in kinds and ("defaults", None) in kinds
    grid_and_defaults = [r for r in runs if r["kind"] != "fine_tune"]
    assert len({round(r["warm_valid_loss"], 5) for r in grid_and_defaults}) == 1  # one warm-up, shared
    assert {r["top"] for r in runs if r["kind"] == "grid"} == set(ladder.GRID)
    defaults = next(r for r in runs if r["kind"] == "defaults")
    assert not defaults["fell_back"] and defaults["curve"]["ratio"]  # 25 batches: the range test ran
    text = out.with_suffix(".md").read_text()
    assert "| fashion-200-quick | 200 | 8 | 25 |" in text and "edge/2 (default)" in text and "Targets:" in text


def test_interpolation_between_grid_rates(ladder):
    grid = {1e-4: 0.5, 1e-3: 0.7, 1e-2: 0.6}
    assert ladder._interp(grid, 1e-3) == pytest.approx(0.7)
    assert ladder._interp(grid, 10 ** -3.5) == pytest.approx(0.6)
    assert ladder._interp(grid, 1e-6) == pytest.approx(0.5) and ladder._interp(grid, 1.0) == pytest.approx(0.6)
