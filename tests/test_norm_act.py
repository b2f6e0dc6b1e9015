"""timm's norm-act layers and the other BatchNorm kinds, on the architectures users bring."""
import copy

import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import (
    FrozenBatchNormAct2d,
    SyncBatchNormAct,
    convert_sync_batchnorm,
    freeze_batch_norm_2d,
)
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fastai_freeze.core import (
    BNAffine,
    UnknownBNLayerError,
    bn_layers,
    bn_shift,
    fold_bn,
    fuse_conv_bn,
    recalibrate_bn,
    register_bn_layer,
)
from fastai_freeze.core.fuse import _CONVS

ARCHS = [("timm", n) for n in ("resnet18", "resnet50", "efficientnet_b0", "tf_efficientnet_lite0",
                               "mobilenetv3_large_100", "regnety_002", "densenet121")] + \
        [("torchvision", n) for n in ("resnet18", "mobilenet_v3_small", "efficientnet_b0")]


def build(lib, name):
    torch.manual_seed(0)
    if lib == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10)
    return torchvision.models.get_model(name, num_classes=10)


def randomize(model, seed=0):
    "Non-trivial statistics and affine parameters in every BN layer (buffers too, for frozen kinds)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in bn_layers(model):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def runtime_conv_bn_pairs(model, x):
    "(conv, bn) names where, in a real forward pass, a BN layer's input is the output of a conv."
    names = {m: n for n, m in model.named_modules()}
    outputs, pairs, handles = {}, [], []
    for m in model.modules():
        if isinstance(m, _CONVS):
            handles.append(m.register_forward_hook(lambda mod, a, o: outputs.__setitem__(id(o), (mod, o))))
    for _, m in bn_layers(model):
        def pre(mod, a):
            hit = outputs.get(id(a[0]))
            if hit is not None and hit[1] is a[0]:
                pairs.append((names[hit[0]], names[mod]))
        handles.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return set(pairs)


@pytest.mark.parametrize("lib,name", ARCHS, ids=[f"{a}-{b}" for a, b in ARCHS])
def test_fold_and_fuse_are_exact_and_fuse_every_conv_bn_pair(lib, name):
    model = randomize(build(lib, name))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        folded = copy.deepcopy(model)
        report = fold_bn(folded)
        assert report.count == len(bn_layers(model)) > 0 and not bn_layers(folded, include_folded=False)
        assert rel_err(folded(x), ref) < 1e-5
        fused, freport = fuse_conv_bn(model)
        assert rel_err(fused(x), ref) < 1e-5
        assert rel_err(fuse_conv_bn(model, channels_last=True)[0](x), ref) < 1e-5
    expected = runtime_conv_bn_pairs(model, x)
    assert expected and expected <= set(freport.fused), sorted(expected - set(freport.fused))[:3]
    assert freport.method == "fx"


def test_norm_act_fold_keeps_the_activation_and_fuse_keeps_it_after_the_conv():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.SiLU)))
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    folded = copy.deepcopy(model)
    fold_bn(folded)
    assert isinstance(folded[1], BNAffine) and isinstance(folded[1].act, nn.SiLU)
    torch.testing.assert_close(folded(x), ref)
    fused, report = fuse_conv_bn(model)
    assert report.fused == [("0", "1")] and isinstance(fused[1], nn.SiLU)
    torch.testing.assert_close(fused(x), ref)


def _frozen_twins():
    "The same random ResNet with trainable BN, timm's frozen norm-act kinds, torchvision's frozen BN."
    base = randomize(build("timm", "tf_efficientnet_lite0"))
    timm_frozen = freeze_batch_norm_2d(copy.deepcopy(base))
    tv = randomize(torchvision.models.resnet18(num_classes=10))
    tv_frozen = torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d)
    tv_frozen.load_state_dict({k: v for k, v in tv.state_dict().items() if "num_batches" not in k})
    return [(base, timm_frozen.eval(), FrozenBatchNormAct2d), (tv, tv_frozen.eval(), FrozenBatchNorm2d)]


def test_frozen_kinds_fold_fuse_recalibrate_and_shift_like_their_trainable_twins():
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    batches = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for live, frozen, kind in _frozen_twins():
        assert any(isinstance(m, kind) for _, m in bn_layers(frozen))
        ref = live(x)
        with torch.no_grad():
            f = copy.deepcopy(frozen)
            fold_bn(f)
            assert rel_err(f(x), ref) < 1e-5
            assert rel_err(fuse_conv_bn(frozen)[0](x), ref) < 1e-5
        assert bn_shift(live, batches).per_layer == pytest.approx(bn_shift(frozen, batches).per_layer, rel=1e-5)
        recalibrate_bn(live, batches)
        recalibrate_bn(frozen, batches)
        for (n, a), (_, b) in zip(bn_layers(live), bn_layers(frozen)):
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6, msg=n)
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6, msg=n)
        assert rel_err(frozen(x), live(x)) < 1e-4


def test_sync_norm_act_folds_and_fuses_exactly():
    model = convert_sync_batchnorm(randomize(build("timm", "efficientnet_b0")))
    assert any(isinstance(m, SyncBatchNormAct) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.eval()(x)
        folded = copy.deepcopy(model)
        fold_bn(folded)
        assert rel_err(folded(x), ref) < 1e-5
        fused, report = fuse_conv_bn(model)
        assert rel_err(fused(x), ref) < 1e-5 and len(report.fused) == 49


def test_recalibrating_a_norm_act_layer_pools_its_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 2, 1), BatchNormAct2d(2))
    xs = [torch.randn(5, 3, 6, 6) * 2 + 1 for _ in range(3)]
    recalibrate_bn(model, xs)
    with torch.no_grad():
        h = torch.cat([model[0](x) for x in xs])
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(model[1].running_var, h.var((0, 2, 3)), rtol=1e-5, atol=1e-6)


class SplitBN(nn.BatchNorm2d):
    "A BN subclass with a forward of its own (it also halves its output)."

    def forward(self, x):
        return super().forward(x) * 0.5


def test_an_unknown_bn_subclass_is_refused_by_name_and_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SplitBN(4)).eval()
    before = copy.deepcopy(model.state_dict())
    x = [torch.randn(2, 3, 8, 8)]
    for f in (fold_bn, lambda m: fuse_conv_bn(m), lambda m: recalibrate_bn(m, x), lambda m: bn_shift(m, x)):
        with pytest.raises(UnknownBNLayerError, match="SplitBN.*at '1'.*register_bn_layer"):
            f(model)
    assert type(model[1]) is SplitBN
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a subclass that keeps torch's forward is a BatchNorm like any other
    plain = type("PlainSub", (nn.BatchNorm2d,), {})
    assert fold_bn(nn.Sequential(plain(3))).count == 1


def test_registered_subclass_is_handled_with_its_post_modules():
    class ScaleAct(nn.BatchNorm2d):
        def __init__(self, n):
            super().__init__(n)
            self.act = nn.Hardtanh(-0.5, 0.5)

        def forward(self, x):
            return self.act(super().forward(x))

    register_bn_layer(ScaleAct, post=("act",))
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), ScaleAct(4)))
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    folded = copy.deepcopy(model)
    fold_bn(folded)
    torch.testing.assert_close(folded(x), ref)
    torch.testing.assert_close(fuse_conv_bn(model)[0](x), ref)


@pytest.mark.parametrize("policy", ["train", "frozen", "fold", "adapt", "auto"])
def test_vision_learner_with_a_timm_name_end_to_end(target_data, tmp_path, policy):
    "timm name through fastai's vision_learner, fine_tune_with under each policy, export, load_learner."
    from fastai.learner import load_learner
    from fastai.vision.learner import vision_learner

    from fastai_freeze.demo.data import tensor_dls
    xt, yt, xv, yv = (t.clone() for t in target_data)
    dls = tensor_dls(xt, yt, xv, yv, bs=16)
    torch.manual_seed(0)
    learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=False, n_out=4)
    randomize(learn.model[0]).train()
    n_body_bn = len(bn_layers(learn.model[0]))
    with learn.no_bar(), learn.no_logging():
        rec = learn.fine_tune_with(1, bn=policy)
    body_bn = bn_layers(learn.model[0])
    assert len(body_bn) == n_body_bn == 49
    folded = rec.bn.policy.value in ("fold", "adapt")
    assert all(isinstance(m, BNAffine) == folded for _, m in body_bn)
    if folded:  # the activation of each norm-act layer is kept by its folded layer
        assert sum(isinstance(getattr(m, "act", None), nn.ReLU6) for _, m in body_bn) == 33
    assert all(p.requires_grad for p in learn.model.parameters())
    learn.export(tmp_path / "export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    with loaded.no_bar():
        preds, _ = loaded.get_preds(dl=learn.dls.valid)
    with learn.no_bar():
        expected, _ = learn.get_preds(dl=learn.dls.valid)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(preds, expected)
