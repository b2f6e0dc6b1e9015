"""The learning-rate range test: fastai's `lr_find` on the model as it is, leaving nothing changed.

Two curves, one sweep:

- **training loss** (fastai's `lr_find`): the smoothed loss of the batches trained on. Valid while
  every batch is new: a sweep that goes over the training set again shows the loss falling because
  the same images come back, whatever the rate.
- **held-out loss**, for training sets too small for that (`RangeTest(small_data='held-out')`):
  after each step, the loss on a fixed batch of validation images the sweep never trains on (eval
  mode), so images that come back cannot make the curve look better than the rate is. One extra
  forward pass of `held_out` images per iteration.

By default a training set too small for a training-loss curve gets fastai's own rule instead
(`fallback_lr`, with a warning): on the benchmark's small data sets the held-out curve's rates were
no better than that rule (benchmarks/results/transfer_real.md) and the sweep cost more than the
training it chose the rate for.

With `lr_mult`, the sweep moves every group's rate together, at the ratios of the discriminative
slice `slice(lr / lr_mult, lr)` the result will be used with, and the suggestion is the top (head
group) rate: fastai's `lr_find` instead sets one rate for every group, which measures what the body
tolerates at the head's rate.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from fastai.callback.core import CancelFitException, CancelValidException
from fastai.callback.schedule import ParamScheduler, SchedExp, minimum, slide, steep, valley
from fastai.learner import Learner
from fastai.torch_core import even_mults

from .core.state import kept_modes, kept_random_state
from .distrib import broadcast_object, local_fit_state
from .internals import belongs_to_fit, learner_snapshot, paused_callbacks, restore_learner
from .record import RangeTestResult

__all__ = ["SUGGESTERS", "RangeTest", "range_test", "held_out_batch", "DEFAULT_FALLBACK_LR"]

DEFAULT_FALLBACK_LR = 1e-3
"""The rate a range test returns, with a warning, when it has no usable curve and no `fallback_lr`
is given: fastai's `fine_tune` rule for the unfrozen phase, `base_lr / 2` with `base_lr = 2e-3`."""

SUGGESTERS: dict[str, Callable] = {"valley": valley, "steep": steep, "minimum": minimum, "slide": slide}
"fastai's suggestion functions (`SuggestionMethod`), by name."


def _suggester(suggest: str | Callable) -> tuple[str, Callable]:
    if callable(suggest):
        return getattr(suggest, "__name__", "custom"), suggest
    key = str(suggest).lower()
    if key not in SUGGESTERS:
        raise ValueError(f"unknown suggestion method {suggest!r}: use one of {sorted(SUGGESTERS)} "
                         f"(fastai's SuggestionMethod) or a callable f(lrs, losses, num_it) -> (lr, point)")
    return key, SUGGESTERS[key]


@dataclass(frozen=True)
class RangeTest:
    """How a range test runs. The defaults are fastai's `lr_find` for the training-loss curve.

    - `suggest`: the suggestion function for the training-loss curve; `held_out_suggest` for the
      held-out curve ('valley', 'steep', 'minimum', 'slide' or a callable `f(lrs, losses, num_it)`).
    - `num_it` iterations from `start_lr` to `end_lr` on the training-loss curve, which is used
      while they fit in `max_passes` passes over the training set (`None`: always).
    - Otherwise `small_data` says what happens: 'fastai' (the fallback rate, fastai's rule) or
      'held-out' (the held-out curve: `held_out_it` iterations, the loss measured on `held_out`
      validation images).
    - `stop_div`: stop once the (smoothed) loss exceeds 4x its best, as fastai does.
    """
    suggest: str | Callable = "valley"
    held_out_suggest: str | Callable = "steep"
    start_lr: float = 1e-7
    end_lr: float = 10.0
    num_it: int = 100
    max_passes: float | None = 1.0
    small_data: str = "fastai"
    held_out: int = 64
    held_out_it: int = 30
    stop_div: bool = True

    def __post_init__(self):
        _suggester(self.suggest)
        _suggester(self.held_out_suggest)
        if not (0 < self.start_lr < self.end_lr) or not math.isfinite(self.end_lr):
            raise ValueError(f"need 0 < start_lr < end_lr (finite), got {self.start_lr} and {self.end_lr}")
        for name in ("num_it", "held_out_it"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 20:
                raise ValueError(f"{name}={getattr(self, name)!r}: a range test needs at least 20 iterations "
                                 "for a usable curve")
        if self.max_passes is not None and not self.max_passes > 0:
            raise ValueError(f"max_passes must be > 0 or None, got {self.max_passes}")
        if not isinstance(self.held_out, int) or self.held_out < 1:
            raise ValueError(f"held_out must be a sample count >= 1, got {self.held_out!r}")
        if self.small_data not in ("fastai", "held-out"):
            raise ValueError(f"small_data must be 'fastai' or 'held-out', got {self.small_data!r}")


def held_out_batch(learn: Learner, n: int):
    "The first `n` validation samples, as one batch `(x, y)`, or None when there is no validation data."
    dl = learn.dls.valid if len(learn.dls.loaders) > 1 else None
    if dl is None or not len(dl.dataset):
        return None
    xs, ys, got = [], [], 0
    for b in dl.new(shuffle=False, bs=min(n, 256)):
        xs.append(b[0])
        ys.append(b[1])
        got += len(b[0])
        if got >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


class _Sweep(ParamScheduler):
    """fastai's `LRFinder` schedule (exponential rates, per group when given arrays), measuring either
    the training loss or the loss on a held-out batch after each step.

    Differences from `LRFinder`: the divergence check starts after the first `skip` iterations (the
    part of the curve the suggestion discards: a warmed-up head on small batches can show a near-zero
    loss on one batch and a normal one on the next); no file is saved (`range_test` restores from
    memory); named `lr_finder`, so that callbacks that stay out of `lr_find` stay out of this too.
    """

    def __init__(self, start, end, num_it: int, stop_div: bool, skip: int, held_out=None):
        super().__init__({"lr": SchedExp(start, end)})
        self.num_it, self.stop_div, self.skip, self.held_out = num_it, stop_div, skip, held_out
        self.curve: list[float] = []

    @property
    def name(self):
        return "lr_finder"

    def before_fit(self):
        super().before_fit()
        self.best = float("inf")

    def before_batch(self):
        self._update_val(self.train_iter / self.num_it)

    def after_batch(self):
        super().after_batch()
        if self.held_out is None:
            value = float(self.smooth_loss)
        else:
            x, y = self.held_out
            with torch.no_grad(), kept_modes(self.learn.model):
                self.learn.model.eval()
                value = float(self.learn.loss_func(self.learn.model(x), y))
        self.curve.append(value)
        if self.train_iter > self.skip:
            self.best = min(self.best, value)
            if self.stop_div and (value > 4 * self.best or not math.isfinite(value)):
                raise CancelFitException()
        if self.train_iter >= self.num_it:
            raise CancelFitException()

    def before_validate(self):
        raise CancelValidException()

    def after_fit(self):
        self.learn.opt.zero_grad()


def _fallback(name, reason, fallback_lr, seconds, curve="") -> RangeTestResult:
    warnings.warn(f"range test unusable: {reason}; falling back to lr={fallback_lr:g}", stacklevel=3)
    return RangeTestResult([], [], name, float(fallback_lr), None, True, reason, [], [], seconds, curve)


def range_test(learn: Learner, config: RangeTest = RangeTest(), lr_mult: float | None = None,
               fallback_lr: float = DEFAULT_FALLBACK_LR) -> RangeTestResult:
    """Run a range test on the Learner as it is now (frozen or not); everything is restored after.

    Weights, BN statistics, optimizer state, `requires_grad`, module modes, every Learner attribute,
    the Recorder's history and the random states are put back bit for bit (`learner_snapshot`),
    also after an error or an interrupt. It may run inside a fit (that fit's schedule, progress bar
    and this library's callbacks are paused meanwhile). With `lr_mult`, the groups move together at
    the ratios of `slice(lr / lr_mult, lr)`; the suggestion is the top rate.

    When no curve can be measured (no held-out data for a small training set) or the curve is
    unusable (it diverged at once, became NaN, the suggestion failed), `fallback_lr` is returned
    with a warning and the reason in the result (`fell_back=True`); turn the warning into an error
    with `warnings.simplefilter('error')` to stop instead.
    """
    if not isinstance(config, RangeTest):
        raise TypeError(f"config must be a RangeTest(...), got {type(config).__name__}")
    if not (isinstance(fallback_lr, (int, float)) and math.isfinite(fallback_lr) and fallback_lr > 0):
        raise ValueError(f"fallback_lr must be a finite rate > 0, got {fallback_lr!r}")
    if lr_mult is not None and not (isinstance(lr_mult, (int, float)) and math.isfinite(lr_mult) and lr_mult >= 1):
        raise ValueError(f"lr_mult must be None or a finite ratio >= 1, got {lr_mult!r}")
    n_batches = len(learn.dls.train)
    if n_batches == 0:
        raise ValueError("range test: the training DataLoader yields no batch (batch size larger than the "
                         "training set with drop_last?)")
    held = None
    if config.max_passes is None or config.num_it <= config.max_passes * n_batches:
        name, func = _suggester(config.suggest)
        num_it, curve = config.num_it, "training loss"
    else:
        name, func = _suggester(config.held_out_suggest)
        num_it, curve = config.held_out_it, "held-out loss"
        why = (f"{config.num_it} iterations would go over the {n_batches}-batch training set "
               f"{config.num_it / n_batches:.0f} times, where the training-loss curve shows memorisation")
        if config.small_data == "fastai":
            return _fallback(name, f"{why}; fastai's rule instead (RangeTest(small_data='held-out') measures a "
                             "held-out curve)", fallback_lr, 0.0)
        with kept_random_state():  # a new DataLoader draws its seed from the global generator
            held = held_out_batch(learn, config.held_out)
        if held is None:
            return _fallback(name, f"{why}, and there are no validation images for a held-out curve",
                             fallback_lr, 0.0)
    n_groups = len(learn.opt.param_lists) if learn.opt is not None else 1
    ratios = np.array(even_mults(1 / lr_mult, 1.0, n_groups)) if lr_mult and n_groups > 1 else np.ones(n_groups)
    t0 = time.perf_counter()
    paused = [cb for cb in learn.cbs if belongs_to_fit(cb)]
    # distributed: every process sweeps on its own (no DDP, no DistributedDL); rank 0's curve is shared
    with local_fit_state(learn):
        snap = learner_snapshot(learn)
        try:
            dev = next(learn.model.parameters()).device
            held = None if held is None else (held[0].to(dev), held[1].to(dev))
            sweep = _Sweep(config.start_lr * ratios, config.end_lr * ratios, num_it, config.stop_div,
                           num_it // 10, held)
            with paused_callbacks(learn, paused), learn.no_logging():
                learn.fit(num_it // n_batches + 1, cbs=sweep)
            full_lrs = [float(x) for x in learn.recorder.lrs]
            full_losses = list(sweep.curve)
        finally:
            restore_learner(learn, snap)
    full_lrs, full_losses = broadcast_object((full_lrs, full_losses))
    seconds = time.perf_counter() - t0
    # the same cut as fastai's lr_find: the first tenth and the last five points
    lrs, losses = torch.tensor(full_lrs[num_it // 10:-5]), torch.tensor(full_losses[num_it // 10:-5])
    bad = torch.nonzero(~torch.isfinite(losses.view(-1)))
    if len(bad):
        lrs, losses = lrs[:int(bad.min())], losses[:int(bad.min())]
    reason, lr, point = "", None, None
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
        res = _fallback(name, reason, fallback_lr, seconds, curve)
        res.lrs, res.losses, res.full_lrs, res.full_losses = lrs.tolist(), losses.tolist(), full_lrs, full_losses
        return res
    pt = (float(point[0]), float(point[1])) if point is not None else None
    return RangeTestResult(lrs.tolist(), losses.tolist(), name, lr, pt, False, "", full_lrs, full_losses, seconds,
                           curve)
