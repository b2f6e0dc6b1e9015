"""The fastai internals this library relies on, checked: an upgrade that changes them fails here first."""
import torch
from fastai.callback.schedule import ParamScheduler

import fastai_freeze  # noqa: F401
from fastai_freeze.internals import (
    LEARNER_ATTRS,
    RECORDER_ATTRS,
    learner_attributes,
    learner_snapshot,
    restore_learner,
)


def test_a_fit_leaves_the_learner_and_recorder_attributes_this_library_knows(make_learner):
    learn = make_learner(bs=16)
    learn.fit_one_cycle(1, 1e-3)  # a ParamScheduler fit: the Recorder gets `hps` too
    assert learner_attributes(learn) == LEARNER_ATTRS, learner_attributes(learn) ^ LEARNER_ATTRS
    assert set(learn.recorder.__dict__) == RECORDER_ATTRS, set(learn.recorder.__dict__) ^ RECORDER_ATTRS


def test_the_snapshot_gives_back_every_attribute_whatever_it_is(make_learner):
    learn = make_learner(bs=16)
    learn.fit(1, 1e-3)
    snap = learner_snapshot(learn)
    attrs = set(learn.__dict__)
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.some_new_attribute = 1  # an attribute a future fastai might add during a fit
    learn.fit_one_cycle(1, 1e-2)
    restore_learner(learn, snap)
    assert not hasattr(learn, "some_new_attribute")
    assert set(learn.__dict__) == attrs
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert not any(isinstance(cb, ParamScheduler) for cb in learn.cbs)
