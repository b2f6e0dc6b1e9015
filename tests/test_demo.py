import pytest

from fastai_freeze.demo import SCENARIOS, main, run_strategy


def test_demo_quick_path_prints_the_table_and_writes_plots(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for sc in SCENARIOS:
        assert f"{sc}" in out
    assert "fine_tune_with" in out and "accuracy" in out
    assert (tmp_path / "fine_tune_with_run.png").stat().st_size > 0
    assert (tmp_path / "fine_tune_with_range_tests.png").stat().st_size > 0


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--seeds", "0"])
    with pytest.raises(ValueError, match="unknown strategy"):
        run_strategy("nope", SCENARIOS["patterns-small"][0](), 32, 1, 0)
