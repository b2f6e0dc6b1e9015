import os

import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.transforms import Pipeline
from fastai.learner import load_learner
from fastai.vision.augment import Flip

import fastai_freeze  # noqa: F401
from fastai_freeze.demo.data import tensor_dls
from fastai_freeze.features import augmentations, cached_warmup, compute_features
from fastai_freeze.freeze import FrozenBodyShortcut, frozen_prefix
from fastai_freeze.core.fuse import inference_model
from fastai_freeze.transfer import new_head_learner


class HeadInputSpy(Callback):
    "Whether the head's input carried an autograd graph, per training batch."
    order = 100

    def before_fit(self):
        self.graph = []
        self.h = self.learn.model[1].register_forward_pre_hook(
            lambda m, a: self.graph.append(a[0].grad_fn is not None) if self.learn.training else None)

    def after_fit(self):
        self.h.remove()


def _fit(make_learner, shortcut, seed=0):
    learn = make_learner(bs=16, seed=seed)
    learn.apply_bn_policy("frozen")
    learn.freeze_body(freeze_bn=True)
    spy = HeadInputSpy()
    cbs = [spy] + ([FrozenBodyShortcut()] if shortcut else [])
    torch.manual_seed(seed)
    learn.fit_one_cycle(2, 1e-3, cbs=cbs)
    return learn, spy


def test_shortcut_gives_identical_results_without_a_graph(make_learner):
    slow, slow_spy = _fit(make_learner, False)
    fast, fast_spy = _fit(make_learner, True)
    for (k, a), (_, b) in zip(slow.model.state_dict().items(), fast.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert slow.recorder.values == fast.recorder.values
    assert fast_spy.graph and not any(fast_spy.graph)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in fast.model.modules())
    assert torch.is_grad_enabled()


def test_frozen_prefix_follows_the_freeze_state(make_learner):
    learn = make_learner(bs=16)
    learn.freeze_body(freeze_bn=True)
    prefix = frozen_prefix(learn.model)
    assert prefix[0] is learn.model[0]  # the body, then the head's parameter-free pooling layers
    assert prefix[1:] and all(not list(m.parameters()) for m in prefix[1:])
    learn.freeze_body(freeze_bn=False)  # BN trains: nothing of the body may skip autograd
    assert learn.model[0][0] in frozen_prefix(learn.model) and learn.model[0] not in frozen_prefix(learn.model)
    learn.unfreeze()
    assert frozen_prefix(learn.model) == []
    assert frozen_prefix(torch.nn.Linear(2, 2)) == []


def test_cached_warmup_matches_the_normal_warmup(make_learner, target_data, source_model):
    xt, yt, xv, yv = target_data

    def learner():
        dls = tensor_dls(xt, yt, xv, yv, bs=16)
        dls.train.shuffle = False  # the same batch order on both paths
        torch.manual_seed(0)
        learn = new_head_learner(source_model, dls)
        learn.apply_bn_policy("frozen")
        learn.freeze_body(freeze_bn=True)
        return learn

    normal = learner()
    torch.manual_seed(1)
    normal.fit_one_cycle(2, 1e-3)
    cached = learner()
    torch.manual_seed(1)
    cw = cached_warmup(cached, 2, 1e-3)
    assert not cw.on_disk and cw.epochs == 2
    for (k, a), (_, b) in zip(normal.model.state_dict().items(), cached.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(torch.tensor(cw.values)[:, 1], torch.tensor(normal.recorder.values)[:, 1],
                               rtol=1e-4, atol=1e-5)


def test_memory_budget_spills_to_disk_and_cleans_up(make_learner, tmp_path):
    learn = make_learner(bs=16)
    cache = compute_features(learn.model[0], learn.dls.train, memory_budget=0, tmp_dir=str(tmp_path))
    assert cache.on_disk and any(tmp_path.iterdir())
    inmem = compute_features(learn.model[0], learn.dls.train)
    assert torch.equal(torch.as_tensor(cache.x), inmem.x) and torch.equal(cache.y, inmem.y)
    cache.close()
    assert not any(tmp_path.iterdir())
    learn.apply_bn_policy("frozen")
    learn.freeze_body(freeze_bn=True)
    cw = cached_warmup(learn, 1, 1e-3, memory_budget=0, tmp_dir=str(tmp_path))
    assert cw.on_disk and not any(tmp_path.iterdir())

    class Boom(Callback):
        def before_batch(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        cached_warmup(learn, 1, 1e-3, memory_budget=0, tmp_dir=str(tmp_path), cbs=Boom())
    assert not os.listdir(tmp_path)


def test_cached_warmup_refuses_what_it_cannot_cache(make_learner):
    learn = make_learner(bs=16)
    with pytest.raises(ValueError, match="body parameters are trainable"):
        cached_warmup(learn, 1)  # BN trainable in the frozen body
    learn.freeze_body(freeze_bn=True)
    learn.dls.train.after_batch = Pipeline([Flip()])
    assert augmentations(learn.dls.train) == ["Flip"]
    with pytest.raises(ValueError, match="augmented .*Flip"):
        cached_warmup(learn, 1)
    with pytest.raises(ValueError, match="cache_features"):
        make_learner(bs=16).fine_tune_with(1, bn="train", cache_features=True)


def test_fine_tune_with_cached_features(make_learner):
    learn = make_learner(bs=16)
    rec = learn.fine_tune_with(1, cache_features=True, num_it=30)
    assert "cached features" in rec.phases[0].end_reason and rec.phases[0].epochs_run == 1
    assert rec.bn.freeze_bn and rec.phases[-1].trainable_groups == ["T", "T"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in learn.model.modules())


def test_fused_inference_and_export(make_learner, tmp_path):
    learn = make_learner(bs=16)
    learn.apply_bn_policy("fold")
    learn.fit_one_cycle(1, 1e-3)
    x = torch.randn(8, 3, 32, 32)
    model = learn.model.eval()
    with torch.no_grad():
        ref = model(x)
    for cl in (False, True):
        fused, report = inference_model(model, channels_last=cl)
        with torch.inference_mode():
            out = fused(x)
        assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5
        assert report.fused and report.unfused == ['1.2', '1.6']  # the head's BatchNorm1d follow no conv
    learn.path = tmp_path
    learn.export_fused("fused.pkl")
    assert learn.model is model  # the Learner keeps its training model and optimizer
    assert {id(p) for pg in learn.opt.param_lists for p in pg} == {id(p) for p in model.parameters()}
    loaded = load_learner(tmp_path / "fused.pkl")
    with torch.no_grad():
        assert ((loaded.model(x) - ref).abs().max() / ref.abs().max()) < 1e-5
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision is checked on a CUDA device")
def test_mixed_precision_on_gpu():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    assert subprocess.run([sys.executable, str(script)]).returncode == 0
