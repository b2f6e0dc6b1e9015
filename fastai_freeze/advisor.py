"""Which strategy for this data? Measure size and similarity, recommend, apply.

Seed 004's four situations: small and similar data → train a head on the features; large and
similar → fine-tune; small and different → head only; large and different → train everything,
starting from the pretrained weights or from scratch. The pretrained model measures both
quantities itself:

- **similarity of the inputs**: the body's BN layers hold the pretraining data's per-channel
  statistics; `bn_shift` gives the mean KL divergence of the new data's statistics from them;
- **transferability of the features**: LogME (You, Liu, Wang, Long, *LogME: Practical Assessment of
  Pre-trained Models for Transfer Learning*, ICML 2021), the log marginal evidence per sample of a
  Bayesian linear model on the body's pooled features, one-vs-rest per class, compared against the
  same body with random weights (a gain above zero: the pretrained features are better than random
  ones for these labels).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from fastai.learner import Learner
from fastcore.basics import patch
from torch import nn

from .core.bn import bn_shift
from .core.logme import logme
from .freeze import body_bn_layers
from .strategies import run_named_strategy

MAX_BN_SHIFT = 0.1

__all__ = ["Advice", "suggest_strategy", "MIN_IMAGES_PER_CLASS"]

MIN_IMAGES_PER_CLASS = 100
"Fewer training images per class than this is a small data set (seed 004's 'small')."


@dataclass
class Advice:
    "A recommendation with the numbers it rests on; `print` it, or `apply(learn, epochs)` it."
    strategy: str
    situation: str
    reason: str
    n_images: int
    n_classes: int
    per_class: float
    bn_shift: float | None
    logme_pretrained: float
    logme_random: float
    bn_policy: str
    fine_tune_with_kwargs: dict = field(default_factory=dict)

    @property
    def logme_gain(self) -> float:
        return self.logme_pretrained - self.logme_random

    def __str__(self) -> str:
        shift = f"{self.bn_shift:.3f} nats" if self.bn_shift is not None else "n/a (no BN)"
        return (f"recommended: {self.strategy} ({self.situation})\n"
                f"  why: {self.reason}\n"
                f"  data: {self.n_images} images, {self.n_classes} classes, {self.per_class:.0f} per class "
                f"(small below {MIN_IMAGES_PER_CLASS})\n"
                f"  BN statistics shift: {shift} (different above {MAX_BN_SHIFT})\n"
                f"  LogME: pretrained {self.logme_pretrained:.3f}, random weights {self.logme_random:.3f}, "
                f"gain {self.logme_gain:+.3f}\n"
                f"  BN policy: {self.bn_policy}; fine_tune_with arguments: {self.fine_tune_with_kwargs}")

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))

    def apply(self, learn: Learner, epochs: int = 4, freeze_epochs: int = 1):
        "Train `learn` with the recommended strategy (the same functions as the strategy comparison); returns its record."
        return run_named_strategy(learn, self.strategy, epochs, freeze_epochs)


def _reinit(module: nn.Module) -> nn.Module:
    rnd = copy.deepcopy(module)
    for m in rnd.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return rnd


@torch.no_grad()
def _pooled_features(body: nn.Module, batches, max_samples: int):
    modes = {m: m.training for m in body.modules()}
    body.eval()
    device = next(body.parameters()).device
    fs, ys, n = [], [], 0
    try:
        for b in batches:
            x, y = b[0], b[1]
            f = body(x.to(device))
            fs.append((f.mean(dim=tuple(range(2, f.dim()))) if f.dim() > 2 else f).float().cpu())
            ys.append(torch.as_tensor(y).cpu())
            n += len(x)
            if n >= max_samples:
                break
    finally:
        for m, t in modes.items():
            m.train(t)
    return torch.cat(fs)[:max_samples].numpy(), torch.cat(ys)[:max_samples].numpy()


@patch
def suggest_strategy(self: Learner, max_samples: int = 2000) -> Advice:
    """Measure the training data against the pretrained body and recommend a strategy.

    The model must be `Sequential(body, head)` (vision_learner, new_head_learner). Uses up to
    `max_samples` training images (un-shuffled, as they come), changes nothing.
    """
    m = self.model
    if not (isinstance(m, nn.Sequential) and len(m) == 2):
        raise ValueError("suggest_strategy needs a model Sequential(body, head), as vision_learner builds")
    body, head = m[0], m[1]
    dl = self.dls.train.new(shuffle=False, drop_last=False) if hasattr(self.dls.train, "new") else self.dls.train
    f_pre, y = _pooled_features(body, dl, max_samples)
    f_rnd, _ = _pooled_features(_reinit(body), dl, max_samples)
    lm_pre, lm_rnd = logme(f_pre, y), logme(f_rnd, y)
    head_params = list(head.parameters())
    body_bns = [mod for _, mod in body_bn_layers(m, head_params)]
    try:
        shift = bn_shift(m, dl, max_batches=max(1, -(-min(max_samples, 256) // (dl.bs or 1))),
                         layers=body_bns).mean_kl if body_bns else None
    except ValueError:
        shift = None
    n_images = len(self.dls.train.dataset)
    n_classes = int(len(np.unique(y)))
    per_class = n_images / max(n_classes, 1)
    small = per_class < MIN_IMAGES_PER_CLASS
    similar = (shift is None or shift <= MAX_BN_SHIFT) and lm_pre > lm_rnd
    from .policy import decide_bn_policy
    bn = decide_bn_policy(self).policy.value
    size_txt = (f"{per_class:.0f} images per class {'<' if small else '>='} {MIN_IMAGES_PER_CLASS}")
    sim_txt = (f"BN shift {shift:.3f} {'<=' if shift is not None and shift <= MAX_BN_SHIFT else '>'} "
               f"{MAX_BN_SHIFT}, LogME gain over random weights {lm_pre - lm_rnd:+.3f}"
               if shift is not None else f"LogME gain over random weights {lm_pre - lm_rnd:+.3f}")
    if small and similar:
        strategy, sit = "features", "small and similar"
        why = "few images and features that already fit: train only a head on the pretrained features"
    elif small:
        strategy, sit = "features", "small and different"
        why = ("few images from another domain: fine-tuning the body would overfit them; train the head only "
               "(seed 004), and expect a lower ceiling")
    elif similar:
        strategy, sit = "fine_tune_with", "large and similar"
        why = "enough images, similar domain: fine-tune the whole network"
    elif lm_pre > lm_rnd:
        strategy, sit = "fine_tune_with", "large and different"
        why = ("enough images from another domain, but the pretrained features still beat random ones: "
               "fine-tune everything from the pretrained weights")
    else:
        strategy, sit = "scratch", "large and different"
        why = "enough images, and the pretrained features are no better than random ones for these labels"
    kwargs = {"bn": bn} if strategy == "fine_tune_with" else {}
    return Advice(strategy, sit, f"{size_txt}; {sim_txt}. {why}", n_images, n_classes, per_class, shift,
                  lm_pre, lm_rnd, bn, kwargs)
