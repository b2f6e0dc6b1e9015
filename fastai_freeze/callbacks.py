"""Callbacks: stop rules on fastai's `TrackerCallback` (end the warm-up on a plateau, stop at a target
metric) and the frozen phase's fast path (`FrozenPrefix`).

Both keep fastai's meaning of `monitor`, `comp`, `min_delta` and `reset_on_fit` (lower is better
for a monitor whose name holds 'loss' or 'error'), and stay out of `lr_find` and range tests as
every `TrackerCallback` does.
"""
from __future__ import annotations

import weakref

import torch
from fastai.callback.core import CancelFitException
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback, TrackerCallback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .core.fuse import inference_model
from .distrib import unwrap_model
from .freeze import frozen_prefix
from .internals import FitScopedCallback

__all__ = ["PlateauTracker", "UnfreezeOnPlateau", "StopAtTarget", "FrozenPrefix", "check_monitor_data"]


def check_monitor_data(learn, monitor: str, who: str) -> None:
    """Refuse a rule on a validation value (`valid_loss`, a metric) when there is no validation data:
    fastai's Recorder would record `None` and the rule would fail after an epoch had trained."""
    if monitor == "train_loss":
        return
    try:
        n = len(learn.dls.valid)
    except (AttributeError, IndexError):
        n = 0
    except TypeError:  # an iterable without a length: data may come
        return
    if n == 0:
        raise ValueError(f"{who} watches {monitor!r}, a validation value, and this Learner has no validation data "
                         "(an empty or missing validation set): give it a validation set, or monitor='train_loss'")


class PlateauTracker(TrackerCallback):
    """fastai's `TrackerCallback` counting the epochs since `monitor` last improved by more than
    `min_delta` (`wait`, as `EarlyStoppingCallback` counts them): `plateaued` once that is `patience`.
    The one plateau rule of the library (`UnfreezeOnPlateau`, `FineTuneCallback`)."""

    def __init__(self, monitor: str = "valid_loss", comp=None, min_delta: float = 0.0, patience: int = 1,
                 reset_on_fit: bool = True):
        super().__init__(monitor=monitor, comp=comp, min_delta=min_delta, reset_on_fit=reset_on_fit)
        self.patience = patience

    watches = True  # the rule reads `monitor` (a subclass may watch only when configured to)

    def before_fit(self):
        self.wait = 0
        super().before_fit()
        if self.run and self.watches:
            check_monitor_data(self.learn, self.monitor, type(self).__name__)

    def after_epoch(self):
        if not self.watches:  # nothing to track, and the value may be None (no validation data)
            return
        super().after_epoch()
        self.wait = 0 if self.new_best else self.wait + 1

    @property
    def plateaued(self) -> bool:
        return self.wait >= self.patience


class UnfreezeOnPlateau(PlateauTracker):
    """Ends a (warm-up) fit once `monitor` has not improved by `min_delta` for `patience` epochs.

    As fastai's `EarlyStoppingCallback`, with the epoch it stopped after kept in `stopped_epoch`
    (None when the fit ran to its end) and no message printed: what follows is an unfreeze, not the end.
    """
    order = EarlyStoppingCallback.order
    _pause_in_probe = True

    def before_fit(self):
        self.stopped_epoch = None
        super().before_fit()

    def after_epoch(self):
        super().after_epoch()
        if self.plateaued:
            self.stopped_epoch = self.epoch + 1
            raise CancelFitException()


class StopAtTarget(TrackerCallback):
    """Stops the fit once `monitor` reaches `target`; with `keep_best`, the best epoch's weights are
    loaded at the end (as `SaveModelCallback` does, but kept in memory: one copy of the state dict).

    `reached_epoch` is the epoch (1-based) after which the target was reached, `best_epoch` the
    best one (0-based, as fastai counts).
    """
    order = SaveModelCallback.order
    _pause_in_probe = True

    def __init__(self, monitor: str = "valid_loss", target: float | None = None, keep_best: bool = True,
                 comp=None, min_delta: float = 0.0):
        super().__init__(monitor=monitor, comp=comp, min_delta=min_delta)
        self.target, self.keep_best = target, keep_best
        self.reached_epoch = self.best_epoch = self._state = None

    def before_fit(self):
        self.reached_epoch = self.best_epoch = self._state = None
        super().before_fit()
        if self.run:
            check_monitor_data(self.learn, self.monitor, "StopAtTarget")

    def after_epoch(self):
        super().after_epoch()
        if self.new_best:
            self.best_epoch = self.epoch
            if self.keep_best:
                self._state = {k: t.detach().clone() for k, t in self.learn.model.state_dict().items()}
        value = self.recorder.values[-1][self.idx]
        if self.target is not None and (value == self.target or self.comp(value, self.target)):
            self.reached_epoch = self.epoch + 1
            raise CancelFitException()

    def after_fit(self):
        if self.run and self.keep_best and self._state is not None:
            self.learn.model.load_state_dict(self._state)
        self._state = None
        super().after_fit()


def _fixed_function(modules: list[nn.Module]) -> bool:
    """Whether the modules compute a fixed function in training mode: no BN layer normalising with
    batch statistics (they are in eval mode, frozen kinds or folded), no active dropout or drop-path."""
    for m in (x for mod in modules for x in mod.modules()):
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None):
            return False
        if m.training and (isinstance(m, _DROPOUTS) and m.p > 0 or getattr(m, "drop_prob", 0) or 0) > 0:
            return False
    return True


_DROPOUTS: tuple[type, ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _identity(x, *args, **kwargs):
    return x


def _tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def _versions(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    "The in-place version counters of weights and buffers: any write (a `load`) changes one."
    return tuple(t._version for t in tensors)


def _own_forward(module: nn.Module):
    "The module's own forward (what a pickled patch becomes: nothing of the fast path survives a copy)."
    return type(module).forward.__get__(module)


class _PrefixForward:
    """The forward `FrozenPrefix` gives a prefix module for one training epoch: `fn` without autograd.

    Called outside that epoch (an interrupt left it: the Learner validates or predicts, or the
    weights were loaded since), it takes itself off and runs the module's own forward, so nothing
    stale ever answers. It pickles as the module's own forward.
    """

    def __init__(self, owner: FrozenPrefix, module: nn.Module, fn):
        self.owner, self.module, self.fn = weakref.ref(owner), module, fn

    def __call__(self, *args, **kwargs):
        owner = self.owner()
        if owner is None or not owner.current(self):
            if owner is not None:
                owner.remove()  # every patch of the prefix: the modules after this one compute again
            self.module.__dict__.pop("forward", None)
            return self.module.forward(*args, **kwargs)
        with torch.no_grad():
            return self.fn(*args, **kwargs)

    def __reduce__(self):
        return _own_forward, (self.module,)


class FrozenPrefix(FitScopedCallback):
    """During training epochs, runs the frozen leading part of the model without autograd and, when
    it computes a fixed function (every parameter frozen, its BN frozen or folded, no active
    dropout) and no forward hook watches it, as a fused, channels-last inference copy
    (`inference_model`).

    The prefix is looked up at each epoch (`frozen_prefix`): what unfreezes leaves it at the next
    epoch, and the copy is rebuilt when the prefix or its weights changed. Outputs match the normal
    path to float precision (the copy) or exactly (no-grad only). Nothing is left on the model after
    a training epoch, nor after an error or an interrupt (`FitScopedCallback.cleanup`); the grad mode
    is a context manager's, so it comes back whatever happens.
    """
    order = TrackerCallback.order + 3  # after every callback that sets BN modes in before_train
    _pause_in_probe = True

    def __init__(self, inference_copy: bool = True):
        self.inference_copy = inference_copy
        self._patched: list[nn.Module] = []
        self._key, self._copy, self.mode = None, None, "off"
        self._weights: tuple = ()
        self._tensors: list = []

    def current(self, patch: _PrefixForward) -> bool:
        "Whether `patch` belongs to the training epoch in progress, on the weights it was made for."
        learn = self.__dict__.get("learn")
        if learn is None or not getattr(learn, "training", False) or patch.module not in self._patched:
            return False
        first = patch.module is self._patched[0]  # called first: it answers for the whole prefix
        return not first or self.mode != "inference copy" or _versions(self._tensors) == self._weights

    def before_train(self):
        self.remove()
        prefix = frozen_prefix(unwrap_model(self.learn.model))
        if not any(True for m in prefix for _ in m.parameters()):
            self.mode = "off"
            return
        hooked = any(m._forward_hooks or m._forward_pre_hooks for mod in prefix for m in mod.modules())
        if self.inference_copy and _fixed_function(prefix) and not hooked:
            key = tuple(id(m) for m in prefix) + _versions(_tensors(prefix))
            if key != self._key:
                self._copy = inference_model(nn.Sequential(*prefix), channels_last=True)[0]
                self._key = key
            self.mode = "inference copy"
            fns = [self._copy] + [_identity] * (len(prefix) - 1)
        else:
            self.mode = "no grad"
            fns = [_own_forward(m) for m in prefix]
        for m, fn in zip(prefix, fns):
            m.forward = _PrefixForward(self, m, fn)
        self._patched, self._tensors = prefix, _tensors(prefix)
        self._weights = _versions(self._tensors)

    def after_train(self):
        self.remove()

    def after_fit(self):
        self.cleanup()

    def cleanup(self) -> None:
        self.remove()
        self._key = self._copy = None

    def remove(self) -> None:
        "Give the prefix modules their own forward back."
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched, self._tensors = [], []

    def __getstate__(self):
        "Pickled (`learn.export` of a Learner that keeps it) without the epoch's patch and fused copy."
        return {**super().__getstate__(), "_patched": [], "_key": None, "_copy": None, "_weights": (), "_tensors": []}
