"""The embedded default: a deterministic source task, a model pretrained on it, and target tasks.

Nothing is downloaded. The source task is procedurally generated pattern images; the model is a
small ResNet (torchvision's `BasicBlock`, the same module names as torchvision's ResNet, so fastai's
`create_body`/`cut_model` and a ResNet-style splitter apply) trained on it with a fixed seed and
cached on disk. Targets: new pattern classes (similar domain) and scikit-learn's bundled
handwritten digits (real data, a different domain).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

__all__ = ["PATTERNS", "SOURCE_CLASSES", "TARGET_CLASSES", "make_patterns", "load_digits_images",
           "TinyResNet", "tiny_resnet", "tiny_resnet_split", "pretrained_tiny_resnet", "cache_dir",
           "tensor_dls"]

PATTERNS = ("hstripes", "vstripes", "diag", "antidiag", "disc", "ring", "square", "cross",
            "checker", "triangle", "dots", "xshape")
SOURCE_CLASSES = PATTERNS[:8]
"The pretraining task's classes."
TARGET_CLASSES = PATTERNS[8:]
"Classes the pretrained model never saw, drawn from the same generator (the 'similar' domain)."


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.15, 0.35)
    f = rng.uniform(3, 7)
    ph = rng.uniform(0, 2 * np.pi)
    d = np.maximum(abs(yy - cy), abs(xx - cx))
    rad = np.hypot(yy - cy, xx - cx)
    if kind == "hstripes":
        m = np.sin(2 * np.pi * f * yy + ph) > 0
    elif kind == "vstripes":
        m = np.sin(2 * np.pi * f * xx + ph) > 0
    elif kind == "diag":
        m = np.sin(2 * np.pi * f * (xx + yy) / 1.4 + ph) > 0
    elif kind == "antidiag":
        m = np.sin(2 * np.pi * f * (xx - yy) / 1.4 + ph) > 0
    elif kind == "disc":
        m = rad < r
    elif kind == "ring":
        m = (rad < r) & (rad > 0.6 * r)
    elif kind == "square":
        m = d < r
    elif kind == "cross":
        w = r / 3
        m = ((abs(yy - cy) < w) | (abs(xx - cx) < w)) & (d < r * 1.3)
    elif kind == "checker":
        m = (np.sin(2 * np.pi * f / 2 * xx + ph) > 0) ^ (np.sin(2 * np.pi * f / 2 * yy + ph) > 0)
    elif kind == "triangle":
        m = (yy - cy > -r) & (abs(xx - cx) < (yy - cy + r) / 2) & (yy - cy < r)
    elif kind == "dots":
        m = (np.sin(2 * np.pi * f * xx + ph) > 0.6) & (np.sin(2 * np.pi * f * yy + ph) > 0.6)
    elif kind == "xshape":
        w = r / 4
        m = ((abs((yy - cy) - (xx - cx)) < w) | (abs((yy - cy) + (xx - cx)) < w)) & (d < r * 1.2)
    else:
        raise ValueError(f"unknown pattern {kind!r}: use one of {PATTERNS}")
    fg, bg = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.4, 3)
    img = np.where(m[None], fg[:, None, None], bg[:, None, None])
    return img.astype(np.float32)


def make_patterns(n_per_class: int, classes=SOURCE_CLASSES, size: int = 32, seed: int = 0,
                  noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_per_class` images of each pattern class, deterministic in `seed`.

    Returns `(x, y)`: float32 images `(N, 3, size, size)` in [0, 1] (plus Gaussian noise) and int64
    labels `0..len(classes)-1` in the order of `classes`, shuffled.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    unknown = [c for c in classes if c not in PATTERNS]
    if unknown:
        raise ValueError(f"unknown pattern class(es) {unknown}: use names from {PATTERNS}")
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, kind in enumerate(classes):
        for _ in range(n_per_class):
            xs.append(_pattern(kind, size, rng))
            ys.append(label)
    x = np.stack(xs) + rng.normal(0, noise, (len(xs), 3, size, size)).astype(np.float32)
    order = rng.permutation(len(xs))
    return torch.from_numpy(x[order]), torch.tensor(ys, dtype=torch.long)[order]


def load_digits_images(size: int = 32, seed: int = 0, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits (1797 images, 10 classes) as 3-channel images.

    The 8x8 images are scaled to [0, 1], upsampled to `size` (bilinear) and shuffled with `seed`;
    `n` keeps the first `n` after shuffling.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - dev extra
        raise ImportError("the digits target needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    return (x[:n], y[:n]) if n is not None else (x, y)


class TinyResNet(nn.Module):
    """A small ResNet with torchvision's module names (`conv1`, `bn1`, `layer1..4`, `avgpool`, `fc`).

    Four stages of one `BasicBlock` each; `width` channels in the first stage, doubling per stage.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._stage(width, 1)
        self.layer2 = self._stage(width * 2, 2)
        self.layer3 = self._stage(width * 4, 2)
        self.layer4 = self._stage(width * 8, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8, num_classes)

    def _stage(self, planes: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        block = BasicBlock(self.inplanes, planes, stride, down)
        self.inplanes = planes
        return nn.Sequential(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_resnet(pretrained: bool = False, num_classes: int = len(SOURCE_CLASSES), **kwargs) -> TinyResNet:
    """Architecture function in the style of torchvision's `resnet18` (usable with `vision_learner`).

    `pretrained=True` loads (or first builds and caches) the weights trained on the source task.
    """
    if pretrained:
        return pretrained_tiny_resnet(**kwargs)
    return TinyResNet(num_classes=num_classes, **kwargs)


def tiny_resnet_split(m: nn.Module):
    "The ResNet splitter of fastai (`_resnet_split`) for a `vision_learner` model `Sequential(body, head)`."
    from fastai.torch_core import params
    return [params(m[0][:4]), params(m[0][4:]), params(m[1:])]


def cache_dir() -> Path:
    "Where the pretrained weights live: `$FASTAI_FREEZE_CACHE`, else `~/.cache/fastai_freeze`."
    return Path(os.environ.get("FASTAI_FREEZE_CACHE", Path.home() / ".cache" / "fastai_freeze"))


_PRETRAIN = dict(n_per_class=300, size=32, seed=0, epochs=4, bs=64, lr=3e-3, width=16)


def _pretrain_key(cfg: dict) -> str:
    text = repr(sorted(cfg.items())) + torch.__version__.split("+")[0]
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def pretrained_tiny_resnet(width: int = 16, verbose: bool = True) -> TinyResNet:
    """The source-task model: trained with a fixed seed on `SOURCE_CLASSES`, cached on disk.

    The first call trains it (about a minute on 2 CPU cores) and writes the weights to `cache_dir()`;
    later calls load them. The cache file name encodes the training set-up and the torch version.
    """
    cfg = {**_PRETRAIN, "width": width}
    path = cache_dir() / f"tiny_resnet_{_pretrain_key(cfg)}.pth"
    model = TinyResNet(num_classes=len(SOURCE_CLASSES), width=width)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    if verbose:
        print(f"pretraining the source model on {len(SOURCE_CLASSES)} pattern classes (cached at {path})")
    x, y = make_patterns(cfg["n_per_class"], SOURCE_CLASSES, cfg["size"], seed=cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"])
        model = TinyResNet(num_classes=len(SOURCE_CLASSES), width=width)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-2)
        steps = cfg["epochs"] * (len(x) // cfg["bs"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=steps)
        model.train()
        for _ in range(cfg["epochs"]):
            perm = torch.randperm(len(x), generator=g)
            for i in range(len(x) // cfg["bs"]):
                idx = perm[i * cfg["bs"]:(i + 1) * cfg["bs"]]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


class _Items(list):
    "A list of (x, y) pairs that can carry a `loss_func` and be emptied for `learn.export()`."

    def new_empty(self) -> _Items:
        out = _Items()
        out.__dict__.update(self.__dict__)
        return out


def tensor_dls(x_train, y_train, x_valid, y_valid, bs: int = 64, seed: int | None = 0, device=None):
    """fastai `DataLoaders` over in-memory tensors (shuffled training set, `drop_last` like fastai).

    `dls.c` is set to the number of classes, so `vision_learner(dls, arch)` needs no `n_out`.
    """
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.losses import CrossEntropyLossFlat

    train, valid = _Items(zip(x_train, y_train)), _Items(zip(x_valid, y_valid))
    train.loss_func = valid.loss_func = CrossEntropyLossFlat()  # what fastai's Learner looks up
    if bs > len(train):
        raise ValueError(f"batch size {bs} is larger than the training set ({len(train)} items)")
    if seed is not None:
        from fastai.torch_core import set_seed
        set_seed(seed)
    dls = DataLoaders(DataLoader(train, bs=bs, shuffle=True, drop_last=True),
                      DataLoader(valid, bs=max(bs, 64)), device=device or "cpu")
    dls.c = int(torch.cat([torch.as_tensor(y_train), torch.as_tensor(y_valid)]).max()) + 1
    return dls
