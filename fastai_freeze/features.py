"""Cached-feature warm-up: compute the frozen body's features once, train the head on them.

When nothing in the body trains and the data is not augmented, the body's output for an image is the
same every epoch. The warm-up then costs one forward pass of the body per image, once, plus a small
head fit per epoch. Features over a memory budget go to a memory-mapped file, removed afterwards.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.vision.augment import RandTransform, Resize, ResizeMethod
from torch import nn

from .core.fuse import inference_model
from .core.state import kept_modes, kept_random_state
from .internals import in_order

__all__ = ["random_transforms", "check_cacheable", "FeatureCache", "compute_features", "cached_warmup", "CachedWarmup"]


def random_transforms(dl) -> list[str]:
    """The transforms of a fastai DataLoader that are random on its split, each with why.

    fastai's random transforms are random on the training split only (on the validation split
    `Resize` crops the centre, affine transforms are the identity, and the rest are training-only).
    On a training DataLoader: every `RandTransform` with `p > 0` (the `aug_transforms` family,
    `RandomResizedCrop`, `Flip`...), including `Resize` unless `method='squish'`: fastai's crop-resize
    takes a random crop and pad-resize places the image at a random offset, on the training set, for
    every image whose aspect ratio differs from the target's. Deterministic transforms (`ToTensor`,
    `IntToFloatTensor`, `Normalize`, squish-resize...) are cacheable.
    """
    split = getattr(dl, "split_idx", None)
    if split is None:
        split = getattr(getattr(dl, "dataset", None), "split_idx", 0)
    if split != 0:
        return []
    found = []
    for attr in ("after_item", "before_batch", "after_batch"):
        for t in getattr(getattr(dl, attr, None), "fs", []):
            if getattr(t, "split_idx", None) == 1 or not isinstance(t, RandTransform) or not getattr(t, "p", 1) > 0:
                continue
            if isinstance(t, Resize):
                if t.method != ResizeMethod.Squish:
                    found.append(f"Resize(method='{t.method}') (a random {'crop' if t.method == 'crop' else 'offset'} "
                                 "per image on the training set)")
            else:
                found.append(type(t).__name__)
    return found


def check_cacheable(learn: Learner) -> None:
    "Raise `ValueError`, saying what to change, when the training data cannot be cached (random transforms)."
    rand = random_transforms(learn.dls.train)
    if rand:
        raise ValueError(f"the training data has random transforms: {'; '.join(rand)}. Features that differ every "
                         "epoch cannot be cached: use Resize(size, method='squish') (or ResizeMethod.Squish) for a "
                         "deterministic resize, leave augmentation (aug_transforms) out of the warm-up, or drop "
                         "cache_features")


@dataclass
class FeatureCache:
    "Features and targets of one dataset, in memory or in a memory-mapped file under `folder`."
    x: torch.Tensor
    y: torch.Tensor
    on_disk: bool
    folder: Path | None = None
    nbytes: int = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        "`(features, target)` of item `i`: a view, read from the file when on disk (no per-item copy kept)."
        return self.x[i], self.y[i]

    def close(self) -> None:
        "Drop the tensors and remove the file (if any)."
        self.x = self.y = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _xy(b):
    return b[0], b[1]


@torch.no_grad()
def compute_features(body: nn.Module, dl, memory_budget: int = 1 << 30, tmp_dir: str | None = None,
                     fast: bool = True) -> FeatureCache:
    """Run `body` (in eval mode, no graph) once over `dl` (in order, nothing dropped).

    `fast` runs an inference copy of the body instead (`inference_model`: BN fused into the convs,
    channels-last), the same function to float precision and about 1.2x faster on CPU; the copy
    costs one body's weights in memory while the features are computed.

    Features are stored in float32 in memory when they fit in `memory_budget` bytes, otherwise in a
    memory-mapped file in a new temporary folder (under `tmp_dir`), removed by `FeatureCache.close()`.
    The body's training flags are restored afterwards.
    """
    dl = in_order(dl)
    n = len(dl.dataset)
    cache, folder, i = None, None, 0
    try:
        with kept_modes(body):
            body.eval()
            run = inference_model(body, channels_last=True)[0] if fast else body
            for b in dl:
                xb, yb = _xy(b)
                f = run(xb).float().cpu().contiguous()
                if cache is None:
                    shape = (n,) + tuple(f.shape[1:])
                    nbytes = int(np.prod(shape)) * 4
                    ys = torch.empty((n,) + tuple(yb.shape[1:]), dtype=torch.as_tensor(yb).dtype)
                    if nbytes <= memory_budget:
                        xs = torch.empty(shape, dtype=torch.float32)
                    else:
                        folder = Path(tempfile.mkdtemp(prefix="fastai_freeze_features_", dir=tmp_dir))
                        mm = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float32,
                                                       shape=shape)
                        xs = torch.from_numpy(mm)
                    cache = FeatureCache(xs, ys, folder is not None, folder, nbytes)
                k = f.shape[0]
                cache.x[i:i + k] = f
                cache.y[i:i + k] = torch.as_tensor(yb).cpu()
                i += k
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if cache is None:
        raise ValueError("compute_features: the DataLoader yielded no batch")
    return cache


@dataclass
class CachedWarmup:
    "What `cached_warmup` did: epochs, rates, time to compute the features, where they were kept."
    epochs: int
    lr: float
    feature_seconds: float
    fit_seconds: float
    on_disk: bool
    nbytes: int
    values: list = field(default_factory=list)
    metric_names: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    iter_lrs: list = field(default_factory=list)


def _body_head(learn: Learner) -> tuple[nn.Module, nn.Module]:
    m = learn.model
    if not (isinstance(m, nn.Sequential) and len(m) == 2):
        raise ValueError("the cached-feature warm-up needs a model `Sequential(body, head)` (what vision_learner "
                         f"and new_head_learner build); this model is a {type(m).__name__}")
    return m[0], m[1]


def cached_warmup(learn: Learner, epochs: int, lr: float = 2e-3, memory_budget: int = 1 << 30,
                  tmp_dir: str | None = None, **fit_kwargs) -> CachedWarmup:
    """Train the head of `learn` for `epochs` on the body's cached features (one-cycle at `lr`).

    Refuses (ValueError) when the training data is augmented (the features would differ every
    epoch), when any body parameter is trainable, or when a body BN layer would use batch statistics
    (use bn='frozen' or 'fold' with freeze_bn=True: the body then computes exactly what the cache
    holds). The head is trained in place: the full model has it afterwards. Temporary files are
    removed, also after an error.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    body, head = _body_head(learn)
    check_cacheable(learn)
    trainable = [n for n, p in body.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"{len(trainable)} body parameters are trainable (e.g. {trainable[0]}): cached features "
                         "need a body that does not change; freeze it fully (freeze_bn=True)")
    t0 = time.perf_counter()
    # computing the features consumes no random numbers: the head's fit draws the same dropout masks
    # and batch order as the normal warm-up would
    with kept_random_state():
        train = compute_features(body, learn.dls.train, memory_budget, tmp_dir)
    try:
        with kept_random_state():
            valid = compute_features(body, learn.dls.valid, memory_budget, tmp_dir)
        try:
            feat_secs = time.perf_counter() - t0
            bs = getattr(learn.dls.train, "bs", 64)
            dls = DataLoaders(DataLoader(train, bs=bs,
                                         shuffle=getattr(learn.dls.train, "shuffle", True),
                                         drop_last=getattr(learn.dls.train, "drop_last", False)),
                              DataLoader(valid, bs=getattr(learn.dls.valid, "bs", bs)),
                              device=getattr(learn.dls, "device", None))
            head_learn = Learner(dls, head, loss_func=learn.loss_func, opt_func=learn.opt_func,
                                 metrics=learn.metrics, wd=learn.wd, moms=learn.moms, train_bn=learn.train_bn)
            # show progress and log as the main Learner does (it may be inside no_bar/no_logging)
            if not any(isinstance(c, ProgressCallback) for c in learn.cbs):
                head_learn.remove_cbs([c for c in head_learn.cbs if isinstance(c, ProgressCallback)])
            head_learn.logger = learn.logger
            t1 = time.perf_counter()
            head_learn.fit_one_cycle(epochs, lr, **fit_kwargs)
            rec = head_learn.recorder
            return CachedWarmup(epochs, lr, feat_secs, time.perf_counter() - t1, train.on_disk or valid.on_disk,
                                train.nbytes + valid.nbytes, [list(v) for v in rec.values],
                                list(rec.metric_names), [float(x) for x in rec.losses],
                                [float(x) for x in rec.lrs])
        finally:
            valid.close()
    finally:
        train.close()
