"""The GPU benchmark (benchmarks/gpu.py) runs end to end: on CPU here with a tiny size (float32); on a
GPU the same command runs at 128 px with `to_fp16()`."""
import json
import math


def test_quick_gpu_benchmark_writes_every_kind_and_its_time_parts(load_benchmark, tmp_path):
    gpu = load_benchmark("gpu")
    out = tmp_path / "gpu"
    gpu.main(["--quick", "--device", "cpu", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["device"] == "cpu" and res["fp16"] is False
    runs = {r["kind"]: r for r in res["runs"]}
    assert set(runs) == set(gpu.KINDS) and len(res["runs"]) == len(gpu.KINDS)
    for r in runs.values():
        assert 0 <= r["acc"] <= 1 and r["seconds"] > 0
        assert all(v >= 0 for v in r["parts"].values())
        assert sum(r["parts"].values()) <= r["seconds"] * 1.05  # the parts are inside the run's time
    assert set(runs["fine_tune"]["parts"]) == {"warm-up", "unfrozen"}
    assert runs["defaults"]["range_test_ran"] and runs["defaults"]["parts"]["range test"] > 0  # 25 batches
    assert not runs["no sweep"]["range_test_ran"] and runs["no sweep"]["parts"].get("range test", 0.0) == 0.0
    assert runs["adapt"]["policy"] == "adapt" and runs["adapt"]["parts"]["applying the policy"] > 0
    assert runs["train"]["policy"] == "train" and runs["freeze_bn=False"]["policy"] in ("fold", "adapt")
    assert len(res["cold"]) == 2 and all(math.isfinite(c["seconds"]) for c in res["cold"])
    text = out.with_suffix(".md").read_text()
    assert "| fashion-200-bs8-quick | 200 | 8 |" in text and "## Cold start" in text
    assert "| fashion-200-bs8-quick | no sweep |" in text
