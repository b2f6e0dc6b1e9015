import math

import pytest
import torch
from fastai.callback.core import Callback
from fastai.optimizer import SGD

import fastai_freeze  # noqa: F401
from fastai_freeze.diagnostics import WeightDiagnostics, layer_weights, relative_change


class GrowLayer(Callback):
    "After every optimizer step (lr=0, so the step changes nothing), scales one layer's weight by 1.01."
    order = 90

    def __init__(self, name):
        self.layer = name

    def after_step(self):
        with torch.no_grad():
            layer_weights(self.learn.model)[self.layer].mul_(1.01)


class GradSpy(Callback):
    order = 80  # after WeightDiagnostics (70) in before_step

    def __init__(self, name):
        self.layer, self.norms = name, []

    def before_step(self):
        g = layer_weights(self.learn.model)[self.layer].grad
        self.norms.append(float(g.norm()))


def test_relative_change():
    a = torch.ones(3, 3)
    assert relative_change(a * 1.1, a) == pytest.approx(0.1)
    assert relative_change(torch.zeros(2), torch.zeros(2)) == 0.0


def test_weight_change_matches_a_known_change(make_learner):
    learn = make_learner(bs=16, opt_func=SGD)
    learn.unfreeze()
    name = "0.4.0.conv1"  # a body layer
    diag, spy = WeightDiagnostics(), GradSpy(name)
    learn.fit(2, lr=0.0, cbs=[diag, GrowLayer(name), spy])
    steps_per_epoch = len(learn.dls.train)
    assert diag.change[name] == pytest.approx([1.01 ** steps_per_epoch - 1, 1.01 ** (2 * steps_per_epoch) - 1],
                                              rel=1e-4)
    other = "0.4.0.conv2"
    assert diag.change[other] == [0.0, 0.0]
    # the reference is the weights when the callback first saw the model: same as the fit start here
    assert diag.drift[name][-1] == pytest.approx(diag.change[name][-1], rel=1e-6)
    # gradient norms are the ones the optimizer saw
    assert diag.grad_norms[name] == pytest.approx(spy.norms, rel=1e-6)
    assert len(diag.grad_iters) == 2 * steps_per_epoch
    # a second fit: change restarts from the new start, drift keeps the first reference
    learn.fit(1, lr=0.0, cbs=[diag, GrowLayer(name)])
    assert diag.change[name][-1] == pytest.approx(1.01 ** steps_per_epoch - 1, rel=1e-4)
    assert diag.drift[name][-1] == pytest.approx(1.01 ** (3 * steps_per_epoch) - 1, rel=1e-4)
    assert not any(m._forward_hooks or m._backward_hooks for m in learn.model.modules())


def test_summary_per_group_and_plots(make_learner, source_model):
    learn = make_learner(bs=16)
    diag = WeightDiagnostics(reference=source_model)
    learn.fit_one_cycle(1, 1e-3, cbs=diag)
    body = [n for n, g in diag.group_of.items() if g == 0]
    convs = [n for n in body if "conv" in n or n.endswith(".0")]
    bns = [n for n in body if "bn" in n or n.endswith(".1")]
    assert convs and all(diag.change[n] == [0.0] for n in convs)  # frozen
    assert bns and all(diag.change[n][0] > 0 for n in bns)  # BN trains in the frozen body
    groups = diag.group_change()
    assert groups[len(groups) - 1][0] > 0  # the head moved
    # the body's drift from the pretrained source: new_head_learner copied the source exactly
    assert math.isclose(diag.drift["0.4.0.conv1"][-1], 0.0, abs_tol=1e-7)
    line = diag.summary()
    assert line.startswith("group 0: ") and "from the reference" in line
    for fig in (diag.plot_change(), diag.plot_grad_norms(), diag.plot_histograms(cols=5)):
        assert fig.axes
    # frozen layers have no gradient: they are not "vanishing"; a trained layer with a tiny one is
    assert not set(diag.vanishing()) & set(convs)
    assert all(math.isnan(v) for v in diag.grad_norms[convs[0]])
    head = [n for n, g in diag.group_of.items() if g == len(groups) - 1]
    assert not set(diag.vanishing()) & set(head)
    top = max(sum(diag.grad_norms[n]) / len(diag.grad_norms[n]) for n in head)
    diag.grad_norms[head[0]] = [top * 1e-5] * len(diag.grad_norms[head[0]])
    assert diag.vanishing() == [head[0]]


def test_diagnostics_off_during_lr_find(make_learner):
    learn = make_learner(bs=16)
    diag = WeightDiagnostics()
    learn.add_cb(diag)
    learn.lr_find(num_it=10, show_plot=False)
    with pytest.raises(ValueError, match="no fit"):
        diag.summary()
    with pytest.raises(ValueError, match="every"):
        WeightDiagnostics(every=0)
