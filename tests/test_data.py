import pytest
import torch

from fastai_freeze.demo.data import (
    PATTERNS,
    SOURCE_CLASSES,
    TinyResNet,
    load_digits_images,
    make_patterns,
    pretrained_tiny_resnet,
    tensor_dls,
)


def test_patterns_are_deterministic_and_shaped():
    x1, y1 = make_patterns(5, SOURCE_CLASSES, size=16, seed=3)
    x2, y2 = make_patterns(5, SOURCE_CLASSES, size=16, seed=3)
    assert x1.shape == (40, 3, 16, 16) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert sorted(y1.tolist()) == sorted(list(range(8)) * 5)
    assert not torch.equal(make_patterns(5, SOURCE_CLASSES, 16, seed=4)[0], x1)
    with pytest.raises(ValueError, match="unknown pattern"):
        make_patterns(2, ["nope"])
    assert len(set(PATTERNS)) == 12


def test_digits_are_real_data():
    x, y = load_digits_images(size=16, n=100)
    assert x.shape == (100, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert len(load_digits_images()[1].unique()) == 10


def test_pretrained_model_is_cached_and_good(source_model):
    again = pretrained_tiny_resnet(verbose=False)
    for (k, a), (_, b) in zip(source_model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    x, y = make_patterns(20, SOURCE_CLASSES, size=32, seed=99)
    with torch.no_grad():
        acc = (source_model.eval()(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9
    assert isinstance(source_model, TinyResNet)


def test_tensor_dls_checks_batch_size():
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="larger than the training set"):
        tensor_dls(x, y, x, y, bs=64)
    assert tensor_dls(x, y, x, y, bs=4).c == int(y.max()) + 1
