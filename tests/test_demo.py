import pytest

from fastai_freeze.demo.cli import main
from fastai_freeze.demo.data import tensor_dls
from fastai_freeze.demo import SCENARIOS, STRATEGIES, embedded_learner_factory, format_table, run_strategy


def test_demo_quick_path_prints_the_table_and_writes_plots(tmp_path, capsys):
    assert main(["demo", "--quick", "--strategies", "fine_tune,fine_tune_with,features",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "similar-small" in out and "different-small" in out and "bs=4" in out and "bs=64" in out
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") == 4 + 1  # header + 2 scenarios x 2 batch sizes
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert (tmp_path / "fine_tune_with_similar-small_bs4_run.png").exists()


def test_every_strategy_runs_and_scratch_is_not_pretrained():
    data = SCENARIOS["similar-small"].make()
    make = embedded_learner_factory()
    make_dls = lambda bs, seed: tensor_dls(*(t[:64] for t in data[:2]), *data[2:], bs=bs, seed=seed)  # noqa: E731
    for name in STRATEGIES:
        acc, secs, learn = run_strategy(name, make_dls, make, 32, 1, 0)
        assert 0 <= acc <= 1 and secs > 0
    pre = make(make_dls(32, 0), True).model[0][0].weight
    scratch = make(make_dls(32, 0), False).model[0][0].weight
    assert not pytest.approx(pre.detach().numpy()) == scratch.detach().numpy()


def test_format_table_marks_the_best():
    rows = [dict(scenario="s", bs=4, strategy="a", acc=0.5, sd=0.1, secs=1.0),
            dict(scenario="s", bs=4, strategy="b", acc=0.7, sd=0.0, secs=2.0)]
    t = format_table(rows)
    assert "**0.700 ± 0.000 (2.0s)**" in t and t.strip().endswith("| b |")


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--seeds", "0"])
    with pytest.raises(ValueError, match="unknown strategy"):
        run_strategy("nope", None, None, 32, 1, 0)
