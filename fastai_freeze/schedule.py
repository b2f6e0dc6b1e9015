"""`fine_tune_with`: the lr_find-driven unfreeze schedule, and the same schedule as drop-in callbacks.

fastai's `fine_tune` unfreezes after a fixed number of epochs and trains at a fixed
`slice(base_lr/2/lr_mult, base_lr/2)`. Here the head warms up (for `freeze_epochs`, or until the
validation loss stops improving), the body is unfrozen, a range test runs on the *unfrozen* model
and its suggestion becomes the top of a discriminative slice. Every decision goes into a
`FineTuneRecord`.
"""
from __future__ import annotations

import copy
import math
import random
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import LRFinder, ParamScheduler, combined_cos, minimum, slide, steep, valley
from fastai.learner import Learner
from fastcore.basics import patch
from fastcore.foundation import L
from fastcore.meta import delegates

from .distrib import broadcast_object, is_distributed, local_fit_state
from .features import cached_warmup
from .freeze import FrozenBodyShortcut, check_splittable, set_frozen_bn_trainable, trainable_groups
from .policy import BNPolicy, BNPolicyCallback, decide_bn_policy
from .record import FineTuneRecord, PhaseRecord, RangeTestResult

__all__ = ["SUGGESTERS", "learner_snapshot", "restore_learner", "range_test", "PlateauRule",
           "StopAtTarget", "UnfreezeOnPlateau", "FineTuneCallback", "DEFAULT_FALLBACK_LR", "DEFAULT_MAX_PASSES",
           "RangeTestFinder"]

SUGGESTERS: dict[str, Callable] = {"valley": valley, "steep": steep, "minimum": minimum, "slide": slide}
DEFAULT_FALLBACK_LR = 1e-3
"""Rate used (with a warning) when a range test gives no usable curve: fastai's `fine_tune` rule for
the unfrozen phase (`base_lr / 2` with its default `base_lr=2e-3`)."""
DEFAULT_MAX_PASSES = 1.0
"""A range test that would go over the training set more than this many times is not run: once
images come back, its curve shows the model memorising them (the loss falls because the same
images return, whatever the rate), which pushes every suggestion to the left. With the default
100 iterations, a range test runs on 100 batches or more. In the transfer benchmark a range test
over a 3-batch training set (33 passes) chose rates 3-5x below fastai's rule and lost accuracy."""


def _suggester(suggest: str | Callable) -> tuple[str, Callable]:
    if callable(suggest):
        return getattr(suggest, "__name__", "custom"), suggest
    key = str(suggest).lower()
    if key not in SUGGESTERS:
        raise ValueError(f"unknown suggestion method {suggest!r}: use one of {sorted(SUGGESTERS)} "
                         f"(fastai's SuggestionMethod) or a callable f(lrs, losses, num_it) -> (lr, point)")
    return key, SUGGESTERS[key]


# ---------------------------------------------------------------- snapshot / restore ----------
_LEARN_ATTRS = ("epoch", "n_epoch", "iter", "n_iter", "train_iter", "pct_train", "training", "loss",
                "smooth_loss", "final_record", "dl", "xb", "yb", "pred", "loss_grad")
_REC_ATTRS = ("lrs", "iters", "losses", "values", "hps", "log", "cancel_train", "cancel_valid")


def learner_snapshot(learn: Learner) -> dict:
    """Everything a probe could disturb, in memory: weights and buffers, optimizer state and hypers,
    `requires_grad` flags, module modes, the recorder's history and the random states.

    Costs one copy of the model's state and of the optimizer's state in memory.
    """
    if learn.opt is None:
        learn.create_opt()
    opt = learn.opt
    rec = getattr(learn, "recorder", None)
    snap = {
        "model": {k: v.detach().clone() for k, v in learn.model.state_dict(keep_vars=True).items()},
        "grad": {p: p.requires_grad for p in learn.model.parameters()},
        "modes": {m: m.training for m in learn.model.modules()},
        "opt_state": {p: copy.deepcopy(st) for p, st in opt.state.items()},
        "opt_hypers": copy.deepcopy(list(opt.hypers)),
        "frozen_idx": getattr(opt, "frozen_idx", 0),
        "learn": {a: getattr(learn, a) for a in _LEARN_ATTRS if hasattr(learn, a)},
        "rng": (torch.get_rng_state(), np.random.get_state(), random.getstate(),
                torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
    }
    if rec is not None:
        snap["rec"] = {a: copy.copy(getattr(rec, a)) for a in _REC_ATTRS if hasattr(rec, a)}
        sl = getattr(rec, "smooth_loss", None)
        snap["smooth"] = copy.deepcopy(sl.__dict__) if sl is not None else None
    return snap


def restore_learner(learn: Learner, snap: dict) -> None:
    "Put back what `learner_snapshot` saved, bit for bit."
    with torch.no_grad():
        for k, v in learn.model.state_dict(keep_vars=True).items():
            v.data.copy_(snap["model"][k]) if v.shape == snap["model"][k].shape else None
    for p, flag in snap["grad"].items():
        p.requires_grad_(flag)
        p.grad = None
    for m, t in snap["modes"].items():
        m.training = t
    opt = learn.opt
    opt.state.clear()
    for p, st in snap["opt_state"].items():
        opt.state[p] = st
    for h, h0 in zip(opt.hypers, snap["opt_hypers"]):
        h.clear()
        h.update(h0)
    opt.frozen_idx = snap["frozen_idx"]
    for a, v in snap["learn"].items():
        setattr(learn, a, v)
    rec = getattr(learn, "recorder", None)
    if rec is not None and "rec" in snap:
        for a, v in snap["rec"].items():
            setattr(rec, a, v)
        if snap.get("smooth") is not None:
            rec.smooth_loss.__dict__.update(snap["smooth"])
    t, n, r, c = snap["rng"]
    torch.set_rng_state(t)
    np.random.set_state(n)
    random.setstate(r)
    if c is not None:
        torch.cuda.set_rng_state_all(c)


def _pause_in_probe(cb) -> bool:
    "Callbacks that belong to the fit in progress, not to the Learner: off during a range test."
    return (isinstance(cb, (ParamScheduler, ProgressCallback)) or getattr(cb, "_pause_in_probe", False)
            or type(cb).__name__ == "DistributedTrainer")


def _fallback(name, reason, fallback_lr, lrs, losses, full_lrs, full_losses, seconds) -> RangeTestResult:
    if fallback_lr is None:
        raise RuntimeError(f"range test unusable: {reason}")
    warnings.warn(f"range test unusable: {reason}; falling back to lr={fallback_lr:g}", stacklevel=3)
    return RangeTestResult(lrs, losses, name, float(fallback_lr), None, True, reason, full_lrs, full_losses, seconds)


class RangeTestFinder(LRFinder):
    """fastai's `LRFinder` with two changes for use inside `range_test`.

    - The divergence check (smoothed loss above 4x the best) starts after the first `skip`
      iterations, the part of the curve the suggestion discards anyway. A warmed-up head on small
      batches can show a near-zero loss on one batch and a normal one on the next, which otherwise
      stops the test at iteration 2.
    - No file save and reload: `range_test` restores everything from memory.
    """

    def __init__(self, start_lr=1e-7, end_lr=10, num_it=100, stop_div=True, skip: int = 10):
        super().__init__(start_lr, end_lr, num_it, stop_div)
        self.skip = skip

    @property
    def name(self):  # `learn.lr_finder`, which fastai's and our callbacks check to stay out of the way
        return "lr_finder"

    def before_fit(self):
        ParamScheduler.before_fit(self)
        self.best_loss = float("inf")

    def after_batch(self):
        ParamScheduler.after_batch(self)
        if self.train_iter > self.skip:
            if self.smooth_loss < self.best_loss:
                self.best_loss = self.smooth_loss
            if self.stop_div and self.smooth_loss > 4 * self.best_loss:
                raise CancelFitException()
        if self.train_iter >= self.num_it:
            raise CancelFitException()

    def after_fit(self):
        self.learn.opt.zero_grad()


def range_test(learn: Learner, suggest: str | Callable = "valley", start_lr: float = 1e-7, end_lr: float = 10,
               num_it: int = 100, stop_div: bool = True, fallback_lr: float | None = DEFAULT_FALLBACK_LR,
               max_passes: float | None = DEFAULT_MAX_PASSES) -> RangeTestResult:
    """fastai's `lr_find` on the Learner as it is now (frozen or not), leaving nothing changed.

    The sweep is fastai's (`RangeTestFinder`: exponential rates, smoothed loss, the same curve cut
    and suggestion functions), with the divergence check starting after the discarded first tenth.

    Weights, BN statistics, optimizer state, `requires_grad`, module modes, the recorder's history
    and the random states are restored bit for bit afterwards (see `learner_snapshot`). It may be
    called inside a running fit (the callbacks of that fit are paused meanwhile). If the curve is
    unusable (it diverged at once or is NaN), `fallback_lr` is used with a warning; with
    `fallback_lr=None` a `RuntimeError` is raised instead. The same happens, without running the
    sweep, when `num_it` iterations would go over the training set more than `max_passes` times
    (see `DEFAULT_MAX_PASSES`; `None` runs it whatever the data size).
    """
    name, func = _suggester(suggest)
    if num_it < 20:
        raise ValueError(f"num_it={num_it}: a range test needs at least 20 iterations for a usable curve")
    n_batches = len(learn.dls.train)
    if max_passes is not None and num_it > max_passes * n_batches:
        reason = (f"{num_it} iterations would go over the {n_batches}-batch training set "
                  f"{num_it / n_batches:.0f} times (> {max_passes:g}): the curve would show memorisation "
                  "rather than the rate")
        return _fallback(name, reason, fallback_lr, [], [], [], [], 0.0)
    t0 = time.perf_counter()
    paused = [cb for cb in learn.cbs if _pause_in_probe(cb)]
    # distributed: every process sweeps on its own (no DDP, no DistributedDL), rank 0's result is shared
    with local_fit_state(learn):
        snap = learner_snapshot(learn)
        try:
            finder = RangeTestFinder(start_lr, end_lr, num_it, stop_div, skip=num_it // 10)
            with learn.removed_cbs(paused), learn.no_logging():
                learn.fit(num_it // len(learn.dls.train) + 1, cbs=finder)
            full_lrs = [float(x) for x in learn.recorder.lrs]
            full_losses = [float(x) for x in learn.recorder.losses]
        finally:
            restore_learner(learn, snap)
    full_lrs, full_losses = broadcast_object((full_lrs, full_losses))
    # the same cut as fastai's lr_find
    lrs = torch.tensor(full_lrs[num_it // 10:-5])
    losses = torch.tensor(full_losses[num_it // 10:-5])
    bad = torch.nonzero(~torch.isfinite(losses.view(-1)))
    if len(bad):
        lrs, losses = lrs[:int(bad.min())], losses[:int(bad.min())]
    reason = ""
    if len(losses) < 5:
        how = ("became NaN or infinite" if len(bad) else
               f"diverged (stopped after {len(full_losses)} of {num_it} iterations)")
        reason = f"the loss {how}, leaving {len(losses)} usable points"
    else:
        try:
            lr, point = func(lrs, losses, num_it)
            lr = float(lr)
            if not math.isfinite(lr) or lr <= 0:
                reason = f"the {name} suggestion was {lr}"
        except Exception as e:  # noqa: BLE001 - a suggester failing on an odd curve is a fallback case
            reason = f"the {name} suggestion failed on this curve ({type(e).__name__}: {e})"
    if reason:
        return _fallback(name, reason, fallback_lr, lrs.tolist(), losses.tolist(), full_lrs, full_losses,
                         time.perf_counter() - t0)
    pt = (float(point[0]), float(point[1])) if point is not None else None
    return RangeTestResult(lrs.tolist(), losses.tolist(), name, lr, pt, False, "", full_lrs, full_losses,
                           time.perf_counter() - t0)


# ---------------------------------------------------------------- rules and callbacks ---------
class PlateauRule:
    "True once `value` has not improved on the best by more than `min_delta` for `patience` updates."

    def __init__(self, patience: int = 1, min_delta: float = 0.0, mode: str = "min"):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best, self.wait = None, 0

    def update(self, value: float) -> bool:
        better = (self.best is None or
                  (value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta))
        if better:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        return self.wait >= self.patience


def _metric_index(learn: Learner, name: str) -> int:
    names = list(learn.recorder.metric_names[1:])
    if name not in names:
        raise ValueError(f"no metric {name!r} is recorded: the recorder has {names[:-1]} (pass the metric "
                         "to the Learner, e.g. metrics=accuracy)")
    return names.index(name)


class UnfreezeOnPlateau(Callback):
    "Ends the (warm-up) fit once the monitored value stops improving; `stopped_epoch` says when."
    order = 55  # after the Recorder (50) has written the epoch's values
    _pause_in_probe = True

    def __init__(self, monitor: str = "valid_loss", patience: int = 1, min_delta: float = 0.0):
        self.monitor = monitor
        self.rule = PlateauRule(patience, min_delta, "min" if "loss" in monitor or "error" in monitor else "max")
        self.stopped_epoch = None

    def before_fit(self):
        self.idx = _metric_index(self.learn, self.monitor)
        self.rule.best, self.rule.wait, self.stopped_epoch = None, 0, None

    def after_epoch(self):
        if self.rule.update(float(self.learn.recorder.values[-1][self.idx])):
            self.stopped_epoch = self.epoch + 1
            raise CancelFitException()


class StopAtTarget(Callback):
    """Stops the fit once `monitor` reaches `target`, and (with `keep_best`) loads the best weights seen.

    The best weights are kept in memory (one copy of the state dict), not in a file.
    """
    order = 56
    _pause_in_probe = True

    def __init__(self, monitor: str, target: float | None = None, keep_best: bool = True):
        self.monitor, self.target, self.keep_best = monitor, target, keep_best
        self.mode = "min" if "loss" in monitor or "error" in monitor else "max"
        self.reached_epoch, self.best, self.best_epoch, self._state = None, None, None, None

    def before_fit(self):
        self.idx = _metric_index(self.learn, self.monitor)
        self.reached_epoch, self.best, self.best_epoch, self._state = None, None, None, None

    def _better(self, v, ref) -> bool:
        return ref is None or (v < ref if self.mode == "min" else v > ref)

    def after_epoch(self):
        v = float(self.learn.recorder.values[-1][self.idx])
        if self._better(v, self.best):
            self.best, self.best_epoch = v, self.epoch
            if self.keep_best:
                self._state = {k: t.detach().clone() for k, t in self.learn.model.state_dict().items()}
        if self.target is not None and not self._better(self.target, v) and v == v:
            self.reached_epoch = self.epoch + 1
            raise CancelFitException()

    def after_fit(self):
        if self.keep_best and self._state is not None:
            self.learn.model.load_state_dict(self._state)


def _lr_source(rt: RangeTestResult) -> str:
    return f"fallback ({rt.method} unusable)" if rt.fell_back else f"range test ({rt.method})"


def _group_lrs(learn: Learner, lr) -> list[float]:
    "The per-group rates that `lr` (a float, a slice or a list) gives on this Learner's optimizer."
    saved = [h["lr"] for h in learn.opt.hypers]
    learn.opt.set_hyper("lr", lr)
    out = [float(h["lr"]) for h in learn.opt.hypers]
    for h, v in zip(learn.opt.hypers, saved):
        h["lr"] = v
    return out


class _Resumed:
    "A schedule that runs `sched` over the part `[start, 1]` of the fit (for a new cycle mid-fit)."

    def __init__(self, sched: Callable, start: float):
        self.sched, self.start = sched, start

    def __call__(self, pos: float):
        return self.sched(min(max((pos - self.start) / max(1 - self.start, 1e-12), 0.0), 1.0))


class FineTuneCallback(Callback):
    """The `fine_tune_with` schedule inside an existing `fit_one_cycle`/`fit` call.

    `learn.fit_one_cycle(6, 1e-3, cbs=FineTuneCallback(unfreeze_epoch=2))` starts with the body
    frozen (BN as `freeze_bn` says), unfreezes after epoch `unfreeze_epoch` (or earlier, with
    `plateau=True`, once the validation loss stops improving), runs a range test on the unfrozen
    model and continues the remaining epochs with a new one-cycle schedule at the discriminative
    `slice(lr/lr_mult, lr)` (with plain `fit`: at those constant rates). Off while `lr_find` runs.
    The decisions are in `self.record`.
    """
    order = 57  # after the Recorder (50): the epoch's validation loss is known in after_epoch
    _pause_in_probe = True

    def __init__(self, unfreeze_epoch: int = 1, plateau: bool = False, patience: int = 1,
                 min_delta: float = 0.0, suggest: str | Callable = "valley", lr_mult: float = 100,
                 freeze_bn: bool = False, pct_start: float = 0.3, div: float = 5.0, div_final: float = 1e5,
                 fallback_lr: float | None = DEFAULT_FALLBACK_LR, num_it: int = 100,
                 max_passes: float | None = DEFAULT_MAX_PASSES):
        if unfreeze_epoch < 1:
            raise ValueError(f"unfreeze_epoch must be >= 1 (epochs trained frozen), got {unfreeze_epoch}")
        if lr_mult < 1:
            raise ValueError(f"lr_mult must be >= 1 (ratio of the head's rate to the first group's), got {lr_mult}")
        _suggester(suggest)
        self.unfreeze_epoch, self.plateau = unfreeze_epoch, plateau
        self.rule_args = (patience, min_delta)
        self.suggest, self.lr_mult, self.freeze_bn = suggest, lr_mult, freeze_bn
        self.pct_start, self.div, self.div_final = pct_start, div, div_final
        self.fallback_lr, self.num_it, self.max_passes = fallback_lr, num_it, max_passes
        self.record = FineTuneRecord()
        self._unsynced: list = []

    def before_fit(self):
        self.run = not hasattr(self.learn, "lr_finder")
        if not self.run:
            return
        check_splittable(self.learn)
        # DDP (fastai's distrib_ctx wraps the model before this runs) synchronises the gradients of
        # the parameters that were trainable when it was built, and no others
        self._ddp_params = ({id(p) for p in self.learn.model.parameters() if p.requires_grad}
                            if is_distributed() else None)
        self._unsynced = []
        self.learn.freeze_body(bn_trainable=not self.freeze_bn)
        self.rule = PlateauRule(*self.rule_args)
        self.record = FineTuneRecord(bn=f"freeze_bn={self.freeze_bn}")
        self.unfrozen = False
        self._t0 = time.perf_counter()
        self._iter0 = 0
        self._open_phase("warm-up", self.unfreeze_epoch, "the fit's own schedule")

    def _open_phase(self, name, epochs, source, rt=None):
        self.record.phases.append(PhaseRecord(
            name, epochs, [float(h["lr"]) for h in self.learn.opt.hypers], trainable_groups(self.learn),
            self.record.bn, source, range_test=rt, metric_names=list(self.learn.recorder.metric_names)))

    def _close_phase(self, reason):
        p = self.record.phases[-1]
        rec = self.learn.recorder
        p.losses = [float(x) for x in rec.losses[self._iter0:]]
        p.iter_lrs = [float(x) for x in rec.lrs[self._iter0:]]
        p.values = [list(v) for v in rec.values[len(rec.values) - p.epochs_run:]] if p.epochs_run else []
        p.seconds = time.perf_counter() - self._t0
        p.end_reason = reason
        self._iter0, self._t0 = len(rec.losses), time.perf_counter()

    def after_epoch(self):
        self.record.phases[-1].epochs_run += 1
        if self.unfrozen:
            return
        idx = _metric_index(self.learn, "valid_loss")
        plateau = self.plateau and self.rule.update(float(self.learn.recorder.values[-1][idx]))
        due = self.epoch + 1 >= self.unfreeze_epoch
        if not (plateau or due) or self.epoch + 1 >= self.n_epoch:
            return
        reason = ("validation loss did not improve by more than "
                  f"{self.rule.min_delta} for {self.rule.patience} epoch(s)" if plateau and not due
                  else f"{self.unfreeze_epoch} warm-up epoch(s) done")
        self._close_phase(reason)
        self.record.unfroze_at_epoch, self.record.unfreeze_reason = self.epoch + 1, reason
        self.learn.unfreeze()
        if self._ddp_params is not None:
            self._unsynced = [p for p in self.learn.model.parameters()
                              if p.requires_grad and id(p) not in self._ddp_params]
        rt = range_test(self.learn, self.suggest, num_it=self.num_it, fallback_lr=self.fallback_lr,
                        max_passes=self.max_passes)
        top = rt.suggestion
        self.learn.opt.set_hyper("lr", slice(top / self.lr_mult, top))
        lr_max = np.array([h["lr"] for h in self.learn.opt.hypers])
        sched = self._scheduler()
        if sched is not None:
            start = (self.epoch + 1) / self.n_epoch
            sched.scheds["lr"] = _Resumed(combined_cos(self.pct_start, lr_max / self.div, lr_max,
                                                       lr_max / self.div_final), start)
        self.unfrozen = True
        self._open_phase("unfrozen", self.n_epoch - self.epoch - 1, _lr_source(rt), rt)

    def before_step(self):
        "Average, across processes, the gradients DDP does not know about (unfrozen mid-fit)."
        if self._unsynced:
            world = torch.distributed.get_world_size()
            for p in self._unsynced:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)

    def _scheduler(self) -> ParamScheduler | None:
        return next((cb for cb in self.learn.cbs if isinstance(cb, ParamScheduler)), None)

    def after_fit(self):
        if self.record.phases and not self.record.phases[-1].end_reason:
            self._close_phase("fit ended")

    def after_cancel_fit(self):
        if self.record.phases:
            self._close_phase("fit cancelled")


# ---------------------------------------------------------------- fine_tune_with --------------
def _run_phase(learn: Learner, record: FineTuneRecord, name: str, epochs: int, lr, lr_source: str,
               rt: RangeTestResult | None, fit_kwargs: dict, cbs: list) -> PhaseRecord:
    phase = PhaseRecord(name, epochs, _group_lrs(learn, lr), trainable_groups(learn), str(record.bn.policy),
                        lr_source, range_test=rt)
    record.phases.append(phase)
    t0 = time.perf_counter()
    try:
        learn.fit_one_cycle(epochs, lr, cbs=cbs, **fit_kwargs)
    finally:
        rec = learn.recorder
        phase.seconds = time.perf_counter() - t0
        phase.losses = [float(x) for x in rec.losses]
        phase.iter_lrs = [float(x) for x in rec.lrs]
        phase.values = [list(v) for v in rec.values]
        phase.metric_names = list(getattr(rec, "metric_names", []))
        phase.epochs_run = len(rec.values)
        phase.end_reason = phase.end_reason or f"{phase.epochs_run} epoch(s) done"
    return phase


def _cached_phase(learn: Learner, record: FineTuneRecord, epochs: int, lr: float, lr_source: str,
                  rt: RangeTestResult | None, memory_budget: int, fit_kwargs: dict) -> PhaseRecord:
    "The warm-up on cached body features, recorded like a phase."
    phase = PhaseRecord("warm-up", epochs, [0.0] * (len(learn.opt.param_lists) - 1) + [float(lr)],
                        trainable_groups(learn), str(record.bn.policy), lr_source, range_test=rt)
    record.phases.append(phase)
    cw = cached_warmup(learn, epochs, lr, memory_budget, **fit_kwargs)
    phase.epochs_run, phase.values, phase.metric_names = len(cw.values), cw.values, cw.metric_names
    phase.losses, phase.iter_lrs = cw.losses, cw.iter_lrs
    phase.seconds = cw.feature_seconds + cw.fit_seconds
    where = "on disk (memory-mapped)" if cw.on_disk else "in memory"
    phase.end_reason = (f"{phase.epochs_run} epoch(s) on cached features ({cw.nbytes / 2**20:.1f} MiB {where}, "
                        f"computed in {cw.feature_seconds:.1f}s)")
    return phase


@patch
@delegates(Learner.fit_one_cycle)
def fine_tune_with(self: Learner, epochs: int, base_lr: float | None = 2e-3, freeze_epochs: int = 1,
                   bn: str = "auto", freeze_bn: bool | None = None, unfreeze: str = "epochs",
                   patience: int = 1, min_delta: float = 0.0, suggest: str | Callable = "valley",
                   lr_mult: float = 100, fallback_lr: float | None = None,
                   max_passes: float | None = DEFAULT_MAX_PASSES,
                   target: float | None = None, monitor: str | None = None, keep_best: bool = False,
                   gradual: bool | float = False, pct_start: float = 0.3, div: float = 5.0,
                   num_it: int = 100, cache_features: bool = False, memory_budget: int = 1 << 30,
                   shortcut: bool = True, **kwargs) -> FineTuneRecord:
    """Fine-tune with a warm-up, an informed unfreeze and a range test on the unfrozen model.

    - BN: `bn` names a policy ('auto', the default, decides from the batch size and the measured
      shift; see `choose_bn_policy`); `freeze_bn` says whether BN parameters train in the warm-up
      (`None`: no, only under bn='frozen').
    - Warm-up: `fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)` on the frozen body, as
      fastai's `fine_tune` does (same default, 2e-3); `base_lr=None` takes the range test's suggestion
      on the frozen model instead.
      `unfreeze='plateau'` ends it early once the validation loss has not improved by `min_delta`
      for `patience` epochs (`freeze_epochs` is then the cap).
    - Unfreeze, range test (`suggest`: 'valley', 'steep', 'minimum', 'slide' or a callable), train
      `epochs` at `slice(lr/lr_mult, lr)` with one cycle (`pct_start`, `div` as in `fine_tune`).
      `target` with `monitor` (e.g. 'accuracy') stops once reached; `keep_best` loads the best
      epoch's weights at the end.
    - When the range test is unusable (it diverges at once, gives NaN, or would go over the training
      set more than `max_passes` times, where its curve shows memorisation rather than the rate),
      `fallback_lr` is used with a warning; by default fastai's own rule, `base_lr / 2`.
    - `gradual=True`: unfreeze one more group per stage (one epoch each, each with its own range
      test), out of `epochs`; a float instead divides the previous stage's rate by it per stage.

    - Speed: `shortcut` runs the frozen part of the body without autograd (`FrozenBodyShortcut`);
      `cache_features=True` computes the body's features once and warms the head up on them
      (`cached_warmup`; it needs un-augmented data and implies `freeze_bn=True`), spilling to a
      memory-mapped file beyond `memory_budget` bytes.

    Returns (and keeps as `learn.fine_tune_record`) the record of every decision.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if freeze_epochs < 0:
        raise ValueError(f"freeze_epochs must be >= 0, got {freeze_epochs}")
    if unfreeze not in ("epochs", "plateau"):
        raise ValueError(f"unfreeze must be 'epochs' or 'plateau', got {unfreeze!r}")
    if unfreeze == "plateau" and freeze_epochs < 1:
        raise ValueError("unfreeze='plateau' needs freeze_epochs >= 1 as its cap")
    if lr_mult < 1:
        raise ValueError(f"lr_mult must be >= 1, got {lr_mult}")
    if target is not None and monitor is None:
        raise ValueError("target needs monitor, the metric it applies to (e.g. monitor='accuracy')")
    if not isinstance(gradual, bool) and (not isinstance(gradual, (int, float)) or gradual <= 1):
        raise ValueError(f"gradual must be True/False or a ratio > 1 between stages' rates, got {gradual!r}")
    _suggester(suggest)
    if fallback_lr is None:  # fastai's own rule for the unfrozen phase
        fallback_lr = base_lr / 2 if base_lr is not None else DEFAULT_FALLBACK_LR
    if "lr_max" in kwargs:
        raise ValueError("lr_max is not taken: fine_tune_with chooses its rates; give the warm-up rate as base_lr; the unfrozen "
                         "rate comes from the range test (or fallback_lr)")
    if cache_features:
        if freeze_bn is False or BNPolicy.parse(bn) is BNPolicy.TRAIN:
            raise ValueError("cache_features needs a body that does not change during the warm-up: BN parameters "
                             "frozen and no batch statistics; drop freeze_bn=False / bn='train', or drop "
                             "cache_features")
        if unfreeze == "plateau":
            raise ValueError("cache_features warms up for a fixed number of epochs: use unfreeze='epochs'")
        freeze_bn = True
    check_splittable(self)

    record = FineTuneRecord()
    decision = decide_bn_policy(self, bn, freeze_bn)
    record.bn = decision
    policy_cb = BNPolicyCallback(decision.policy, decision.freeze_bn)
    policy_cb.decision = decision
    self.add_cb(policy_cb)
    shortcut_cb = FrozenBodyShortcut() if shortcut else None
    if shortcut_cb is not None:
        self.add_cb(shortcut_cb)
    user_cbs = list(L(kwargs.pop("cbs", None)))
    self.fine_tune_record = record
    try:
        policy_cb.resolve()
        record.bn_seconds = decision.seconds
        self.freeze_body(bn_trainable=not decision.freeze_bn)
        # warm-up
        if freeze_epochs:
            if base_lr is None:
                rt = range_test(self, suggest, num_it=num_it, fallback_lr=fallback_lr, max_passes=max_passes)
                warm_lr, src = rt.suggestion, _lr_source(rt) + ", frozen"
            else:
                rt, warm_lr, src = None, base_lr, "base_lr"
            cbs = list(user_cbs)
            plateau_cb = None
            if unfreeze == "plateau":
                plateau_cb = UnfreezeOnPlateau("valid_loss", patience, min_delta)
                cbs.append(plateau_cb)
            if cache_features:
                phase = _cached_phase(self, record, freeze_epochs, warm_lr, src, rt, memory_budget,
                                      {**kwargs, "pct_start": 0.99})
            else:
                phase = _run_phase(self, record, "warm-up", freeze_epochs, slice(warm_lr), src, rt,
                                   {**kwargs, "pct_start": 0.99}, cbs)
            if plateau_cb is not None and plateau_cb.stopped_epoch is not None:
                phase.end_reason = (f"validation loss did not improve by more than {min_delta} for "
                                    f"{patience} epoch(s)")
            record.unfroze_at_epoch = phase.epochs_run
            record.unfreeze_reason = phase.end_reason
        # unfreezing: all at once, or one more group per stage
        n_groups = len(self.opt.param_lists)
        stages = list(range(n_groups - 2, 0, -1)) if gradual else []
        stages = stages[:max(epochs - 1, 0)]
        prev_lr = None
        for i, k in enumerate(stages):
            self.freeze_to(k)
            set_frozen_bn_trainable(self, not decision.freeze_bn)
            if isinstance(gradual, bool) or prev_lr is None:
                rt = range_test(self, suggest, num_it=num_it, fallback_lr=fallback_lr, max_passes=max_passes)
                top, src = rt.suggestion, _lr_source(rt)
            else:
                rt, top, src = None, prev_lr / float(gradual), f"previous stage / {gradual}"
            prev_lr = top
            _run_phase(self, record, f"stage {i + 1}", 1, slice(top / lr_mult, top), src, rt,
                       {**kwargs, "pct_start": pct_start, "div": div}, list(user_cbs))
        self.unfreeze()
        rest = epochs - len(stages)
        if not isinstance(gradual, bool) and prev_lr is not None:
            rt, top, src = None, prev_lr / float(gradual), f"previous stage / {gradual}"
        else:
            rt = range_test(self, suggest, num_it=num_it, fallback_lr=fallback_lr, max_passes=max_passes)
            top, src = rt.suggestion, _lr_source(rt)
        cbs = list(user_cbs)
        stop_cb = None
        if monitor is not None:
            stop_cb = StopAtTarget(monitor, target, keep_best)
            cbs.append(stop_cb)
        phase = _run_phase(self, record, "unfrozen", rest, slice(top / lr_mult, top), src, rt,
                           {**kwargs, "pct_start": pct_start, "div": div}, cbs)
        if stop_cb is not None:
            if stop_cb.reached_epoch is not None:
                phase.end_reason = f"{monitor} reached {target} after epoch {stop_cb.reached_epoch}"
            if keep_best and stop_cb.best_epoch is not None:
                record.notes.append(f"kept the weights of unfrozen epoch {stop_cb.best_epoch + 1} "
                                    f"({monitor}={stop_cb.best:.4g})")
        record.notes.append("the range test's suggestion is the top (head group) of the discriminative slice")
    finally:
        # fastai runs no event on an arbitrary exception: give back the BN modes and flags here
        policy_cb.restore()
        self.remove_cb(policy_cb)
        if shortcut_cb is not None:
            shortcut_cb.remove_hooks()
            self.remove_cb(shortcut_cb)
    return record
