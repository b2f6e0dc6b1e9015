"""One fine-tuning schedule, two front ends: `learn.fine_tune_with(...)` and `FineTuneCallback`.

fastai's `fine_tune` unfreezes after a fixed number of epochs and trains at a fixed
`slice(base_lr/2/lr_mult, base_lr/2)`. Here the body's BN layers follow a policy, the head warms up
with the body frozen (for `freeze_epochs`, or until the validation loss stops improving), the body
is unfrozen, a range test runs on the *unfrozen* model, and its suggestion becomes the top of the
discriminative slice. `FineTuneSchedule` holds these steps once; the method runs them as separate
fits, the callback inside the fit a user already has. Every decision goes into a `FineTuneRecord`.
"""
from __future__ import annotations

import inspect
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
from fastai.callback.schedule import combined_cos
from fastai.callback.tracker import TrackerCallback
from fastai.learner import Learner
from fastcore.basics import patch
from fastcore.foundation import L
from fastcore.meta import delegates

from .callbacks import FrozenPrefix, StopAtTarget, UnfreezeOnPlateau
from .distrib import is_distributed
from .features import cached_warmup, check_cacheable
from .freeze import (
    check_splittable,
    rebuild_optimizer,
    set_frozen_bn_trainable,
    staged_splitter,
    trainable_groups,
)
from .internals import FitScopedCallback, ResumedSchedule, group_lrs, scheduler_of
from .policy import (
    BNPolicy,
    BNPolicyCallback,
    BNPolicyKeeper,
    check_batch_size,
    check_freeze_bn,
    policy_freezes_bn,
)
from .probe import DEFAULT_FALLBACK_LR, RangeTest, _is_number, range_test
from .record import FineTuneRecord, PhaseRecord, RangeTestResult

__all__ = ["Unfreeze", "FineTuneSchedule", "FineTuneCallback"]


def _positive(name: str, value, integer: bool = False, allow_zero: bool = False) -> None:
    "Refuse anything but a finite real number (Python's, NumPy's or a one-element tensor's) in range."
    ok = _is_number(value) and math.isfinite(float(value))
    ok = ok and (float(value) >= 0 if allow_zero else float(value) > 0) and (not integer or float(value).is_integer())
    if not ok:
        kind = "a whole number" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class Unfreeze:
    """When the warm-up ends: after `freeze_epochs`, or (`plateau=True`) as soon as `monitor` has not
    improved by more than `min_delta` for `patience` epochs (`freeze_epochs` is then the cap).
    `monitor`, `min_delta` and `patience` mean what they mean in fastai's `EarlyStoppingCallback`."""
    plateau: bool = False
    patience: int = 1
    min_delta: float = 0.0
    monitor: str = "valid_loss"

    def __post_init__(self):
        _positive("patience", self.patience, integer=True)
        _positive("min_delta", self.min_delta, allow_zero=True)
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"monitor must be the name of a recorded value, got {self.monitor!r}")

    @classmethod
    def parse(cls, value: Unfreeze | str | None) -> Unfreeze:
        if value is None or value == "epochs":
            return cls()
        if value == "plateau":
            return cls(plateau=True)
        if isinstance(value, cls):
            return value
        raise ValueError(f"unfreeze must be 'epochs', 'plateau' or an Unfreeze(...), got {value!r}")


def _range_test_config(value) -> RangeTest | None:
    "A `RangeTest` (None: the default one), or False for none at all (fastai's fixed rule): None then."
    if value is False:
        return None
    if value is not None and not isinstance(value, RangeTest):
        raise TypeError(f"range_test must be a RangeTest(...), None (the default one) or False (no range test: "
                        f"fastai's fixed rule, fallback_lr), got {type(value).__name__}")
    return value or RangeTest()


def _check_monitor(learn: Learner, monitor: str) -> None:
    "Refuse, before anything changes, a monitor the Recorder will not have."
    names = ["train_loss", "valid_loss"] + [m.name for m in learn.metrics]
    if monitor not in names:
        raise ValueError(f"no value {monitor!r} is recorded: the recorder will have {names} (pass the metric "
                         "to the Learner, e.g. metrics=accuracy)")


def _lr_source(rt: RangeTestResult) -> str:
    "What the record says chose a rate: the range test, or fastai's rule and the one reason (the warning's)."
    return f"fastai's rule: {rt.reason}" if rt.fell_back else f"range test ({rt.method}, {rt.curve})"


class FineTuneSchedule:
    """The fine-tuning steps, written once, that `fine_tune_with` and `FineTuneCallback` drive.

    `start()` decides and applies the BN policy and freezes the body; `unfreeze(n)` unfreezes the
    groups from `n` on (all by default), keeps the still-frozen groups' BN parameters as the policy
    says, runs the range test on the model as it now is and returns the discriminative rates;
    `open_phase`/`close_phase` keep the record; `finish()` gives back what the policy changed for
    the fit. Nothing here starts a fit.
    """

    def __init__(self, learn: Learner, bn: str | BNPolicy = "auto", freeze_bn: bool | None = None,
                 lr_mult: float = 100, range_test: RangeTest | bool | None = None,
                 fallback_lr: float = DEFAULT_FALLBACK_LR):
        policy = BNPolicy.parse(bn)
        if policy is not BNPolicy.AUTO:
            check_freeze_bn(policy, freeze_bn)
        elif freeze_bn is not None and not isinstance(freeze_bn, bool):
            raise TypeError(f"freeze_bn must be True, False or None, got {freeze_bn!r}")
        _positive("lr_mult", lr_mult)
        if lr_mult < 1:
            raise ValueError(f"lr_mult must be >= 1 (the head's rate over the first group's), got {lr_mult}")
        _positive("fallback_lr", fallback_lr)
        check_batch_size(learn, policy)
        self.learn, self.lr_mult, self.fallback_lr = learn, float(lr_mult), float(fallback_lr)
        self.range_test = _range_test_config(range_test)
        self.keeper = BNPolicyKeeper(learn, policy, freeze_bn, 200)
        self.record = FineTuneRecord()
        self._iter0, self._t0 = 0, time.perf_counter()

    @property
    def freeze_bn(self) -> bool:
        return self.keeper.decision.freeze_bn

    def start(self) -> None:
        "Decide and apply the BN policy, freeze the body (BN parameters as `freeze_bn` says)."
        decision = self.keeper.resolve()
        self.record.bn = decision
        self.learn.freeze_body(freeze_bn=decision.freeze_bn)

    def rates(self, top: float) -> slice:
        "The discriminative slice whose top is `top`."
        return slice(top / self.lr_mult, top)

    def unfreeze(self, from_group: int | None = None) -> tuple[slice, RangeTestResult]:
        """Unfreeze the groups from `from_group` on (None: all), find the top rate on the model as it
        now is, return `(rates, range_test_result)`."""
        if from_group is None:
            self.learn.unfreeze()
        else:
            self.learn.freeze_to(from_group)
            set_frozen_bn_trainable(self.learn, not self.freeze_bn)
        if self.range_test is None:  # range_test=False: fastai's fixed rule, asked for
            rt = RangeTestResult([], [], "fixed", float(self.fallback_lr), None, True,
                                 "range_test=False, the fixed top rate fallback_lr")
        else:
            rt = range_test(self.learn, self.range_test, lr_mult=self.lr_mult, fallback_lr=self.fallback_lr)
        return self.rates(rt.suggestion), rt

    def open_phase(self, name: str, epochs: int, lr, source: str, rt: RangeTestResult | None = None,
                   first_iter: int = 0) -> PhaseRecord:
        "Start a phase; its history starts at the Recorder's iteration `first_iter` (0: a fit of its own)."
        phase = PhaseRecord(name, epochs, group_lrs(self.learn, lr), trainable_groups(self.learn),
                            str(self.keeper.decision.policy), source, range_test=rt)
        self.record.phases.append(phase)
        self._iter0, self._t0 = first_iter, time.perf_counter()
        return phase

    def close_phase(self, reason: str | None = None) -> None:
        "Copy the phase's part of the Recorder's history into the record."
        p = self.record.phases[-1]
        rec = self.learn.recorder
        values, losses, lrs = (getattr(rec, a, []) for a in ("values", "losses", "lrs"))  # empty before a first batch
        first = len(values) - p.epochs_run if p.epochs_run else len(values)
        p.losses = [float(x) for x in losses[self._iter0:]]
        p.iter_lrs = [float(x) for x in lrs[self._iter0:]]
        p.values = [list(v) for v in values[first:]]
        p.metric_names = list(getattr(rec, "metric_names", []))
        p.seconds = time.perf_counter() - self._t0
        p.end_reason = p.end_reason or reason or f"{p.epochs_run} epoch(s) done"
        bad = [x for x in p.losses + [v for row in p.values for v in row if isinstance(v, float)] if not math.isfinite(x)]
        if bad:
            note = (f"{p.name}: the training or validation loss is not finite ({bad[0]}): the rates are too high for "
                    "this model, or the data holds NaN or infinite values; the weights may be unusable")
            self.record.notes.append(note)
            warnings.warn(note, stacklevel=2)

    def finish(self) -> None:
        """Give back what the policy changed for the fit. Stopped while groups are still frozen (an
        interrupt in the warm-up), their BN parameters are left as `learn.freeze_body()` leaves
        them, not as the warm-up had them."""
        self.keeper.restore()
        if self.learn.opt is not None and self.learn.opt.frozen_idx:
            set_frozen_bn_trainable(self.learn, not policy_freezes_bn(self.learn))


# ---------------------------------------------------------------- the method ------------------
def _stages(learn: Learner, record: FineTuneRecord, epochs: int) -> list[int]:
    """Group indices to unfreeze down to, one stage each (an epoch per stage, the last stage with
    the rest), out of `epochs`; a 2-group Learner's body is split in two first."""
    n = len(learn.opt.param_lists)
    if n == 2:
        split = staged_splitter(learn.splitter, 2)
        if len(split(learn.model)) < 3:
            record.notes.append("gradual: the body could not be split into stages (fewer than two parts with "
                                "parameters); unfrozen at once")
            return []
        learn.splitter = split
        learn.create_opt()
        record.notes.append(f"gradual: the body was split into {len(learn.opt.param_lists) - 1} stages "
                            f"({split.how})")
        n = len(learn.opt.param_lists)
    stages = list(range(n - 2, 0, -1))[:max(epochs - 1, 0)]
    if not stages:
        record.notes.append(f"gradual: {epochs} epoch(s) leave no epoch for a stage before the last; unfrozen at once")
    return stages


def _fit_phase(sched: FineTuneSchedule, name: str, epochs: int, lr, source: str, rt, fit_kwargs: dict,
               cbs: list) -> PhaseRecord:
    phase = sched.open_phase(name, epochs, lr, source, rt)
    try:
        sched.learn.fit_one_cycle(epochs, lr, cbs=cbs, **fit_kwargs)
    finally:
        phase.epochs_run = len(getattr(sched.learn.recorder, "values", []))
        sched.close_phase()
    return phase


def _warm_up(self: Learner, sched: FineTuneSchedule, freeze_epochs: int, base_lr: float | None, rule: Unfreeze,
             cache_features: bool, cbs: list, kwargs: dict) -> None:
    record = sched.record
    if base_lr is None:
        rt = range_test(self, sched.range_test or RangeTest(), fallback_lr=sched.fallback_lr)
        lr, src = rt.suggestion, _lr_source(rt) + ", frozen"
    else:
        rt, lr, src = None, base_lr, "base_lr"
    fit_kwargs = {**kwargs, "pct_start": 0.99}
    if cache_features:
        phase = sched.open_phase("warm-up", freeze_epochs, slice(lr), src, rt)
        cw = cached_warmup(self, freeze_epochs, lr, **fit_kwargs)
        phase.epochs_run, phase.values, phase.metric_names = len(cw.values), cw.values, cw.metric_names
        phase.losses, phase.iter_lrs = cw.losses, cw.iter_lrs
        phase.seconds = cw.feature_seconds + cw.fit_seconds
        where = "on disk (memory-mapped)" if cw.on_disk else "in memory"
        phase.end_reason = (f"{phase.epochs_run} epoch(s) on cached features ({cw.nbytes / 2**20:.1f} MiB {where}, "
                            f"computed in {cw.feature_seconds:.1f}s)")
    else:
        plateau = UnfreezeOnPlateau(rule.monitor, min_delta=rule.min_delta, patience=rule.patience) \
            if rule.plateau else None
        phase = _fit_phase(sched, "warm-up", freeze_epochs, slice(lr), src, rt, fit_kwargs,
                           cbs + ([plateau] if plateau else []))
        if plateau is not None and plateau.stopped_epoch is not None:
            phase.end_reason = (f"{rule.monitor} did not improve by more than {rule.min_delta} for "
                                f"{rule.patience} epoch(s)")
    record.unfroze_at_epoch, record.unfreeze_reason = phase.epochs_run, phase.end_reason


_FIT_ONE_CYCLE_ARGS = frozenset(inspect.signature(Learner.fit_one_cycle).parameters) - {"self", "n_epoch", "lr_max",
                                                                                     "start_epoch"}


@patch
@delegates(Learner.fit_one_cycle, but=["lr_max", "start_epoch"])
def fine_tune_with(self: Learner, epochs: int, base_lr: float | None = 2e-3, freeze_epochs: int = 1,
                   lr_mult: float = 100, pct_start: float = 0.3, div: float = 5.0, bn: str = "auto",
                   freeze_bn: bool | None = None, unfreeze: Unfreeze | str | None = None,
                   range_test: RangeTest | bool | None = None, fallback_lr: float | None = None,
                   monitor: str | None = None, target: float | None = None, keep_best: bool = False,
                   gradual: bool | float = False, cache_features: bool = False, **kwargs) -> FineTuneRecord:
    """Fine-tune: BN policy, warm-up, informed unfreeze, range test on the unfrozen model, discriminative rates.

    - `bn`: 'auto' (default: a probe of the body's features decides, see `choose_bn_policy`),
      'train', 'frozen', 'fold' or 'adapt'. `freeze_bn`: whether the body's BN parameters stay
      frozen during the warm-up (None: as the policy says, frozen only under 'frozen').
    - Warm-up: `fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)` with the body frozen,
      as in fastai's `fine_tune` (`base_lr=None`: a range test on the frozen model chooses it).
      `unfreeze='plateau'` (or `Unfreeze(...)`) ends it once the validation loss stops improving.
    - Unfreeze, range test (`range_test=RangeTest(...)` to change it), then `epochs` of one cycle at
      `slice(lr / lr_mult, lr)`; `pct_start`, `div` and other `fit_one_cycle` arguments apply to it.
      Below 20 training batches per epoch, or when the curve is unusable, the top rate is `fallback_lr`
      (None: fastai's rule, `base_lr / 2`), with a warning; `range_test=False` asks for that rate
      without a range test.
    - `monitor` with `target` stops once the target is reached; `keep_best` loads the best epoch's
      weights at the end (best by `monitor`, `valid_loss` if none is given, as `SaveModelCallback`). `gradual=True`: one more group per stage (an epoch each, each with its
      range test; a 2-group Learner's body is split in two); a number > 1 divides the previous
      stage's rate by it instead.
    - `cache_features=True` warms the head up on the body's features computed once (needs data
      without random transforms and a body that does not change: implies `freeze_bn=True`).

    Every argument is checked before anything changes. Returns the record of every decision (kept
    as `learn.fine_tune_record`); the Learner keeps no callback of this call.
    """
    _positive("epochs", epochs, integer=True)
    _positive("freeze_epochs", freeze_epochs, integer=True, allow_zero=True)
    epochs, freeze_epochs = int(epochs), int(freeze_epochs)
    if base_lr is not None:
        _positive("base_lr", base_lr)
        base_lr = float(base_lr)
    rule = Unfreeze.parse(unfreeze)
    if rule.plateau and freeze_epochs < 1:
        raise ValueError("unfreeze='plateau' needs freeze_epochs >= 1 as its cap")
    if fallback_lr is None:
        fallback_lr = base_lr / 2 if base_lr is not None else DEFAULT_FALLBACK_LR
    if target is not None and monitor is None:
        raise ValueError("target needs monitor, the metric it applies to (e.g. monitor='accuracy')")
    if target is not None:
        _positive("target", abs(target), allow_zero=True)
    if not isinstance(gradual, bool):
        if not (_is_number(gradual) and math.isfinite(float(gradual)) and float(gradual) > 1):
            raise ValueError(f"gradual must be True/False or a ratio > 1 between stages' rates, got {gradual!r}")
        gradual = float(gradual)
    if "lr_max" in kwargs:
        raise ValueError("lr_max is not taken: give the warm-up rate as base_lr; the unfrozen rate comes from "
                         "the range test (or fallback_lr)")
    unknown = sorted(set(kwargs) - _FIT_ONE_CYCLE_ARGS)
    if unknown:
        raise TypeError(f"fine_tune_with got unexpected arguments {unknown}: besides its own, it takes "
                        f"fit_one_cycle's {sorted(_FIT_ONE_CYCLE_ARGS)}")
    for k, v in (("pct_start", pct_start), ("div", div), ("div_final", kwargs.get("div_final", 1e5))):
        _positive(k, v)
    pct_start, div = float(pct_start), float(div)
    if pct_start >= 1:
        raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
    if keep_best and monitor is None:
        monitor = "valid_loss"  # as fastai's SaveModelCallback
    for name in ([rule.monitor] if rule.plateau else []) + ([monitor] if monitor else []):
        _check_monitor(self, name)
    if cache_features:
        if freeze_bn is False or BNPolicy.parse(bn) is BNPolicy.TRAIN:
            raise ValueError("cache_features needs a body that does not change during the warm-up: BN parameters "
                             "frozen and no batch statistics; drop freeze_bn=False / bn='train', or drop "
                             "cache_features")
        if rule.plateau:
            raise ValueError("cache_features warms up for a fixed number of epochs: use unfreeze='epochs'")
        check_cacheable(self)
        freeze_bn = True
    check_splittable(self)
    sched = FineTuneSchedule(self, bn, freeze_bn, lr_mult, range_test, fallback_lr)
    kwargs = {"pct_start": pct_start, "div": div, **kwargs}
    user_cbs = list(L(kwargs.pop("cbs", None)))
    record = sched.record
    splitter = self.splitter
    # this call's policy replaces, for its run only, the one set on the Learner (apply_bn_policy)
    learners_policies = [cb for cb in self.cbs if isinstance(cb, BNPolicyCallback)]
    policy_cb, prefix_cb = BNPolicyCallback.for_keeper(sched.keeper), FrozenPrefix()
    self.remove_cbs(learners_policies)
    self.add_cbs([policy_cb, prefix_cb])
    try:
        sched.start()
        self.fine_tune_record = record
        if freeze_epochs:
            _warm_up(self, sched, freeze_epochs, base_lr, rule, cache_features, user_cbs, kwargs)
        stages = _stages(self, record, epochs) if gradual else []
        prev = None
        for i, k in enumerate(stages):
            if isinstance(gradual, bool) or prev is None:
                lr, rt = sched.unfreeze(k)
                src = _lr_source(rt)
            else:
                self.freeze_to(k)
                set_frozen_bn_trainable(self, not sched.freeze_bn)
                lr, rt, src = sched.rates(prev.stop / gradual), None, f"previous stage / {gradual:g}"
            prev = lr
            _fit_phase(sched, f"stage {i + 1}", 1, lr, src, rt, kwargs, list(user_cbs))
        if prev is not None and not isinstance(gradual, bool):
            self.unfreeze()
            lr, rt, src = sched.rates(prev.stop / gradual), None, f"previous stage / {gradual:g}"
        else:
            lr, rt = sched.unfreeze()
            src = _lr_source(rt)
        stop = StopAtTarget(monitor, target, keep_best) if monitor is not None else None
        phase = _fit_phase(sched, "unfrozen", epochs - len(stages), lr, src, rt, kwargs,
                           list(user_cbs) + ([stop] if stop else []))
        if stop is not None:
            if stop.reached_epoch is not None:
                phase.end_reason = f"{monitor} reached {target} after epoch {stop.reached_epoch}"
            if keep_best and stop.best_epoch is not None:
                record.notes.append(f"kept the weights of unfrozen epoch {stop.best_epoch + 1} "
                                    f"({monitor}={stop.best:.4g})")
        record.notes.append("each range test sweeps the top (head group) rate of the discriminative slice")
    finally:
        # the callbacks of this call go, whatever ended it (an error, an interrupt)
        self.remove_cbs([policy_cb, prefix_cb])
        self.add_cbs(learners_policies)
        sched.finish()
        if self.splitter is not splitter:
            self.splitter = splitter
            rebuild_optimizer(self)
    return record


# ---------------------------------------------------------------- the callback ----------------
class FineTuneCallback(FitScopedCallback, TrackerCallback):
    """The `fine_tune_with` schedule inside an existing `fit_one_cycle`/`fit` call.

    `learn.fit_one_cycle(6, 1e-3, cbs=FineTuneCallback(unfreeze_epoch=2))` applies the BN policy
    (`bn`, `freeze_bn` as in `fine_tune_with`), starts with the body frozen, unfreezes after epoch
    `unfreeze_epoch` (or earlier, with `Unfreeze(plateau=True)`, once the monitored value stops
    improving), runs a range test on the unfrozen model and continues the remaining epochs with a new
    one-cycle schedule at `slice(lr / lr_mult, lr)` (with plain `fit`: at those constant rates).
    Off while `lr_find` runs. The decisions are in `self.record`, a `FineTuneRecord`. However the fit
    ends (an error or a Ctrl-C included), the BN policy's changes for the fit are given back and the
    record's last phase is closed (`FitScopedCallback`).
    """
    order = TrackerCallback.order + 2
    _pause_in_probe = True

    @property
    def name(self) -> str:
        "The attribute fastai sets on the Learner for this callback (not `fine_tune`: that is a method)."
        return "fine_tune_schedule"

    def __init__(self, unfreeze_epoch: int = 1, unfreeze: Unfreeze | str | None = None, bn: str = "auto",
                 freeze_bn: bool | None = None, lr_mult: float = 100, range_test: RangeTest | bool | None = None,
                 fallback_lr: float = DEFAULT_FALLBACK_LR, pct_start: float = 0.3, div: float = 5.0,
                 div_final: float = 1e5):
        _positive("unfreeze_epoch", unfreeze_epoch, integer=True)
        rule = Unfreeze.parse(unfreeze)
        super().__init__(monitor=rule.monitor, min_delta=rule.min_delta)
        for k, v in (("pct_start", pct_start), ("div", div), ("div_final", div_final)):
            _positive(k, v)
        if pct_start >= 1:
            raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
        policy = BNPolicy.parse(bn)
        if policy is not BNPolicy.AUTO:
            check_freeze_bn(policy, freeze_bn)
        _positive("lr_mult", lr_mult)
        _positive("fallback_lr", fallback_lr)
        self.unfreeze_epoch, self.rule = int(unfreeze_epoch), rule
        self.bn, self.freeze_bn, self.lr_mult, self.fallback_lr = bn, freeze_bn, float(lr_mult), float(fallback_lr)
        _range_test_config(range_test)
        self.range_test = range_test  # None: the default RangeTest; False: fastai's fixed rule
        self.pct_start, self.div, self.div_final = float(pct_start), float(div), float(div_final)
        self.record = FineTuneRecord()
        self.sched: FineTuneSchedule | None = None
        self._unsynced: list = []
        self._drives_keeper = True

    def before_fit(self):
        self.cleanup("the fit ended without an event")  # a no-op unless kept on the Learner and interrupted
        super().before_fit()
        if not self.run:
            return
        check_splittable(self.learn)
        bn = self.bn
        learners = [cb for cb in self.learn.cbs if isinstance(cb, BNPolicyCallback)]
        if learners:
            theirs = learners[0].policy
            if BNPolicy.parse(bn) not in (BNPolicy.AUTO, theirs):
                raise ValueError(f"this Learner already has a BN policy (bn='{theirs}', set by apply_bn_policy), and "
                                 f"FineTuneCallback(bn='{bn}') would apply another: drop one of them")
            bn = theirs  # the Learner's policy stands; its callback keeps it
        self.sched = FineTuneSchedule(self.learn, bn, self.freeze_bn, self.lr_mult, self.range_test,
                                      self.fallback_lr)
        self._drives_keeper = not (learners and learners[0].keeper is not None)
        if not self._drives_keeper:  # the Learner's BNPolicyCallback keeps its policy through this fit
            self.sched.keeper = learners[0].keeper
        self.record = self.sched.record
        # DDP (fastai's distrib_ctx wraps the model before this runs) synchronises the gradients of
        # the parameters that were trainable when it was built, and no others
        self._ddp_params = ({id(p) for p in self.learn.model.parameters() if p.requires_grad}
                            if is_distributed() else None)
        self._unsynced, self.unfrozen, self.wait = [], False, 0
        self.sched.start()
        if self._drives_keeper:
            self.sched.keeper.setup()
        self.sched.open_phase("warm-up", self.unfreeze_epoch, self._warm_lr(), "the fit's own schedule")
        if self.unfreeze_epoch >= self.n_epoch and not self.rule.plateau:
            why = (f"unfreeze_epoch={self.unfreeze_epoch} in a fit of {self.n_epoch} epoch(s): the body is not "
                   "unfrozen (it unfreezes after that epoch, and only before the fit's last)")
            self.record.notes.append(why)
            warnings.warn(f"FineTuneCallback: {why}", stacklevel=2)

    def _warm_lr(self):
        lrs = [float(h["lr"]) for h in self.learn.opt.hypers]
        sched = scheduler_of(self.learn)
        if sched is not None and "lr" in sched.scheds:  # the peak of the fit's own cycle, not its start
            peak = np.max([np.atleast_1d(sched.scheds["lr"](p)) for p in np.linspace(0, 1, 101)], axis=0)
            lrs = list(np.broadcast_to(peak, (len(lrs),)).astype(float))
        return lrs

    def before_train(self):
        if self.run and self.sched is not None and self._drives_keeper:
            self.sched.keeper.before_train()

    def after_epoch(self):
        if not self.run:
            return
        self.record.phases[-1].epochs_run += 1
        if self.unfrozen:
            return
        super().after_epoch()  # the tracker: best value and `new_best`
        self.wait = 0 if self.new_best else self.wait + 1
        plateau = self.rule.plateau and self.wait >= self.rule.patience
        due = self.epoch + 1 >= self.unfreeze_epoch
        if not (plateau or due) or self.epoch + 1 >= self.n_epoch:
            return
        reason = (f"{self.monitor} did not improve by more than {self.rule.min_delta} for {self.rule.patience} "
                  "epoch(s)" if plateau and not due else f"{self.unfreeze_epoch} warm-up epoch(s) done")
        self.sched.close_phase(reason)
        self.record.unfroze_at_epoch, self.record.unfreeze_reason = self.epoch + 1, reason
        lr, rt = self.sched.unfreeze()
        self.learn.opt.set_hyper("lr", lr)
        if self._ddp_params is not None:
            self._unsynced = [p for p in self.learn.model.parameters()
                              if p.requires_grad and id(p) not in self._ddp_params]
        lr_max = np.array([h["lr"] for h in self.learn.opt.hypers])
        sched = scheduler_of(self.learn)
        if sched is not None:
            sched.scheds["lr"] = ResumedSchedule(combined_cos(self.pct_start, lr_max / self.div, lr_max,
                                                              lr_max / self.div_final), (self.epoch + 1) / self.n_epoch)
        self.unfrozen = True
        self.sched.open_phase("unfrozen", self.n_epoch - self.epoch - 1, list(lr_max), _lr_source(rt), rt,
                              first_iter=len(self.learn.recorder.losses))

    def before_step(self):
        "Average, across processes, the gradients DDP does not know about (unfrozen mid-fit)."
        if self._unsynced:
            import torch.distributed as dist
            world = dist.get_world_size()
            for p in self._unsynced:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)

    def after_fit(self):
        if self.run:
            self.cleanup("fit ended")
        super().after_fit()

    def cleanup(self, reason: str = "interrupted") -> None:
        "Close the record's open phase, give back what the BN policy changed for the fit."
        sched, self.sched, self._unsynced = self.sched, None, []
        if sched is None:
            return
        try:
            if self.record.phases and not self.record.phases[-1].end_reason:
                sched.close_phase(reason)
        finally:
            if self._drives_keeper:
                sched.finish()
