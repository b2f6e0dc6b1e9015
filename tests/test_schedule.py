import math
import random
import warnings

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.metrics import accuracy
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18

import fastai_freeze  # noqa: F401
from fastai_freeze import FineTuneCallback, RangeTest, Unfreeze, range_test
from fastai_freeze.demo.data import TARGET_CLASSES, make_patterns, tensor_dls
from fastai_freeze.probe import SUGGESTERS
from fastai_freeze.transfer import new_head_learner


def observable_state(learn):
    "Everything a probe must give back, read through public attributes only."
    opt = learn.opt
    return {
        "weights": {k: v.detach().clone() for k, v in learn.model.state_dict().items()},
        "grad": [p.requires_grad for p in learn.model.parameters()],
        "modes": [m.training for m in learn.model.modules()],
        "opt_state": [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                      for pg in opt.param_lists for p in pg],
        "hypers": [dict(h) for h in opt.hypers], "frozen_idx": opt.frozen_idx,
        "recorder": [list(getattr(learn.recorder, a, [])) for a in ("lrs", "losses", "values", "iters")],
        "attrs": sorted(learn.__dict__),
        "rng": (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()),
    }


def assert_same_state(a, b):
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    assert a["grad"] == b["grad"] and a["modes"] == b["modes"]
    for sa, sb in zip(a["opt_state"], b["opt_state"]):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
    assert a["hypers"] == b["hypers"] and a["frozen_idx"] == b["frozen_idx"]
    assert a["recorder"] == b["recorder"] and a["attrs"] == b["attrs"]
    assert torch.equal(a["rng"][0], b["rng"][0]) and np.array_equal(a["rng"][1], b["rng"][1])
    assert a["rng"][2] == b["rng"][2]


@pytest.mark.parametrize("curve", ["training loss", "held-out loss"])
def test_range_test_restores_everything_bitwise(make_learner, curve):
    learn = make_learner(bs=16)
    learn.fit_one_cycle(1, 1e-3)  # optimizer state and recorder history exist
    learn.unfreeze()
    learn.fit_one_cycle(1, 1e-4)
    before = observable_state(learn)
    cfg = (RangeTest(num_it=30, max_passes=None) if curve == "training loss" else
           RangeTest(held_out_it=25, small_data="held-out"))
    rt = range_test(learn, cfg, lr_mult=100)
    assert_same_state(before, observable_state(learn))
    assert rt.curve.startswith(curve) and rt.suggestion > 0 and len(rt.full_lrs) > 0 and not rt.fell_back


@pytest.mark.parametrize("name", ["valley", "steep", "minimum"])
def test_chosen_rate_is_the_suggestion_on_the_recorded_curve(make_learner, name):
    learn = make_learner(bs=16)  # 96 images, 6 batches: a 100-iteration sweep would see them 17 times
    learn.unfreeze()
    rt = range_test(learn, RangeTest(held_out_suggest=name, small_data="held-out"), lr_mult=100)
    assert rt.curve == "held-out loss" and rt.method == name and not rt.fell_back
    lr, _ = SUGGESTERS[name](torch.tensor(rt.lrs), torch.tensor(rt.losses), 30)
    assert math.isclose(rt.suggestion, float(lr), rel_tol=1e-9)
    assert np.allclose(rt.lrs, rt.full_lrs[3:-5], rtol=1e-6)  # fastai's cut: the first tenth, the last five points


def test_discriminative_sweep_moves_every_group_at_the_slice_ratios(make_learner):
    learn = make_learner(bs=16)
    learn.unfreeze()
    seen = []

    class Rates(Callback):
        order = 99

        def after_batch(self):
            if hasattr(self.learn, "lr_finder"):
                seen.append([h["lr"] for h in self.learn.opt.hypers])
    learn.add_cb(Rates())
    range_test(learn, RangeTest(num_it=20, max_passes=None), lr_mult=100)
    assert seen and all(math.isclose(lrs[-1] / lrs[0], 100, rel_tol=1e-6) for lrs in seen)


def test_diverging_range_test_falls_back_with_a_warning(make_learner):
    learn = make_learner(bs=16)
    learn.unfreeze()
    with pytest.warns(UserWarning, match="NaN or infinite|diverged|do worse from the first rate|no step made its own batch"):
        rt = range_test(learn, RangeTest(start_lr=1e3, end_lr=1e6, num_it=40, max_passes=None), fallback_lr=3e-5)
    assert rt.fell_back and rt.suggestion == 3e-5


def test_small_data_gets_fastais_rule_by_default(make_learner):
    learn = make_learner(bs=16)
    learn.unfreeze()
    before = observable_state(learn)
    with pytest.warns(UserWarning, match="6 training batches per epoch, fewer than the 20.*fastai.s rule"):
        rt = range_test(learn, RangeTest(), fallback_lr=7e-4)
    assert rt.fell_back and rt.suggestion == 7e-4 and not rt.full_lrs
    assert_same_state(before, observable_state(learn))
    fig = learn.fine_tune_with(1, bn="train", range_test=RangeTest()).plot_range_tests()
    assert "fallback" in fig.axes[0].get_title()  # a fallback has no curve: it says so instead of an empty plot


def test_range_test_config_is_checked():
    with pytest.raises(ValueError, match="unknown suggestion method 'vally'"):
        RangeTest(suggest="vally")
    with pytest.raises(ValueError, match="at least 20"):
        RangeTest(num_it=5)
    with pytest.raises(ValueError, match="start_lr < end_lr"):
        RangeTest(start_lr=1.0, end_lr=1e-3)


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
    rec = learn.fine_tune_with(2, base_lr=None, bn="train", cbs=spy, range_test=RangeTest(num_it=30, max_passes=None))
    assert [p.name for p in rec.phases] == ["warm-up", "unfrozen"]
    assert [p.epochs_run for p in rec.phases] == [1, 2]
    warm, full = spy.fits
    assert not all(warm[0]) and all(warm[-1])  # body frozen (BN aside), head trains
    assert all(all(g) for g in full)
    assert rec.phases[0].trainable_groups == ["b", "T"] and rec.phases[1].trainable_groups == ["T", "T"]
    top = rec.phases[1].range_test.suggestion
    assert math.isclose(rec.phases[1].lrs[-1], top) and math.isclose(rec.phases[1].lrs[0], top / 100)
    assert rec.phases[0].range_test is not None  # base_lr=None: the warm-up rate came from a range test
    assert len(rec.phases[1].values) == 2 and len(rec.phases[0].values) == 1
    text = str(rec)
    assert "warm-up" in text and "range test (edge, training loss)" in text and "bn=train" in text
    assert learn.fine_tune_record is rec
    assert not [cb for cb in learn.cbs if type(cb).__name__ in ("BNPolicyCallback", "FrozenPrefix")]
    assert len(rec.plot().axes) == 2 and len(rec.plot_range_tests().axes) == 2


def test_fine_tune_with_freeze_bn_and_base_lr(make_learner):
    learn = make_learner(bs=16)
    spy = PhaseSpy()
    rec = learn.fine_tune_with(1, base_lr=2e-3, freeze_bn=True, bn="fold", cbs=spy)
    assert rec.phases[0].lr_source == "base_lr" and rec.phases[0].range_test is None
    assert rec.phases[0].trainable_groups == [".", "T"]
    assert not any(spy.fits[0][0])
    assert rec.bn.policy.value == "fold"


def test_plateau_unfreezes_at_the_epoch_the_rule_says(make_learner):
    learn = make_learner(bs=16)
    # a tiny rate: the validation loss barely moves, so min_delta=0.5 calls a plateau after `patience` epochs
    rec = learn.fine_tune_with(1, base_lr=1e-6, freeze_epochs=5, bn="train",
                               unfreeze=Unfreeze(plateau=True, patience=2, min_delta=0.5))
    warm = rec.phases[0]
    losses = [v[1] for v in warm.values]
    best, wait, expected = math.inf, 0, None  # fastai's EarlyStoppingCallback rule, written out
    for i, v in enumerate(losses):
        best, wait = (v, 0) if v < best - 0.5 else (best, wait + 1)
        if wait >= 2:
            expected = i + 1
            break
    assert warm.epochs_run == expected == 3
    assert rec.unfroze_at_epoch == 3 and "did not improve" in rec.unfreeze_reason


def test_target_metric_stops_and_keeps_best(make_learner):
    learn = make_learner(bs=16)
    seen = []

    class Weights(Callback):
        order = 99

        def after_epoch(self):
            if not hasattr(self.learn, "lr_finder"):
                seen.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})
    rec = learn.fine_tune_with(4, base_lr=3e-3, bn="train", monitor="valid_loss", keep_best=True, cbs=Weights())
    unfrozen = rec.phases[-1]
    losses = [v[1] for v in unfrozen.values]
    best = int(np.argmin(losses))
    assert unfrozen.epochs_run == 4 and f"epoch {best + 1}" in rec.notes[0]
    kept = seen[1 + best]  # after the warm-up epoch, the unfrozen epochs in order
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, kept[k]), k  # the best epoch's weights came back
    learn2 = make_learner(bs=16)
    rec2 = learn2.fine_tune_with(4, base_lr=3e-3, bn="train", monitor="accuracy", target=0.0)
    assert rec2.phases[-1].epochs_run == 1 and "reached" in rec2.phases[-1].end_reason


def test_gradual_unfreezing_on_a_three_group_learner(make_learner):
    learn = make_learner(bs=16)
    learn.split_bn()  # 3 groups: body, body BN, head
    spy = PhaseSpy()
    rec = learn.fine_tune_with(3, base_lr=2e-3, gradual=True, bn="train", cbs=spy)
    assert [p.name for p in rec.phases] == ["warm-up", "stage 1", "unfrozen"]
    assert rec.phases[1].trainable_groups == [".", "T", "T"] and rec.phases[1].range_test is not None
    assert rec.phases[2].trainable_groups == ["T", "T", "T"]
    assert [p.epochs_run for p in rec.phases] == [1, 1, 2]
    learn2 = make_learner(bs=16)
    learn2.split_bn()
    rec2 = learn2.fine_tune_with(3, base_lr=2e-3, gradual=4.0, bn="train")
    assert math.isclose(rec2.phases[2].lrs[-1], rec2.phases[1].lrs[-1] / 4)


def test_gradual_splits_a_two_group_learner_and_gives_its_splitter_back(make_learner):
    learn = make_learner(bs=16)
    splitter, n = learn.splitter, len(learn.opt.param_lists)
    assert n == 2
    rec = learn.fine_tune_with(3, base_lr=2e-3, gradual=True, bn="train")
    assert [p.name for p in rec.phases] == ["warm-up", "stage 1", "unfrozen"]
    assert rec.phases[1].trainable_groups == ["b", "T", "T"] and "split into 2 stages" in " ".join(rec.notes)
    assert learn.splitter is splitter and len(learn.opt.param_lists) == 2
    one_epoch = make_learner(bs=16).fine_tune_with(1, gradual=True, bn="train")
    assert [p.name for p in one_epoch.phases] == ["warm-up", "unfrozen"] and "no epoch for a stage" in " ".join(one_epoch.notes)


def test_fine_tune_with_is_deterministic(make_learner):
    recs = []
    for _ in range(2):
        learn = make_learner(bs=16, seed=3)
        torch.manual_seed(3)
        recs.append(learn.fine_tune_with(1, bn="auto"))
    a, b = recs
    assert [p.lrs for p in a.phases] == [p.lrs for p in b.phases]
    assert a.bn.policy == b.bn.policy and a.phases[-1].values == b.phases[-1].values


def test_exception_in_a_phase_leaves_state_as_reported(make_learner):
    class Crash(Callback):
        order = 100

        def before_batch(self):
            if not self.learn.opt.frozen_idx and self.iter == 1 and not hasattr(self.learn, "lr_finder"):
                raise RuntimeError("crash in the unfrozen phase")

    learn = make_learner(bs=16)
    with pytest.raises(RuntimeError, match="crash"):
        learn.fine_tune_with(2, base_lr=1e-3, bn="frozen", cbs=Crash())
    rec = learn.fine_tune_record
    assert rec.phases[-1].name == "unfrozen" and rec.phases[-1].trainable_groups == ["T", "T"]
    assert all(p.requires_grad for p in learn.model.parameters())  # unfrozen, as reported
    mode = learn.model.training
    assert {m.training for m in learn.model.modules()} == {mode}  # no BN left in forced eval
    assert not [cb for cb in learn.cbs if type(cb).__name__ in ("BNPolicyCallback", "FrozenPrefix")]
    assert not any("forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks for m in learn.model.modules())
    assert torch.is_grad_enabled()


def test_dropin_callback_inside_fit_one_cycle(make_learner):
    learn = make_learner(bs=16)
    spy = PhaseSpy()
    n_groups = len(learn.opt.param_lists)
    cb = FineTuneCallback(freeze_epochs=1, bn="train", range_test=RangeTest(num_it=30, max_passes=None))
    learn.fit_one_cycle(3, 2e-3, cbs=[cb, spy])
    rec = cb.record
    assert [p.name for p in rec.phases] == ["warm-up", "unfrozen"]
    assert [p.epochs_run for p in rec.phases] == [1, 2]
    assert rec.bn.policy.value == "train"  # the callback records its BN policy, as the method does
    assert len(learn.recorder.values) == 3  # the fit's own history is whole: the range test left no trace
    assert math.isclose(rec.phases[0].lrs[-1], 2e-3, rel_tol=1e-6)  # the warm-up's peak rate, not its start
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
    cb = FineTuneCallback(freeze_epochs=4, unfreeze=Unfreeze(plateau=True, patience=1, min_delta=10.0), bn="train")
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
        rec = learn.fine_tune_with(1, bn="auto")
    assert rec.phases[-1].trainable_groups == ["T", "T", "T"]
