import numpy as np
import pytest
import torch

import fastai_freeze  # noqa: F401
from fastai_freeze.advisor import Advice, logme
from fastai_freeze.demo.data import load_digits_images, tensor_dls
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


def test_small_similar_data_gets_the_head_only(make_learner):
    learn = make_learner(bs=16)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    advice = learn.suggest_strategy()
    assert isinstance(advice, Advice)
    assert advice.n_images == 96 and advice.n_classes == 4 and advice.per_class == 24
    assert advice.situation == "small and similar" and advice.strategy == "features"
    assert advice.logme_gain > 0 and advice.bn_shift < 0.1
    text = str(advice)
    assert "recommended: features" in text and "LogME" in text
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing changed


def test_large_different_data(source_model):
    x, y = load_digits_images(size=32)
    dls = tensor_dls(x[:1300], y[:1300], x[1300:], y[1300:], bs=64)
    learn = new_head_learner(source_model, dls)
    advice = learn.suggest_strategy(max_samples=1300)
    assert advice.per_class >= 100 and advice.situation == "large and different"
    assert advice.strategy in ("fine_tune_with", "scratch")
    assert advice.bn_shift > 0.1
