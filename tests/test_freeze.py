import pytest
import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import params
from fastai.vision.learner import vision_learner
from torch import nn
from torchvision.models import resnet18

import fastai_freeze  # noqa: F401  (the Learner patches)
from fastai_freeze.core.bn import bn_parameters
from fastai_freeze.demo.data import tensor_dls
from fastai_freeze.freeze import BNSplitter, body_bn_layers, frozen_state


def _dls(bs=8):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    return tensor_dls(x[:24], y[:24], x[24:], y[24:], bs=bs)


def _check_body_frozen_bn(learn, freeze_bn):
    head = learn.opt.param_lists[-1]
    body_bn = {id(p) for _, m in body_bn_layers(learn.model, head) for p in m.parameters(recurse=False)}
    assert body_bn, "the model should have BN layers in its body"
    for pg in learn.opt.param_lists[:-1]:
        for p in pg:
            assert p.requires_grad == (not freeze_bn and id(p) in body_bn)
    assert all(p.requires_grad for p in head)


@pytest.mark.parametrize("train_bn", [True, False])
@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_body_on_vision_learner_ignores_train_bn(train_bn, freeze_bn):
    learn = vision_learner(_dls(), resnet18, pretrained=False, n_out=3, train_bn=train_bn)
    learn.freeze_body(freeze_bn=freeze_bn)
    assert len(learn.opt.param_lists) == 3
    _check_body_frozen_bn(learn, freeze_bn)
    learn.unfreeze()  # fastai's own unfreeze undoes it
    assert all(p.requires_grad for p in learn.model.parameters())


def test_freeze_body_timm_model():
    pytest.importorskip("timm")
    learn = vision_learner(_dls(), "resnet18", pretrained=False, n_out=3)
    learn.freeze_body()  # default: no BN policy on the Learner, so BN parameters train ("freeze non-BN")
    _check_body_frozen_bn(learn, False)
    learn.apply_bn_policy("frozen")
    learn.freeze_body()  # default: as the Learner's policy says
    _check_body_frozen_bn(learn, True)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.body(x))


def _custom_learner(splitter=None):
    kw = {} if splitter is None else {"splitter": splitter}
    return Learner(_dls(), Custom(), loss_func=CrossEntropyLossFlat(), **kw)


def test_custom_splitter_and_head_bn_untouched():
    learn = _custom_learner(lambda m: [params(m.body), params(m.head)])
    state = learn.freeze_body(freeze_bn=True)
    assert state == [(0, 8), (4, 4)]
    assert learn.model.head[2].weight.requires_grad  # the head's BN is the head's
    names = [n for n, _ in body_bn_layers(learn.model, learn.opt.param_lists[-1])]
    assert names == ["body.1", "body.4"]


def test_one_group_model_is_refused_with_a_hint():
    learn = _custom_learner()
    with pytest.raises(ValueError, match="splitter"):
        learn.freeze_body()
    with pytest.raises(ValueError, match="splitter"):
        learn.split_bn()


def test_bn_splitter_gives_bn_its_own_group():
    learn = vision_learner(_dls(), resnet18, pretrained=False, n_out=3)
    n = learn.split_bn()
    assert n == 4
    groups = learn.opt.param_lists
    bn_ids = {id(p) for p in bn_parameters(learn.model[0])}
    assert {id(p) for p in groups[2]} == bn_ids
    assert not any(id(p) in bn_ids for g in groups[:2] for p in g)
    assert sum(len(g) for g in groups) == len(list(learn.model.parameters()))
    learn.freeze_body(freeze_bn=False)
    assert frozen_state(learn) == [(0, len(groups[0])), (0, len(groups[1])), (len(groups[2]), len(groups[2])),
                                   (len(groups[3]), len(groups[3]))]
    learn.opt.set_hyper("lr", [1e-5, 1e-4, 5e-3, 1e-2])  # its own rate
    assert learn.opt.hypers[2]["lr"] == 5e-3
    assert repr(BNSplitter(len)).startswith("BNSplitter")


def test_import_changes_no_fastai_method():
    import subprocess
    import sys
    code = ("import fastai.vision.all as f; names=['fine_tune','lr_find','freeze','unfreeze','freeze_to','fit_one_cycle','fit'];"
            "before={n: getattr(f.Learner, n) for n in names}; import fastai_freeze;"
            "assert all(getattr(f.Learner, n) is before[n] for n in names), 'patched';"
            "assert fastai_freeze.BNPolicy.FOLD.value == 'fold'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


_FASTAI_FREEZE_STATE = """
import json, torch
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18
from fastai_freeze.demo.data import tensor_dls  # data only: the package's patches come with `import fastai_freeze`
def state(train_bn):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,))
    learn = vision_learner(tensor_dls(x[:24], y[:24], x[24:], y[24:], bs=8), resnet18, pretrained=False, n_out=3,
                           train_bn=train_bn)
    out = {}
    for step in ("freeze", "unfreeze"):
        getattr(learn, step)()
        learn.model.train()
        out[step] = [[p.requires_grad for p in g] for g in learn.opt.param_lists]
        out[step + "_modes"] = [m.training for m in learn.model.modules()]
        out[step + "_frozen_idx"] = learn.opt.frozen_idx
    return out
"""


def test_fastai_freeze_behaviour_unchanged_after_import():
    "fastai's freeze/unfreeze give the same flags and modes with and without the package imported."
    import json
    import subprocess
    import sys
    code = _FASTAI_FREEZE_STATE + "print(json.dumps([state(True), state(False)]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    without = json.loads(out.stdout.strip().splitlines()[-1])
    scope: dict = {}
    exec(_FASTAI_FREEZE_STATE, scope)  # here fastai_freeze is imported (module level)
    with_pkg = [scope["state"](True), scope["state"](False)]
    assert with_pkg == without
    assert any(not all(g) for g in without[1]["freeze"])  # the comparison covers a frozen body
