"""Named BatchNorm policies for fine-tuning, the automatic choice, and the callback that keeps one.

| policy   | BN layers during fine-tuning                                   | frozen phase: BN params |
|----------|-----------------------------------------------------------------|-------------------------|
| `train`  | BatchNorm, batch statistics, running stats updated (fastai's)   | trainable               |
| `frozen` | BatchNorm kept in eval mode: pretrained statistics, never moved | frozen                  |
| `fold`   | replaced by a trainable `BNAffine` with the pretrained stats    | trainable (or frozen)   |
| `adapt`  | statistics re-estimated on the new data (AdaBN), then folded    | trainable (or frozen)   |
| `auto`   | one of the above, chosen from batch size and measured shift     |                         |
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from fastai.callback.core import Callback
from fastai.learner import Learner
from fastcore.basics import patch

from .bn import bn_shift, fold_bn, recalibrate_bn
from .distrib import broadcast_module_state, broadcast_object, unwrap_model
from .freeze import body_bn_layers, rebuild_optimizer, set_frozen_bn_trainable

__all__ = ["BNPolicy", "BNDecision", "choose_bn_policy", "decide_bn_policy", "apply_bn_policy_now",
           "BNPolicyCallback", "MIN_BN_BATCH", "MAX_BN_SHIFT"]

MIN_BN_BATCH = 16
"""Below this many samples per batch, batch statistics are too noisy to train with.

Wu & He (Group Normalization, 2018, fig. 1) measure ResNet-50's ImageNet error rising sharply as
the per-device BN batch falls below 16 (+0.5 pt at 16, +2.7 pt at 8, +10 pt at 4), while
normalisation with fixed statistics does not depend on the batch at all."""

MAX_BN_SHIFT = 0.1
"""Mean KL divergence (nats, averaged over channels and the body's BN layers) between the new data's
per-channel statistics and the pretrained running statistics above which the pretrained statistics
are considered wrong for the new data and are re-estimated (`adapt`).

0.1 nats is the KL of a mean offset of 0.45 standard deviations (or a variance off by a factor of
about 1.6) in every channel of every layer. Measured on the embedded default's pretrained model:
held-out source data 0.001, unseen pattern classes 0.08, scikit-learn digits 0.11, inverted digits
0.21, uniform noise 0.40."""


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
    "Which BN policy applies, and why (the record keeps this)."
    policy: BNPolicy
    freeze_bn: bool
    reason: str
    batch_size: int | None = None
    shift: float | None = None
    details: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        frozen = "BN params frozen in warm-up" if self.freeze_bn else "BN params trained in warm-up"
        return f"bn={self.policy.value} ({frozen}): {self.reason}"


def _check_freeze_bn(policy: BNPolicy, freeze_bn: bool | None) -> bool:
    if policy is BNPolicy.TRAIN and freeze_bn:
        raise ValueError("bn='train' trains BN layers with batch statistics, which contradicts "
                         "freeze_bn=True: use bn='frozen' (eval-mode BN, nothing trained) or "
                         "bn='fold' with freeze_bn=True")
    if policy is BNPolicy.FROZEN and freeze_bn is False:
        raise ValueError("bn='frozen' freezes BN layers fully, which contradicts freeze_bn=False: use "
                         "bn='fold' to keep the pretrained statistics and train the affine parameters")
    if policy is BNPolicy.FROZEN:
        return True
    return bool(freeze_bn)


def choose_bn_policy(batch_size: int | None, shift: float | None = None, freeze_bn: bool | None = None,
                     min_batch: int = MIN_BN_BATCH, max_shift: float = MAX_BN_SHIFT) -> BNDecision:
    """The automatic choice.

    - measured shift above `max_shift`: the pretrained statistics do not describe the new data, so
      re-estimate them over the whole training set and fold (`adapt`), at any batch size;
    - batch below `min_batch`: batch statistics are too noisy, so keep the pretrained ones
      (`fold`, which still trains the affine parameters; `frozen` when `freeze_bn=True`);
    - otherwise `train` (fastai's default), or `frozen` when `freeze_bn=True`.

    In the transfer benchmark (benchmarks/results/transfer.md) re-estimating then folding beat
    training with batch statistics on the shifted data (scikit-learn digits) at batch size 64 too.
    """
    shift_txt = f"measured BN shift {shift:.2f} nats" if shift is not None else "shift not measured"
    if shift is not None and shift > max_shift:
        reason = (f"{shift_txt} > {max_shift}: the new data is far from the pretraining data, so its "
                  "statistics are re-estimated on it, then folded")
        if batch_size is not None and batch_size < min_batch:
            reason += f" (batch size {batch_size} < {min_batch} also rules out batch statistics)"
        return BNDecision(BNPolicy.ADAPT, bool(freeze_bn), reason, batch_size, shift)
    if batch_size is not None and batch_size < min_batch:
        pol = BNPolicy.FROZEN if freeze_bn else BNPolicy.FOLD
        return BNDecision(pol, bool(freeze_bn) or pol is BNPolicy.FROZEN,
                          f"batch size {batch_size} < {min_batch}: batch statistics are too noisy; {shift_txt} "
                          f"<= {max_shift}: the pretrained statistics are kept", batch_size, shift)
    pol = BNPolicy.FROZEN if freeze_bn else BNPolicy.TRAIN
    bs_txt = f"batch size {batch_size} >= {min_batch}" if batch_size is not None else "batch size unknown"
    return BNDecision(pol, bool(freeze_bn), f"{bs_txt} and {shift_txt} <= {max_shift}: batch statistics "
                      "can be trusted", batch_size, shift)


def _measure(learn: Learner, samples: int) -> tuple[int | None, float | None]:
    "Batch size, and the body's BN shift over about `samples` training images (fewer bias it upwards)."
    dl = learn.dls.train
    bs = getattr(dl, "bs", None)
    max_batches = max(1, -(-samples // (bs or 1)))
    body = [m for _, m in body_bn_layers(learn.model, _head_params(learn))]
    try:
        shift = bn_shift(learn.model, (b for b in dl), max_batches=max_batches, layers=body).mean_kl
    except ValueError:  # no BN with statistics: nothing to measure
        shift = None
    return bs, shift


def decide_bn_policy(learn: Learner, policy: str | BNPolicy = "auto", freeze_bn: bool | None = None,
                     samples: int = 256) -> BNDecision:
    "Resolve `policy` for this Learner ('auto' measures batch size and shift on the training data)."
    pol = BNPolicy.parse(policy)
    if pol is BNPolicy.AUTO:
        bs, shift = broadcast_object(_measure(learn, samples))  # distributed: rank 0's measurement for all
        return choose_bn_policy(bs, shift, freeze_bn)
    fb = _check_freeze_bn(pol, freeze_bn)
    return BNDecision(pol, fb, "asked for", getattr(learn.dls.train, "bs", None))


def _head_params(learn: Learner):
    return learn.opt.param_lists[-1] if learn.opt is not None else list(learn.splitter(learn.model))[-1]


def apply_bn_policy_now(learn: Learner, decision: BNDecision, max_batches: int | None = 200) -> str:
    """Carry out the model change a decision needs (recalibrate, fold) and rebuild the optimizer.

    Returns a line saying what was done. `train` and `frozen` change no module.
    """
    if decision.policy not in (BNPolicy.FOLD, BNPolicy.ADAPT):
        return "no module changed"
    if learn.opt is None:
        learn.create_opt()
    done = []
    model = unwrap_model(learn.model)
    if decision.policy is BNPolicy.ADAPT:
        rep = recalibrate_bn(model, learn.dls.train, max_batches=max_batches)
        broadcast_module_state(model)  # distributed: rank 0's statistics everywhere
        done.append(str(rep))
    report = fold_bn(model, strict=False)
    done.append(str(report))
    rebuild_optimizer(learn)
    # folded layers of the frozen groups: their affine params train in the warm-up unless freeze_bn
    set_frozen_bn_trainable(learn, not decision.freeze_bn)
    return "; ".join(done)


class BNPolicyCallback(Callback):
    """Apply a BN policy for a fit and keep it across epochs.

    Use it as a drop-in (`learn.fit_one_cycle(5, cbs=BNPolicyCallback('frozen'))`) or set it on
    the Learner with `learn.apply_bn_policy(...)`. `fold`/`adapt` change the model before the first
    batch and rebuild the optimizer (fastai builds it before `before_fit`); `frozen` puts the body's
    BN layers back in eval mode after fastai's `model.train()` every epoch and, when the fit ends or
    is interrupted, gives them the mode of the rest of the model again.
    """
    order = -5  # after TrainEvalCallback (-10), which calls model.train() in before_train

    def __init__(self, policy: str | BNPolicy = "auto", freeze_bn: bool | None = None,
                 recalibration_batches: int | None = 200):
        self.policy = BNPolicy.parse(policy)
        if self.policy is not BNPolicy.AUTO:
            _check_freeze_bn(self.policy, freeze_bn)
        self.freeze_bn, self.recalibration_batches = freeze_bn, recalibration_batches
        self.decision: BNDecision | None = None
        self.applied = False
        self._eval_layers: list = []
        self._grad_flags: dict = {}
        self._depth = 0  # a range test runs a fit inside a fit: set up and restore at the outer one

    def resolve(self) -> BNDecision:
        "Decide (once) and carry out the model change; later calls return the same decision."
        if self.decision is None:
            self.decision = decide_bn_policy(self.learn, self.policy, self.freeze_bn)
        if not self.applied:
            did = apply_bn_policy_now(self.learn, self.decision, self.recalibration_batches)
            self.decision.details.append(did)
            self.applied = True
        return self.decision

    def before_fit(self):
        self._depth += 1
        if self._depth > 1:
            return
        self.resolve()
        self._eval_layers, self._grad_flags = [], {}
        if self.decision.policy is BNPolicy.FROZEN:
            # BN params of the frozen groups stay frozen whatever `train_bn` made of them
            frozen = {id(p) for pg in self.learn.opt.param_lists[:self.learn.opt.frozen_idx] for p in pg}
            for m in self._body_bn():
                for p in m.parameters(recurse=False):
                    if id(p) in frozen:
                        self._grad_flags[p] = p.requires_grad
                        p.requires_grad_(False)

    def _body_bn(self) -> list:
        return [m for _, m in body_bn_layers(unwrap_model(self.learn.model), _head_params(self.learn))]

    def before_train(self):
        if self.decision.policy is BNPolicy.FROZEN:
            # looked up every epoch: fastai's distrib_ctx may have swapped them for SyncBatchNorm copies
            self._eval_layers = self._body_bn()
        for m in self._eval_layers:
            m.eval()

    def restore(self):
        "Give the BN layers the mode of the rest of the model and the flags changed back (also after an error)."
        mode = self.learn.model.training
        for m in self._eval_layers:
            m.train(mode)
        for p, flag in self._grad_flags.items():
            p.requires_grad_(flag)
        self._eval_layers, self._grad_flags, self._depth = [], {}, 0

    def after_fit(self):  # fastai calls it after a cancelled fit too
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self.restore()


@patch
def apply_bn_policy(self: Learner, policy: str | BNPolicy = "auto", freeze_bn: bool | None = None,
                    recalibration_batches: int | None = 200) -> BNDecision:
    """Set a BN policy on this Learner for every later fit, and apply its model change now.

    Replaces an earlier policy callback. Returns the decision (policy, reason, measurements).
    """
    for cb in [c for c in self.cbs if isinstance(c, BNPolicyCallback)]:
        self.remove_cb(cb)
    cb = BNPolicyCallback(policy, freeze_bn, recalibration_batches)
    self.add_cb(cb)
    return cb.resolve()
