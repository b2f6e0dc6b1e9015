"""The learning-rate range test: a sweep on the model as it is, leaving nothing changed.

**The sweep** trains one batch per rate, the rates rising geometrically from `start_lr` to `end_lr`
(fastai's `LRFinder` schedule), and records each batch's loss. Every batch is new: the sweep is
sized to fit in one pass over the training set (`num_it=None`: 4 rates per decade from 1e-4 to 1,
17 in all, at most one per batch), because a sweep that sees the same images again shows the loss
falling whatever the rate. It stops once the edge (below) is final: three steps in a row at the floor,
or a decade past it: 6 to 15 steps on the benchmark's rows. It starts at 1e-4: starting one rate
higher made the edge fall on the first rate of one small-data curve in eight (the range test then
falls back). From `min_batches` (20) batches per epoch up it always runs; below, fastai's rule is used
(`fallback_lr`), or, with `RangeTest(small_data='held-out')`, a curve of the loss on a fixed batch of
validation images the sweep never trains on.

**The suggestion** (`suggest='edge'`, the default) reads the curve the way the fastai book tells a
person to: find the sharp increase, and take a point well before it. The curve is the *step ratio*:
each step's loss on its own batch after the step over before it (the same forward pass, the same
dropout masks), which does not depend on which images a batch holds and so is usable on small data.
The *edge* is the rate at which a step is most effective (the minimum of the 3-point running mean of
the log-ratio, ratios below `floor` = 0.05 counted as 0.05: a step that removes 95% of its batch's
loss is as effective as a step usefully gets, below that the ratio measures how well one small batch
is memorised); beyond it the curve turns up towards the rate at which a step makes things worse.
The suggestion is `edge / 2`: of the divisors 1, 1.5, 2, 3 and 5, one of the two closest (with 1.5) to
the best of a grid of fixed rates on the benchmark's first four seeds per row (`benchmarks/ladder.py`),
and better than the earlier `edge / 5` on four new seeds of the two small rows, which it was not chosen
on. fastai's `valley`, `slide`, `steep` and `minimum` remain available by name; they get fastai's curve
(its smoothed loss, the first tenth and the last five points cut).

With `lr_mult`, the sweep moves every group's rate together, at the ratios of the discriminative
slice `slice(lr / lr_mult, lr)` the result will be used with, and the suggestion is the top (head
group) rate: fastai's `lr_find` instead sets one rate for every group, which measures what the body
tolerates at the head's rate.

While the sweep runs, the callbacks on the Learner that do not take part in computing a training
step (schedulers, trackers, savers, loggers, progress bars, a user's own) are paused; those that do
(mixed precision, gradient clipping or accumulation, BN freezing, channels-last) run, and their state
is given back afterwards, as is every Learner attribute, the weights, the optimizer and the random
states (`learner_snapshot`).
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
from .internals import (
    in_order,
    learner_snapshot,
    probe_callbacks,
    restore_learner,
    set_schedule_position,
    shielded_callbacks,
)
from .record import RangeTestResult

__all__ = ["SUGGESTERS", "RangeTest", "range_test", "held_out_batch", "edge", "DEFAULT_FALLBACK_LR"]

DEFAULT_FALLBACK_LR = 1e-3
"""The rate a range test returns, with a warning, when it has no usable curve and no `fallback_lr`
is given: fastai's `fine_tune` rule for the unfrozen phase, `base_lr / 2` with `base_lr = 2e-3`."""


def _cuda_used() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _running_mean(y: np.ndarray, width: int = 3) -> np.ndarray:
    "Centred running mean (shorter windows at the ends), so a single noisy batch does not make an edge."
    h = width // 2
    return np.array([y[max(0, i - h):i + h + 1].mean() for i in range(len(y))])


def _first_min(s: np.ndarray) -> int:
    "The first index at the minimum (rounding-level differences count as ties: a floor of equal windows)."
    return int(np.flatnonzero(s <= np.nanmin(s) + 1e-12)[0])


EDGE_FLOOR = 0.05
"Step ratios below this count as this when `edge` reads the curve."


def edge(lrs, ratios, num_it=None, divisor: float = 2.0, floor: float = EDGE_FLOOR):
    """"A point well before the sharp increase", read off the step-ratio curve: `edge / divisor`.

    `ratios[i]` is the loss of the batch of step `i` after that step over its loss before it (same
    forward pass, same dropout masks): below 1 the step helped its own batch, at the stability limit
    it is 1 or more. Unlike the training-loss curve, it does not depend on which images the batch
    holds, so it is usable with 20 steps of 8 images. The *edge* is the rate at which one step is
    most effective (the minimum of the log-ratio, 3-point running mean, ratios under `floor` counted
    as `floor`, so that the first rate of a floor of memorised batches is the edge, not its noisiest
    point): beyond it the curve turns up sharply, towards the rate at which a step makes things worse.
    Returns `(edge / divisor, (edge, ratio at the edge))`, like fastai's suggestion functions.
    """
    lrs, r = np.asarray(lrs, dtype=float), np.asarray(ratios, dtype=float)
    if len(r) < 5:
        raise ValueError(f"a curve of {len(r)} points is too short to find an edge")
    if not 0 < floor < 1:
        raise ValueError(f"floor must be a ratio in (0, 1), got {floor!r}")
    s = _running_mean(np.log(np.clip(r, floor, None)))
    if not np.isfinite(s).any():
        raise ValueError("the curve has no finite point")
    i = _first_min(s)
    if i == 0:
        raise ValueError(f"the steps do worse from the first rate on (edge at {lrs[0]:.2g}): start_lr is too high")
    if s[i] >= 0:
        raise ValueError("no step made its own batch's loss smaller: the curve has no edge")
    return float(lrs[i] / divisor), (float(lrs[i]), float(r[i]))


edge.uses_step_ratio = True

SUGGESTERS: dict[str, Callable] = {"edge": edge, "valley": valley, "steep": steep, "minimum": minimum,
                                   "slide": slide}
"""The suggestion functions, by name: `edge` (this library's default) and fastai's (`SuggestionMethod`).
A function with `uses_step_ratio = True` (`edge`) gets the whole curve of step ratios (of the held-out loss
relative to its start, on a held-out curve); the others get fastai's curve (smoothed, cut)."""


def _suggester(suggest: str | Callable) -> tuple[str, Callable]:
    if callable(suggest):
        return getattr(suggest, "__name__", "custom"), suggest
    key = str(suggest).lower()
    if key not in SUGGESTERS:
        raise ValueError(f"unknown suggestion method {suggest!r}: use one of {sorted(SUGGESTERS)} "
                         f"or a callable f(lrs, losses, num_it) -> (lr, point)")
    return key, SUGGESTERS[key]


@dataclass(frozen=True)
class RangeTest:
    """How a range test runs.

    - `suggest`: 'edge' (default), or fastai's 'valley', 'steep', 'minimum', 'slide', or a callable
      `f(lrs, losses, num_it) -> (lr, point)`; `held_out_suggest` for the held-out curve.
    - The sweep: `num_it` rates from `start_lr` to `end_lr`. `num_it=None` sizes it to the data:
      `per_decade` rates per decade, at most one per batch of one pass (`max_passes` passes).
    - `min_batches`: below this many training batches per epoch there is too little new data for a
      curve, and `small_data` says what happens: 'fastai' (the fallback rate, fastai's rule) or
      'held-out' (`held_out_it` iterations, the loss measured on `held_out` validation images).
      An explicit `num_it` that does not fit in `max_passes` passes is treated the same way
      (`max_passes=None`: always run, whatever it measures).
    - `stop_div`: stop once the loss diverges (after the first tenth): for 'edge', once the last 3
      steps' loss ratios average over 2, steps doubling their own batch's loss (the edge is behind by
      then); for fastai's suggestions, once the smoothed loss is 4x its best, as fastai does.
    - `past_edge`: for 'edge', stop once the rate is `past_edge` times the edge of the curve so far
      (the curve beyond is not read; None: sweep on to `end_lr` or divergence), or once three steps in
      a row are at the floor (the edge can no longer move).

    fastai's own `lr_find` is `RangeTest(suggest='valley', start_lr=1e-7, end_lr=10, num_it=100)`.
    """
    suggest: str | Callable = "edge"
    held_out_suggest: str | Callable = "edge"
    start_lr: float = 1e-4
    end_lr: float = 1.0
    num_it: int | None = None
    per_decade: float = 4.0
    max_passes: float | None = 1.0
    min_batches: int = 20
    small_data: str = "fastai"
    held_out: int = 64
    held_out_it: int = 30
    stop_div: bool = True
    past_edge: float | None = 10.0

    def __post_init__(self):
        _suggester(self.suggest)
        _suggester(self.held_out_suggest)
        if not (0 < self.start_lr < self.end_lr) or not math.isfinite(self.end_lr):
            raise ValueError(f"need 0 < start_lr < end_lr (finite), got {self.start_lr} and {self.end_lr}")
        for name in ("num_it", "held_out_it", "min_batches"):
            v = getattr(self, name)
            if not (v is None and name == "num_it") and (not isinstance(v, int) or isinstance(v, bool) or v < 20):
                raise ValueError(f"{name}={v!r}: a range test needs at least 20 iterations for a usable curve")
        if not (_is_number(self.per_decade) and math.isfinite(self.per_decade) and self.per_decade > 0):
            raise ValueError(f"per_decade must be a number of rates > 0, got {self.per_decade!r}")
        if self.max_passes is not None and not self.max_passes > 0:
            raise ValueError(f"max_passes must be > 0 or None, got {self.max_passes}")
        if not isinstance(self.held_out, int) or self.held_out < 1:
            raise ValueError(f"held_out must be a sample count >= 1, got {self.held_out!r}")
        if self.past_edge is not None and not (_is_number(self.past_edge) and math.isfinite(self.past_edge)
                                               and self.past_edge > 1):
            raise ValueError(f"past_edge must be None or a rate ratio > 1, got {self.past_edge!r}")
        if self.small_data not in ("fastai", "held-out"):
            raise ValueError(f"small_data must be 'fastai' or 'held-out', got {self.small_data!r}")

    def iterations(self, n_batches: int) -> int | None:
        """How many rates the training-loss sweep uses on `n_batches` batches per epoch, or None when the
        training set is too small for one (below `min_batches`, or `num_it` does not fit)."""
        if self.num_it is not None:
            fits = self.max_passes is None or self.num_it <= self.max_passes * n_batches
            return self.num_it if fits else None
        if n_batches < self.min_batches:
            return None
        wanted = math.ceil(self.per_decade * math.log10(self.end_lr / self.start_lr)) + 1
        room = n_batches if self.max_passes is None else int(self.max_passes * n_batches)
        return min(wanted, room) if room >= self.min_batches else None


def held_out_batch(learn: Learner, n: int):
    "The first `n` validation samples, as one batch `(x, y)`, or None when there is no validation data."
    dl = learn.dls.valid if len(learn.dls.loaders) > 1 else None
    if dl is None or not len(dl.dataset):
        return None
    xs, ys, got = [], [], 0
    for b in in_order(dl, min(n, 256)):
        xs.append(b[0])
        ys.append(b[1])
        got += len(b[0])
        if got >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


class _Sweep(ParamScheduler):
    """fastai's `LRFinder` schedule (exponential rates, per group when given arrays), recording after
    each step the batch's raw loss and fastai's smoothed loss, or the loss on a held-out batch.

    Differences from `LRFinder`: the divergence check starts after the first `skip` iterations (a
    warmed-up head on small batches can show a near-zero loss on one batch and a normal one on the
    next); no file is saved (`range_test` restores from memory); named `lr_finder`, so that callbacks
    that stay out of `lr_find` stay out of this too.
    """

    def __init__(self, start, end, num_it: int, stop_div: bool, skip: int, held_out=None, paired: bool = False,
                 past_edge: float | None = None, final_at_floor: bool = False):
        super().__init__({"lr": SchedExp(start, end)})
        self.num_it, self.stop_div, self.skip, self.held_out = num_it, stop_div, skip, held_out
        self.past_edge, self.final_at_floor = past_edge, final_at_floor
        self.paired = paired and held_out is None
        self.ratio: list[float] = []
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self.smooth: list[float] = []

    @property
    def name(self):
        return "lr_finder"

    def before_fit(self):
        super().before_fit()
        self.best = float("inf")

    def before_batch(self):
        set_schedule_position(self, self.train_iter / self.num_it)
        if self.paired:  # the after-step forward pass draws the same dropout masks as the step's own
            self._rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if _cuda_used() else None)

    def after_batch(self):
        super().after_batch()
        if self.held_out is not None:
            x, y = self.held_out
            with torch.no_grad(), kept_modes(self.learn.model):
                self.learn.model.eval()
                raw = value = float(self.learn.loss_func(self.learn.model(x), y))
        else:
            raw, value = float(self.learn.loss.detach()), float(self.smooth_loss)
        self.lrs.append(float(self.opt.hypers[-1]["lr"]))
        self.raw.append(raw)
        self.smooth.append(value)
        if self.paired:
            self.ratio.append(self._loss_after_step() / raw if raw > 0 else float("nan"))
        # the edge needs the curve only a little past its edge: stop once a step doubles its own batch's
        # loss (3-step mean); fastai's suggestions get fastai's rule (4x the best smoothed loss)
        track, limit = ((float(np.mean(self.ratio[-3:])), 2.0) if self.paired else (value, 4 * self.best))
        if self.train_iter > self.skip:
            self.best = min(self.best, value)
            if self.stop_div and (track > limit or not math.isfinite(track)):
                raise CancelFitException()
        if self.train_iter >= self.num_it or self._past_edge():
            raise CancelFitException()

    def _past_edge(self) -> bool:
        """The rate is `past_edge` times the edge of the step-ratio curve so far (as `edge` reads it,
        over the points whose 3-point mean is complete), and that edge is a real one (a step helped).
        With `final_at_floor` (the suggestion is `edge` itself), also once a complete 3-point window is
        at the floor: no later point can count lower, so `edge` reads the same edge off the whole curve."""
        if not (self.paired and self.past_edge) or len(self.ratio) < 6:
            return False
        s = _running_mean(np.log(np.clip(np.nan_to_num(self.ratio, nan=np.inf), EDGE_FLOOR, None)))[:-1]
        i = _first_min(s)
        at_floor = self.final_at_floor and i > 0 and s[i] <= math.log(EDGE_FLOOR) + 1e-12
        return s[i] < 0 and (at_floor or self.lrs[-1] >= self.past_edge * self.lrs[i])

    def _loss_after_step(self) -> float:
        """The loss of the batch just trained on, after the step: the same forward pass as the step's
        (same modes, same dropout masks), with BN running statistics left as they are (momentum 0)."""
        bns = [m for m in self.learn.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        try:
            for m in bns:
                m.momentum = 0.0
            cpu, cuda = self._rng
            with torch.no_grad(), torch.random.fork_rng(devices=range(len(cuda)) if cuda else []):
                torch.set_rng_state(cpu)
                if cuda:
                    torch.cuda.set_rng_state_all(cuda)
                return float(self.learn.loss_func(self.learn.model(*self.learn.xb), *self.learn.yb))
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom

    def before_validate(self):
        raise CancelValidException()

    def after_fit(self):
        self.learn.opt.zero_grad()


def _fallback(method: str, reason: str, fallback_lr: float, **curve) -> RangeTestResult:
    "The fallback result; the warning and the record give the same reason."
    warnings.warn(f"range test not used: {reason}; fastai's rule instead, lr={fallback_lr:g}", stacklevel=3)
    return RangeTestResult(method=method, suggestion=fallback_lr, point=None, fell_back=True, reason=reason,
                           **{"lrs": [], "losses": [], **curve})


def _check_args(config, lr_mult, fallback_lr) -> None:
    if not isinstance(config, RangeTest):
        raise TypeError(f"config must be a RangeTest(...), got {type(config).__name__}")
    if not (_is_number(fallback_lr) and math.isfinite(fallback_lr) and fallback_lr > 0):
        raise ValueError(f"fallback_lr must be a finite rate > 0, got {fallback_lr!r}")
    if lr_mult is not None and not (_is_number(lr_mult) and math.isfinite(lr_mult) and lr_mult >= 1):
        raise ValueError(f"lr_mult must be None or a finite ratio >= 1, got {lr_mult!r}")


def _positive(name: str, value, integer: bool = False, allow_zero: bool = False) -> None:
    "Refuse anything but a finite real number (Python's, NumPy's or a one-element tensor's) in range."
    ok = _is_number(value) and math.isfinite(float(value))
    ok = ok and (float(value) >= 0 if allow_zero else float(value) > 0) and (not integer or float(value).is_integer())
    if not ok:
        kind = "a whole number" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _is_number(x) -> bool:
    "A real number: Python's, NumPy's or a one-element tensor's (not a bool)."
    if isinstance(x, bool):
        return False
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.dtype.is_complex and x.dtype != torch.bool
    return isinstance(x, (int, float, np.integer, np.floating))


def _sweep(learn: Learner, config: RangeTest, num_it: int, ratios: np.ndarray, held,
           paired: bool) -> tuple[list, list, list]:
    """Run the sweep with everything restored after; returns the head group's rates, the raw losses and
    (`paired`) each step's loss ratio on its own batch, else fastai's smoothed loss (or the held-out loss)."""
    n_batches = len(learn.dls.train)
    paused, kept = probe_callbacks(learn)
    # distributed: every process sweeps on its own (no DDP, no DistributedDL); rank 0's curve is shared
    with local_fit_state(learn):
        snap = learner_snapshot(learn)
        try:
            dev = next(learn.model.parameters()).device
            held = None if held is None else (held[0].to(dev), held[1].to(dev))
            sweep = _Sweep(config.start_lr * ratios, config.end_lr * ratios, num_it, config.stop_div,
                           num_it // 10, held, paired, config.past_edge, _suggester(config.suggest)[1] is edge)
            with shielded_callbacks(learn, paused, kept), learn.no_logging():
                learn.fit(num_it // n_batches + 1, cbs=sweep)
            out = sweep.lrs, sweep.raw, sweep.ratio if sweep.paired else sweep.smooth
        finally:
            restore_learner(learn, snap)
    return broadcast_object(out)


@dataclass(frozen=True)
class _Plan:
    "Which curve a range test measures, for how many iterations, read by which suggestion."
    method: str
    suggest: Callable
    num_it: int
    curve: str
    held: tuple | None = None

    @property
    def whole(self) -> bool:
        "The suggestion reads the whole curve, of step ratios (`edge`), not fastai's cut smoothed loss."
        return bool(getattr(self.suggest, "uses_step_ratio", False))


def _plan(learn: Learner, config: RangeTest, n_batches: int) -> _Plan | str:
    "The plan for this training set, or why there is none (the fallback's reason)."
    num_it = config.iterations(n_batches)
    if num_it is not None:
        return _Plan(*_suggester(config.suggest), num_it, "training loss")
    why = (f"{n_batches} training batches per epoch, fewer than the {config.min_batches} new batches a curve needs"
           if config.num_it is None else
           f"{config.num_it} iterations would go over the {n_batches}-batch training set "
           f"{config.num_it / n_batches:.1f} times (repeated images make the loss fall at any rate)")
    if config.small_data == "fastai":
        return why
    with kept_random_state():  # a new DataLoader draws its seed from the global generator
        held = held_out_batch(learn, config.held_out)
    if held is None:
        return f"{why}, and no validation images for a held-out curve"
    return _Plan(*_suggester(config.held_out_suggest), config.held_out_it, "held-out loss", held)


def _read(plan: _Plan, full_lrs: list, values: list) -> tuple[dict, str, float | None, tuple | None]:
    """The curve the suggestion sees and what it suggests: `(curve fields, reason it failed or '', lr, point)`."""
    curve = plan.curve
    if plan.whole and plan.held is not None and values and values[0] > 0:
        # edge reads ratios: the held-out loss relative to its value after the first (lowest) rate
        values, curve = [v / values[0] for v in values], "held-out loss, relative to the first rate's"
    cut = slice(None) if plan.whole else slice(plan.num_it // 10, -5)  # fastai's lr_find cut
    lrs, losses = torch.tensor(full_lrs[cut]), torch.tensor(values[cut])
    bad = torch.nonzero(~torch.isfinite(losses.view(-1)))
    if len(bad):
        lrs, losses = lrs[:int(bad.min())], losses[:int(bad.min())]
    fields = dict(curve=curve, lrs=lrs.tolist(), losses=losses.tolist())
    if len(losses) < 5:
        how = ("became NaN or infinite" if len(bad) else
               f"diverged at once (stopped after {len(full_lrs)} of {plan.num_it} iterations)")
        return fields, f"the loss {how}, leaving {len(losses)} usable points", None, None
    try:
        lr, point = plan.suggest(lrs, losses, plan.num_it)
        lr = float(lr)
    except Exception as e:  # noqa: BLE001 - a suggester failing on an odd curve is a fallback case
        return fields, f"the {plan.method} suggestion failed on this curve ({type(e).__name__}: {e})", None, None
    if not math.isfinite(lr) or lr <= 0:
        return fields, f"the {plan.method} suggestion was {lr}", None, None
    return fields, "", lr, (float(point[0]), float(point[1])) if point is not None else None


def range_test(learn: Learner, config: RangeTest = RangeTest(), lr_mult: float | None = None,
               fallback_lr: float = DEFAULT_FALLBACK_LR) -> RangeTestResult:
    """Run a range test on the Learner as it is now (frozen or not); everything is restored after.

    Weights, BN statistics, optimizer state, `requires_grad`, module modes, every Learner attribute,
    the Recorder's history, the random states and the state of the callbacks that run during the
    sweep are put back bit for bit, also after an error or an interrupt; the other callbacks do not
    see the sweep. It may run inside a fit. With `lr_mult`, the groups move together at the ratios
    of `slice(lr / lr_mult, lr)`; the suggestion is the top rate.

    With too few batches for a curve (see `RangeTest`), or when the curve is unusable (it diverged
    at once, became NaN, the suggestion failed), `fallback_lr` is returned with a warning and the
    reason in the result (`fell_back=True`); `warnings.simplefilter('error')` stops instead.
    """
    _check_args(config, lr_mult, fallback_lr)
    n_batches = len(learn.dls.train)
    if n_batches == 0:
        raise ValueError("range test: the training DataLoader yields no batch (batch size larger than the "
                         "training set with drop_last?)")
    fallback_lr = float(fallback_lr)
    plan = _plan(learn, config, n_batches)
    if isinstance(plan, str):
        return _fallback(_suggester(config.held_out_suggest)[0], plan, fallback_lr)
    created = learn.opt is None  # the sweep needs one; a Learner that had none gets none back
    if created:
        learn.create_opt()
    try:
        n_groups = len(learn.opt.param_lists)
        ratios = np.array(even_mults(1 / lr_mult, 1.0, n_groups)) if lr_mult and n_groups > 1 else np.ones(n_groups)
        t0 = time.perf_counter()
        full_lrs, raw, values = _sweep(learn, config, plan.num_it, ratios, plan.held, plan.whole)
    finally:
        if created:
            learn.opt = None
    fields, reason, lr, point = _read(plan, full_lrs, values)
    fields.update(seconds=time.perf_counter() - t0, full_lrs=list(full_lrs), full_losses=list(raw))
    if reason:
        return _fallback(plan.method, reason, fallback_lr, **fields)
    return RangeTestResult(method=plan.method, suggestion=lr, point=point, **fields)
