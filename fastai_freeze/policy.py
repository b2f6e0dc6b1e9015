"""Named BatchNorm policies for fine-tuning, the automatic choice, and the callback that keeps one.

| policy   | the body's BN layers during fine-tuning                          | warm-up: BN params |
|----------|-------------------------------------------------------------------|--------------------|
| `train`  | BatchNorm, batch statistics, running stats updated (fastai's)     | trainable          |
| `frozen` | BatchNorm kept in eval mode: pretrained statistics, never moved   | frozen             |
| `fold`   | replaced by a trainable `BNAffine` with the pretrained statistics | trainable (or frozen) |
| `adapt`  | statistics re-estimated on the new data (AdaBN), then folded      | trainable (or frozen) |
| `auto`   | `frozen` (or `fold`) or `adapt`, from a probe of the body's features |                  |

Policies act on what was pretrained: the body's BN layers. A new head's BN layers have no
pretrained statistics to keep; what they do follows from each policy:

- `train`: they train as fastai trains them (batch statistics), as the body's do.
- `adapt`: the new data's statistics everywhere: the head's are estimated with the body's, in the
  same pass over the training set, and folded with them.
- `frozen`, `fold`: at batch sizes of `MIN_BN_BATCH` (16) or more they train with batch statistics;
  below, batch statistics are too noisy (Wu & He, *Group Normalization*, 2018: ResNet-50's error
  grows steeply below 16 per batch), so their statistics are estimated once over the training set
  and they are folded.

Measured with 3 seeds (head BN with batch statistics / estimated and folded / folded at its initial
statistics, i.e. no normalisation). ImageNet EfficientNet-Lite0, 400 images, bn='frozen', batch 8:
Fashion-MNIST 0.598 / 0.652 / 0.729, digits 0.729 / 0.762 / 0.821; batch 64: 0.673 / 0.601 / 0.654
and 0.737 / 0.725 / 0.722. The pattern model, 200 digits, bn='adapt', batch 4: 0.779 / 0.838 /
0.693; batch 64: 0.579 / 0.641 / -. Estimating is never the worst of the three below batch 16;
dropping the normalisation is the best on one network and the worst on the other.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from fastai.callback.core import TrainEvalCallback
from fastai.learner import Learner
from fastcore.basics import patch
from torch import nn

from .core.bn import BNAffine, fold_bn, recalibrate_bn
from .core.logme import StatisticsProbe, probe_bn_statistics
from .core.state import kept_random_state
from .distrib import broadcast_module_state, broadcast_object, unwrap_model
from .freeze import (
    body_bn_layers,
    check_splittable,
    frozen_state,
    head_bn_layers,
    param_groups,
    rebuild_optimizer,
    set_frozen_bn_trainable,
)
from .internals import FitScopedCallback, follow_norm_rules, frozen_groups, in_order, n_inputs

__all__ = ["BNPolicy", "BNDecision", "check_freeze_bn", "choose_bn_policy", "decide_bn_policy",
           "apply_bn_decision", "check_batch_size", "BNPolicyCallback", "learner_body_bn", "PROBE_SAMPLES", "MIN_BN_BATCH",
           "policy_freezes_bn"]

PROBE_SAMPLES = 128
"Training samples the automatic choice probes (two forward passes, no gradient)."

MIN_BN_BATCH = 16
"""Below this many samples per batch, a new head's BN layers get statistics estimated over the
training set instead of batch statistics (under `frozen`, `fold` and `adapt`): Wu & He (Group
Normalization, 2018, fig. 1) measure ResNet-50's ImageNet error rising sharply as the per-device BN
batch falls below 16."""


class BNPolicy(str, Enum):
    "The BN policies, by name (`BNPolicy('fold')` or `BNPolicy.FOLD`)."
    TRAIN = "train"
    FROZEN = "frozen"
    FOLD = "fold"
    ADAPT = "adapt"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: str | BNPolicy) -> BNPolicy:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(repr(p.value) for p in cls)
            raise ValueError(f"unknown BN policy {value!r}: use one of {names}") from None

    def __str__(self) -> str:
        return self.value


@dataclass
class BNDecision:
    """Which BN policy applies, and why, with the measurements behind it (the record keeps this).

    `seconds`: measuring and deciding (the probe); `apply_seconds`: carrying it out (re-estimating
    statistics, folding)."""
    policy: BNPolicy
    freeze_bn: bool
    reason: str
    batch_size: int | None = None
    probe: StatisticsProbe | None = None
    body_bn_layers: int = 0
    seconds: float = 0.0
    apply_seconds: float = 0.0
    details: list[str] = field(default_factory=list)

    @property
    def shift(self) -> float | None:
        return self.probe.shift if self.probe is not None else None

    def __str__(self) -> str:
        frozen = "BN params frozen in warm-up" if self.freeze_bn else "BN params trained in warm-up"
        return f"bn={self.policy.value} ({frozen}): {self.reason}"


def check_freeze_bn(policy: BNPolicy, freeze_bn: bool | None) -> bool:
    """`freeze_bn` under `policy`: whether the body's BN parameters are frozen during the warm-up.

    `None` (the default everywhere) lets the policy decide: frozen under `frozen`, trained under the
    others. Contradictions raise `ValueError`."""
    if freeze_bn is not None and not isinstance(freeze_bn, bool):
        raise TypeError(f"freeze_bn must be True, False or None, got {freeze_bn!r}")
    if policy is BNPolicy.TRAIN and freeze_bn:
        raise ValueError("bn='train' trains BN layers with batch statistics, which contradicts "
                         "freeze_bn=True: use bn='frozen' (eval-mode BN, nothing trained) or "
                         "bn='fold' with freeze_bn=True")
    if policy is BNPolicy.FROZEN and freeze_bn is False:
        raise ValueError("bn='frozen' freezes BN layers fully, which contradicts freeze_bn=False: use "
                         "bn='fold' to keep the pretrained statistics and train the affine parameters")
    return policy is BNPolicy.FROZEN or bool(freeze_bn)


def check_batch_size(learn: Learner, policy: BNPolicy) -> None:
    """Refuse `train` at batch size 1 when the model has BatchNorm layers with statistics: in training
    mode they have no batch statistics there (before anything changes)."""
    if policy is BNPolicy.TRAIN and getattr(learn.dls.train, "bs", None) == 1 and _head_bn(learn) + learner_body_bn(
            learn, with_stats=True):
        raise ValueError("bn='train' at batch size 1: BatchNorm layers in training mode need more than one sample "
                         "per batch; use bn='frozen' or 'fold' (or 'auto'), which keep fixed statistics")


def choose_bn_policy(probe: StatisticsProbe, freeze_bn: bool | None = None,
                     batch_size: int | None = None) -> BNDecision:
    """The automatic choice, from a probe of the body's features (`probe_bn_statistics`).

    - The pretrained statistics give features at least as good (LogME) as the new data's own:
      keep them, `frozen` (the body does not move in the warm-up; `fold` when `freeze_bn=False`).
    - The new data's statistics give better features: re-estimate them on the training set and
      fold (`adapt`).

    Batch statistics (`train`) are not chosen: on every benchmark row where the new data's
    statistics win, re-estimating them once over the training set did better than normalising with
    each batch's (benchmarks/results/transfer_pattern.md, transfer_real.md).
    """
    how = (f"LogME of the body's features {probe.logme_pretrained:.3f} with the pretrained statistics, "
           f"{probe.logme_new:.3f} with the new data's (over {probe.samples} training images)")
    if probe.gain > 0:
        reason = f"{how}: the new data's statistics are better, so they are re-estimated on it, then folded"
        return BNDecision(BNPolicy.ADAPT, bool(freeze_bn), reason, batch_size, probe)
    pol = BNPolicy.FOLD if freeze_bn is False else BNPolicy.FROZEN
    reason = f"{how}: the pretrained statistics are kept"
    return BNDecision(pol, pol is BNPolicy.FROZEN or bool(freeze_bn), reason, batch_size, probe)


def learner_body_bn(learn: Learner, with_stats: bool = False) -> list[nn.Module]:
    """The body's BN layers: those with no parameter in the head group (`body_bn_layers`), the one
    answer every part of the library uses; `with_stats`: only those with running statistics."""
    head = param_groups(learn)[-1]
    return [m for _, m in body_bn_layers(unwrap_model(learn.model), head)
            if not with_stats or getattr(m, "running_mean", None) is not None]


def _head_bn(learn: Learner) -> list[nn.Module]:
    "The head's BN layers with running statistics."
    return [m for _, m in head_bn_layers(unwrap_model(learn.model), param_groups(learn)[-1])
            if getattr(m, "running_mean", None) is not None]


def _body(learn: Learner) -> nn.Module | None:
    "The body of a `Sequential(body, head)` model (vision_learner, new_head_learner), else None."
    m = unwrap_model(learn.model)
    return m[0] if isinstance(m, nn.Sequential) and len(m) == 2 else None


def decide_bn_policy(learn: Learner, policy: str | BNPolicy = "auto", freeze_bn: bool | None = None,
                     samples: int = PROBE_SAMPLES) -> BNDecision:
    """Resolve `policy` for this Learner; 'auto' probes the body on up to `samples` training images.

    Nothing changes: the probe runs in no-grad passes, restores every mode and buffer, and leaves
    the global random state alone. A body without BatchNorm gets a decision that says so.
    """
    t0 = time.perf_counter()
    pol = BNPolicy.parse(policy)
    if pol is not BNPolicy.AUTO:
        check_freeze_bn(pol, freeze_bn)
    check_batch_size(learn, pol)
    bs = getattr(learn.dls.train, "bs", None)
    body_bns = learner_body_bn(learn, with_stats=True)
    if not body_bns and pol is not BNPolicy.TRAIN and bs == 1 and _head_bn(learn):
        pol = pol if pol is not BNPolicy.AUTO else BNPolicy.FOLD if freeze_bn is False else BNPolicy.FROZEN
        return BNDecision(pol, pol is BNPolicy.FROZEN or bool(freeze_bn),
                          "the body has no BatchNorm layer with statistics; at batch size 1 the head's BN layers "
                          "cannot use batch statistics, so they get statistics estimated on the training data, then "
                          "folded", bs, seconds=time.perf_counter() - t0)
    if not body_bns:
        left = "" if pol in (BNPolicy.AUTO, BNPolicy.TRAIN) else f" bn='{pol.value}'"
        return BNDecision(BNPolicy.TRAIN if pol is BNPolicy.AUTO else pol, bool(freeze_bn),
                          f"the body has no BatchNorm layer with statistics (none, or already folded):{left} "
                          "changes nothing", bs, seconds=time.perf_counter() - t0)
    if pol is not BNPolicy.AUTO:
        return BNDecision(pol, check_freeze_bn(pol, freeze_bn), "asked for", bs, body_bn_layers=len(body_bns),
                          seconds=time.perf_counter() - t0)
    body = _body(learn)
    if body is None:
        pol = BNPolicy.FOLD if freeze_bn is False else BNPolicy.FROZEN
        return BNDecision(pol, pol is BNPolicy.FROZEN or bool(freeze_bn),
                          "the model is not Sequential(body, head), so its body's features cannot be probed: "
                          "the pretrained statistics are kept", bs, body_bn_layers=len(body_bns),
                          seconds=time.perf_counter() - t0)
    with kept_random_state():  # a new DataLoader draws its seed from the global generator
        dl = in_order(learn.dls.train, 64)
        probe = broadcast_object(probe_bn_statistics(body, dl, samples))  # distributed: rank 0's for all
    decision = choose_bn_policy(probe, freeze_bn, bs)
    decision.body_bn_layers, decision.seconds = len(body_bns), time.perf_counter() - t0
    return decision


def apply_bn_decision(learn: Learner, decision: BNDecision, max_batches: int | None = 200) -> str:
    """Carry out the model change a decision needs and rebuild the optimizer; returns what was done.

    `adapt` re-estimates the statistics of the body's and the head's BN layers on the training data
    and folds them; `fold` folds the body's; under `frozen` and `fold` at batch sizes below
    `MIN_BN_BATCH` the head's BN layers get statistics estimated on the training data and are
    folded (behind a body without BatchNorm, only at batch size 1, where batch statistics cannot
    work). `train` changes nothing.
    """
    bs = getattr(learn.dls.train, "bs", None)
    small = bs is not None and bs < MIN_BN_BATCH
    if decision.policy is BNPolicy.TRAIN or not (decision.body_bn_layers or (bs == 1 and _head_bn(learn))):
        return "no module changed"
    if learn.opt is None:
        learn.create_opt()
    t0 = time.perf_counter()
    model = unwrap_model(learn.model)
    body = learner_body_bn(learn) if decision.body_bn_layers else []
    head = _head_bn(learn) if decision.policy is BNPolicy.ADAPT or small else []
    done = []
    estimate = (body if decision.policy is BNPolicy.ADAPT else []) + head
    if estimate:  # one pass: the head's statistics are those of the body's features as they will be
        with kept_random_state():
            dl = in_order(learn.dls.train, max(bs or 64, 64))
            rep = recalibrate_bn(model, dl, max_batches=max_batches, layers=estimate, n_inp=n_inputs(learn))
        broadcast_module_state(model)  # distributed: rank 0's statistics everywhere
        done.append(str(rep))
    fold = (body if decision.policy in (BNPolicy.FOLD, BNPolicy.ADAPT) else []) + head
    if fold:
        rep = fold_bn(model, strict=False, layers=fold)
        why = "bn='adapt'" if decision.policy is BNPolicy.ADAPT else f"batch size {bs} < {MIN_BN_BATCH}"
        done.append(str(rep) + (f" (the head's {len(head)} with statistics estimated on the training data: {why})"
                                if head else ""))
        done.append(f"to load weights saved from this model into a new Learner, apply the same policy to it first "
                    f"(learn.apply_bn_policy('{decision.policy.value}')), or use learn.export / load_learner")
        rebuild_optimizer(learn)
        _folded_follow_norm_rules(learn, decision)
    if decision.policy in (BNPolicy.FOLD, BNPolicy.ADAPT):
        # folded layers of the frozen groups: their affine params train in the warm-up unless freeze_bn
        set_frozen_bn_trainable(learn, not decision.freeze_bn)
    decision.apply_seconds += time.perf_counter() - t0
    return "; ".join(done) or "no module changed"


def _folded_follow_norm_rules(learn: Learner, decision: BNDecision) -> None:
    "The folded layers' parameters get fastai's rules for norm layers (`follow_norm_rules`)."
    params = [p for m in unwrap_model(learn.model).modules() if isinstance(m, BNAffine) for p in m.parameters(recurse=False)]
    follow_norm_rules(learn, params, trainable=not decision.freeze_bn)


class BNPolicyCallback(FitScopedCallback):
    """Apply a BN policy for a fit and keep it across epochs: the one owner of a policy's state.

    Use it as a drop-in (`learn.fit_one_cycle(5, cbs=BNPolicyCallback('frozen'))`) or set it on
    the Learner with `learn.apply_bn_policy(...)`; `fine_tune_with` and `FineTuneCallback` use the
    Learner's when it has one, else one of their own for their run, and read its `decision`.
    `fold`/`adapt` change the model once, before the first batch, and rebuild the optimizer (fastai
    builds it before `before_fit`); `frozen` puts the body's BN layers back in eval mode after
    fastai's `model.train()` every epoch and, when the fit ends however it ends (an error or a
    Ctrl-C included, see `FitScopedCallback`), gives them the mode of the rest of the model and
    their `requires_grad` flags back. A fit without an optimizer (`get_preds` on a loaded Learner)
    needs nothing from it. A range test run inside a fit keeps the outer fit's set-up.
    """
    order = TrainEvalCallback.order + 1  # after fastai's model.train() in before_train

    def __init__(self, policy: str | BNPolicy = "auto", freeze_bn: bool | None = None,
                 recalibration_batches: int | None = 200):
        self.policy = BNPolicy.parse(policy)
        if self.policy is not BNPolicy.AUTO:
            check_freeze_bn(self.policy, freeze_bn)
        elif freeze_bn is not None and not isinstance(freeze_bn, bool):
            raise TypeError(f"freeze_bn must be True, False or None, got {freeze_bn!r}")
        self.freeze_bn, self.recalibration_batches = freeze_bn, recalibration_batches
        self.decision: BNDecision | None = None
        self._applied = False  # the decision's model change is done
        self._active = False  # set up by a fit that has not ended yet
        self._nested = 0  # range tests running inside that fit
        self._eval_layers: list = []
        self._grad_flags: dict = {}

    def resolve(self, learn: Learner | None = None) -> BNDecision:
        "Decide (once) and carry out the model change (once); later calls return the same decision."
        learn = learn if learn is not None else self.learn
        if self.decision is None:
            self.decision = decide_bn_policy(learn, self.policy, self.freeze_bn)
        if not self._applied:
            self.decision.details.append(apply_bn_decision(learn, self.decision, self.recalibration_batches))
            self._applied = True
        return self.decision

    def conflicts_with(self, policy: BNPolicy, freeze_bn: bool | None) -> str | None:
        "Why asking for `policy`/`freeze_bn` contradicts this policy (None: it does not; 'auto' never does)."
        mine = {self.policy} | ({self.decision.policy} if self.decision is not None else set())
        if policy is not BNPolicy.AUTO and policy not in mine:
            return f"bn='{policy}' against this Learner's bn='{self.policy}'"
        frozen = self.decision.freeze_bn if self.decision is not None else self.freeze_bn
        if freeze_bn is not None and frozen is not None and freeze_bn != frozen:
            return f"freeze_bn={freeze_bn} against this Learner's freeze_bn={frozen}"
        return None

    def before_fit(self):
        if self._active and hasattr(self.learn, "lr_finder"):
            self._nested += 1  # a range test inside the fit this callback set up: that set-up stands
            return
        self.cleanup()  # a no-op, unless the last fit ended without any event (kept on the Learner)
        if self.learn.opt is None:
            return
        self.resolve()
        _folded_follow_norm_rules(self.learn, self.decision)  # the optimizer may have been created anew
        self._eval_layers, self._grad_flags = [], {}
        if self.decision.policy is BNPolicy.FROZEN:
            # BN params of the frozen groups stay frozen whatever `train_bn` made of them
            frozen = {id(p) for pg in frozen_groups(self.learn) for p in pg}
            for m in learner_body_bn(self.learn):
                for p in m.parameters(recurse=False):
                    if id(p) in frozen:
                        self._grad_flags[p] = p.requires_grad
                        p.requires_grad_(False)
        self._active = True

    def before_train(self):
        if self._active and self.decision.policy is BNPolicy.FROZEN:
            # looked up every epoch: fastai's distrib_ctx may have swapped them for SyncBatchNorm copies
            self._eval_layers = learner_body_bn(self.learn)
            for m in self._eval_layers:
                m.eval()

    def after_fit(self):  # fastai calls it after a cancelled fit too
        if self._nested:
            self._nested -= 1
        else:
            self.cleanup()

    def cleanup(self) -> None:
        "Give the BN layers the mode of the rest of the model and the flags changed for the fit back."
        if self._active:
            mode = self.learn.model.training if self.learn is not None else None
            for m in self._eval_layers:
                if mode is not None:
                    m.train(mode)
            for p, flag in self._grad_flags.items():
                if not p.requires_grad:  # still as `before_fit` left it (an unfreeze since then stands)
                    p.requires_grad_(flag)
        self._eval_layers, self._grad_flags = [], {}
        self._active, self._nested = False, 0


def policy_freezes_bn(learn: Learner) -> bool:
    "Whether the BN policy set on this Learner (if any) freezes BN parameters while the body is frozen."
    for cb in learn.cbs:
        if isinstance(cb, BNPolicyCallback) and cb.decision is not None:
            return cb.decision.freeze_bn
    return False


@patch
def freeze_body(self: Learner, freeze_bn: bool | None = None, n: int = -1) -> list[tuple[int, int]]:
    """Freeze the parameter groups before `n` (all but the head by default), BN as `freeze_bn` says.

    `freeze_bn=False` is "freeze non-BN layers": the BN affine parameters of the frozen groups stay
    trainable whatever the Learner's `train_bn` says; `True` freezes them too; `None` (default) does
    what the Learner's BN policy says (`learn.apply_bn_policy`: frozen under 'frozen'), else False.
    Raises `ValueError` on a one-group model. Returns `frozen_state(learn)`.
    """
    if freeze_bn is not None and not isinstance(freeze_bn, bool):
        raise TypeError(f"freeze_bn must be True, False or None, got {freeze_bn!r}")
    ngroups = check_splittable(self)
    if not isinstance(n, int) or not -ngroups < n < ngroups or n == 0:
        raise ValueError(f"n={n!r}: pick a group index that leaves at least one group trainable and one "
                         f"frozen, between 1 and {ngroups - 1} (or -1 for 'all but the head')")
    freeze_bn = policy_freezes_bn(self) if freeze_bn is None else freeze_bn
    if self.opt is None:
        self.create_opt()  # as fastai's freeze_to does
    self.opt.freeze_to(n)
    set_frozen_bn_trainable(self, not freeze_bn)
    self.opt.clear_state()
    return frozen_state(self)


@patch
def apply_bn_policy(self: Learner, policy: str | BNPolicy = "auto", freeze_bn: bool | None = None,
                    recalibration_batches: int | None = 200) -> BNDecision:
    """Set a BN policy on this Learner for every later fit, and apply its model change now.

    Replaces an earlier policy callback. Returns the decision (policy, reason, measurements). A
    refused call (bad arguments, a Learner with one parameter group: no body apart from the head)
    leaves the Learner as it was, its earlier policy included.
    """
    cb = BNPolicyCallback(policy, freeze_bn, recalibration_batches)
    if cb.policy is not BNPolicy.TRAIN:
        check_splittable(self)
    check_batch_size(self, cb.policy)
    old = [c for c in self.cbs if isinstance(c, BNPolicyCallback)]
    self.remove_cbs(old)
    self.add_cb(cb)
    try:
        return cb.resolve()
    except BaseException:
        self.remove_cb(cb)
        self.add_cbs(old)
        raise
