"""The named fine-tuning strategies: what the advisor recommends and the strategy comparison runs.

Each strategy trains a Learner for `freeze_epochs + epochs` epochs in all and returns the
`FineTuneRecord` of what it did: `fine_tune_with`'s own record, or, for the strategies that are plain
fastai fits, one phase per fit.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastai.callback.core import Callback
from fastai.learner import Learner, Recorder
from torch import nn

from .freeze import trainable_groups
from .probe import RangeTest, _is_number
from .record import FineTuneRecord, PhaseRecord

__all__ = ["Strategy", "STRATEGIES", "run_named_strategy"]


@dataclass(frozen=True)
class Strategy:
    "A named way to train a Learner: `run(learn, epochs, freeze_epochs) -> FineTuneRecord`."
    name: str
    run: Callable[[Learner, int, int], FineTuneRecord]
    description: str


class _FitLog(Callback):
    "Records each (non-probe) fit of a plain-fastai strategy as a phase of a `FineTuneRecord`."
    order = Recorder.order + 1

    def __init__(self, record: FineTuneRecord, names: list[str], policy: str):
        self.record, self.names, self.policy = record, names, policy

    def before_fit(self):
        self.skip = hasattr(self.learn, "lr_finder")
        if not self.skip:
            self.t0, self.top = time.perf_counter(), None

    def after_batch(self):
        if not self.skip and self.training:
            lrs = [float(h["lr"]) for h in self.learn.opt.hypers]
            self.top = lrs if self.top is None or lrs[-1] > self.top[-1] else self.top

    def after_fit(self):
        if self.skip:
            return
        rec = self.learn.recorder
        i = len(self.record.phases)
        name = self.names[i] if i < len(self.names) else f"fit {i + 1}"
        self.record.phases.append(PhaseRecord(
            name, self.n_epoch, self.top or [], trainable_groups(self.learn), self.policy, "given",
            epochs_run=len(rec.values), end_reason=f"{len(rec.values)} epoch(s) done",
            seconds=time.perf_counter() - self.t0, losses=[float(x) for x in rec.losses],
            iter_lrs=[float(x) for x in rec.lrs], metric_names=list(rec.metric_names),
            values=[list(v) for v in rec.values]))


def _logged(learn: Learner, names: list[str], policy: str, fit: Callable[[], None]) -> FineTuneRecord:
    record = FineTuneRecord()
    log = _FitLog(record, names, policy)
    learn.add_cb(log)
    try:
        fit()
    finally:
        learn.remove_cb(log)
    return record


def _fine_tune(learn: Learner, epochs: int, freeze_epochs: int) -> FineTuneRecord:
    return _logged(learn, ["warm-up", "unfrozen"], "fastai (BN trained)",
                   lambda: learn.fine_tune(epochs, freeze_epochs=freeze_epochs))


def _policy(bn: str) -> Callable[[Learner, int, int], FineTuneRecord]:
    def run(learn: Learner, epochs: int, freeze_epochs: int) -> FineTuneRecord:
        return learn.fine_tune_with(epochs, freeze_epochs=freeze_epochs, bn=bn)
    return run


def _fine_tune_with(learn: Learner, epochs: int, freeze_epochs: int) -> FineTuneRecord:
    return learn.fine_tune_with(epochs, freeze_epochs=freeze_epochs)


def _held_out(learn: Learner, epochs: int, freeze_epochs: int) -> FineTuneRecord:
    return learn.fine_tune_with(epochs, freeze_epochs=freeze_epochs, range_test=RangeTest(small_data="held-out"))


def _features(learn: Learner, epochs: int, freeze_epochs: int) -> FineTuneRecord:
    "Head only: the body never unfreezes and its BN stays in eval mode (a fixed feature extractor)."
    def fit():
        learn.apply_bn_policy("frozen")
        learn.freeze_body(freeze_bn=True)
        learn.fit_one_cycle(epochs + freeze_epochs, 2e-3)
    return _logged(learn, ["head only"], "frozen", fit)


def _reinitialise(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()


def _scratch(learn: Learner, epochs: int, freeze_epochs: int) -> FineTuneRecord:
    "Every weight re-initialised (PyTorch's default initialisation), everything trained from the start."
    def fit():
        _reinitialise(learn.model)
        learn.unfreeze()
        learn.fit_one_cycle(epochs + freeze_epochs, 2e-3)
    return _logged(learn, ["from scratch"], "fastai (BN trained)", fit)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("fine_tune", _fine_tune, "fastai's fine_tune (BN trained, fixed rates)"),
    Strategy("bn_train", _policy("train"), "fine_tune_with, bn='train': BN trained with batch statistics"),
    Strategy("bn_frozen", _policy("frozen"), "fine_tune_with, bn='frozen': BN fully frozen (eval mode)"),
    Strategy("bn_fold", _policy("fold"), "fine_tune_with, bn='fold': BN folded into a trainable affine layer"),
    Strategy("bn_adapt", _policy("adapt"), "fine_tune_with, bn='adapt': BN statistics re-estimated, then folded"),
    Strategy("fine_tune_with", _fine_tune_with, "fine_tune_with with its defaults (bn='auto', range tests)"),
    Strategy("ftw_held_out", _held_out, "fine_tune_with, defaults, but a held-out range test on small data "
             "(RangeTest(small_data='held-out')) instead of fastai's rule"),
    Strategy("features", _features, "feature extraction: head only, body never unfrozen"),
    Strategy("scratch", _scratch, "training from scratch: same network re-initialised, same budget"),
]}
"The strategies by name, in the order the comparison prints them."


def run_named_strategy(learn: Learner, name: str, epochs: int = 4, freeze_epochs: int = 1) -> FineTuneRecord:
    "Train `learn` with the strategy `name` (see `STRATEGIES`); returns its record."
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: use one of {', '.join(STRATEGIES)}")
    for arg, value, least in (("epochs", epochs, 1), ("freeze_epochs", freeze_epochs, 0)):
        whole = _is_number(value) and math.isfinite(float(value)) and float(value).is_integer()
        if not whole or float(value) < least:
            raise ValueError(f"{arg} must be a whole number >= {least}, got {value!r}")  # before any weight changes
    return STRATEGIES[name].run(learn, int(epochs), int(freeze_epochs))
