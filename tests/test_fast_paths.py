"""The fast paths: the frozen prefix run as a fused inference copy, cached-feature warm-ups, fused
export and mixed precision; that each gives the same result as the plain path (timings: benchmarks/)."""
import os

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.transforms import Pipeline
from fastai.learner import load_learner
from fastai.vision.augment import Flip
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18

import fastai_freeze  # noqa: F401
from fastai_freeze.callbacks import FrozenPrefix
from fastai_freeze.core.fuse import inference_model
from fastai_freeze.demo.data import tensor_dls
from fastai_freeze.features import cached_warmup, compute_features, random_transforms
from fastai_freeze.freeze import frozen_prefix
from fastai_freeze.transfer import new_head_learner


class HeadInputSpy(Callback):
    "How often the body's own first convolution (not a copy of it) ran in training batches."
    order = 100

    def before_fit(self):
        self.calls, conv, spy = 0, self.learn.model[0][0], self
        self.forward = forward = type(conv).forward

        def counting(m, *args):
            spy.calls += int(m is conv and spy.learn.training)
            return forward(m, *args)
        type(conv).forward = counting

    def after_fit(self):
        type(self.learn.model[0][0]).forward = self.forward


def _fit(make_learner, prefix, policy="frozen", seed=0, epochs=2, unfreeze_after=None):
    learn = make_learner(bs=16, seed=seed)
    learn.apply_bn_policy(policy)
    learn.freeze_body(freeze_bn=True)
    spy = HeadInputSpy()
    cbs = [spy] + ([prefix] if prefix is not None else [])

    class Unfreeze(Callback):  # what gradual unfreezing does between epochs
        order = -20

        def before_epoch(self):
            if unfreeze_after is not None and self.epoch == unfreeze_after:
                self.learn.freeze_to(1)
    torch.manual_seed(seed)
    learn.fit_one_cycle(epochs, 1e-3, cbs=cbs + [Unfreeze()])
    return learn, spy


@pytest.mark.parametrize("policy", ["frozen", "fold"])
def test_frozen_prefix_runs_an_inference_copy_with_the_same_result(make_learner, policy):
    slow, slow_spy = _fit(make_learner, None, policy)
    prefix = FrozenPrefix()
    fast, fast_spy = _fit(make_learner, prefix, policy)
    assert prefix.mode == "inference copy"
    for (k, a), (_, b) in zip(slow.model.state_dict().items(), fast.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(torch.tensor(slow.recorder.values), torch.tensor(fast.recorder.values), rtol=1e-4, atol=1e-5)
    assert fast_spy.calls == 0 and slow_spy.calls > 0  # the copy ran the body, not the model's own modules
    assert not any("forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks for m in fast.model.modules())
    assert torch.is_grad_enabled()
    # a forward hook on the frozen body is a promise to the user: the real modules run, without autograd
    hooked = make_learner(bs=16)
    hooked.freeze_body(freeze_bn=True)
    hooked.apply_bn_policy(policy)
    seen = []
    h = hooked.model[0][0].register_forward_hook(lambda m, a, o: seen.append(o.requires_grad))
    prefix = FrozenPrefix()
    hooked.fit(1, 1e-3, cbs=prefix)
    h.remove()
    assert prefix.mode == "no grad" and seen and not any(seen)


def test_frozen_prefix_follows_unfreezing_and_batch_statistics(make_learner):
    # BN trained with batch statistics in the frozen body: not a fixed function, so no copy, only no-grad
    learn = make_learner(bs=16)
    learn.freeze_body(freeze_bn=True)  # BN params frozen, but BN still in training mode (batch statistics)
    prefix = FrozenPrefix()
    learn.fit(1, 1e-3, cbs=prefix)
    assert prefix.mode == "no grad"
    # groups unfrozen between epochs: the prefix shrinks and the copy is rebuilt; same result as without
    slow, _ = _fit(make_learner, None, epochs=3, unfreeze_after=1)
    fast, _ = _fit(make_learner, FrozenPrefix(), epochs=3, unfreeze_after=1)
    for (k, a), (_, b) in zip(slow.model.state_dict().items(), fast.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


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
    assert random_transforms(learn.dls.train) == ["Flip"]
    with pytest.raises(ValueError, match="random transforms: Flip.*method='squish'"):
        cached_warmup(learn, 1)
    with pytest.raises(ValueError, match="cache_features"):
        make_learner(bs=16).fine_tune_with(1, bn="train", cache_features=True)


def test_fine_tune_with_cached_features(make_learner):
    learn = make_learner(bs=16)
    rec = learn.fine_tune_with(1, cache_features=True)
    assert "cached features" in rec.phases[0].end_reason and rec.phases[0].epochs_run == 1
    assert rec.bn.freeze_bn and rec.phases[-1].trainable_groups == ["T", "T"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in learn.model.modules())


def _folder(tmp_path, n=6):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)  # not square: crop and pad are random
                Image.fromarray(arr).save(tmp_path / split / c / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("method,cacheable", [("squish", True), ("crop", False), ("pad", False)])
def test_fastai_pipelines_deterministic_resize_is_cached_random_is_refused(tmp_path, method, cacheable):
    from fastai.vision.all import ImageDataLoaders, Resize, aug_transforms
    path = _folder(tmp_path)
    dls = ImageDataLoaders.from_folder(path, item_tfms=Resize(16, method=method), bs=4)
    rand = random_transforms(dls.train)
    assert (rand == []) == cacheable
    assert random_transforms(dls.valid) == []  # on the validation set fastai's resize is centred
    learn = vision_learner(dls, resnet18, pretrained=False)
    if cacheable:
        rec = learn.fine_tune_with(1, bn="frozen", cache_features=True)
        assert "cached features" in rec.phases[0].end_reason
        with_aug = ImageDataLoaders.from_folder(path, item_tfms=Resize(16, method="squish"),
                                                batch_tfms=aug_transforms(), bs=4)
        assert random_transforms(with_aug.train) and not random_transforms(with_aug.valid)
    else:  # refused before anything changed: no record, the weights and flags as they were
        weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
        flags = [p.requires_grad for p in learn.model.parameters()]
        with pytest.raises(ValueError, match=f"Resize\\(method='{method}'\\).*method='squish'"):
            learn.fine_tune_with(1, bn="frozen", cache_features=True)
        assert getattr(learn, "fine_tune_record", None) is None
        assert all(torch.equal(v, weights[k]) for k, v in learn.model.state_dict().items())
        assert [p.requires_grad for p in learn.model.parameters()] == flags


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


def _interrupted(make_learner):
    "A Learner keeping a FrozenPrefix whose training epoch a Ctrl-C stopped mid-way (no event ran after it)."
    learn = make_learner(bs=16)
    learn.apply_bn_policy("frozen")
    learn.freeze_body(freeze_bn=True)
    prefix = FrozenPrefix()
    learn.add_cb(prefix)

    class CtrlC(Callback):
        def after_batch(self):
            if self.iter == 1:
                raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1, 1e-3, cbs=CtrlC())
    assert prefix.mode == "inference copy" and any("forward" in m.__dict__ for m in learn.model.modules())
    return learn, prefix


def _own(model, x):
    "The model's output with every module's own forward (a deep copy without the instance patches)."
    import copy
    clean = copy.deepcopy(model)
    for m in clean.modules():
        m.__dict__.pop("forward", None)
    with torch.no_grad():
        return clean(x)


def test_an_interrupted_frozen_prefix_never_answers_stale(make_learner):
    "After a Ctrl-C the patches are still there; validating, predicting or new weights take them off."
    learn, _ = _interrupted(make_learner)
    xb = learn.dls.valid.one_batch()[0]
    learn.validate()  # eval mode: the patch takes itself off
    assert not any("forward" in m.__dict__ for m in learn.model.modules())
    learn, _ = _interrupted(make_learner)
    with torch.no_grad():
        next(learn.model[0].parameters()).mul_(2.0)  # what learn.load does to the body: new weights in place
    learn.model.eval()  # no dropout, to compare; the Learner is still training as far as fastai knows
    assert learn.training
    expected = _own(learn.model, xb)
    with torch.no_grad():
        got = learn.model(xb)
    torch.testing.assert_close(got, expected)
    assert not any("forward" in m.__dict__ for m in learn.model.modules())


def test_an_interrupted_frozen_prefix_pickles_as_the_plain_model(make_learner):
    import pickle
    learn, prefix = _interrupted(make_learner)
    xb = learn.dls.valid.one_batch()[0]
    model = pickle.loads(pickle.dumps(learn.model))  # learn.export pickles the model the same way
    model.eval()
    expected = _own(learn.model.eval(), xb)
    with torch.no_grad():
        torch.testing.assert_close(model(xb), expected)
    kept = pickle.loads(pickle.dumps(prefix))
    assert kept._copy is None and kept._patched == []
