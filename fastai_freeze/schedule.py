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
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from fastai.callback.schedule import combined_cos
from fastai.callback.tracker import TrackerCallback
from fastai.learner import Learner
from fastcore.basics import patch
from fastcore.foundation import L
from fastcore.meta import delegates

from .callbacks import FrozenPrefix, PlateauTracker, StopAtTarget, UnfreezeOnPlateau, check_monitor_data
from .distrib import is_distributed
from .features import cached_warmup, check_cacheable
from .freeze import (
    check_splittable,
    rebuild_optimizer,
    set_frozen_bn_trainable,
    staged_splitter,
    trainable_groups,
)
from .internals import FitScopedCallback, frozen_count, group_lrs, resume_schedule, scheduled_peak
from .policy import (
    BNPolicy,
    BNPolicyCallback,
    check_batch_size,
    check_freeze_bn,
    policy_freezes_bn,
)
from .probe import DEFAULT_FALLBACK_LR, RangeTest, _is_number, _positive, range_test
from .record import FineTuneRecord, PhaseRecord, RangeTestResult

__all__ = ["Unfreeze", "Gradual", "Stop", "FineTuneSchedule", "FineTuneCallback"]


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


def _check_monitor(learn: Learner, monitor: str, who: str) -> None:
    "Refuse, before anything changes, a monitor the Recorder will not have, or will record as None."
    names = ["train_loss", "valid_loss"] + [m.name for m in learn.metrics]
    if monitor not in names:
        raise ValueError(f"no value {monitor!r} is recorded: the recorder will have {names} (pass the metric "
                         "to the Learner, e.g. metrics=accuracy)")
    check_monitor_data(learn, monitor, who)


def _lr_source(rt: RangeTestResult) -> str:
    "What the record says chose a rate: the range test, or fastai's rule and the one reason (the warning's)."
    return f"fastai's rule: {rt.reason}" if rt.fell_back else f"range test ({rt.method}, {rt.curve})"


@dataclass(frozen=True)
class Gradual:
    """Gradual unfreezing: one more group per stage, an epoch each, before the last stage (the rest of
    the epochs, everything trainable); a 2-group Learner's body is split in two first.

    `ratio=None`: each stage's top rate comes from its own range test; a number > 1: the first
    stage's does, and each later stage's (the last's included) is the previous one's divided by it.
    """
    ratio: float | None = None

    def __post_init__(self):
        if self.ratio is not None and not (_is_number(self.ratio) and math.isfinite(float(self.ratio))
                                           and float(self.ratio) > 1):
            raise ValueError(f"gradual must be True/False or a ratio > 1 between stages' rates, got {self.ratio!r}")

    @classmethod
    def parse(cls, value: Gradual | bool | float | None) -> Gradual | None:
        "`False`/None: no gradual unfreezing; `True`: `Gradual()`; a number: `Gradual(ratio)`."
        if isinstance(value, cls) or value is None:
            return value
        if isinstance(value, bool):
            return cls() if value else None
        return cls(float(value) if _is_number(value) else value)


@dataclass(frozen=True)
class Stop:
    """How the unfrozen phase ends: early once `monitor` reaches `target`; with `keep_best`, on the
    best epoch's weights (by `monitor`, `valid_loss` when none is given, as `SaveModelCallback`)."""
    monitor: str | None = None
    target: float | None = None
    keep_best: bool = False

    def __post_init__(self):
        if self.target is not None and self.monitor is None:
            raise ValueError("target needs monitor, the metric it applies to (e.g. monitor='accuracy')")
        if self.target is not None:
            _positive("target", abs(self.target), allow_zero=True)
        if not isinstance(self.keep_best, bool):
            raise TypeError(f"keep_best must be True or False, got {self.keep_best!r}")
        if self.keep_best and self.monitor is None:
            object.__setattr__(self, "monitor", "valid_loss")

    def callback(self) -> StopAtTarget | None:
        return StopAtTarget(self.monitor, self.target, self.keep_best) if self.monitor is not None else None


def _fit_kwargs(pct_start, div, kwargs: dict) -> dict:
    "`fit_one_cycle`'s arguments for the unfrozen phase, checked (`lr_max` and unknown names refused)."
    if "lr_max" in kwargs:
        raise ValueError("lr_max is not taken: give the warm-up rate as base_lr; the unfrozen rate comes from "
                         "the range test (or fallback_lr)")
    unknown = sorted(set(kwargs) - _FIT_ONE_CYCLE_ARGS)
    if unknown:
        raise TypeError(f"fine_tune_with got unexpected arguments {unknown}: besides its own, it takes "
                        f"fit_one_cycle's {sorted(_FIT_ONE_CYCLE_ARGS)}")
    for k, v in (("pct_start", pct_start), ("div", div), ("div_final", kwargs.get("div_final", 1e5))):
        _positive(k, v)
    if pct_start >= 1:
        raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
    cbs = list(L(kwargs.get("cbs")))
    ours = [type(cb).__name__ for cb in cbs if isinstance(cb, (BNPolicyCallback, FineTuneCallback))]
    if ours:
        raise ValueError(f"fine_tune_with runs the schedule and the BN policy itself: give the policy as bn=... (or "
                         f"learn.apply_bn_policy) and the schedule's settings as arguments, not {ours} in cbs")
    return {**kwargs, "pct_start": float(pct_start), "div": float(div), "cbs": cbs}


_FIT_ONE_CYCLE_ARGS = frozenset(inspect.signature(Learner.fit_one_cycle).parameters) - {"self", "n_epoch", "lr_max",
                                                                                     "start_epoch"}


def _policy_callback(learn: Learner, bn, freeze_bn) -> BNPolicyCallback:
    """The BN policy callback of a run: the Learner's (`apply_bn_policy`, or one among the fit's
    callbacks), whose policy stands ('auto' defers to it, another policy is refused), else a new one."""
    policy = BNPolicy.parse(bn)
    theirs = [cb for cb in learn.cbs if isinstance(cb, BNPolicyCallback)]
    if not theirs:
        return BNPolicyCallback(policy, freeze_bn)
    why = theirs[0].conflicts_with(policy, freeze_bn)
    if why:
        raise ValueError(f"this Learner already has a BN policy (apply_bn_policy, or a BNPolicyCallback in the fit), "
                         f"and this run asks for another ({why}): drop one of them")
    return theirs[0]


class FineTuneSchedule:
    """The fine-tuning steps, written once: `fine_tune_with` runs them as separate fits (`run`),
    `FineTuneCallback` inside the fit a user already has (`start`, `unfreeze`).

    `start()` decides and applies the BN policy and freezes the body; `unfreeze(n)` unfreezes the
    groups from `n` on (all by default), keeps the still-frozen groups' BN parameters as the policy
    says, runs the range test on the model as it now is and returns the discriminative rates;
    `open_phase`/`close_phase` keep the record; `attached()` holds the run's callbacks on the Learner
    and gives back, however the run ends, what it changed for it. The BN policy's state is its
    callback's (`policy_cb`: the Learner's when it has one), queried here, never copied.
    """

    def __init__(self, learn: Learner, bn: str | BNPolicy = "auto", freeze_bn: bool | None = None,
                 lr_mult: float = 100, range_test: RangeTest | bool | None = None,
                 fallback_lr: float | None = None):
        policy = BNPolicy.parse(bn)
        if policy is not BNPolicy.AUTO:
            check_freeze_bn(policy, freeze_bn)
        elif freeze_bn is not None and not isinstance(freeze_bn, bool):
            raise TypeError(f"freeze_bn must be True, False or None, got {freeze_bn!r}")
        _positive("lr_mult", lr_mult)
        if lr_mult < 1:
            raise ValueError(f"lr_mult must be >= 1 (the head's rate over the first group's), got {lr_mult}")
        if fallback_lr is not None:
            _positive("fallback_lr", fallback_lr)
        check_splittable(learn)
        check_batch_size(learn, policy)
        self.policy_cb = _policy_callback(learn, policy, freeze_bn)
        self.learn, self.lr_mult = learn, float(lr_mult)
        self.fallback_lr = None if fallback_lr is None else float(fallback_lr)
        self.warm_lr: float | None = None  # the warm-up's top rate, for fastai's rule
        self.range_test = _range_test_config(range_test)
        self.record = FineTuneRecord()
        self._iter0, self._t0 = 0, time.perf_counter()
        self._before: tuple[dict, int] | None = None  # the freeze state `start` found (flags, frozen groups)

    @property
    def freeze_bn(self) -> bool:
        return self.policy_cb.decision.freeze_bn

    @property
    def fallback(self) -> float:
        "`fallback_lr`, else fastai's `fine_tune` rule: half the warm-up's top rate."
        if self.fallback_lr is not None:
            return self.fallback_lr
        return self.warm_lr / 2 if self.warm_lr else DEFAULT_FALLBACK_LR

    def start(self) -> None:
        "Decide and apply the BN policy, freeze the body (BN parameters as `freeze_bn` says)."
        learn = self.learn
        self._before = ({p: p.requires_grad for p in learn.model.parameters()}, frozen_count(learn.opt))
        self.record.bn = self.policy_cb.resolve(learn)
        learn.freeze_body(freeze_bn=self.record.bn.freeze_bn)

    def give_back_freeze(self) -> bool:
        """After an interrupt (an error, Ctrl-C) while groups are still frozen by this run: the Learner's
        freeze state from before the run (its frozen groups and every parameter's `requires_grad`;
        parameters a fold made new keep their own). Returns whether anything was given back."""
        before, self._before = self._before, None
        learn = self.learn
        if before is None or learn.opt is None or not frozen_count(learn.opt):
            return False
        flags, idx = before
        learn.freeze_to(idx)  # fastai's own: 0 unfreezes every group, train_bn as the Learner says
        for p in learn.model.parameters():
            if p in flags:
                p.requires_grad_(flags[p])
        self.record.notes.append("interrupted while groups were frozen by the run: the Learner's frozen groups "
                                 "and parameter flags from before it were given back (the weights keep what "
                                 "was trained)")
        return True

    def rates(self, top: float) -> slice:
        "The discriminative slice whose top is `top`."
        return slice(top / self.lr_mult, top)

    def unfreeze_to(self, from_group: int | None = None) -> None:
        "Unfreeze the groups from `from_group` on (None: all); the still-frozen groups' BN as the policy says."
        if from_group is None:
            self.learn.unfreeze()
        else:
            self.learn.freeze_to(from_group)
            set_frozen_bn_trainable(self.learn, not self.freeze_bn)

    def unfreeze(self, from_group: int | None = None) -> tuple[slice, RangeTestResult]:
        """Unfreeze the groups from `from_group` on (None: all), find the top rate on the model as it
        now is, return `(rates, range_test_result)`."""
        self.unfreeze_to(from_group)
        if self.range_test is None:  # range_test=False: fastai's fixed rule, asked for
            rt = RangeTestResult(lrs=[], losses=[], method="fixed", suggestion=self.fallback, point=None,
                                 fell_back=True, reason="range_test=False, the fixed top rate fallback_lr")
        else:
            rt = range_test(self.learn, self.range_test, lr_mult=self.lr_mult, fallback_lr=self.fallback)
        return self.rates(rt.suggestion), rt

    def open_phase(self, name: str, epochs: int, lr, source: str, rt: RangeTestResult | None = None,
                   first_iter: int = 0) -> PhaseRecord:
        "Start a phase; its history starts at the Recorder's iteration `first_iter` (0: a fit of its own)."
        phase = PhaseRecord(name, epochs, group_lrs(self.learn, lr), trainable_groups(self.learn),
                            str(self.policy_cb.decision.policy), source, range_test=rt)
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
        interrupt in the warm-up), their BN parameters are first left as `learn.freeze_body()` leaves
        them; `give_back_freeze` then restores the freeze state from before the run."""
        self.policy_cb.cleanup()
        if frozen_count(self.learn.opt):
            set_frozen_bn_trainable(self.learn, not policy_freezes_bn(self.learn))

    # ------------------------------------------------------------ the steps as separate fits ----
    @contextmanager
    def attached(self, frozen_prefix: bool = True):
        """For the run: its BN policy callback (unless it is the Learner's) and `FrozenPrefix` on the
        Learner. After it, however the run ended: no callback of the run left, the policy's changes
        for the fit given back, the Learner's splitter (gradual unfreezing may split the body)."""
        learn, splitter = self.learn, self.learn.splitter
        cbs = ([] if self.policy_cb in learn.cbs else [self.policy_cb]) + ([FrozenPrefix()] if frozen_prefix else [])
        learn.add_cbs(cbs)
        ended = False
        try:
            yield self
            ended = True
        finally:
            learn.remove_cbs(cbs)
            self.finish()
            if learn.splitter is not splitter:
                learn.splitter = splitter
                rebuild_optimizer(learn)
            if not ended:
                self.give_back_freeze()

    def run(self, epochs: int, freeze_epochs: int, base_lr: float | None, rule: Unfreeze, gradual: Gradual | None,
            stop: Stop, cache_features: bool, fit_kwargs: dict) -> FineTuneRecord:
        "The schedule after `start()`, as separate fits: warm-up, the stages of `gradual`, the unfrozen phase."
        self.warm_lr = base_lr
        if freeze_epochs:
            self.warm_up(freeze_epochs, base_lr, rule, cache_features, fit_kwargs)
        stages = self._stages(epochs) if gradual is not None else []
        lr = None
        for i, k in enumerate(stages):
            lr, rt, src = self._stage_rates(k, gradual, lr)
            self._fit_phase(f"stage {i + 1}", 1, lr, src, rt, fit_kwargs)
        lr, rt, src = self._stage_rates(None, gradual, lr)
        self.fit_unfrozen(epochs - len(stages), lr, src, rt, stop, fit_kwargs)
        self.record.notes.append("each range test sweeps the top (head group) rate of the discriminative slice")
        return self.record

    def _fit_phase(self, name: str, epochs: int, lr, source: str, rt, fit_kwargs: dict, extra: list = ()) -> PhaseRecord:
        phase = self.open_phase(name, epochs, lr, source, rt)
        try:
            self.learn.fit_one_cycle(epochs, lr, **{**fit_kwargs, "cbs": fit_kwargs["cbs"] + list(extra)})
        finally:
            phase.epochs_run = len(getattr(self.learn.recorder, "values", []))
            self.close_phase()
        return phase

    def warm_up(self, epochs: int, base_lr: float | None, rule: Unfreeze, cache_features: bool,
                fit_kwargs: dict) -> PhaseRecord:
        """`fit_one_cycle(epochs, slice(lr), pct_start=0.99)` with the body frozen, as fastai's
        `fine_tune` (`base_lr=None`: a range test on the frozen model chooses `lr`)."""
        if base_lr is None:
            rt = range_test(self.learn, self.range_test or RangeTest(), fallback_lr=DEFAULT_FALLBACK_LR)
            lr, src = rt.suggestion, _lr_source(rt) + ", frozen"
        else:
            rt, lr, src = None, base_lr, "base_lr"
        self.warm_lr = lr
        kwargs = {**fit_kwargs, "pct_start": 0.99}
        if cache_features:
            phase = self.open_phase("warm-up", epochs, slice(lr), src, rt)
            cw = cached_warmup(self.learn, epochs, lr, **kwargs)
            phase.epochs_run, phase.values, phase.metric_names = len(cw.values), cw.values, cw.metric_names
            phase.losses, phase.iter_lrs = cw.losses, cw.iter_lrs
            phase.seconds = cw.feature_seconds + cw.fit_seconds
            where = "on disk (memory-mapped)" if cw.on_disk else "in memory"
            phase.end_reason = (f"{phase.epochs_run} epoch(s) on cached features ({cw.nbytes / 2**20:.1f} MiB "
                                f"{where}, computed in {cw.feature_seconds:.1f}s)")
            return phase
        plateau = (UnfreezeOnPlateau(rule.monitor, min_delta=rule.min_delta, patience=rule.patience)
                   if rule.plateau else None)
        phase = self._fit_phase("warm-up", epochs, slice(lr), src, rt, kwargs, [plateau] if plateau else [])
        if plateau is not None and plateau.stopped_epoch is not None:
            phase.end_reason = f"{rule.monitor} did not improve by more than {rule.min_delta} for {rule.patience} epoch(s)"
        return phase

    def _stages(self, epochs: int) -> list[int]:
        """Group indices to unfreeze down to, one stage each (an epoch per stage, the last stage with
        the rest), out of `epochs`; a 2-group Learner's body is split in two first."""
        learn, notes = self.learn, self.record.notes
        n = len(learn.opt.param_lists)
        if n == 2:
            split = staged_splitter(learn.splitter, 2)
            if len(split(learn.model)) < 3:
                notes.append("gradual: the body could not be split into stages (fewer than two parts with "
                             "parameters); unfrozen at once")
                return []
            learn.splitter = split
            learn.create_opt()
            notes.append(f"gradual: the body was split into {len(learn.opt.param_lists) - 1} stages ({split.how})")
            n = len(learn.opt.param_lists)
        stages = list(range(n - 2, 0, -1))[:max(epochs - 1, 0)]
        if not stages:
            notes.append(f"gradual: {epochs} epoch(s) leave no epoch for a stage before the last; unfrozen at once")
        return stages

    def _stage_rates(self, from_group: int | None, gradual: Gradual | None, prev: slice | None):
        "Unfreeze down to `from_group`; the rates from a range test, or the previous stage's over `gradual.ratio`."
        if prev is None or gradual is None or gradual.ratio is None:
            lr, rt = self.unfreeze(from_group)
            return lr, rt, _lr_source(rt)
        self.unfreeze_to(from_group)
        return self.rates(prev.stop / gradual.ratio), None, f"previous stage / {gradual.ratio:g}"

    def fit_unfrozen(self, epochs: int, lr: slice, source: str, rt, stop: Stop, fit_kwargs: dict) -> PhaseRecord:
        "The unfrozen phase, ended early and on the best weights as `stop` says."
        cb = stop.callback()
        phase = self._fit_phase("unfrozen", epochs, lr, source, rt, fit_kwargs, [cb] if cb else [])
        if cb is not None and cb.reached_epoch is not None:
            phase.end_reason = f"{stop.monitor} reached {stop.target} after epoch {cb.reached_epoch}"
        if cb is not None and stop.keep_best and cb.best_epoch is not None:
            self.record.notes.append(f"kept the weights of unfrozen epoch {cb.best_epoch + 1} ({stop.monitor}={cb.best:.4g})")
        return phase


# ---------------------------------------------------------------- the method ------------------
@patch
@delegates(Learner.fit_one_cycle, but=["lr_max", "start_epoch"])
def fine_tune_with(self: Learner, epochs: int, base_lr: float | None = 2e-3, freeze_epochs: int = 1,
                   lr_mult: float = 100, pct_start: float = 0.3, div: float = 5.0, bn: str = "auto",
                   freeze_bn: bool | None = None, unfreeze: Unfreeze | str | None = None,
                   range_test: RangeTest | bool | None = None, fallback_lr: float | None = None,
                   monitor: str | None = None, target: float | None = None, keep_best: bool = False,
                   gradual: Gradual | bool | float = False, cache_features: bool = False, **kwargs) -> FineTuneRecord:
    """fastai's `fine_tune` with a BN policy (`bn`, `freeze_bn`), a warm-up that may end on a plateau
    (`unfreeze`), the unfrozen top rate from a range test on the unfrozen model (`range_test`; below 20
    batches per epoch, or `range_test=False`: `fallback_lr`, by default fastai's rule `base_lr / 2`),
    `slice(lr / lr_mult, lr)` for `epochs` one-cycle epochs; `base_lr=None`: a range test sets the
    warm-up rate. `monitor`/`target`/`keep_best`: `Stop`; `gradual`: `Gradual`; `cache_features`: the
    warm-up on the body's features computed once. Other arguments go to `fit_one_cycle`. Every argument
    is checked before anything changes; returns the `FineTuneRecord` (also `learn.fine_tune_record`)."""
    _positive("epochs", epochs, integer=True)
    _positive("freeze_epochs", freeze_epochs, integer=True, allow_zero=True)
    if base_lr is not None:
        _positive("base_lr", base_lr)
    rule, stages, stop = Unfreeze.parse(unfreeze), Gradual.parse(gradual), Stop(monitor, target, keep_best)
    if rule.plateau and not freeze_epochs:
        raise ValueError("unfreeze='plateau' needs freeze_epochs >= 1 as its cap")
    fit_kwargs = _fit_kwargs(pct_start, div, kwargs)
    for name, who in ([(rule.monitor, "unfreeze='plateau'")] if rule.plateau else []) + (
            [(stop.monitor, "the stop rule (target/keep_best)")] if stop.monitor else []):
        _check_monitor(self, name, who)
    if cache_features:
        freeze_bn = _check_cache(self, bn, freeze_bn, rule)
    if fallback_lr is None and base_lr is not None:
        fallback_lr = float(base_lr) / 2  # fastai's fine_tune rule
    sched = FineTuneSchedule(self, bn, freeze_bn, lr_mult, range_test, fallback_lr)
    with sched.attached():
        sched.start()
        self.fine_tune_record = sched.record
        sched.run(int(epochs), int(freeze_epochs), None if base_lr is None else float(base_lr), rule, stages, stop,
                  cache_features, fit_kwargs)
    return sched.record


def _check_cache(learn: Learner, bn, freeze_bn, rule: Unfreeze) -> bool:
    "Refuse `cache_features` where the body changes during the warm-up; the `freeze_bn` it implies."
    if freeze_bn is False or BNPolicy.parse(bn) is BNPolicy.TRAIN:
        raise ValueError("cache_features needs a body that does not change during the warm-up: BN parameters "
                         "frozen and no batch statistics; drop freeze_bn=False / bn='train', or drop cache_features")
    if rule.plateau:
        raise ValueError("cache_features warms up for a fixed number of epochs: use unfreeze='epochs'")
    check_cacheable(learn)
    return True


# ---------------------------------------------------------------- the callback ----------------
class FineTuneCallback(FitScopedCallback, PlateauTracker):
    """The `fine_tune_with` schedule inside an existing `fit_one_cycle`/`fit` call.

    `learn.fit_one_cycle(6, 1e-3, cbs=FineTuneCallback(freeze_epochs=2))` applies the BN policy
    (`bn`, `freeze_bn` as in `fine_tune_with`; a policy already on the Learner stands), starts with
    the body frozen, unfreezes after `freeze_epochs` epochs (or earlier, with `unfreeze='plateau'`,
    once the monitored value stops improving), runs a range test on the unfrozen model and continues
    the remaining epochs with a new one-cycle schedule at `slice(lr / lr_mult, lr)` (with plain `fit`:
    at those constant rates). `fallback_lr=None` is fastai's rule: half the warm-up's top rate. The
    set-up waits for the first training epoch (`validate` and `get_preds` leave it alone) and is off
    while `lr_find` runs. The decisions are in `self.record`. However the fit ends (an error or a
    Ctrl-C included), the BN policy's changes for the fit are given back and the record's last phase
    is closed (`FitScopedCallback`).
    """
    order = TrackerCallback.order + 2
    _pause_in_probe = True

    @property
    def name(self) -> str:
        "The attribute fastai sets on the Learner for this callback (not `fine_tune`: that is a method)."
        return "fine_tune_schedule"

    def __init__(self, freeze_epochs: int = 1, unfreeze: Unfreeze | str | None = None, bn: str = "auto",
                 freeze_bn: bool | None = None, lr_mult: float = 100, range_test: RangeTest | bool | None = None,
                 fallback_lr: float | None = None, pct_start: float = 0.3, div: float = 5.0,
                 div_final: float = 1e5, unfreeze_epoch: int | None = None):
        if unfreeze_epoch is not None:  # the name of earlier releases
            warnings.warn("FineTuneCallback(unfreeze_epoch=...) is now freeze_epochs=..., as in fine_tune_with",
                          DeprecationWarning, stacklevel=2)
            freeze_epochs = unfreeze_epoch
        _positive("freeze_epochs", freeze_epochs, integer=True)
        rule = Unfreeze.parse(unfreeze)
        super().__init__(monitor=rule.monitor, min_delta=rule.min_delta, patience=rule.patience)
        for k, v in (("pct_start", pct_start), ("div", div), ("div_final", div_final)):
            _positive(k, v)
        if pct_start >= 1:
            raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
        policy = BNPolicy.parse(bn)
        if policy is not BNPolicy.AUTO:
            check_freeze_bn(policy, freeze_bn)
        _positive("lr_mult", lr_mult)
        if fallback_lr is not None:
            _positive("fallback_lr", fallback_lr)
        _range_test_config(range_test)
        self.freeze_epochs, self.rule = int(freeze_epochs), rule
        self.bn, self.freeze_bn, self.lr_mult, self.fallback_lr = policy, freeze_bn, float(lr_mult), fallback_lr
        self.range_test = range_test  # None: the default RangeTest; False: fastai's fixed rule
        self.pct_start, self.div, self.div_final = float(pct_start), float(div), float(div_final)
        self.record = FineTuneRecord()
        self.sched: FineTuneSchedule | None = None
        self._added: list = []
        self._unsynced: list = []

    @property
    def unfreeze_epoch(self) -> int:
        return self.freeze_epochs

    @property
    def watches(self) -> bool:  # the plateau tracker reads `monitor` only under unfreeze='plateau'
        return self.rule.plateau

    def before_fit(self):
        self.cleanup("the fit ended without an event")  # a no-op unless kept on the Learner and interrupted
        super().before_fit()
        self._pending, self.unfrozen = self.run, False

    def before_train(self):
        if self.run and self._pending:
            self._pending = False
            self._set_up()

    def _set_up(self) -> None:
        "The schedule's start, at the fit's first training epoch."
        learn = self.learn
        sched = FineTuneSchedule(learn, self.bn, self.freeze_bn, self.lr_mult, self.range_test, self.fallback_lr)
        # DDP (fastai's distrib_ctx wraps the model at before_fit) synchronises the gradients of the
        # parameters that were trainable when it was built, and no others
        self._ddp_params = ({id(p) for p in learn.model.parameters() if p.requires_grad}
                            if is_distributed() else None)
        self.sched, self.record, self._unsynced = sched, sched.record, []
        peak = scheduled_peak(learn) or [float(h["lr"]) for h in learn.opt.hypers]
        sched.warm_lr = peak[-1]
        self._added = [] if sched.policy_cb in learn.cbs else [sched.policy_cb]
        learn.add_cbs(self._added)
        sched.start()
        if self._added:  # joins the fit in progress: the events it missed
            sched.policy_cb.before_fit()
        sched.policy_cb.before_train()
        sched.open_phase("warm-up", self.freeze_epochs, peak, "the fit's own schedule")
        if self.freeze_epochs >= self.n_epoch and not self.rule.plateau:
            why = (f"freeze_epochs={self.freeze_epochs} in a fit of {self.n_epoch} epoch(s): the body is not "
                   "unfrozen (it unfreezes after that epoch, and only before the fit's last)")
            self.record.notes.append(why)
            warnings.warn(f"FineTuneCallback: {why}", stacklevel=2)

    def after_epoch(self):
        if not self.run or self.sched is None:
            return
        self.record.phases[-1].epochs_run += 1
        if self.unfrozen:
            return
        super().after_epoch()  # the plateau tracker: best value, `wait`
        plateau = self.rule.plateau and self.plateaued
        due = self.epoch + 1 >= self.freeze_epochs
        if not (plateau or due) or self.epoch + 1 >= self.n_epoch:
            return
        reason = (f"{self.monitor} did not improve by more than {self.rule.min_delta} for {self.rule.patience} "
                  "epoch(s)" if plateau and not due else f"{self.freeze_epochs} warm-up epoch(s) done")
        self.sched.close_phase(reason)
        lr, rt = self.sched.unfreeze()
        self.learn.opt.set_hyper("lr", lr)
        if self._ddp_params is not None:
            self._unsynced = [p for p in self.learn.model.parameters()
                              if p.requires_grad and id(p) not in self._ddp_params]
        lr_max = np.array([h["lr"] for h in self.learn.opt.hypers])
        resume_schedule(self.learn, "lr", combined_cos(self.pct_start, lr_max / self.div, lr_max,
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
            added, self._added = self._added, []
            if added and self.learn is not None:
                self.learn.remove_cbs(added)
            sched.finish()
            if reason != "fit ended":  # interrupted: the freeze state from before the fit, if still frozen
                sched.give_back_freeze()
