import pytest
import torch

from fastai_freeze.demo.cli import main
from fastai_freeze.demo.comparison import SCENARIOS, EmbeddedTask, compare, format_table, run_job
from fastai_freeze.strategies import STRATEGIES, run_named_strategy


class SmallTask(EmbeddedTask):
    "An embedded scenario cut to 64 training images (fast)."

    def data(self):
        xt, yt, xv, yv = super().data()
        return xt[:64], yt[:64], xv[:64], yv[:64]


def test_every_strategy_runs_returns_its_record_and_scratch_starts_from_new_weights():
    task = SmallTask("patterns-200")
    for name in STRATEGIES:
        acc, secs, rec = run_job(task, name, 32, 0, 1)
        assert rec.phases and secs > 0
        assert rec.final_metrics()["accuracy"] == pytest.approx(acc)
    learn = task.learner(32, 0)
    before = learn.model[0][0].weight.detach().clone()
    run_named_strategy(learn, "scratch", 1, 0)
    fresh = task.learner(32, 0).model[0][0].weight
    assert not torch.allclose(before, learn.model[0][0].weight) and torch.equal(before, fresh)


def test_compare_pairs_seeds_and_runs_in_worker_processes():
    task = SmallTask("patterns-200")
    once = compare([task], ["features", "bn_frozen"], batch_sizes={task.name: [32]}, seeds=2, epochs=1, workers=2,
                   progress=False)
    again = compare([task], ["features", "bn_frozen"], batch_sizes={task.name: [32]}, seeds=2, epochs=1, workers=2,
                    progress=False)
    assert [r["accs"] for r in once] == [r["accs"] for r in again]  # deterministic per seed
    assert [r["strategy"] for r in once] == ["features", "bn_frozen"] and all(len(r["accs"]) == 2 for r in once)


def test_format_table_marks_the_best():
    rows = [dict(scenario="s", bs=4, strategy="a", acc=0.5, sd=0.1, secs=1.0),
            dict(scenario="s", bs=4, strategy="b", acc=0.7, sd=0.0, secs=2.0)]
    t = format_table(rows)
    assert "**0.700 ± 0.000**" in t and t.strip().endswith("| b |")


def test_scenarios_are_on_both_networks_and_deterministic():
    assert {s.network for s in SCENARIOS.values()} == {"real", "pattern"}
    a, b = SCENARIOS["fashion-400"].make(), SCENARIOS["fashion-400"].make()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (400, 3, 32, 32) and len(a[2]) == 500


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--seeds", "0"])
    with pytest.raises(ValueError, match="unknown strategy"):
        run_named_strategy(None, "nope")
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "f")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
