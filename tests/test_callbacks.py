"""Fast unit tests: the stop rules on fastai's TrackerCallback, and the rate arithmetic."""
import math

import numpy as np
import pytest
from fastai.callback.core import Callback
from fastai.learner import Recorder
from fastai.test_utils import synth_learner

from fastai_freeze.callbacks import StopAtTarget, UnfreezeOnPlateau
from fastai_freeze.internals import ResumedSchedule, group_lrs
from fastai_freeze.schedule import FineTuneSchedule


class Scripted(Callback):
    "Replaces the epoch's validation loss by the next value of a script (between the Recorder and the rules)."
    order = Recorder.order + 1

    def __init__(self, values):
        self.values = list(values)

    def after_epoch(self):
        self.learn.recorder.values[-1][1] = self.values[self.epoch]


def _fit(values, rule):
    learn = synth_learner()
    learn.remove_cbs([c for c in learn.cbs if type(c).__name__ == "ProgressCallback"])
    with learn.no_logging():
        learn.fit(len(values), 1e-3, cbs=[Scripted(values), rule])
    return learn


@pytest.mark.parametrize("values,patience,min_delta,stopped", [
    ([1.0, 0.9, 0.95, 0.96, 0.5], 2, 0.0, 4),    # no better than 0.9 for 2 epochs: stops after epoch 4
    ([1.0, 0.9, 0.8, 0.7, 0.6], 1, 0.0, None),   # always better: runs to the end
    ([1.0, 0.95, 0.91, 0.9, 0.8], 2, 0.1, 3),    # better, but not by min_delta
    ([1.0, math.nan, 0.9, 0.8], 1, 0.0, 2),      # NaN is never an improvement
])
def test_unfreeze_on_plateau_follows_fastais_early_stopping_rule(values, patience, min_delta, stopped):
    rule = UnfreezeOnPlateau(min_delta=min_delta, patience=patience)
    learn = _fit(values, rule)
    assert rule.stopped_epoch == stopped
    assert len(learn.recorder.values) == (stopped or len(values))


@pytest.mark.parametrize("values,target,reached", [
    ([1.0, 0.6, 0.4, 0.3], 0.5, 3), ([1.0, 0.6, 0.55], 0.5, None), ([1.0, 0.5], 0.5, 2)])
def test_stop_at_target_stops_when_the_monitored_value_reaches_it(values, target, reached):
    rule = StopAtTarget("valid_loss", target, keep_best=False)
    _fit(values, rule)
    assert rule.reached_epoch == reached


def test_discriminative_rates_and_the_resumed_cycle():
    learn = synth_learner()
    with pytest.raises(ValueError, match="1 parameter group"):  # no body to unfreeze
        FineTuneSchedule(learn, bn="train", lr_mult=100)
    learn.create_opt()
    assert group_lrs(learn, slice(1e-5, 1e-3)) == [1e-3]  # one group: the top rate
    learn.splitter = lambda m: [[m.a], [m.b]]  # two groups
    learn.create_opt()
    assert FineTuneSchedule(learn, bn="train", lr_mult=100).rates(1e-3) == slice(1e-5, 1e-3)
    assert np.allclose(group_lrs(learn, slice(1e-5, 1e-3)), [1e-5, 1e-3])
    cycle = ResumedSchedule(lambda p: p, start=0.5)  # a new cycle over the second half of the fit
    assert [cycle(p) for p in (0.0, 0.5, 0.75, 1.0)] == [0.0, 0.0, 0.5, 1.0]
