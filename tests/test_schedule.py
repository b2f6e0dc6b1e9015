import math
import warnings

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.metrics import accuracy
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18

import fastai_freeze  # noqa: F401
from fastai_freeze.data import TARGET_CLASSES, make_patterns, tensor_dls
from fastai_freeze.schedule import (
    SUGGESTERS,
    FineTuneCallback,
    PlateauRule,
    learner_snapshot,
    range_test,
)
from fastai_freeze.transfer import new_head_learner


def _bitwise_equal_snapshots(a, b):
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["grad"] == {p: f for p, f in b["grad"].items()}
    assert a["modes"] == b["modes"]
    assert a["opt_hypers"] == b["opt_hypers"] and a["frozen_idx"] == b["frozen_idx"]
    assert a["opt_state"].keys() == b["opt_state"].keys()
    for p in a["opt_state"]:
        for k, v in a["opt_state"][p].items():
            w = b["opt_state"][p][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w
    for k in a["rec"]:
        assert a["rec"][k] == b["rec"][k], k
    assert torch.equal(a["rng"][0], b["rng"][0])
    assert a["rng"][2] == b["rng"][2]
    assert np.array_equal(a["rng"][1][1], b["rng"][1][1])


def test_range_test_restores_everything_bitwise(make_learner):
    learn = make_learner(bs=16)
    learn.fit_one_cycle(1, 1e-3)  # optimizer state and recorder history exist
    learn.unfreeze()
    learn.fit_one_cycle(1, 1e-4)
    before = learner_snapshot(learn)
    rt = range_test(learn, "valley", num_it=30, max_passes=None)
    after = learner_snapshot(learn)
    _bitwise_equal_snapshots(before, after)
    assert rt.suggestion > 0 and len(rt.full_lrs) > 0


def test_chosen_rate_is_the_suggestion_on_the_recorded_curve(make_learner):
    learn = make_learner(bs=16)
    learn.unfreeze()
    for name in ("valley", "steep", "minimum", "slide"):
        rt = range_test(learn, name, num_it=40, max_passes=None)
        lr, _ = SUGGESTERS[name](torch.tensor(rt.lrs), torch.tensor(rt.losses), 40)
        assert math.isclose(rt.suggestion, float(lr), rel_tol=1e-9), name
        assert rt.method == name and not rt.fell_back


def test_diverging_range_test_falls_back_with_a_warning(make_learner):
    learn = make_learner(bs=16)
    learn.unfreeze()
    with pytest.warns(UserWarning, match="NaN or infinite|diverged"):
        rt = range_test(learn, start_lr=1e3, end_lr=1e6, num_it=40, fallback_lr=3e-5, max_passes=None)
    assert rt.fell_back and rt.suggestion == 3e-5
    with pytest.raises(RuntimeError, match="unusable"):
        range_test(learn, start_lr=1e3, end_lr=1e6, num_it=40, fallback_lr=None, max_passes=None)


def test_unknown_suggestion_method():
    with pytest.raises(ValueError, match="unknown suggestion method 'vally'"):
        FineTuneCallback(suggest="vally")


class PhaseSpy(Callback):
    "Per fit: the trainable flags per optimizer group at the first training batch."
    order = 100

    def __init__(self):
        self.fits = []

    def before_fit(self):
        if not hasattr(self.learn, "lr_finder"):
            self.fits.append(None)

    def before_batch(self):
        if self.training and self.iter == 0 and self.fits and self.fits[-1] is None and not hasattr(self.learn, "lr_finder"):
            self.fits[-1] = [[p.requires_grad for p in pg] for pg in self.learn.opt.param_lists]


def test_fine_tune_with_phases_and_freeze_states(make_learner):
    learn = make_learner(bs=16)
    spy = PhaseSpy()
    rec = learn.fine_tune_with(2, base_lr=None, bn="train", freeze_epochs=1, cbs=spy, num_it=30, max_passes=None)
    assert [p.name for p in rec.phases] == ["warm-up", "unfrozen"]
    assert [p.epochs_run for p in rec.phases] == [1, 2]
    warm, full = spy.fits
    assert not all(warm[0]) and all(warm[-1])  # body frozen (BN aside), head trains
    assert all(all(g) for g in full)
    assert rec.phases[0].trainable_groups == ["b", "T"] and rec.phases[1].trainable_groups == ["T", "T"]
    top = rec.phases[1].range_test.suggestion
    assert math.isclose(rec.phases[1].lrs[-1], top) and math.isclose(rec.phases[1].lrs[0], top / 100)
    assert rec.phases[0].range_test is not None  # base_lr=None: the warm-up rate came from a range test
    text = str(rec)
    assert "warm-up" in text and "range test (valley)" in text and "bn=train" in text
    assert learn.fine_tune_record is rec
    assert not [cb for cb in learn.cbs if type(cb).__name__ == "BNPolicyCallback"]
    fig = rec.plot()
    assert len(fig.axes) == 2
    assert len(rec.plot_range_tests().axes) == 2


def test_fine_tune_with_freeze_bn_and_base_lr(make_learner):
    learn = make_learner(bs=16)
    spy = PhaseSpy()
    rec = learn.fine_tune_with(1, base_lr=2e-3, freeze_bn=True, bn="fold", cbs=spy, num_it=30)
    assert rec.phases[0].lr_source == "base_lr" and rec.phases[0].range_test is None
    assert rec.phases[0].trainable_groups == [".", "T"]
    assert not any(spy.fits[0][0])
    assert rec.bn.policy.value == "fold"


def test_plateau_unfreezes_at_the_epoch_the_rule_says(make_learner):
    learn = make_learner(bs=16)
    # a tiny rate: the validation loss barely moves, so min_delta=0.5 calls a plateau after `patience` epochs
    rec = learn.fine_tune_with(1, base_lr=1e-6, freeze_epochs=5, unfreeze="plateau", patience=2,
                               min_delta=0.5, bn="train", num_it=30)
    warm = rec.phases[0]
    rule = PlateauRule(2, 0.5)
    expected = next(i + 1 for i, v in enumerate(warm.values) if rule.update(v[1]))
    assert warm.epochs_run == expected == 3
    assert rec.unfroze_at_epoch == 3 and "did not improve" in rec.unfreeze_reason


def test_target_metric_stops_and_keeps_best(make_learner):
    learn = make_learner(bs=16)
    rec = learn.fine_tune_with(4, base_lr=3e-3, bn="train", monitor="accuracy", target=0.0, keep_best=True,
                               num_it=30)
    assert rec.phases[-1].epochs_run == 1 and "reached" in rec.phases[-1].end_reason


def test_gradual_unfreezing(make_learner):
    learn = make_learner(bs=16)
    learn.split_bn()  # 3 groups: body, body BN, head
    spy = PhaseSpy()
    rec = learn.fine_tune_with(3, base_lr=2e-3, gradual=True, bn="train", cbs=spy, num_it=30, max_passes=None)
    assert [p.name for p in rec.phases] == ["warm-up", "stage 1", "unfrozen"]
    assert rec.phases[1].trainable_groups == [".", "T", "T"] and rec.phases[1].range_test is not None
    assert rec.phases[2].trainable_groups == ["T", "T", "T"]
    assert [p.epochs_run for p in rec.phases] == [1, 1, 2]
    learn2 = make_learner(bs=16)
    learn2.split_bn()
    rec2 = learn2.fine_tune_with(3, base_lr=2e-3, gradual=4.0, bn="train", num_it=30)
    assert math.isclose(rec2.phases[2].lrs[-1], rec2.phases[1].lrs[-1] / 4)


def test_fine_tune_with_is_deterministic(make_learner):
    recs = []
    for _ in range(2):
        learn = make_learner(bs=16, seed=3)
        torch.manual_seed(3)
        recs.append(learn.fine_tune_with(1, bn="auto", num_it=30))
    a, b = recs
    assert [p.lrs for p in a.phases] == [p.lrs for p in b.phases]
    assert a.bn.policy == b.bn.policy and a.phases[-1].values == b.phases[-1].values


def test_bad_arguments(make_learner):
    learn = make_learner(bs=16)
    with pytest.raises(ValueError, match="freeze_bn=True"):
        learn.fine_tune_with(1, bn="train", freeze_bn=True)
    with pytest.raises(ValueError, match="monitor"):
        learn.fine_tune_with(1, target=0.9)
    with pytest.raises(ValueError, match="unfreeze"):
        learn.fine_tune_with(1, unfreeze="sometimes")
    with pytest.raises(ValueError, match="lr_max"):
        learn.fine_tune_with(1, lr_max=1e-3)


def test_exception_in_a_phase_leaves_state_as_reported(make_learner):
    class Crash(Callback):
        order = 100

        def before_batch(self):
            if not self.learn.opt.frozen_idx and self.iter == 1 and not hasattr(self.learn, "lr_finder"):
                raise RuntimeError("crash in the unfrozen phase")

    learn = make_learner(bs=16)
    with pytest.raises(RuntimeError, match="crash"):
        learn.fine_tune_with(2, base_lr=1e-3, bn="frozen", cbs=Crash(), num_it=30)
    rec = learn.fine_tune_record
    assert rec.phases[-1].name == "unfrozen" and rec.phases[-1].trainable_groups == ["T", "T"]
    assert all(p.requires_grad for p in learn.model.parameters())  # unfrozen, as reported
    mode = learn.model.training
    assert {m.training for m in learn.model.modules()} == {mode}  # no BN left in forced eval
    assert not [cb for cb in learn.cbs if "Policy" in type(cb).__name__]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in learn.model.modules())


def test_dropin_callback_inside_fit_one_cycle(make_learner):
    learn = make_learner(bs=16)
    spy = PhaseSpy()
    n_groups = len(learn.opt.param_lists)
    cb = FineTuneCallback(unfreeze_epoch=1, num_it=30, max_passes=None)
    learn.fit_one_cycle(3, 2e-3, cbs=[cb, spy])
    rec = cb.record
    assert [p.name for p in rec.phases] == ["warm-up", "unfrozen"]
    assert [p.epochs_run for p in rec.phases] == [1, 2]
    assert len(learn.recorder.values) == 3  # the fit's own history is whole: the range test left no trace
    top = rec.phases[1].range_test.suggestion
    # the new cycle: at its peak the head group runs at the found rate, the first group at rate/lr_mult
    lrs = np.array(learn.recorder.lrs)
    n_iter = len(lrs) // 3
    assert 0.9 * top < lrs[n_iter:].max() <= top * (1 + 1e-6)  # the cycle's peak, between samples
    assert lrs[:n_iter].max() < 2.1e-3
    assert all(p.requires_grad for p in learn.model.parameters()) and n_groups == 2
    assert math.isclose(learn.opt.hypers[0]["lr"] * 100, learn.opt.hypers[-1]["lr"], rel_tol=1e-6)


def test_dropin_plateau(make_learner):
    learn = make_learner(bs=16)
    cb = FineTuneCallback(unfreeze_epoch=4, plateau=True, patience=1, min_delta=10.0, num_it=30)
    learn.fit_one_cycle(3, 1e-3, cbs=cb)
    assert cb.record.unfroze_at_epoch == 2  # epoch 1 sets the best, epoch 2 fails to beat it by 10


def test_vision_learner_resnet18_with_weights_from_a_trained_model():
    """cnn_learner-style resnet18 (pretrained=False) given weights from a model trained here."""
    torch.manual_seed(0)
    xs, ys = make_patterns(16, ("hstripes", "vstripes", "disc", "ring"), size=32, seed=0)
    src_dls = tensor_dls(xs[:48], ys[:48], xs[48:], ys[48:], bs=16)
    src = vision_learner(src_dls, resnet18, pretrained=False, n_out=4, metrics=accuracy)
    src.unfreeze()
    src.fit_one_cycle(1, 1e-3)
    xt, yt = make_patterns(12, TARGET_CLASSES, size=32, seed=1)
    dls = tensor_dls(xt[:32], yt[:32], xt[32:], yt[32:], bs=16)
    learn = new_head_learner(src, dls, metrics=accuracy)
    for (k, a), (_, b) in zip(learn.model[0].state_dict().items(), src.model[0].state_dict().items()):
        assert torch.equal(a, b), k
    assert len(learn.opt.param_lists) == 3  # fastai's ResNet splitter came along
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = learn.fine_tune_with(1, bn="auto", num_it=30)
    assert rec.phases[-1].trainable_groups == ["T", "T", "T"]


def test_range_test_refuses_to_measure_memorisation(make_learner):
    learn = make_learner(bs=16)  # 96 images: 6 batches per epoch
    learn.unfreeze()
    before = learner_snapshot(learn)
    with pytest.warns(UserWarning, match="go over the 6-batch training set 17 times"):
        rt = range_test(learn, num_it=100, fallback_lr=7e-4)
    assert rt.fell_back and rt.suggestion == 7e-4 and not rt.full_lrs
    _bitwise_equal_snapshots(before, learner_snapshot(learn))
    learn2 = make_learner(bs=16)
    with pytest.warns(UserWarning):
        rec = learn2.fine_tune_with(1, base_lr=2e-3, bn="train")
    top = rec.phases[-1]
    assert top.lr_source == "fallback (valley unusable)" and math.isclose(top.lrs[-1], 1e-3)
