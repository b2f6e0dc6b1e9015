"""Fault cases, round 3: other Learners and data paths, refusals that change nothing."""
import warnings

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
    cb = FineTuneCallback(unfreeze_epoch=1, range_test=RangeTest(num_it=20, max_passes=None))
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
