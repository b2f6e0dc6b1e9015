import numpy as np
import pytest
import torch

import fastai_freeze  # noqa: F401
from fastai_freeze.advisor import Advice, choose_strategy
from fastai_freeze.core import logme
from fastai_freeze.demo.data import load_digits_images, tensor_dls
from fastai_freeze.record import FineTuneRecord
from fastai_freeze.transfer import new_head_learner


def test_logme_prefers_features_that_separate_the_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    good = np.hstack([np.eye(4)[y] * 3 + rng.normal(0, 0.3, (400, 4)), rng.normal(0, 1, (400, 12))])
    bad = rng.normal(0, 1, (400, 16))
    assert logme(good, y) > logme(bad, y) + 1.0
    # wider than long (D > N) works too
    assert np.isfinite(logme(rng.normal(size=(20, 64)), rng.integers(0, 2, 20)))
    with pytest.raises(ValueError, match="N x D"):
        logme(np.zeros(5), np.zeros(5))


@pytest.mark.parametrize("scale", [0.0, 1e-8, 1e8])
def test_logme_is_finite_on_degenerate_features(scale):
    "Constant features, and features of a huge scale that fit the labels exactly (D > N, as a random-weights"
    " MobileOne gives): a finite score, not a division by zero."
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 64)
    f = np.ones((64, 100)) if scale == 0 else rng.normal(size=(64, 200)) * scale
    assert np.isfinite(logme(f, y))
    ok = np.hstack([np.eye(4)[y] * 3 + rng.normal(0, 0.3, (64, 4)), rng.normal(0, 1, (64, 12))])
    assert logme(ok, y) > logme(np.ones((64, 16)), y)


def test_advice_is_deterministic_changes_nothing_and_applies(make_learner):
    learn = make_learner(bs=16)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    rng = torch.get_rng_state()
    a, b = learn.suggest_strategy(), learn.suggest_strategy()
    assert torch.equal(torch.get_rng_state(), rng)  # the random-weights baseline is seeded, the state kept
    assert (a.logme_pretrained, a.logme_random, a.bn.probe.gain) == (b.logme_pretrained, b.logme_random, b.bn.probe.gain)
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert isinstance(a, Advice) and a.n_images == 96 and a.n_classes == 4 and a.per_class == 24
    assert a.strategy == "fine_tune_with" and a.logme_gain > 0 and a.situation.startswith("small")
    text = str(a)
    assert "recommended: fine_tune_with" in text and "LogME" in text and "bn=frozen" in text
    rec = a.apply(learn, epochs=1)
    assert isinstance(rec, FineTuneRecord) and rec.phases[-1].name == "unfrozen"


def test_large_data_the_pretrained_features_do_not_fit_gets_scratch(source_model):
    x, y = load_digits_images(size=32)
    dls = tensor_dls(x[:1300], y[:1300], x[1300:], y[1300:], bs=64)
    learn = new_head_learner(source_model, dls)
    advice = learn.suggest_strategy(max_samples=1300)
    assert advice.per_class >= 100 and advice.logme_gain <= 0
    assert advice.strategy == "scratch" and "from scratch" in advice.reason


def test_the_rule():
    assert choose_strategy(50, 0.5)[0] == "fine_tune_with"
    assert choose_strategy(50, -0.5)[0] == "fine_tune_with"  # small: scratch needs data
    assert choose_strategy(150, -0.01)[0] == "scratch"
    assert choose_strategy(150, 0.01)[0] == "fine_tune_with"
