"""The range test: when it runs, what it suggests, and that a sweep inside a user's fit leaves the
user's own callbacks (mixed precision, savers, trackers, loggers) as they were."""
import math
import warnings

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback

import fastai_freeze  # noqa: F401
from fastai_freeze import FineTuneCallback, RangeTest, range_test
from fastai_freeze.probe import edge

SWEEP = RangeTest(num_it=20, max_passes=None)  # runs on the 6-batch test set: the callbacks see a real sweep


# ------------------------------------------------------------------ when it runs ---------------
@pytest.mark.parametrize("n_batches, runs", [(6, False), (19, False), (20, True), (100, True)])
def test_sweep_is_sized_to_one_pass_from_20_batches(n_batches, runs):
    n = RangeTest().iterations(n_batches)
    assert (n is not None) == runs
    if runs:
        assert n == 17  # 4 rates a decade from 1e-4 to 1, within one pass (20 batches at least)


def test_range_test_runs_at_20_batches_per_epoch(make_learner):
    learn = make_learner(bs=4)  # 96 images: 24 batches
    learn.unfreeze()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        rt = range_test(learn, RangeTest(), lr_mult=100)
    assert not rt.fell_back and rt.method == "edge" and rt.curve == "training loss"
    assert 5 <= len(rt.full_lrs) <= 17 and rt.full_lrs[0] == pytest.approx(1e-4)
    assert rt.point is not None and rt.suggestion == pytest.approx(rt.point[0] / 2)


def test_the_sweep_stops_a_decade_past_the_edge():
    "The curve beyond a decade past its edge is not read: the sweep ends there, and the edge is the same."
    from fastai_freeze.probe import _Sweep
    lrs = [1e-4 * 10 ** (k / 4) for k in range(17)]
    ratios = [0.9, 0.8, 0.7, 0.5, 0.3, 0.15, 0.08, 0.04, 0.03, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 5]
    sweep = _Sweep(1e-4, 1.0, 17, True, 1, paired=True, past_edge=10)
    stops = []
    for n in range(1, 18):
        sweep.lrs, sweep.ratio = lrs[:n], ratios[:n]
        stops.append(sweep._past_edge())
    assert stops.index(True) == 12  # the edge is at 1e-2 (step 8): the sweep ends at 1e-1, 4 steps on
    assert edge(lrs[:13], ratios[:13]) == edge(lrs, ratios)
    sweep.ratio = [1.1] * 17  # no step helped: no edge yet, the sweep goes on
    assert not sweep._past_edge()
    with pytest.raises(ValueError, match="past_edge"):
        RangeTest(past_edge=1.0)


def test_the_sweep_stops_once_the_edge_is_at_the_floor():
    "Three steps in a row at the floor: no later point can count lower, so the edge is final and the sweep ends."
    from fastai_freeze.probe import _Sweep
    lrs = [1e-4 * 10 ** (k / 4) for k in range(17)]
    ratios = [0.9, 0.7, 0.4, 0.2, 0.04, 0.03, 0.05, 0.01, 0.02, 0.2, 0.6, 1.0, 1.5, 2, 3, 5, 8]
    stops = {}
    for final in (True, False):
        sweep = _Sweep(1e-4, 1.0, 17, True, 1, paired=True, past_edge=10, final_at_floor=final)
        for n in range(1, 18):
            sweep.lrs, sweep.ratio = lrs[:n], ratios[:n]
            if sweep._past_edge():
                stops[final] = n
                break
    assert stops == {True: 7, False: 10}  # the window 0.04, 0.03, 0.05 is complete at step 7; a decade on is step 10
    assert edge(lrs[:7], ratios[:7]) == edge(lrs[:10], ratios[:10]) == edge(lrs, ratios)


def test_a_range_test_gives_the_data_order_back(make_learner):
    "After a sweep the next pass over the data draws the order it would have drawn: two sweeps are one."
    learn = make_learner(bs=4)
    learn.unfreeze()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = range_test(learn, RangeTest(past_edge=None), lr_mult=100)
        b = range_test(learn, RangeTest(past_edge=None), lr_mult=100)
    assert a.full_losses == b.full_losses and a.losses == b.losses


def test_record_and_warning_give_the_same_reason(make_learner):
    learn = make_learner(bs=16)  # 6 batches: below the 20 a curve needs
    with pytest.warns(UserWarning) as caught:
        rec = learn.fine_tune_with(1, bn="frozen")
    rt = rec.phases[-1].range_test
    assert rt.fell_back and "6 training batches per epoch, fewer than the 20" in rt.reason
    assert any(rt.reason in str(w.message) for w in caught)
    assert rec.phases[-1].lr_source == f"fastai's rule: {rt.reason}"


def test_range_test_false_is_fastais_fixed_rule_without_a_sweep(make_learner):
    learn = make_learner(bs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = learn.fine_tune_with(1, bn="frozen", range_test=False, fallback_lr=3e-4)
    p = rec.phases[-1]
    assert p.range_test.fell_back and not p.range_test.full_lrs and p.range_test.seconds == 0
    assert p.lrs[-1] == pytest.approx(3e-4) and p.lrs[0] == pytest.approx(3e-6)


# ------------------------------------------------------------------ what it suggests -----------
def test_edge_is_the_most_effective_step_over_five():
    lrs = np.logspace(-5, 0, 21)
    ratios = np.r_[np.linspace(0.99, 0.2, 12), [0.1, 0.05, 0.08, 0.3, 0.9, 1.5, 3.0, 6.0, 9.0]]
    lr, (at, r) = edge(lrs, ratios)
    i = int(np.argmin(np.convolve(np.log(ratios), np.ones(3) / 3, mode="same")[1:-1])) + 1
    assert at == pytest.approx(lrs[i]) and lr == pytest.approx(lrs[i] / 2) and 12 <= i <= 14


def test_edge_takes_the_start_of_a_floor_of_memorised_batches():
    "Small batches: from some rate on, one step wipes out its batch's loss; the noise within that floor decides nothing."
    lrs = np.logspace(-5, 0, 21)
    base = np.r_[np.linspace(0.95, 0.3, 8), [0.04, 0.01, 0.03, 0.002, 0.02, 0.0005, 0.01], [0.6, 1.2, 3, 6, 9]]
    noisy = base.copy()
    noisy[9:15] = noisy[9:15][::-1]  # the deepest point moves; the start of the floor does not
    picks = {edge(lrs, r)[1][0] for r in (base, noisy)}
    assert picks == {lrs[9]}
    no_floor = {edge(lrs, r, floor=1e-8)[1][0] for r in (base, noisy)}
    assert len(no_floor) == 2  # without the floor the pick follows the noise
    with pytest.raises(ValueError, match="floor"):
        edge(lrs, base, floor=1.5)


def test_edge_refuses_a_curve_that_rises_from_the_start():
    with pytest.raises(ValueError, match="start_lr is too high"):
        edge(np.logspace(-5, 0, 10), np.linspace(1.0, 30.0, 10))


def test_edge_refuses_a_curve_on_which_no_step_helps():
    "The training loss is not a criterion (at 8 images a batch it spreads over 7x; a memorised set starts near 0)."
    with pytest.raises(ValueError, match="no step made its own batch's loss smaller"):
        edge(np.logspace(-5, 0, 10), [1.2, 1.1, 1.05, 1.0, 1.1, 1.3, 2.0, 3.0, 4.0, 5.0])


def test_step_ratio_is_paired_dropout_and_batch_noise_cancel(make_learner):
    "At the lowest rate a step barely changes its own batch's loss: same batch, same dropout masks."
    learn = make_learner(bs=4)
    assert any(isinstance(m, __import__("torch").nn.Dropout) and m.p > 0 for m in learn.model.modules())
    learn.unfreeze()
    rt = range_test(learn, RangeTest(start_lr=1e-7), lr_mult=100)
    assert abs(rt.losses[0] - 1) < 0.02, rt.losses[:3]
    assert min(rt.losses) < 0.9  # and higher rates do reduce it


# ------------------------------------------------------------------ the user's callbacks -------
def test_sweep_keeps_mixed_precision_working(make_learner):
    learn = make_learner(bs=16).to_fp16()
    cb = FineTuneCallback(freeze_epochs=1, bn="frozen", range_test=SWEEP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast('cuda') without CUDA warns that it is disabled
        learn.fit_one_cycle(3, 1e-3, cbs=cb)
    rt = cb.record.phases[-1].range_test
    assert not rt.fell_back and len(rt.full_lrs) >= 5  # the sweep ran inside the fit
    assert len(learn.recorder.values) == 3 and learn.mixed_precision.autocast is None  # ended as fastai ends it


class BestSpy(Callback):
    "Reads SaveModelCallback's best after every epoch, after FineTuneCallback's sweep."
    order = FineTuneCallback.order + 5

    def before_fit(self):
        self.bests = []

    def after_epoch(self):
        if not hasattr(self, "lr_finder"):  # as a callback that stays out of lr_find does
            self.bests.append(self.learn.save_model.best)


def test_sweep_does_not_reset_a_savers_best(make_learner, tmp_path):
    learn = make_learner(bs=16, path=tmp_path)
    spy = BestSpy()
    learn.fit_one_cycle(3, 1e-3, cbs=[SaveModelCallback(monitor="valid_loss", fname="best"), spy,
                                      FineTuneCallback(freeze_epochs=1, bn="frozen", range_test=SWEEP)])
    losses = [v[1] for v in learn.recorder.values]
    assert spy.bests == [min(losses[:i + 1]) for i in range(3)]  # never reset to inf by the sweep
    assert math.isfinite(spy.bests[0])


def test_sweep_does_not_reset_early_stopping(make_learner):
    learn = make_learner(bs=16)
    es = EarlyStoppingCallback(monitor="valid_loss", patience=5)
    ft = FineTuneCallback(freeze_epochs=1, bn="frozen", range_test=SWEEP)
    learn.fit_one_cycle(2, 1e-3, cbs=[es, ft])
    assert not ft.record.phases[-1].range_test.fell_back
    assert es.best == min(v[1] for v in learn.recorder.values) and es.run


@pytest.mark.parametrize("append", [False, True])
def test_sweep_leaves_a_csv_log_open_and_clean(make_learner, tmp_path, append):
    learn = make_learner(bs=16, path=tmp_path)
    if append:
        (tmp_path / "history.csv").write_text("earlier run\n")
    ft = FineTuneCallback(freeze_epochs=1, bn="frozen", range_test=SWEEP)
    learn.fit_one_cycle(3, 1e-3, cbs=[CSVLogger(append=append), ft])
    assert not ft.record.phases[-1].range_test.fell_back
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[-4].startswith("epoch") and [line.split(",")[0] for line in lines[-3:]] == ["0", "1", "2"]
    assert len(lines) == (5 if append else 4)  # the sweep wrote nothing, truncated nothing


class CountingCallback(Callback):
    "A user's callback of unknown purpose: it sees the sweep as it sees fastai's lr_find."

    def before_fit(self):
        self.fits = getattr(self, "fits", 0) + 1
        self.finder = getattr(self, "finder", []) + [hasattr(self, "lr_finder")]


def test_a_users_callback_sees_the_sweep_as_lr_find(make_learner):
    learn = make_learner(bs=16)
    user = CountingCallback()
    ft = FineTuneCallback(freeze_epochs=1, bn="frozen", range_test=SWEEP)
    learn.fit_one_cycle(2, 1e-3, cbs=[user, ft])
    assert not ft.record.phases[-1].range_test.fell_back
    assert user.fits == 2 and user.finder == [False, True]  # the fit, then the sweep, flagged as fastai flags it


def test_held_out_edge_reads_the_loss_relative_to_its_start(make_learner):
    "A held-out loss over 1 (here a 10x cross-entropy) is a loss, not a ratio: the edge still finds its minimum."
    import torch.nn.functional as F
    learn = make_learner(bs=16, loss_func=lambda out, y: 10 * F.cross_entropy(out.as_subclass(torch.Tensor),
                                                                          y.as_subclass(torch.Tensor)))
    learn.unfreeze()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = range_test(learn, RangeTest(small_data="held-out"), lr_mult=100)
    assert not [w for w in caught if "range test not used" in str(w.message)]
    assert rt.curve.startswith("held-out loss, relative") and not rt.fell_back
    assert rt.losses[0] == pytest.approx(1.0) and min(rt.losses) < 1
    assert rt.suggestion == pytest.approx(rt.point[0] / 2)
