"""Fault cases, round 3: other Learners and data paths, refusals that change nothing."""
import warnings

import numpy as np
import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from torch.utils.data import DataLoader, TensorDataset

import fastai_freeze  # noqa: F401
from fastai_freeze import FineTuneCallback, RangeTest
from fastai_freeze.transfer import new_head_learner


@pytest.fixture
def plain_learner(source_model, target_data):
    "fastai's pure-PyTorch path: plain torch DataLoaders wrapped in fastai's DataLoaders."
    def _make(bs=16):
        xt, yt, xv, yv = (t.clone() for t in target_data)
        dls = DataLoaders(DataLoader(TensorDataset(xt, yt), batch_size=bs, shuffle=True, drop_last=True),
                          DataLoader(TensorDataset(xv, yv), batch_size=32))
        torch.manual_seed(0)
        return new_head_learner(source_model, dls, n_out=4, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    return _make


@pytest.mark.parametrize("bn", ["auto", "adapt", "fold", "frozen", "train"])
def test_fine_tune_with_on_plain_pytorch_dataloaders(plain_learner, bn):
    learn = plain_learner(bs=4)  # 24 batches: the range test runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = learn.fine_tune_with(1, bn=bn)
    assert [p.name for p in rec.phases] == ["warm-up", "unfrozen"] and len(learn.recorder.values) == 1
    assert not rec.phases[-1].range_test.fell_back


def test_drop_in_callback_and_advisor_on_plain_pytorch_dataloaders(plain_learner):
    learn = plain_learner(bs=16)
    cb = FineTuneCallback(freeze_epochs=1, range_test=RangeTest(num_it=20, max_passes=None))
    learn.fit_one_cycle(2, 1e-3, cbs=cb)
    assert cb.record.phases[-1].name == "unfrozen" and not cb.record.phases[-1].range_test.fell_back
    adv = learn.suggest_strategy()
    assert adv.n_images == 96 and adv.strategy


@pytest.mark.parametrize("freeze_bn", [None, True])
def test_folded_bn_follows_fastais_norm_rules(make_learner, freeze_bn):
    "A folded BN is a norm layer to fastai's optimizer: trained by `freeze()` under train_bn, no weight decay."
    from fastai_freeze.core.bn import BNAffine
    learn = make_learner(bs=16)
    learn.apply_bn_policy("fold", freeze_bn=freeze_bn)
    params = [p for m in learn.model.modules() if isinstance(m, BNAffine) for p in m.parameters(recurse=False)]
    assert params
    learn.freeze()  # fastai's own, train_bn=True
    assert all(p.requires_grad == (freeze_bn is None) for p in params)
    assert all(learn.opt.state[p]["do_wd"] is False for p in params)
    learn.opt = None  # a new optimizer: the policy gives the rules back when the next fit starts
    learn.fit(1, 1e-4)
    learn.freeze()
    assert all(p.requires_grad == (freeze_bn is None) for p in params)
    assert all(learn.opt.state[p]["do_wd"] is False for p in params)


@pytest.mark.parametrize("box", [np.float64, np.float32, lambda v: torch.tensor(v)], ids=["np64", "np32", "tensor0d"])
def test_numpy_and_tensor_scalars_are_numbers(make_learner, box):
    "Rates and counts computed with NumPy or torch are accepted as the numbers they are."
    learn = make_learner(bs=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = learn.fine_tune_with(np.int64(1), base_lr=box(2e-3), freeze_epochs=np.int64(1), lr_mult=box(100.0),
                                   pct_start=box(0.3), div=box(5.0), fallback_lr=box(1e-3), range_test=False)
    assert rec.phases[-1].lrs[-1] == pytest.approx(1e-3) and rec.phases[0].lrs[-1] == pytest.approx(2e-3, rel=1e-6)
    cb = FineTuneCallback(freeze_epochs=np.int64(1), lr_mult=box(10.0), fallback_lr=box(1e-3), range_test=False)
    learn.fit_one_cycle(2, 1e-3, cbs=cb)
    assert cb.record.phases[-1].lrs[-1] == pytest.approx(1e-3)


@pytest.mark.parametrize("bad", [np.nan, torch.tensor([1e-3, 2e-3]), np.bool_(True), "1e-3"])
def test_non_numbers_are_refused_before_anything_changes(make_learner, bad):
    learn = make_learner(bs=16)
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    flags, opt = [p.requires_grad for p in learn.model.parameters()], learn.opt
    with pytest.raises((ValueError, TypeError)):
        learn.fine_tune_with(1, base_lr=bad)
    assert all(torch.equal(v, weights[k]) for k, v in learn.model.state_dict().items())
    assert [p.requires_grad for p in learn.model.parameters()] == flags and learn.opt is opt


def test_keep_best_without_monitor_keeps_the_lowest_validation_loss(make_learner):
    learn = make_learner(bs=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = learn.fine_tune_with(3, keep_best=True, range_test=False)
    losses = [v[1] for v in rec.phases[-1].values]
    best = int(np.argmin(losses))
    assert any(f"kept the weights of unfrozen epoch {best + 1} (valid_loss=" in n for n in rec.notes)
    assert learn.validate()[0] == pytest.approx(losses[best], rel=1e-4)


def test_an_unfreeze_epoch_past_the_fit_is_said(make_learner):
    learn = make_learner(bs=16)
    cb = FineTuneCallback(freeze_epochs=3, range_test=False)
    with pytest.warns(UserWarning, match="freeze_epochs=3 in a fit of 2 epoch"):
        learn.fit_one_cycle(2, 1e-3, cbs=cb)
    assert any("the body is not unfrozen" in n for n in cb.record.notes) and len(cb.record.phases) == 1


def test_range_test_gives_back_a_torch_optimizer_in_optimwrapper(make_learner):
    "fastai's OptimWrapper keeps rates and moments in the torch optimizer: both come back after a sweep."
    from functools import partial

    from fastai.optimizer import OptimWrapper

    from fastai_freeze import range_test
    learn = make_learner(bs=4, opt_func=partial(OptimWrapper, opt=torch.optim.AdamW))
    learn.fit(1, 3e-4)  # AdamW's moments exist
    learn.unfreeze()
    before = {k: v for k, v in learn.opt.opt.state_dict().items()}
    rates = [g["lr"] for g in learn.opt.opt.param_groups]
    moments = {i: {k: t.clone() for k, t in st.items()} for i, st in before["state"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt = range_test(learn, RangeTest())
    assert not rt.fell_back  # 24 batches: the sweep ran and stepped AdamW
    assert [g["lr"] for g in learn.opt.opt.param_groups] == rates
    after = learn.opt.opt.state_dict()["state"]
    assert moments.keys() == after.keys()
    assert all(torch.equal(t, after[i][k]) for i, st in moments.items() for k, t in st.items())


# ------------------------------------------------------------------ one schedule, two front ends --------
def test_a_kept_schedule_callback_does_nothing_outside_training(make_learner):
    "validate() and get_preds() run before_fit; the schedule waits for a training epoch."
    from fastai_freeze.core.bn import BNAffine
    learn = make_learner(bs=16)
    cb = FineTuneCallback(bn="adapt", range_test=False)
    learn.add_cb(cb)
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    flags = [p.requires_grad for p in learn.model.parameters()]
    learn.validate()
    learn.get_preds(dl=learn.dls.valid)
    assert [p.requires_grad for p in learn.model.parameters()] == flags  # the body was not frozen
    assert not any(isinstance(m, BNAffine) for m in learn.model.modules())  # nor re-estimated and folded
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in state.items())
    assert cb.record.phases == [] and [type(c).__name__ for c in learn.cbs].count("BNPolicyCallback") == 0
    learn.fit_one_cycle(2, 1e-3)  # a fit does run it, once
    assert [p.name for p in cb.record.phases] == ["warm-up", "unfrozen"] and cb.record.bn.policy.value == "adapt"
    assert any(isinstance(m, BNAffine) for m in learn.model.modules())
    assert all(p.requires_grad for p in learn.model.parameters())
    assert [type(c).__name__ for c in learn.cbs].count("BNPolicyCallback") == 0  # its policy callback left with it


def test_both_front_ends_fall_back_to_fastais_rule_half_the_warm_up_rate(make_learner):
    "Below 20 batches per epoch the top rate is fastai's: half the warm-up's top rate, in both."
    learn = make_learner(bs=16)  # 6 batches per epoch
    with pytest.warns(UserWarning, match="fewer than the 20"):
        rec = learn.fine_tune_with(1, base_lr=4e-3, bn="frozen")
    assert rec.phases[-1].lrs[-1] == pytest.approx(2e-3)
    cb = FineTuneCallback(bn="frozen")
    with pytest.warns(UserWarning, match="fewer than the 20"):
        learn.fit_one_cycle(2, 4e-3, cbs=cb)
    assert cb.record.phases[-1].lrs[-1] == pytest.approx(2e-3)
    assert cb.record.phases[-1].lr_source == rec.phases[-1].lr_source


def test_the_plateau_rule_is_one_rule(make_learner):
    "The warm-up ends after the same epoch under fine_tune_with and under the drop-in callback."
    from fastai_freeze import Unfreeze
    rule = Unfreeze(plateau=True, patience=1, min_delta=10.0)  # no epoch beats the first by 10
    learn = make_learner(bs=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = learn.fine_tune_with(1, freeze_epochs=4, unfreeze=rule, range_test=False)
        cb = FineTuneCallback(freeze_epochs=4, unfreeze=rule, range_test=False)
        make_learner(bs=16).fit_one_cycle(5, 1e-3, cbs=cb)
    assert rec.unfroze_at_epoch == cb.record.unfroze_at_epoch == 2
    assert rec.unfreeze_reason == cb.record.unfreeze_reason == rec.phases[0].end_reason


def test_the_old_name_of_freeze_epochs_still_works_and_says_so():
    with pytest.warns(DeprecationWarning, match="freeze_epochs"):
        cb = FineTuneCallback(unfreeze_epoch=3)
    assert cb.freeze_epochs == cb.unfreeze_epoch == 3


def test_checks_do_not_create_the_optimizer(make_learner):
    from fastai_freeze.freeze import check_splittable, frozen_state
    learn = make_learner(bs=16)
    learn.opt = None
    assert check_splittable(learn) == 2 and frozen_state(learn)[0][0] > 0
    assert learn.opt is None


def test_a_cancelled_epoch_before_training_is_not_an_error(make_learner):
    from fastai.callback.core import Callback, CancelEpochException

    class CancelFirst(Callback):
        def before_train(self):
            if self.epoch == 0:
                raise CancelEpochException()
    learn = make_learner(bs=16)
    cb = FineTuneCallback(range_test=False)
    learn.fit_one_cycle(3, 1e-3, cbs=[CancelFirst(), cb])
    assert [p.name for p in cb.record.phases] == ["warm-up", "unfrozen"]
    assert all(p.requires_grad for p in learn.model.parameters())


@pytest.mark.parametrize("name", ["fine_tune", "bn_fold", "bn_adapt", "features", "scratch"])
@pytest.mark.parametrize("epochs,freeze_epochs", [(1.5, 1), (2, 0.5), (0, 1), (float("nan"), 1)])
def test_a_refused_strategy_changes_nothing(make_learner, name, epochs, freeze_epochs):
    "Fractional or missing epochs are refused before a strategy re-initialises, folds or freezes anything."
    from fastai_freeze import run_named_strategy
    learn = make_learner(bs=16)
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    kinds = [type(m) for m in learn.model.modules()]
    cbs = [type(c) for c in learn.cbs]
    with pytest.raises(ValueError, match="whole number"):
        run_named_strategy(learn, name, epochs, freeze_epochs)
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in state.items())
    assert [type(m) for m in learn.model.modules()] == kinds and [type(c) for c in learn.cbs] == cbs


def test_a_strategy_takes_numpy_counts(make_learner):
    from fastai_freeze import run_named_strategy
    rec = run_named_strategy(make_learner(bs=16), "features", np.int64(1), np.int64(0))
    assert rec.phases[0].epochs_run == 1


@pytest.mark.parametrize("policy", ["adapt", "fold", "auto"])
def test_data_the_body_cannot_take_changes_nothing(source_model, target_data, policy):
    "One-channel images into a three-channel body: the error comes before any statistic or layer changes."
    from fastai_freeze.demo.data import tensor_dls
    xt, yt, xv, yv = target_data
    dls = tensor_dls(xt[:, :1].clone(), yt, xv[:, :1].clone(), yv, bs=8)
    learn = new_head_learner(source_model, dls, n_out=4, loss_func=CrossEntropyLossFlat())
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    kinds = [type(m) for m in learn.model.modules()]
    with pytest.raises((RuntimeError, ValueError)):
        learn.apply_bn_policy(policy)
    assert [type(m) for m in learn.model.modules()] == kinds
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in state.items())
    assert not [c for c in learn.cbs if type(c).__name__ == "BNPolicyCallback"]


# ---------------------------------------------- sizes and counts: refused where they are given ---
def _state(learn):
    return ({k: v.clone() for k, v in learn.model.state_dict().items()}, [p.requires_grad for p in learn.model.parameters()],
            [m.training for m in learn.model.modules()], [type(c) for c in learn.cbs])


def _same(learn, before):
    after = _state(learn)
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items()) and after[1:] == before[1:]


@pytest.mark.parametrize("bad", [0, 1, -5, 2.5, "a", True, np.nan])
def test_suggest_strategy_refuses_a_bad_sample_count(make_learner, bad):
    learn = make_learner(bs=16)
    before = _state(learn)
    with pytest.raises(ValueError, match="max_samples"):
        learn.suggest_strategy(max_samples=bad)
    _same(learn, before)
    assert learn.suggest_strategy(max_samples=np.int64(40)).n_images == 96  # NumPy counts are counts


@pytest.mark.parametrize("kw", [dict(bins=0), dict(bins=2.5), dict(bins=True), dict(every=0), dict(every=1.5),
                                dict(reference=3), dict(reference="model.pth")], ids=str)
def test_weight_diagnostics_refuses_bad_settings_at_construction(kw):
    from fastai_freeze import WeightDiagnostics
    with pytest.raises((ValueError, TypeError), match="bins|every|reference"):
        WeightDiagnostics(**kw)
    assert WeightDiagnostics(every=np.int64(2), bins=np.int64(10)).bins == 10


@pytest.mark.parametrize("n_out", [0, -2, 2.5, "4", np.nan])
def test_new_head_learner_refuses_a_bad_class_count(source_model, target_data, n_out):
    from fastai_freeze.demo.data import tensor_dls
    xt, yt, xv, yv = target_data
    with pytest.raises(ValueError, match="n_out"):
        new_head_learner(source_model, tensor_dls(xt, yt, xv, yv, bs=16), n_out=n_out)
    assert new_head_learner(source_model, tensor_dls(xt, yt, xv, yv, bs=16), n_out=np.int64(4)).model[1][-1].out_features == 4


# ---------------------------------------- rules on validation values need validation data --------
@pytest.fixture
def no_valid_learner(source_model, target_data):
    from fastai_freeze.demo.data import tensor_dls
    xt, yt, xv, yv = (t.clone() for t in target_data)
    torch.manual_seed(0)
    return new_head_learner(source_model, tensor_dls(xt, yt, xv[:0], yv[:0], bs=16), metrics=accuracy)


@pytest.mark.parametrize("how", ["plateau", "target", "keep_best", "callback", "drop-in", "stop-drop-in"])
def test_a_rule_on_validation_values_without_validation_data_is_refused_before_training(no_valid_learner, how):
    "fastai records valid_loss as None without validation data: the rule would fail after an epoch trained."
    from fastai_freeze.callbacks import StopAtTarget, UnfreezeOnPlateau
    learn = no_valid_learner
    before = _state(learn)
    with pytest.raises(ValueError, match="no validation data"):
        if how == "plateau":
            learn.fine_tune_with(1, freeze_epochs=2, unfreeze="plateau")
        elif how == "target":
            learn.fine_tune_with(1, monitor="accuracy", target=0.9)
        elif how == "keep_best":
            learn.fine_tune_with(1, keep_best=True)
        elif how == "callback":
            learn.fit_one_cycle(2, 1e-3, cbs=FineTuneCallback(freeze_epochs=1, unfreeze="plateau"))
        elif how == "drop-in":
            learn.fit_one_cycle(2, 1e-3, cbs=UnfreezeOnPlateau())
        else:
            learn.fit_one_cycle(2, 1e-3, cbs=StopAtTarget("accuracy", 0.9))
    _same(learn, before)


def test_without_validation_data_the_epoch_rules_and_train_loss_still_work(no_valid_learner):
    learn = no_valid_learner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = learn.fine_tune_with(1, freeze_epochs=2, unfreeze=fastai_freeze.Unfreeze(plateau=True, monitor="train_loss"),
                                   range_test=False)
        learn.fit_one_cycle(2, 1e-3, cbs=FineTuneCallback(freeze_epochs=1, range_test=False))
    assert [p.name for p in rec.phases] == ["warm-up", "unfrozen"]


# ------------------------------------------- a BN head behind a BN-free body at tiny batches -----
def _bn_free_learner(target_data, bs):
    from torch import nn

    from fastai_freeze.demo.data import tensor_dls
    xt, yt, xv, yv = (t.clone() for t in target_data)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
    src = nn.Sequential(body, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
    return new_head_learner(src, tensor_dls(xt, yt, xv, yv, bs=bs), body=body, metrics=accuracy)


def test_a_bn_head_behind_a_bn_free_body_trains_at_batch_size_one(target_data):
    "fastai's head has BatchNorm1d: at batch size 1 it gets statistics estimated on the data, then folded."
    from torch.nn.modules.batchnorm import _BatchNorm
    learn = _bn_free_learner(target_data, bs=1)
    assert any(isinstance(m, _BatchNorm) for m in learn.model[1].modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = learn.fine_tune_with(1, range_test=False)
    assert "head's BN layers cannot use batch statistics" in rec.bn.reason
    assert not any(isinstance(m, _BatchNorm) for m in learn.model.modules())
    assert np.isfinite(rec.phases[-1].values[-1][0])


def test_batch_statistics_at_batch_size_one_are_refused_before_anything_changes(target_data):
    learn = _bn_free_learner(target_data, bs=1)
    before = _state(learn)
    with pytest.raises(ValueError, match="batch size 1"):
        learn.fine_tune_with(1, bn="train")
    _same(learn, before)


# ------------------------------------------- a two-input (tabular) Learner under adapt -----------
def test_adapt_feeds_every_input_of_a_two_input_tabular_model():
    "fastai's tabular model takes (categorical, continuous): the statistics pass feeds both, as a fit does."
    import pandas as pd
    from fastai.tabular.all import (
        Categorify,
        CategoryBlock,
        TabularDataLoaders,
        params,
        tabular_learner,
    )

    from fastai_freeze.core.bn import BNAffine
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.choice(["x", "y", "z"], 300), "b": rng.normal(3, 2, 300), "c": rng.normal(size=300)})
    df["t"] = ((df.b > 3) ^ (df.a == "x")).astype(int)
    dls = TabularDataLoaders.from_df(df, procs=[Categorify], cat_names=["a"], cont_names=["b", "c"], y_names="t",
                                     y_block=CategoryBlock, bs=32, valid_idx=list(range(240, 300)))
    torch.manual_seed(0)
    learn = tabular_learner(dls, layers=[16, 8], metrics=accuracy)
    learn.splitter = lambda m: [params(m.embeds) + params(m.bn_cont) + params(m.layers[:-1]), params(m.layers[-1])]
    learn.apply_bn_policy("adapt")
    folded = learn.model.bn_cont
    assert isinstance(folded, BNAffine)
    x = torch.tensor(df[["b", "c"]].values[:240], dtype=torch.float32)  # the training rows, unnormalised
    y = folded(x)  # gamma 1, beta 0: the training set's own statistics standardise it
    assert torch.allclose(y.mean(0), torch.zeros(2), atol=1e-4) and torch.allclose(y.std(0), torch.ones(2), atol=1e-3)
    learn.fit_one_cycle(1, 1e-2)
    assert np.isfinite(learn.recorder.values[-1][0])


@pytest.mark.parametrize("n_inp", [0, 1.5, True])
def test_recalibrate_bn_refuses_a_bad_input_count(n_inp):
    from torch import nn

    from fastai_freeze.core.bn import recalibrate_bn
    with pytest.raises(ValueError, match="n_inp"):
        recalibrate_bn(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), [torch.randn(4, 2)], n_inp=n_inp)


def test_range_test_on_a_learner_without_an_optimizer_restores_everything(make_learner):
    from fastai_freeze import range_test
    learn = make_learner(bs=4)
    learn.opt = None
    before = _state(learn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt = range_test(learn, RangeTest())
    assert not rt.fell_back and rt.suggestion > 0
    _same(learn, before)
    assert learn.opt is None  # none was there: none is left (the next fit builds its own, as fastai does)


def test_cache_features_passes_the_users_callbacks_to_both_phases(make_learner):
    "The cached warm-up is a fit too: the user's callbacks see its training batches, then the unfrozen fit's."
    from fastai.callback.core import Callback

    class Count(Callback):
        def __init__(self):
            self.train_batches = []

        def before_fit(self):
            self.train_batches.append(0)

        def after_batch(self):
            if self.training:
                self.train_batches[-1] += 1
    learn, spy = make_learner(bs=16), Count()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fine_tune_with(1, cache_features=True, range_test=False, cbs=[spy])
    assert spy.train_batches == [6, 6]  # 96 images at 16: the cached warm-up, then the unfrozen epoch
