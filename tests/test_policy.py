import pickle

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.learner import load_learner

import fastai_freeze  # noqa: F401
from fastai_freeze.core.bn import BNAffine, bn_layers
from fastai_freeze.core.logme import StatisticsProbe
from fastai_freeze.freeze import body_bn_layers
from fastai_freeze.policy import BNPolicy, BNPolicyCallback, choose_bn_policy, decide_bn_policy


class Spy(Callback):
    "Records, at the first batch of every epoch, the training flag and requires_grad of every module/param."
    order = 100

    def before_fit(self):
        self.seen = []

    def before_batch(self):
        if self.training and self.iter == 0:
            self.seen.append(_state(self.learn))


def _state(learn):
    head = learn.opt.param_lists[-1]
    body_bn = [m for _, m in body_bn_layers(learn.model, head)]
    bn_ids = {id(m) for m in body_bn}
    others = [m for m in learn.model[0].modules() if id(m) not in bn_ids and not list(m.children())]
    return {
        "bn_training": {m.training for m in body_bn},
        "bn_grad": {p.requires_grad for m in body_bn for p in m.parameters(recurse=False)},
        "body_grad": {p.requires_grad for m in others for p in m.parameters(recurse=False)},
        "head_grad": {p.requires_grad for p in head},
        "other_training": {m.training for m in others},
        "folded": all(isinstance(m, BNAffine) for m in body_bn),
    }


EXPECTED = {  # during the frozen fit: (BN training mode, BN params trainable, folded)
    "train": ({True}, {True}, False),
    "frozen": ({False}, {False}, False),
    "fold": ({True}, {True}, True),
    "adapt": ({True}, {True}, True),
}


@pytest.mark.parametrize("policy", ["train", "frozen", "fold", "adapt"])
@pytest.mark.parametrize("dropin", [False, True])
def test_policy_state_before_during_after(make_learner, policy, dropin):
    learn = make_learner(bs=16)
    spy = Spy()
    before = _state(learn)
    assert before["bn_grad"] == {True} and before["body_grad"] == {False}  # new_head_learner: frozen, BN trainable
    if dropin:
        learn.fit_one_cycle(2, 1e-3, cbs=[BNPolicyCallback(policy), spy])
    else:
        decision = learn.apply_bn_policy(policy)
        assert decision.policy.value == policy
        learn.fit_one_cycle(2, 1e-3, cbs=spy)
    training, grad, folded = EXPECTED[policy]
    assert len(spy.seen) == 2
    for s in spy.seen:
        assert s["bn_training"] == training
        assert s["bn_grad"] == grad
        assert s["body_grad"] == {False} and s["head_grad"] == {True}
        assert s["other_training"] == {True}
        assert s["folded"] == folded
    after = _state(learn)
    assert after["bn_training"] == {False} == after["other_training"]  # fastai ends in eval: uniform
    assert after["bn_grad"] == {True}  # as before the fit: 'frozen' gives back the flags it changed
    # every trainable parameter of the model is in the optimizer (rebuilt after a fold)
    opt_ids = {id(p) for pg in learn.opt.param_lists for p in pg}
    assert {id(p) for p in learn.model.parameters()} == opt_ids


def test_frozen_keeps_running_stats_byte_identical(make_learner):
    learn = make_learner(bs=16)
    learn.apply_bn_policy("frozen")
    stats = {n: b.clone() for n, b in learn.model.named_buffers()}
    learn.fit_one_cycle(1, 1e-3)
    body = {id(b) for _, m in body_bn_layers(learn.model, learn.opt.param_lists[-1]) for b in m.buffers()}
    for n, b in learn.model.named_buffers():
        if id(b) in body:
            assert torch.equal(b, stats[n]), n
    # ...while under 'train' they move
    learn2 = make_learner(bs=16)
    s2 = {n: b.clone() for n, b in learn2.model.named_buffers()}
    learn2.fit_one_cycle(1, 1e-3)
    assert not torch.equal(learn2.model[0][1].running_mean, s2["0.1.running_mean"])


def test_fold_updates_affine_params_through_rebuilt_optimizer(make_learner):
    learn = make_learner(bs=16)
    learn.fit_one_cycle(1, 1e-3, cbs=BNPolicyCallback("fold"))
    affine = [m for _, m in bn_layers(learn.model[0])]
    assert affine and all(isinstance(m, BNAffine) for m in affine)
    w0 = {id(m): m.weight.detach().clone() for m in affine}
    learn.fit_one_cycle(1, 1e-3)
    assert any(not torch.equal(m.weight, w0[id(m)]) for m in affine)


def test_adapt_recalibrates_on_the_new_data(make_learner, source_model):
    learn = make_learner(bs=16)
    decision = learn.apply_bn_policy("adapt")
    assert any("re-estimated" in d for d in decision.details)
    first = learn.model[0][1]  # stem BN of the body, now folded
    src = source_model.bn1
    old_scale = (src.weight / torch.sqrt(src.running_var + src.eps)).detach()
    assert isinstance(first, BNAffine) and not torch.allclose(first.effective_weight.detach(), old_scale)


def test_interrupted_fit_leaves_no_mode_or_flag_behind(make_learner):
    class Boom(Callback):
        order = 100

        def before_batch(self):
            if self.iter == 2:
                raise CancelFitException()

    learn = make_learner(bs=16)
    flags = {p: p.requires_grad for p in learn.model.parameters()}
    learn.fit_one_cycle(2, 1e-3, cbs=[BNPolicyCallback("frozen"), Boom()])
    mode = learn.model.training
    assert {m.training for m in learn.model.modules()} == {mode}
    assert {p: p.requires_grad for p in learn.model.parameters()} == flags

    class Crash(Boom):
        def before_batch(self):
            if self.iter == 1:
                raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        learn.fit_one_cycle(2, 1e-3, cbs=[BNPolicyCallback("frozen"), Crash()])


def test_folded_learner_save_load_export_pickle(make_learner, tmp_path):
    learn = make_learner(bs=16)
    learn.path = tmp_path
    learn.apply_bn_policy("fold")
    learn.fit_one_cycle(1, 1e-3)
    x = torch.randn(4, 3, 32, 32)
    learn.model.eval()
    ref = learn.model(x).detach()
    learn.save("folded")
    learn2 = make_learner(bs=16)
    learn2.path = tmp_path
    learn2.apply_bn_policy("fold")
    learn2.load("folded")
    assert torch.allclose(learn2.model.eval()(x), ref)
    learn.export(tmp_path / "export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    assert torch.allclose(loaded.model.eval()(x), ref)
    clone = pickle.loads(pickle.dumps(learn.model))
    assert torch.allclose(clone.eval()(x), ref)


def test_unknown_policy_and_conflicts_are_clear_errors(make_learner):
    with pytest.raises(ValueError, match="unknown BN policy 'folded'.*'fold'"):
        BNPolicy.parse("folded")
    with pytest.raises(ValueError, match="freeze_bn=True"):
        BNPolicyCallback("train", freeze_bn=True)
    with pytest.raises(ValueError, match="freeze_bn=False"):
        BNPolicyCallback("frozen", freeze_bn=False)
    assert BNPolicy.parse("FOLD") is BNPolicy.FOLD


def _probe(pre, new):
    return StatisticsProbe(pre, new, 0.3, 256, 0.1)


def test_auto_choice_rules():
    keep = choose_bn_policy(_probe(0.20, 0.10), batch_size=8)
    assert keep.policy is BNPolicy.FROZEN and keep.freeze_bn and "pretrained statistics are kept" in keep.reason
    assert "0.200" in keep.reason and "0.100" in keep.reason  # the measurements are in the reason
    assert choose_bn_policy(_probe(0.20, 0.10), freeze_bn=False).policy is BNPolicy.FOLD
    new = choose_bn_policy(_probe(0.10, 0.20), batch_size=64)
    assert new.policy is BNPolicy.ADAPT and not new.freeze_bn and "re-estimated" in new.reason
    assert choose_bn_policy(_probe(0.10, 0.20), freeze_bn=True).freeze_bn
    assert choose_bn_policy(_probe(0.10, 0.10)).policy is BNPolicy.FROZEN  # a tie keeps what was pretrained


def test_auto_keeps_the_pretrained_statistics_where_they_fit(make_learner):
    "Unseen pattern classes through the pattern model: its own statistics describe them (measured)."
    learn = make_learner(bs=16)
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    rng = torch.get_rng_state()
    d = decide_bn_policy(learn, "auto")
    assert d.policy is BNPolicy.FROZEN and d.probe.gain < 0 and d.probe.samples == 96
    assert torch.equal(torch.get_rng_state(), rng)  # the probe leaves the random state alone
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, state[k]), k  # and the model


def test_auto_re_estimates_statistics_that_do_not_fit(make_learner):
    "A constructed case: the body's running statistics scrambled, so its eval-mode features are noise."
    learn = make_learner(bs=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in body_bn_layers(learn.model, learn.opt.param_lists[-1]):
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 20)
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 1e3 + 1e-3)
    d = learn.apply_bn_policy("auto")
    assert d.policy is BNPolicy.ADAPT and d.probe.gain > 0
    assert all(isinstance(m, BNAffine) for _, m in bn_layers(learn.model[0]))


@pytest.mark.parametrize("bs,folded", [(8, True), (16, False)])
def test_head_bn_gets_estimated_statistics_below_batch_16(make_learner, bs, folded):
    import copy

    from fastai_freeze.core import recalibrate_bn
    learn = make_learner(bs=bs)
    head_bn = [m for _, m in bn_layers(learn.model[1])]
    # the reference: the same model, the head's BN statistics re-estimated on the training data, in eval mode
    ref = copy.deepcopy(learn.model)
    recalibrate_bn(ref, learn.dls.train.new(shuffle=False, drop_last=False, bs=64),
                   layers=[m for _, m in bn_layers(ref[1])])
    d = learn.apply_bn_policy("frozen")
    now = [m for _, m in bn_layers(learn.model[1])]
    assert len(now) == len(head_bn) == 2
    if folded:
        assert all(isinstance(m, BNAffine) and m.weight.requires_grad for m in now)
        assert "statistics estimated on the training data" in d.details[-1]
        x = learn.dls.valid.one_batch()[0]
        with torch.no_grad():
            torch.testing.assert_close(learn.model.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)
    else:
        assert now == head_bn  # batch statistics, as fastai trains them
    learn2 = make_learner(bs=bs)
    learn2.apply_bn_policy("train")  # under 'train' nothing changes
    assert not any(isinstance(m, BNAffine) for _, m in bn_layers(learn2.model))
    learn3 = make_learner(bs=bs)
    d3 = learn3.apply_bn_policy("adapt")  # under 'adapt' the head's statistics are the new data's too
    assert all(isinstance(m, BNAffine) for _, m in bn_layers(learn3.model)) and "bn='adapt'" in d3.details[-1]


def test_policy_on_model_without_bn_is_a_clear_no_op():
    timm = pytest.importorskip("timm")
    from fastai.vision.learner import vision_learner

    from fastai_freeze.demo.data import tensor_dls
    x, y = torch.rand(24, 3, 32, 32), torch.randint(0, 3, (24,))
    learn = vision_learner(tensor_dls(x[:16], y[:16], x[16:], y[16:], bs=8), "convnext_atto", pretrained=False, n_out=3)
    assert not bn_layers(learn.model[0]) and timm is not None
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    for policy in ("auto", "fold", "frozen"):
        d = learn.apply_bn_policy(policy)
        assert "no BatchNorm layer" in d.reason and "changes nothing" in d.reason
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_syncbatchnorm_is_handled_by_every_policy(make_learner):
    """fastai's norm_types miss SyncBatchNorm (what distrib_ctx(sync_bn=True) converts to); ours do not.

    Structural checks only: SyncBatchNorm runs forward in training mode only inside a process group.
    """
    import copy

    from torch import nn

    from fastai_freeze.core.bn import fold_bn
    learn = make_learner(bs=16)
    learn.model = nn.SyncBatchNorm.convert_sync_batchnorm(learn.model)
    learn.create_opt()
    learn.freeze_body(freeze_bn=False)  # freeze non-BN: SyncBN params stay trainable
    body = [m for _, m in body_bn_layers(learn.model, learn.opt.param_lists[-1])]
    assert body and all(isinstance(m, nn.SyncBatchNorm) for m in body)
    assert all(p.requires_grad for m in body for p in m.parameters())
    learn.freeze_body(freeze_bn=True)
    assert not any(p.requires_grad for m in body for p in m.parameters())
    cb = BNPolicyCallback("frozen")
    learn.add_cb(cb)
    cb.before_fit()
    learn.model.train()
    cb.before_train()
    assert not any(m.training for m in body)
    cb.after_fit()
    learn.remove_cb(cb)
    folded = copy.deepcopy(learn.model)
    report = fold_bn(folded)
    assert report.count == len([m for m in learn.model.modules() if isinstance(m, nn.SyncBatchNorm)])
    x = torch.randn(4, 3, 32, 32)
    learn.model.eval()
    with torch.no_grad():
        assert torch.allclose(folded.eval()(x), learn.model(x), rtol=1e-4, atol=1e-5)
