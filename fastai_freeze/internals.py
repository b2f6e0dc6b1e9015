"""Every use of fastai's internals, in one module: on a fastai upgrade, audit this file.

`tests/test_internals.py` fails when a fit leaves a Learner or a Recorder with attributes other than
`LEARNER_ATTRS` and `RECORDER_ATTRS`, the ones this module was written against (fastai 2.8).
The snapshot itself does not depend on those lists: it keeps every attribute there is.
"""
from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler
from fastai.learner import Learner
from fastcore.foundation import L

from .core.state import random_state, set_random_state

__all__ = ["LEARNER_ATTRS", "RECORDER_ATTRS", "learner_attributes", "LearnerSnapshot", "learner_snapshot",
           "restore_learner", "FitScopedCallback", "paused_callbacks", "belongs_to_fit", "unwrap_distributed_dls", "distributed_trainer_class",
           "ResumedSchedule", "scheduler_of", "group_lrs", "probe_callbacks", "shielded_callbacks",
           "set_schedule_position", "in_order", "n_inputs", "follow_norm_rules",
           "one_process_view", "frozen_count", "set_frozen_count", "frozen_groups", "scheduled_peak",
           "resume_schedule"]

LEARNER_ATTRS = frozenset({
    "_metrics", "cbs", "create_mbar", "default_cbs", "dl", "dls", "epoch", "final_record",
    "iter", "lock", "logger", "loss", "loss_func", "loss_grad", "lr", "model", "model_dir", "moms", "n_epoch",
    "n_iter", "opt", "opt_func", "path", "pct_train", "pred", "smooth_loss", "splitter", "train_bn",
    "train_iter", "training", "wd", "wd_bn_bias", "xb", "yb"})
"""The instance attributes of a fastai 2.8 Learner after a fit (before one, a subset), besides the one
per callback that fastai's `add_cb` sets under the callback's `name` (`learn.recorder`...)."""


def learner_attributes(learn: Learner) -> set[str]:
    "The Learner's instance attributes, without the ones named after its callbacks (`add_cb` sets them)."
    return set(learn.__dict__) - {cb.name for cb in learn.cbs}

RECORDER_ATTRS = frozenset({
    "add_time", "train_metrics", "valid_metrics", "loss", "smooth_loss", "learn", "lrs", "iters", "losses",
    "values", "metric_names", "cancel_train", "cancel_valid", "start_epoch", "log", "run", "hps"})
"The instance attributes of a fastai 2.8 Recorder after a fit (`hps` once a ParamScheduler ran)."


@dataclass
class LearnerSnapshot:
    "What `learner_snapshot` keeps; give it back with `restore_learner` (its layout is private)."
    _learner: dict
    _recorder: dict | None
    _model: dict
    _grad: dict
    _modes: dict
    _opt_state: dict
    _opt_hypers: list
    _frozen_idx: int
    _rng: tuple = field(repr=False)
    _torch_opt: dict | None = field(default=None, repr=False)
    _data_rng: list = field(default_factory=list, repr=False)


def _loader_rngs(learn: Learner) -> list:
    """The random generators the training data draws its order from: a fastai `DataLoader`'s `rng`
    (re-seeded from itself at every pass), a PyTorch `DataLoader`'s `generator`, with their states."""
    out = []
    for dl in getattr(getattr(learn, "dls", None), "loaders", []):
        for gen in (getattr(dl, "rng", None), getattr(dl, "generator", None)):
            if isinstance(gen, random.Random):
                out.append((dl, gen, gen.getstate()))
            elif isinstance(gen, torch.Generator):
                out.append((dl, gen, gen.get_state()))
    return out


def _history(d: dict) -> dict:
    "A Recorder's attributes with its growing history copied (lists, and the running averages)."
    return {k: copy.deepcopy(v) if k in ("loss", "smooth_loss") else copy.copy(v) if isinstance(v, (list, L)) else v
            for k, v in d.items()}


def learner_snapshot(learn: Learner) -> LearnerSnapshot:
    """Everything a probe could disturb: every Learner attribute (by reference: a fit replaces them),
    the Recorder's history (copied: a fit appends to it), weights and buffers, `requires_grad` flags,
    module modes, optimizer state and hyper-parameters, the random states.

    Costs one copy of the model's state and of the optimizer's state in memory.
    """
    if learn.opt is None:
        learn.create_opt()
    rec = getattr(learn, "recorder", None)
    return LearnerSnapshot(
        dict(learn.__dict__),
        _history(rec.__dict__) if rec is not None else None,
        {k: v.detach().clone() for k, v in learn.model.state_dict(keep_vars=True).items()},
        {p: p.requires_grad for p in learn.model.parameters()},
        {m: m.training for m in learn.model.modules()},
        {p: copy.deepcopy(st) for p, st in learn.opt.state.items()},
        copy.deepcopy(list(learn.opt.hypers)),
        getattr(learn.opt, "frozen_idx", 0),
        random_state(),
        _torch_optimizer_state(learn.opt),
        _loader_rngs(learn),
    )


def _torch_optimizer_state(opt) -> dict | None:
    """A copy of the state of the torch optimizer inside fastai's `OptimWrapper` (its hyper-parameters
    are the torch optimizer's `param_groups`, its moments the torch optimizer's own `state`)."""
    inner = getattr(opt, "opt", None)
    return copy.deepcopy(inner.state_dict()) if isinstance(inner, torch.optim.Optimizer) else None


def restore_learner(learn: Learner, snap: LearnerSnapshot) -> None:
    "Put back what `learner_snapshot` saved, bit for bit (attributes a probe added are removed)."
    with torch.no_grad():
        for k, v in learn.model.state_dict(keep_vars=True).items():
            if k in snap._model and v.shape == snap._model[k].shape:
                v.data.copy_(snap._model[k])
    for p, flag in snap._grad.items():
        p.requires_grad_(flag)
        p.grad = None
    for m, t in snap._modes.items():
        m.training = t
    learn.__dict__.clear()
    learn.__dict__.update(snap._learner)
    opt = learn.opt
    opt.state.clear()
    for p, st in snap._opt_state.items():
        opt.state[p] = copy.deepcopy(st)
    for h, h0 in zip(opt.hypers, snap._opt_hypers):
        h.clear()
        h.update(h0)
    opt.frozen_idx = snap._frozen_idx
    if snap._torch_opt is not None:  # OptimWrapper: the rates and moments live in the torch optimizer
        opt.opt.load_state_dict(copy.deepcopy(snap._torch_opt))
    rec = getattr(learn, "recorder", None)
    if rec is not None and snap._recorder is not None:
        rec.__dict__.clear()
        rec.__dict__.update(_history(snap._recorder))
    set_random_state(snap._rng)
    for dl, gen, state in snap._data_rng:  # the next pass draws the order it would have drawn
        if isinstance(gen, random.Random):
            dl.rng = gen
            gen.setstate(state)
        else:
            gen.set_state(state)


class FitScopedCallback(Callback):
    """A callback with state to give back however its fit ends: `cleanup()` (idempotent) runs then.

    fastai calls `after_fit` when a fit ends or is cancelled, but after an error or a
    `KeyboardInterrupt` it calls no event at all. What it does run in a `finally` is the removal of
    the fit's callbacks (`Learner.fit(cbs=...)` adds them with `added_cbs`; `fine_tune_with` removes
    its own the same way), and `remove_cb` sets `cb.learn = None`: that is where `cleanup()` runs,
    besides `after_fit`. A callback a probe takes off for a while (`paused_callbacks`) is not ended.
    A callback kept on the Learner (`learn.add_cb`) is never removed: it cleans up at the start of
    its next fit instead (`before_fit` calls `cleanup()` when the last fit did not end).
    """
    _paused = False

    def __setattr__(self, name, value):
        if (name == "learn" and value is None and not self.__dict__.get("_paused")
                and self.__dict__.get("learn") is not None):
            try:
                self.cleanup()
            finally:
                super().__setattr__(name, value)
            return
        super().__setattr__(name, value)

    def cleanup(self) -> None:
        "Give back what this callback changed for its fit (called once the fit ended, however)."


@contextmanager
def paused_callbacks(learn: Learner, cbs: list) -> Iterator[None]:
    "Inside, `cbs` are off the Learner (fastai's `removed_cbs`), and taking them off does not end their fit."
    scoped = [cb for cb in cbs if isinstance(cb, FitScopedCallback)]
    for cb in scoped:
        cb._paused = True
    try:
        with learn.removed_cbs(cbs):
            yield
    finally:
        for cb in scoped:
            cb._paused = False


def distributed_trainer_class() -> type | None:
    "fastai's `DistributedTrainer` (None where accelerate, which it needs, is not installed)."
    try:
        from fastai.distributed import DistributedTrainer
    except ImportError:
        return None
    return DistributedTrainer


def belongs_to_fit(cb) -> bool:
    """Callbacks that belong to the fit in progress rather than to the Learner, paused while a probe
    runs a fit of its own: the schedule, the progress bar, the distributed trainer, and any callback
    of this library that says so (`_pause_in_probe`)."""
    dt = distributed_trainer_class()
    return (isinstance(cb, (ParamScheduler, ProgressCallback)) or getattr(cb, "_pause_in_probe", False)
            or (dt is not None and isinstance(cb, dt)))


_LOGGER_MODULES = ("fastai.callback.wandb", "fastai.callback.tensorboard", "fastai.callback.comet",
                   "fastai.callback.azureml", "fastai.callback.neptune", "fastai.callback.captum")


def _not_for_probes(cb) -> bool:
    "Trackers (and savers: `SaveModelCallback` is one), loggers, progress output, schedules."
    from fastai.callback.progress import CSVLogger, ShowGraphCallback
    from fastai.callback.tracker import TrackerCallback
    return (belongs_to_fit(cb) or isinstance(cb, (TrackerCallback, CSVLogger, ShowGraphCallback))
            or type(cb).__module__ in _LOGGER_MODULES)


def probe_callbacks(learn: Learner) -> tuple[list, list]:
    """The Learner's callbacks split for a probe's own fit: `(paused, kept)`.

    Paused (they do not see the probe): what belongs to the fit in progress (`belongs_to_fit`),
    trackers and savers, loggers, progress output. Kept: everything that may take part in computing
    a training step (fastai's `TrainEvalCallback`, `Recorder`, `MixedPrecision`, `GradientClip`,
    `GradientAccumulation`, `BnFreeze`, `ChannelsLast`, `MixUp`, this library's BN policy, a user's
    own callback; see `shielded_callbacks`). A user's callback that should not run during a probe
    checks `hasattr(self, 'lr_finder')`, as it does for fastai's `lr_find`.
    """
    paused = [cb for cb in learn.cbs if _not_for_probes(cb)]
    return paused, [cb for cb in learn.cbs if cb not in paused]


@contextmanager
def shielded_callbacks(learn: Learner, paused: list, kept: list) -> Iterator[None]:
    """Inside, `paused` are off the Learner (`paused_callbacks`); on exit, each of `kept` that is
    fastai's or this library's has its attributes back as they were (a nested fit's `before_fit` and
    `after_fit` replace them: fastai's `MixedPrecision` drops its autocast context). A user's own
    callback sees the probe as it sees fastai's `lr_find`, and keeps what it did then: it may hold
    things (a hook, a file) that only it knows how to give back."""
    saved = [(cb, dict(cb.__dict__)) for cb in kept if type(cb).__module__.split(".")[0] in ("fastai", "fastai_freeze")]
    try:
        with paused_callbacks(learn, paused):
            yield
    finally:
        for cb, d in saved:
            cb.__dict__.clear()
            cb.__dict__.update(d)


def in_order(dl, bs: int | None = None):
    """`dl`'s data in a fixed order, nothing dropped, at batch size `bs` (None: the loader's): fastai's
    `DataLoader.new`, or, for a plain PyTorch `DataLoader` (fastai's pure-PyTorch path), a new one on
    the same dataset and collate function, without worker processes."""
    if hasattr(dl, "new"):
        return dl.new(shuffle=False, drop_last=False, **({"bs": bs} if bs else {}))
    from torch.utils.data import DataLoader
    if not isinstance(dl, DataLoader):
        raise TypeError(f"expected a fastai or PyTorch DataLoader, got {type(dl).__name__}")
    return DataLoader(dl.dataset, batch_size=bs or dl.batch_size or 64, shuffle=False, drop_last=False,
                      collate_fn=dl.collate_fn, num_workers=0)


def n_inputs(learn: Learner) -> int:
    "How many leading elements of a batch the model takes: fastai's `dls.n_inp` (1 where it has none)."
    try:
        n = learn.dls.n_inp
    except (AttributeError, IndexError, TypeError):
        return 1
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def follow_norm_rules(learn: Learner, params, trainable: bool) -> None:
    """Give `params` (a folded BN's affine parameters: `BNAffine` is not one of fastai's `norm_types`)
    fastai's rules for norm layers in the optimizer state `Learner.create_opt` sets: `force_train`
    (kept trainable by fastai's `freeze()`) when `learn.train_bn` and `trainable`, and no weight decay
    unless `learn.wd_bn_bias`."""
    state = getattr(learn.opt, "state", None)
    if state is None:
        return
    for p in params:
        st = state[p]
        st["force_train"] = bool(learn.train_bn and trainable)
        if not learn.wd_bn_bias:
            st["do_wd"] = False


@contextmanager
def one_process_view() -> Iterator[None]:
    """Inside, fastai sees a single process (its `num_distrib()` reads `WORLD_SIZE`): the Recorder's loss
    and the metrics are not gathered across processes, so a process can fit on its own (a probe) without
    waiting for the others in a collective they never join."""
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old


def set_schedule_position(sched: ParamScheduler, pos: float) -> None:
    "Set a `ParamScheduler`'s hyper-parameters to their values at `pos` in [0, 1] of its schedule."
    sched._update_val(pos)


def frozen_count(opt) -> int:
    "How many leading parameter groups fastai's optimizer holds frozen (`freeze_to` keeps it in `frozen_idx`)."
    return getattr(opt, "frozen_idx", 0) if opt is not None else 0


def set_frozen_count(opt, n: int) -> None:
    "Record `n` leading frozen groups in fastai's optimizer (after it was rebuilt), as `freeze_to` does."
    opt.frozen_idx = n


def frozen_groups(learn: Learner) -> list:
    "The parameter lists of the optimizer's frozen groups (fastai's `freeze_to`)."
    return list(learn.opt.param_lists[:frozen_count(learn.opt)]) if learn.opt is not None else []


def scheduled_peak(learn: Learner, name: str = "lr") -> list[float] | None:
    """The highest value per group that the running fit's `ParamScheduler` gives `name` over the fit
    (fit_one_cycle's peak, not its start), or None when no schedule sets it."""
    sched = scheduler_of(learn)
    if sched is None or name not in sched.scheds:
        return None
    n = len(learn.opt.hypers)
    vals = [np.atleast_1d(np.asarray(sched.scheds[name](p), dtype=float)) for p in np.linspace(0, 1, 101)]
    return list(np.broadcast_to(np.max(vals, axis=0), (n,)).astype(float))


def resume_schedule(learn: Learner, name: str, fn: Callable, start: float) -> bool:
    """Replace the running fit's schedule of `name` by `fn` run over `[start, 1]` of the fit (a new
    cycle mid-fit); False when the fit has no `ParamScheduler` (plain `fit`)."""
    sched = scheduler_of(learn)
    if sched is None:
        return False
    sched.scheds[name] = ResumedSchedule(fn, start)
    return True


def unwrap_distributed_dls(learn: Learner) -> list:
    "The Learner's DataLoaders with fastai's `DistributedDL` wrappers taken off (the originals)."
    try:
        from fastai.distributed import DistributedDL
    except ImportError:
        return list(learn.dls.loaders)
    return [dl.dl if isinstance(dl, DistributedDL) else dl for dl in learn.dls.loaders]


def scheduler_of(learn: Learner) -> ParamScheduler | None:
    "The running fit's ParamScheduler (fit_one_cycle's), if any."
    return next((cb for cb in learn.cbs if isinstance(cb, ParamScheduler)), None)


class ResumedSchedule:
    "A schedule that runs `sched` over the part `[start, 1]` of the fit (a new cycle mid-fit)."

    def __init__(self, sched: Callable, start: float):
        self.sched, self.start = sched, start

    def __call__(self, pos: float):
        return self.sched(min(max((pos - self.start) / max(1 - self.start, 1e-12), 0.0), 1.0))


def group_lrs(learn: Learner, lr) -> list[float]:
    "The per-group rates that `lr` (a float, a slice or a list) gives on this Learner's optimizer."
    saved = [h["lr"] for h in learn.opt.hypers]
    learn.opt.set_hyper("lr", lr)
    out = [float(h["lr"]) for h in learn.opt.hypers]
    for h, v in zip(learn.opt.hypers, saved):
        h["lr"] = v
    return out
