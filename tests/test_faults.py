"""Fault injection: bad input, interrupts and faults against the public API.

Each case asserts the promise exactly: a clear error before anything changes, or, after an
interrupt or a fault, the Learner, the modules and the files as they must be (nothing left behind:
no hook, no patched forward, no callback of the library, no frozen flag or BN mode it set, grad
mode on).
"""
import copy
import math
import threading
import warnings
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback
from torch import nn

import fastai_freeze  # noqa: F401
from fastai_freeze import BNPolicyCallback, FineTuneCallback, Gradual, RangeTest, Stop, Unfreeze, range_test
from fastai_freeze.cache import cached_file
from fastai_freeze.core import (
    BNAffine,
    bn_layers,
    bn_shift,
    fold_bn,
    fuse_conv_bn,
    inference_model,
    recalibrate_bn,
)
from fastai_freeze.core.logme import probe_bn_statistics
from fastai_freeze.features import compute_features


# ------------------------------------------------------------------ helpers ---------------------
def snapshot(learn):
    "What must not change when a call is refused."
    return dict(
        state={k: v.detach().clone() for k, v in learn.model.state_dict().items()},
        modules=[type(m) for m in learn.model.modules()],
        grad=[p.requires_grad for p in learn.model.parameters()],
        modes=[m.training for m in learn.model.modules()],
        cbs=[type(c) for c in learn.cbs],
        groups=len(learn.opt.param_lists) if learn.opt is not None else None,
        splitter=learn.splitter, record=getattr(learn, "fine_tune_record", None),
    )


def assert_unchanged(learn, before):
    after = snapshot(learn)
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for key in ("modules", "grad", "modes", "cbs", "groups", "splitter"):
        assert before[key] == after[key], key
    assert after["record"] is before["record"]


def assert_clean(learn):
    "Nothing of the library is left on the Learner or in the model; autograd is on."
    assert torch.is_grad_enabled()
    assert not [c for c in learn.cbs if type(c).__module__.startswith("fastai_freeze")]
    for m in learn.model.modules():
        assert "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks, type(m)
    mode = learn.model.training
    assert {m.training for m in learn.model.modules()} == {mode}


# ------------------------------------------------------------------ bad arguments ---------------
BAD_FINE_TUNE_WITH = [
    (dict(epochs=0), ValueError, "epochs"), (dict(epochs=-1), ValueError, "epochs"),
    (dict(epochs=2.5), ValueError, "epochs"), (dict(epochs=math.nan), ValueError, "epochs"),
    (dict(epochs="3"), ValueError, "epochs"), (dict(base_lr=0), ValueError, "base_lr"),
    (dict(base_lr=-1e-3), ValueError, "base_lr"), (dict(base_lr=math.nan), ValueError, "base_lr"),
    (dict(base_lr=math.inf), ValueError, "base_lr"), (dict(freeze_epochs=-1), ValueError, "freeze_epochs"),
    (dict(freeze_epochs=1.5), ValueError, "freeze_epochs"), (dict(bn="folded"), ValueError, "unknown BN policy"),
    (dict(bn="train", freeze_bn=True), ValueError, "freeze_bn=True"),
    (dict(bn="frozen", freeze_bn=False), ValueError, "freeze_bn=False"),
    (dict(freeze_bn="yes"), TypeError, "freeze_bn"), (dict(unfreeze="sometimes"), ValueError, "unfreeze"),
    (dict(unfreeze="plateau", freeze_epochs=0), ValueError, "cap"), (dict(lr_mult=0.5), ValueError, "lr_mult"),
    (dict(lr_mult=math.nan), ValueError, "lr_mult"), (dict(range_test=5), TypeError, "RangeTest"),
    (dict(fallback_lr=0), ValueError, "fallback_lr"), (dict(fallback_lr=math.nan), ValueError, "fallback_lr"),
    (dict(target=0.9), ValueError, "monitor"), (dict(monitor="nope"), ValueError, "no value 'nope'"),
    (dict(unfreeze=Unfreeze(plateau=True, monitor="nope")), ValueError, "no value 'nope'"),
    (dict(monitor="accuracy", target=math.nan), ValueError, "target"), (dict(gradual=0.5), ValueError, "gradual"),
    (dict(gradual="x"), ValueError, "gradual"), (dict(lr_max=1e-3), ValueError, "lr_max"),
    (dict(pct_start=1.5), ValueError, "pct_start"), (dict(pct_start=0), ValueError, "pct_start"),
    (dict(div=0), ValueError, "div"), (dict(div_final=-1), ValueError, "div_final"),
    (dict(nonsense=1), TypeError, "unexpected arguments"),
    (dict(bn="train", cache_features=True), ValueError, "cache_features"),
    (dict(cache_features=True, freeze_bn=False), ValueError, "cache_features"),
    (dict(cache_features=True, unfreeze="plateau"), ValueError, "cache_features"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_FINE_TUNE_WITH, ids=[str(k) for k, _, _ in BAD_FINE_TUNE_WITH])
@pytest.mark.parametrize("policy_on_learner", [None, "fold"])
def test_fine_tune_with_refuses_bad_arguments_before_any_change(make_learner, kwargs, exc, match, policy_on_learner):
    learn = make_learner(bs=16)
    if policy_on_learner:
        learn.apply_bn_policy(policy_on_learner)
    before = snapshot(learn)
    kwargs = dict(kwargs)
    epochs = kwargs.pop("epochs", 1)
    with pytest.raises(exc, match=match):
        learn.fine_tune_with(epochs, **kwargs)
    assert_unchanged(learn, before)


BAD_CONFIGS = [
    (lambda: Unfreeze(patience=0), "patience"), (lambda: Unfreeze(min_delta=-1), "min_delta"),
    (lambda: Unfreeze(monitor=""), "monitor"), (lambda: RangeTest(num_it=5), "at least 20"),
    (lambda: RangeTest(held_out_it=10), "at least 20"), (lambda: RangeTest(start_lr=1, end_lr=1e-3), "start_lr"),
    (lambda: RangeTest(suggest="vally"), "vally"), (lambda: RangeTest(max_passes=0), "max_passes"),
    (lambda: RangeTest(held_out=0), "held_out"), (lambda: RangeTest(small_data="x"), "small_data"), (lambda: FineTuneCallback(freeze_epochs=0), "freeze_epochs"),
    (lambda: FineTuneCallback(lr_mult=0), "lr_mult"), (lambda: FineTuneCallback(pct_start=2), "pct_start"),
    (lambda: FineTuneCallback(bn="train", freeze_bn=True), "freeze_bn"), (lambda: BNPolicyCallback("nope"), "unknown"),
    (lambda: FineTuneCallback(fallback_lr=-1), "fallback_lr"), (lambda: Gradual(1.0), "ratio > 1"),
    (lambda: Gradual("x"), "gradual"), (lambda: Stop(target=0.9), "monitor"), (lambda: Stop(keep_best=1), "keep_best"),
    (lambda: BNPolicyCallback("auto", freeze_bn="yes"), "freeze_bn"),
]


@pytest.mark.parametrize("make,match", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_configuration_objects_refuse_bad_values(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_range_test_refuses_bad_arguments_before_running(make_learner):
    learn = make_learner(bs=16)
    before = snapshot(learn)
    for kwargs in (dict(fallback_lr=-1), dict(lr_mult=0.5), dict(config="valley")):
        with pytest.raises((ValueError, TypeError)):
            range_test(learn, **kwargs)
    assert_unchanged(learn, before)


# ------------------------------------------------------------------ interrupts ------------------
class Interrupt(Callback):
    """Raises `exc` inside the body's forward (where the frozen body runs without autograd) at the
    `at`-th training batch of the phase `where` ('warm-up', 'range test' or 'unfrozen')."""
    order = 100

    def __init__(self, where: str, exc=KeyboardInterrupt, at: int = 1):
        self.where, self.exc, self.at, self.n, self.armed, self._h = where, exc, at, 0, False, None

    def before_fit(self):
        if self._h is None:
            conv = next(m for m in self.learn.model[0].modules() if isinstance(m, nn.Conv2d))
            self._h = conv.register_forward_pre_hook(self._boom)

    def _boom(self, m, a):
        if self.armed:
            # fastai runs no after_fit after an error: the test's own hook goes before it raises
            self.armed = False
            self._h.remove()
            self._h = None
            raise self.exc("injected")

    def before_batch(self):
        phase = ("range test" if hasattr(self.learn, "lr_finder") else
                 "warm-up" if self.learn.opt.frozen_idx else "unfrozen")
        if self.training and phase == self.where:
            self.n += 1
            self.armed = self.n == self.at

    def after_fit(self):
        if self._h is not None and not hasattr(self.learn, "lr_finder"):
            self._h.remove()
            self._h = None


POLICIES = ["train", "frozen", "fold", "adapt", "auto"]
PHASES = ["warm-up", "range test", "unfrozen"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_an_interrupt_anywhere_in_fine_tune_with_leaves_nothing_behind(make_learner, policy, phase, exc):
    learn = make_learner(bs=16)
    flags = {p: p.requires_grad for p in learn.model.parameters()}
    rt = RangeTest(num_it=20, max_passes=None)  # a range test on the training curve, interrupted at batch 1
    interrupt = Interrupt(phase, exc)
    learn.add_cb(interrupt)  # on the Learner, so that it sees the range tests' fits as well
    try:
        with pytest.raises(exc, match="injected"):
            learn.fine_tune_with(1, bn=policy, range_test=rt)
    finally:
        learn.remove_cb(interrupt)
    assert_clean(learn)
    rec = learn.fine_tune_record
    last = rec.phases[-1] if rec.phases else None
    if phase == "warm-up":  # stopped in the warm-up: the freeze state from before the run is back
        assert last.name == "warm-up"
        assert all(p.requires_grad == flags[p] for p in learn.model.parameters() if p in flags)
        assert any("given back" in n for n in rec.notes)
    else:  # the range test restored the unfrozen model it ran on; the unfrozen phase leaves it unfrozen
        assert all(p.requires_grad for p in learn.model.parameters())
    if policy == "frozen":  # the flags the policy set for the warm-up are given back
        body_bn = {p for _, m in bn_layers(learn.model[0]) for p in m.parameters()}
        if phase == "warm-up":
            assert all(p.requires_grad == flags[p] for p in body_bn)
    # and the Learner still trains normally afterwards
    learn.fit(1, 1e-4)
    assert len(learn.recorder.values) == 1 and math.isfinite(learn.recorder.values[-1][0])


@pytest.mark.parametrize("start", ["frozen", "unfrozen"])
@pytest.mark.parametrize("dropin", [False, True])
def test_an_interrupt_in_the_warm_up_gives_the_freeze_state_back(make_learner, start, dropin):
    learn = make_learner(bs=16)
    if start == "unfrozen":
        learn.unfreeze()
    else:
        learn.freeze()
    flags = {p: p.requires_grad for p in learn.model.parameters()}
    idx = learn.opt.frozen_idx
    interrupt = Interrupt("warm-up", at=2)
    with pytest.raises(KeyboardInterrupt, match="injected"):
        if dropin:
            learn.fit_one_cycle(3, 1e-3, cbs=[FineTuneCallback(freeze_epochs=2, bn="frozen"), interrupt])
        else:
            learn.fine_tune_with(1, bn="frozen", cbs=[interrupt])
    assert_clean(learn)
    assert learn.opt.frozen_idx == idx
    assert {p: p.requires_grad for p in learn.model.parameters()} == flags
    if not dropin:
        assert any("given back" in n for n in learn.fine_tune_record.notes)


@pytest.mark.parametrize("policy", ["frozen", "fold", "train"])
def test_an_interrupt_in_a_dropin_fit_leaves_nothing_behind(make_learner, policy):
    learn = make_learner(bs=16)
    cbs = [FineTuneCallback(bn=policy, range_test=RangeTest(num_it=20, max_passes=None)), Interrupt("unfrozen")]
    with pytest.raises(KeyboardInterrupt):
        learn.fit_one_cycle(3, 1e-3, cbs=cbs)
    assert_clean(learn)
    assert all(p.requires_grad for p in learn.model.parameters())


def _interrupting(n):
    "An iterable of batches that raises KeyboardInterrupt at batch `n`."
    def gen():
        for i in range(10):
            if i == n:
                raise KeyboardInterrupt("injected")
            yield torch.randn(8, 3, 32, 32)
    return gen()


CORE_CALLS = {
    "recalibrate_bn": lambda m: recalibrate_bn(m, _interrupting(2)),
    "bn_shift": lambda m: bn_shift(m, _interrupting(2)),
    "probe": lambda m: probe_bn_statistics(m[0], ((x, torch.zeros(len(x), dtype=torch.long)) for x in _interrupting(2))),
    "fold, a layer without statistics": lambda m: fold_bn(nn.Sequential(m, nn.BatchNorm1d(128, track_running_stats=False))),
}


@pytest.mark.parametrize("name", list(CORE_CALLS))
def test_core_functions_interrupted_leave_the_model_exactly_as_before(source_model, name):
    from fastai_freeze.transfer import cut_body
    model = nn.Sequential(cut_body(source_model), nn.Flatten())
    model.train()
    model[0][1].eval()  # a mixed mode, to check each module's own flag comes back
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    momenta = [getattr(m, "momentum", None) for m in model.modules()]
    with pytest.raises((KeyboardInterrupt, ValueError)):
        CORE_CALLS[name](model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.training for m in model.modules()] == modes and [getattr(m, "momentum", None) for m in model.modules()] == momenta
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()) and torch.is_grad_enabled()


def test_compute_features_interrupted_removes_its_files(make_learner, tmp_path):
    learn = make_learner(bs=16)

    class Boom(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body, self.n = body, 0

        def forward(self, x):
            self.n += 1
            if self.n == 2:
                raise KeyboardInterrupt("injected")
            return self.body(x)
    with pytest.raises(KeyboardInterrupt):
        compute_features(Boom(learn.model[0]), learn.dls.train, memory_budget=0, tmp_dir=str(tmp_path), fast=False)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ shared modules, edge shapes -
class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.alias = self.bn  # the same module registered twice

    def forward(self, x):
        return self.bn(self.c1(x)) + self.alias(self.c2(x))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


class AuxBranch(nn.Module):
    "A BN that runs only in training (an auxiliary head)."

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        h = self.main(x)
        return h + self.aux(h).mean() if self.training else h


def _random_stats(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in bn_layers(model):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("make", [SharedBN, SharedConv])
def test_shared_modules_are_folded_and_fused_correctly(make):
    model = _random_stats(make())
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    folded = copy.deepcopy(model)
    fold_bn(folded)
    torch.testing.assert_close(folded(x), ref)
    if make is SharedBN:
        assert folded.bn is folded.alias and isinstance(folded.bn, BNAffine)
    fused, report = fuse_conv_bn(model)
    torch.testing.assert_close(fused(x), ref)
    assert report.fused == []  # a shared BN, or a conv called twice: nothing fusable, and the report says so


def test_bn_that_runs_only_in_training_is_left_alone_and_named():
    model = AuxBranch()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    aux_stats = model.aux[1].running_mean.clone()
    report = recalibrate_bn(model, batches)
    assert report.unused == ["aux.1"] and "did not reach" in str(report)
    assert torch.equal(model.aux[1].running_mean, aux_stats)
    assert bn_shift(model, batches).unused == ["aux.1"]


def test_three_d_convolutions_through_the_channels_last_paths():
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.Flatten(), nn.Conv1d(1, 1, 1) if False else nn.Identity())
    model = _random_stats(model)
    x = torch.randn(2, 1, 4, 6, 6)
    for cl in (True, False):
        fast, report = inference_model(model, channels_last=cl)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
        assert report.fused == [("0", "1")]


@pytest.mark.parametrize("policy", ["frozen", "fold", "adapt", "auto"])
def test_batch_size_one(make_learner, policy):
    learn = make_learner(bs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = learn.fine_tune_with(1, bn=policy, range_test=RangeTest())
    assert all(isinstance(m, BNAffine) for _, m in bn_layers(learn.model[1]))  # no batch statistics in a batch of one
    assert math.isfinite(rec.phases[-1].values[-1][1])


def test_batch_size_one_under_train_is_refused_before_any_change(make_learner):
    learn = make_learner(bs=1)
    before = snapshot(learn)
    with pytest.raises(ValueError, match="batch size 1"):
        learn.fine_tune_with(1, bn="train")
    assert_unchanged(learn, before)


# ------------------------------------------------------------------ non-finite data -------------
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_data_is_named_before_any_change(make_learner, bad):
    learn = make_learner(bs=16)
    x0 = learn.dls.train.dataset[0][0]
    x0[0, 0, 0] = bad
    before = snapshot(learn)
    with pytest.raises(ValueError, match="not finite.*NaN or infinite"):
        learn.fine_tune_with(1, bn="auto")
    assert_unchanged(learn, before)
    with pytest.raises(ValueError, match="not finite"):
        learn.apply_bn_policy("adapt")
    assert not any(isinstance(m, BNAffine) for _, m in bn_layers(learn.model[0]))


def test_a_loss_that_becomes_nan_is_reported(make_learner):
    learn = make_learner(bs=16)
    with pytest.warns(UserWarning, match="not finite"):
        rec = learn.fine_tune_with(1, bn="frozen", base_lr=1e6, fallback_lr=1e6, range_test=RangeTest())
    assert any("not finite" in n for n in rec.notes)


# ------------------------------------------------------------------ state that outlives ---------
def test_an_exported_learner_with_a_policy_predicts(make_learner, tmp_path):
    from fastai.learner import load_learner
    for policy in ("frozen", "fold", "adapt", "train"):
        learn = make_learner(bs=16)
        learn.apply_bn_policy(policy)
        learn.fit(1, 1e-4)
        learn.export(tmp_path / f"{policy}.pkl")
        loaded = load_learner(tmp_path / f"{policy}.pkl")
        assert loaded.opt is None  # get_preds runs the policy callback's before_fit without an optimizer
        preds, _ = loaded.get_preds(dl=learn.dls.valid)
        expected, _ = learn.get_preds(dl=learn.dls.valid)
        assert preds.shape == (64, 4)
        torch.testing.assert_close(preds, expected)


def test_fine_tune_with_uses_the_learners_policy_and_refuses_another(make_learner):
    learn = make_learner(bs=16)
    learn.apply_bn_policy("frozen")
    before = snapshot(learn)
    for kwargs in (dict(bn="train"), dict(bn="fold"), dict(freeze_bn=False)):
        with pytest.raises(ValueError, match="already has a BN policy"):
            learn.fine_tune_with(1, **kwargs)
        assert_unchanged(learn, before)
    seen = []

    class Modes(Callback):
        order = 99

        def before_batch(self):
            if self.training and not hasattr(self.learn, "lr_finder"):
                seen.append({m.training for _, m in bn_layers(self.learn.model[0])})
    rec = learn.fine_tune_with(1, cbs=Modes())  # 'auto' defers to the Learner's policy
    assert rec.bn.policy.value == "frozen" and seen and all(s == {False} for s in seen)  # eval-mode BN throughout
    assert [type(c).__name__ for c in learn.cbs].count("BNPolicyCallback") == 1  # the Learner's policy stays
    with pytest.raises(ValueError, match="runs the schedule and the BN policy itself"):
        learn.fine_tune_with(1, cbs=[BNPolicyCallback("fold")])
    with pytest.raises(ValueError, match="runs the schedule and the BN policy itself"):
        learn.fine_tune_with(1, cbs=FineTuneCallback())


def test_a_dropin_callback_defers_to_the_learners_policy(make_learner):
    learn = make_learner(bs=16)
    learn.apply_bn_policy("frozen")
    flags = [p.requires_grad for p in learn.model.parameters()]
    cb = FineTuneCallback(range_test=RangeTest())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit_one_cycle(2, 1e-3, cbs=cb)
    assert cb.record.bn.policy.value == "frozen"
    body_bn = {id(p) for _, m in bn_layers(learn.model[0]) for p in m.parameters()}
    after = [p.requires_grad for p in learn.model.parameters()]
    # unfrozen by the schedule, and the BN flags the policy froze for the warm-up given back exactly once
    assert all(after) and [f for f, p in zip(flags, learn.model.parameters()) if id(p) in body_bn] == [True] * len(body_bn)


def test_a_dropin_policy_that_conflicts_with_the_learners_is_refused(make_learner):
    learn = make_learner(bs=16)
    learn.apply_bn_policy("frozen")
    with pytest.raises(ValueError, match="already has a BN policy"):
        learn.fit_one_cycle(1, 1e-3, cbs=FineTuneCallback(bn="fold"))
    assert_clean_except_policy = [type(c).__name__ for c in learn.cbs].count("BNPolicyCallback") == 1
    assert assert_clean_except_policy


# ------------------------------------------------------------------ the cache -------------------
@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_a_bad_cache_file_is_named_and_rebuilt(tmp_path, content):
    path = tmp_path / "model.pth"
    good = {"w": torch.arange(4.0)}
    torch.save(good, path)
    data = path.read_bytes()
    path.write_bytes(content if content is not None else data[: len(data) // 2])  # empty, garbage, truncated

    def check(p):
        assert torch.equal(torch.load(p, weights_only=True)["w"], good["w"])
    with pytest.warns(UserWarning, match=str(path)):
        cached_file(path, lambda p: torch.save(good, p), check)
    check(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]  # no temporary file left


def test_two_builders_at_once_write_their_own_temporary_files(tmp_path):
    path, started, names = tmp_path / "model.pth", threading.Barrier(2), []

    def build(p):
        names.append(Path(p).name)
        started.wait()  # both are building now
        torch.save({"w": torch.ones(3)}, p)
    threads = [threading.Thread(target=cached_file, args=(path, build, lambda p: torch.load(p, weights_only=True)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 2 and torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_a_build_that_fails_leaves_no_file(tmp_path):
    path = tmp_path / "model.pth"

    def build(p):
        Path(p).write_bytes(b"half")
        raise KeyboardInterrupt("injected")
    with pytest.raises(KeyboardInterrupt):
        cached_file(path, build, lambda p: None)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ smaller things ----------------
def test_no_callback_of_the_library_shadows_a_learner_attribute(make_learner):
    from fastai_freeze import FrozenPrefix, WeightDiagnostics
    learn = make_learner(bs=16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*shadowing")
        learn.fine_tune_with(1, bn="frozen")
        learn.fit_one_cycle(2, 1e-3, cbs=[FineTuneCallback(bn="train"), FrozenPrefix(), WeightDiagnostics()])


def test_a_folded_model_says_how_to_load_its_weights(make_learner, tmp_path):
    learn = make_learner(bs=16)
    learn.path = tmp_path
    d = learn.apply_bn_policy("fold")
    assert "apply the same policy to it first (learn.apply_bn_policy('fold'))" in d.details[-1]
    learn.save("folded")
    fresh = make_learner(bs=16)
    fresh.path = tmp_path
    with pytest.raises(RuntimeError):  # PyTorch's own missing/unexpected keys: the model differs
        fresh.load("folded")
    fresh.apply_bn_policy("fold")
    fresh.load("folded")
    for (k, a), (_, b) in zip(learn.model.state_dict().items(), fresh.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_second_fine_tune_with_on_a_folded_learner_says_no_bn_is_left(make_learner):
    learn = make_learner(bs=16)
    learn.fine_tune_with(1, bn="fold")
    rec = learn.fine_tune_with(1)
    assert "no BatchNorm layer with statistics" in rec.bn.reason and "already folded" in rec.bn.reason


# ------------------------------------------------------------------ however a fit ends -----------
class CtrlC(Callback):
    "A KeyboardInterrupt at the second training batch, raised where fastai runs no event after it."
    order = 100

    def before_batch(self):
        if self.training and self.iter == 1:
            raise KeyboardInterrupt("injected")


def test_dropin_callbacks_give_everything_back_after_ctrl_c(make_learner):
    from fastai_freeze import FrozenPrefix
    learn = make_learner(bs=16)
    learn.freeze_body(freeze_bn=True)
    flags = {p: p.requires_grad for p in learn.model.parameters()}
    policy, prefix = BNPolicyCallback("frozen"), FrozenPrefix()
    with pytest.raises(KeyboardInterrupt):
        learn.fit_one_cycle(2, 1e-3, cbs=[policy, prefix, CtrlC()])
    assert prefix.mode == "inference copy"  # it was active when the interrupt came
    assert_clean(learn)
    assert {p: p.requires_grad for p in learn.model.parameters()} == flags


def test_a_policy_kept_on_the_learner_sets_up_anew_after_an_interrupted_fit(make_learner):
    learn = make_learner(bs=16)
    learn.apply_bn_policy("frozen")
    flags = {p: p.requires_grad for p in learn.model.parameters()}
    with pytest.raises(KeyboardInterrupt):
        learn.fit_one_cycle(1, 1e-3, cbs=CtrlC())  # the Learner's policy callback gets no after_fit
    seen = []

    class Modes(Callback):
        order = 99

        def before_batch(self):
            if self.training:
                seen.append({m.training for _, m in bn_layers(self.learn.model[0])})
    learn.fit_one_cycle(1, 1e-3, cbs=Modes())
    assert seen and all(s == {False} for s in seen)  # the policy still holds: eval-mode BN in training
    assert {p: p.requires_grad for p in learn.model.parameters()} == flags  # and the first fit's flags came back
    mode = learn.model.training
    assert {m.training for m in learn.model.modules()} == {mode}
