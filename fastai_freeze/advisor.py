"""Which strategy for this data? Measure size, transferability and BN statistics; recommend; apply.

The four situations of the transfer-learning literature (small or large new data, similar to the
pretraining data or not; CS231n's transfer-learning notes) are measured on the user's own data and
network, not assumed:

- **size**: training images per class (`LARGE_PER_CLASS`);
- **transferability**: LogME (You, Liu, Wang, Long, *LogME: Practical Assessment of Pre-trained
  Models for Transfer Learning*, ICML 2021) of the body's pooled features for these labels, against
  the same body with random weights (a seeded re-initialisation: the same data gives the same
  number, and the global random state is left alone);
- **BN statistics**: the automatic BN choice's probe (`probe_bn_statistics`): LogME with the
  pretrained statistics and with the new data's own, and the shift between them.

The rule, validated leaving one data set out on the real network and on the pattern model
(`benchmarks/advisor.py`, `benchmarks/results/advisor.md`): training from scratch where the data is
large and the pretrained features are no better than random ones for its labels; otherwise
`fine_tune_with` with its defaults.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from fastai.learner import Learner
from fastcore.basics import patch
from torch import nn

from .core.logme import logme, pooled_features
from .core.state import kept_random_state
from .internals import in_order
from .policy import BNDecision, decide_bn_policy
from .probe import _positive
from .record import FineTuneRecord
from .strategies import run_named_strategy

__all__ = ["Advice", "suggest_strategy", "LARGE_PER_CLASS", "SCRATCH_MAX_GAIN"]

LARGE_PER_CLASS = 100
"At this many training images per class or more, a data set counts as large."

SCRATCH_MAX_GAIN = 0.0
"Training from scratch is advised for large data when the pretrained features' LogME gain over random ones is at most this."


@dataclass
class Advice:
    "A recommendation with the numbers it rests on; `print` it, or `advice.apply(learn)` it."
    strategy: str
    situation: str
    reason: str
    n_images: int
    n_classes: int
    per_class: float
    logme_pretrained: float
    logme_random: float
    bn: BNDecision

    @property
    def logme_gain(self) -> float:
        "How much better (LogME) the pretrained features fit these labels than random ones."
        return self.logme_pretrained - self.logme_random

    def __str__(self) -> str:
        p = self.bn.probe
        stats = (f"LogME {p.logme_pretrained:.3f} with the pretrained statistics, {p.logme_new:.3f} with the new "
                 f"data's; shift {p.shift:.3f} nats" if p is not None else "no BatchNorm statistics in the body")
        return (f"recommended: {self.strategy} ({self.situation})\n"
                f"  why: {self.reason}\n"
                f"  data: {self.n_images} images, {self.n_classes} classes, {self.per_class:.0f} per class "
                f"(large from {LARGE_PER_CLASS})\n"
                f"  features: LogME pretrained {self.logme_pretrained:.3f}, random weights {self.logme_random:.3f}, "
                f"gain {self.logme_gain:+.3f}\n"
                f"  BN statistics: {stats}\n"
                f"  BN policy: {self.bn}")

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))

    def apply(self, learn: Learner, epochs: int = 4, freeze_epochs: int = 1) -> FineTuneRecord:
        "Train `learn` with the recommended strategy (as the strategy comparison does); returns its record."
        return run_named_strategy(learn, self.strategy, epochs, freeze_epochs)


def _random_twin(body: nn.Module) -> nn.Module:
    "The body with every weight re-initialised, the same way for the same body (seeded, state kept)."
    twin = copy.deepcopy(body)
    with kept_random_state():
        torch.manual_seed(0)
        for m in twin.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
    return twin


def choose_strategy(per_class: float, logme_gain: float) -> tuple[str, str, str]:
    "`(strategy, situation, why)` from the measurements (the rule stated in the module's docstring)."
    large = per_class >= LARGE_PER_CLASS
    fits = logme_gain > SCRATCH_MAX_GAIN
    situation = f"{'large' if large else 'small'}, pretrained features {'fit' if fits else 'no better than random'}"
    if large and not fits:
        return "scratch", situation, ("enough images, and the pretrained features fit these labels no better than "
                                      "random ones: train the network from scratch")
    if fits:
        why = "the pretrained features fit these labels: fine-tune from them, BN policy and rates decided on the data"
    else:
        why = ("few images, and the pretrained features fit these labels no better than random ones; with this little "
               "data, fine-tuning from them still beat training from scratch in every benchmark row")
    return "fine_tune_with", situation, why


@patch
def suggest_strategy(self: Learner, max_samples: int = 2000) -> Advice:
    """Measure the training data against the pretrained body and recommend a strategy.

    The model must be `Sequential(body, head)` (vision_learner, new_head_learner). Uses up to
    `max_samples` training images, in order; changes nothing, consumes no random number.
    """
    _positive("max_samples", max_samples, integer=True)
    if max_samples < 2:
        raise ValueError(f"max_samples must be >= 2 (LogME compares images), got {max_samples!r}")
    max_samples = int(max_samples)
    m = self.model
    if not (isinstance(m, nn.Sequential) and len(m) == 2):
        raise ValueError("suggest_strategy needs a model Sequential(body, head), as vision_learner builds")
    with kept_random_state():  # a new DataLoader draws its seed from the global generator
        dl = in_order(self.dls.train, 64)
        f_pre, y = pooled_features(m[0], dl, max_samples)
        f_rnd, _ = pooled_features(_random_twin(m[0]), dl, max_samples)
    lm_pre, lm_rnd = logme(f_pre, y), logme(f_rnd, y)
    bn = decide_bn_policy(self, "auto")
    n_images = len(self.dls.train.dataset)
    n_classes = int(len(np.unique(y)))
    per_class = n_images / max(n_classes, 1)
    strategy, situation, why = choose_strategy(per_class, lm_pre - lm_rnd)
    reason = (f"{per_class:.0f} images per class ({'>=' if per_class >= LARGE_PER_CLASS else '<'} {LARGE_PER_CLASS}); "
              f"LogME gain of the pretrained features over random ones {lm_pre - lm_rnd:+.3f}. {why}")
    return Advice(strategy, situation, reason, n_images, n_classes, per_class, lm_pre, lm_rnd, bn)
