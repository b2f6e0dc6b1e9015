"""LogME (You, Liu, Wang, Long, *LogME: Practical Assessment of Pre-trained Models for Transfer
Learning*, ICML 2021) and the pooled features it is computed on."""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .bn import (
    _check_finite,
    batch_statistics,
    bn_layers,
    channels_last_ok,
    recorded_moments,
    shift_kl,
    to_pass_input,
)
from .state import device_of, first_tensor, kept_modes

__all__ = ["logme", "pooled_features", "StatisticsProbe", "probe_bn_statistics"]


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 30) -> float:
    """LogME of `features` (N x D) for integer `labels` (N): mean over classes of the maximised log
    evidence per sample of a Bayesian linear model, one-vs-rest (You et al., 2021, Algorithm 1,
    computed on the SVD of the features). Higher is better; deterministic.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise ValueError(f"features must be N x D (N >= 2) with one label per row, got {f.shape} and {y.shape}")
    if not np.isfinite(f).all():
        raise ValueError("logme: the features hold NaN or infinite values (check the data and the model)")
    n, d = f.shape
    # torch's SVD: it keeps to torch's thread count; NumPy's BLAS pool, with as many threads as cores,
    # took seconds for this 128 x 1280 matrix on a loaded 2-core machine (0.05 s here)
    u, s, _ = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(f)), full_matrices=False))
    sigma = s ** 2
    out = []
    for k in np.unique(y):
        yk = (y == k).astype(np.float64)
        x = u.T @ yk
        x2 = x ** 2
        res_out = max(float(yk @ yk - x2.sum()), 0.0)  # the part of y outside the features' span
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + res_out
            # gamma (the effective number of parameters) reaches 0 on constant features and n when
            # they fit the labels exactly (features of a huge scale, D >= N): kept inside (0, n)
            gamma = min(max(gamma, 1e-12 * n), n * (1 - 1e-12))
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t < 1e-3:
                break
        t = alpha / beta
        m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
        res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + res_out
        log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * log_det
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
        out.append(evidence / n)
    return float(np.mean(out))


@torch.no_grad()
def pooled_features(body: nn.Module, batches: Iterable, max_samples: int | None = None,
                    eval_mode: bool = True, channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`(features, labels)`: `body`'s output for each `(x, y)` batch, averaged over the spatial
    dimensions, up to `max_samples` rows; in eval mode unless `eval_mode=False` (then the modes are
    left as the caller set them); the images fed channels-last if asked (`channels_last_ok`). The
    body's modes are restored."""
    device = device_of(body)
    fs, ys, n = [], [], 0
    with kept_modes(body):
        if eval_mode:
            body.eval()
        for b in batches:
            x, y = b[0], b[1]
            f = body(to_pass_input(x, device, channels_last))
            fs.append((f.mean(dim=tuple(range(2, f.dim()))) if f.dim() > 2 else f).float().cpu())
            ys.append(torch.as_tensor(y).cpu())
            n += len(x)
            if max_samples is not None and n >= max_samples:
                break
    if not fs:
        raise ValueError("pooled_features: `batches` yielded no batch")
    return torch.cat(fs)[:max_samples].numpy(), torch.cat(ys)[:max_samples].numpy()


@dataclass
class StatisticsProbe:
    """Which BN statistics give the body more useful features for these labels.

    `logme_pretrained`: LogME of the pooled body features with the pretrained running statistics (eval
    mode); `logme_new`: with every BN layer normalising with the new data's own statistics (train-mode
    BN over the probe batches, running statistics left as they were); `shift`: the mean KL divergence
    (nats) of the new data's per-channel statistics from the running ones at the body's BN layers.
    """
    logme_pretrained: float
    logme_new: float
    shift: float
    samples: int
    seconds: float

    @property
    def gain(self) -> float:
        "How much better (LogME) the new data's statistics make the features; below 0: the pretrained ones win."
        return self.logme_new - self.logme_pretrained


@torch.no_grad()
def probe_bn_statistics(body: nn.Module, batches: Iterable, max_samples: int = 256) -> StatisticsProbe:
    """Compare the pretrained BN statistics with the new data's own on `batches` of `(x, y)`.

    Two forward passes over up to `max_samples` samples, no gradient: one in eval mode (pretrained
    statistics; the BN shift is measured in the same pass), one with the body's BN layers
    normalising with batch statistics (momentum 0, so no running statistic moves). The features of
    each pass are pooled and scored with LogME against the labels. Every module's mode and every
    buffer is as before afterwards; deterministic for the same batches.
    """
    t0 = time.perf_counter()
    layers = [m for _, m in bn_layers(body, include_folded=False) if getattr(m, "running_mean", None) is not None]
    if not layers:
        raise ValueError("probe_bn_statistics: the body has no BatchNorm layer with running statistics")
    batches = list(_take(batches, max_samples))
    if not batches:
        raise ValueError("probe_bn_statistics: `batches` yielded no batch")
    cl = channels_last_ok(body, first_tensor(batches[0]))  # before the hooks: the trial image is not counted
    with recorded_moments(layers) as stats:
        f_pre, y = pooled_features(body, batches, channels_last=cl)
    kl = {str(i): shift_kl(m, *stats[m]) for i, m in enumerate(layers) if m in stats}
    _check_finite("probe_bn_statistics", kl)
    with batch_statistics(body, layers):
        f_new, _ = pooled_features(body, batches, eval_mode=False, channels_last=cl)
    shift = float(sum(kl.values()) / max(len(kl), 1))
    return StatisticsProbe(logme(f_pre, y), logme(f_new, y), shift, len(y), time.perf_counter() - t0)


def _take(batches: Iterable, max_samples: int):
    "Batches until `max_samples` samples (the last batch may go beyond)."
    n = 0
    for b in batches:
        if n >= max_samples:
            return
        yield b
        n += len(first_tensor(b))
