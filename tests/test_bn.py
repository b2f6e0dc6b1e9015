import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.testing import assert_close

from fastai_freeze.core.bn import (
    BNAffine,
    bn_layers,
    bn_shift,
    fold_bn,
    freeze_bn_layers,
    recalibrate_bn,
    set_bn_eval_mode,
)
from fastai_freeze.core.fuse import fuse_conv_bn


def _randomize_stats(model, shape, steps=3, seed=0):
    "Give every BN layer non-trivial running statistics and affine parameters."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in bn_layers(model):
            if getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
        model.train()
        for _ in range(steps):
            model(torch.randn(*shape, generator=g) * 2 + 0.3)
    return model.eval()


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                                        nn.BatchNorm2d(8, affine=False)),
                                     "b": nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))})
        self.vol = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))

    def forward(self, x):
        x = self.stem(x)
        x = self.branch["a"](x) + self.branch["b"](x)
        v = self.vol(x[:, :1, None])[:, :, 0]
        return self.head(x + v.mean(1, keepdim=True))


@pytest.mark.parametrize("make,shape", [
    (lambda: torchvision.models.resnet18(num_classes=10), (4, 3, 64, 64)),
    (Nested, (4, 3, 8, 8)),
])
def test_fold_matches_eval_model(make, shape):
    torch.manual_seed(0)
    model = _randomize_stats(make(), shape)
    x = torch.randn(*shape)
    ref = model(x)
    folded = copy.deepcopy(model)
    report = fold_bn(folded)
    assert report.count == len(bn_layers(model)) > 0
    assert not bn_layers(folded, include_folded=False)
    assert all(isinstance(folded.get_submodule(n), BNAffine) for n in report.folded)
    assert _rel_err(folded(x), ref) < 1e-5
    folded.train()  # an affine layer does not depend on the batch: same output in train mode
    assert _rel_err(folded(x), ref) < 1e-5


def test_fold_formula_and_syncbn():
    bn = nn.SyncBatchNorm(5, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    for pre in (True, False):
        aff = BNAffine.from_bn(bn, preconditioned=pre)
        assert_close(aff.effective_weight.detach(), scale.detach())
        assert_close(aff.bias.detach(), (bn.bias - bn.running_mean * scale).detach())
    assert_close(aff.weight.detach(), scale.detach())  # preconditioned=False: gamma' is the parameter
    pre = BNAffine.from_bn(bn)
    assert_close(pre.weight.detach(), bn.weight.detach())  # preconditioned: gamma is, times a fixed buffer
    ref = nn.BatchNorm2d(5, eps=1e-3)
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(3, 5, 4, 4)
    assert _rel_err(aff(x), ref.eval()(x)) < 1e-6
    assert "SyncBatchNorm" in repr(aff)


def test_fold_refuses_untracked_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_bn(model)
    report = fold_bn(model, strict=False)
    assert report.count == 0 and "1" in report.skipped
    assert isinstance(model[1], nn.BatchNorm2d)


def test_fold_without_bn_is_an_empty_report():
    report = fold_bn(nn.Sequential(nn.Linear(3, 3)))
    assert report.count == 0 and "folded 0" in str(report)
    with pytest.raises(TypeError):
        fold_bn("not a model")


def test_affine_shape_error():
    with pytest.raises(ValueError, match=r"expects input of shape"):
        BNAffine(4)(torch.randn(2, 3))


def test_recalibrate_is_exact_pooled_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
    model.eval()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    # batches of unequal size: a per-batch average would differ from the pooled statistics
    batches = [torch.randn(n, 3, 6, 6) * 3 + 1 for n in (5, 2, 9)]
    captured = {0: [], 1: []}
    # reference: the inputs each BN sees in a train-mode pass (batch statistics upstream), dropout off
    ref = copy.deepcopy(model)
    for i, m in enumerate([ref[1], ref[5]]):
        m.register_forward_pre_hook(lambda mod, inp, i=i: captured[i].append(inp[0].detach()))
    ref.eval()
    ref[1].train()
    ref[5].train()
    with torch.no_grad():
        for b in batches:
            ref(b)
    report = recalibrate_bn(model, batches)
    assert report.batches == 3 and report.samples == 16
    for i, m in enumerate([model[1], model[5]]):
        allx = torch.cat([c.transpose(0, 1).reshape(c.shape[1], -1) for c in captured[i]], 1).double()
        assert_close(m.running_mean, allx.mean(1).float(), rtol=1e-5, atol=1e-6)
        assert_close(m.running_var, allx.var(1, unbiased=True).float(), rtol=1e-5, atol=1e-6)
    for k, v in model.named_parameters():
        assert torch.equal(v, weights[k]) and v.grad is None
    assert not model.training and not any(m.training for m in model.modules())


def test_recalibrate_feeds_images_channels_last_on_cpu_and_leaves_the_batches_alone():
    # the layout that makes the statistics pass cost about one eval pass on a CPU (benchmarks/adabn.py)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2), nn.BatchNorm1d(2))
    seen = []
    model[0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    batches = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    kept = [b.clone() for b in batches]
    report = recalibrate_bn(model, (b for b in batches))  # any iterable: the layout trial gives its batch back
    assert report.batches == 2 and report.samples == 8
    assert seen == [True, True, True]  # a one-image trial, then the two batches
    assert all(b.is_contiguous() and torch.equal(b, k) for b, k in zip(batches, kept))


class _ViewHead(nn.Module):
    "A user's forward with `view` on a feature map: it needs contiguous activations."
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(64, 2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def test_recalibrate_keeps_contiguous_batches_where_the_model_needs_them():
    torch.manual_seed(0)
    model = _ViewHead().eval()
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    with pytest.raises(RuntimeError, match="view"):
        model(batches[0].contiguous(memory_format=torch.channels_last))
    report = recalibrate_bn(model, batches)
    assert report.batches == 3 and report.samples == 12
    with torch.no_grad():
        f = torch.cat([model.conv(b) for b in batches]).transpose(0, 1).reshape(4, -1).double()
    assert_close(model.bn.running_mean, f.mean(1).float(), rtol=1e-5, atol=1e-6)
    assert_close(model.bn.running_var, f.var(1).float(), rtol=1e-5, atol=1e-6)
    assert not model.training


def test_recalibrate_restores_modes_and_momentum_on_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model.train()
    before = model[1].running_mean.clone()

    def bad():
        yield torch.randn(2, 3, 4, 4)
        raise RuntimeError("loader broke")
    with pytest.raises(RuntimeError):
        recalibrate_bn(model, bad())
    assert model.training and model[1].training and model[1].momentum == 0.1
    assert torch.equal(model[1].running_mean, before)
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(nn.Linear(2, 2), [torch.randn(2, 2)])


def test_freeze_bn_and_set_eval():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    assert freeze_bn_layers(model) == 1
    assert not model[1].training and not any(p.requires_grad for p in model[1].parameters())
    assert model[0].training and model[0].weight.requires_grad
    model.train()
    assert set_bn_eval_mode(model) == 1 and not model[1].training


@pytest.mark.parametrize("fold_first", [False, True])
def test_fuse_matches_and_leaves_original(fold_first):
    torch.manual_seed(0)
    model = _randomize_stats(torchvision.models.resnet18(num_classes=5), (4, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    if fold_first:
        fold_bn(model)
    state = copy.deepcopy(model.state_dict())
    for cl in (False, True):
        fused, report = fuse_conv_bn(model, channels_last=cl)
        assert len(report.fused) == 20 and not report.unfused
        assert not any(isinstance(m, (nn.BatchNorm2d, BNAffine)) for m in fused.modules())
        with torch.inference_mode():
            assert _rel_err(fused(x), ref) < 1e-5
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_fuse_untraceable_model_falls_back_to_sequential_pairs():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            return self.seq(x) if x.sum() > -1e9 else x  # data-dependent: fx cannot trace it
    m = _randomize_stats(Dyn(), (4, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    fused, report = fuse_conv_bn(m)
    assert report.fused == [("seq.0", "seq.1")]
    assert _rel_err(fused(x), m(x)) < 1e-5


def test_bn_shift_measures_distance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    data = [torch.randn(64, 3, 4, 4) for _ in range(4)]
    recalibrate_bn(model, data)
    same = bn_shift(model, data).mean_kl
    far = bn_shift(model, [d * 5 + 3 for d in data]).mean_kl
    assert same < 1e-3 < 1.0 < far
