"""The demo's data and its small pattern model. Nothing is downloaded.

- **Fashion-MNIST** (Xiao, Rasul, Vollgraf 2017; MIT licence, see `FASHION_MNIST_LICENSE`): the first
  3000 training and 1000 test images of the official files ship with the package
  (`fashion_mnist_subset.npz`, 1.8 MB); the full set is read from the Debian package
  `dataset-fashion-mnist` when it is installed (`load_fashion_mnist(full=True)`).
- **scikit-learn's digits** (1797 images of 8x8 pixels, bundled with scikit-learn).
- **Generated patterns**: 12 procedurally drawn classes, and a small ResNet (torchvision's
  `BasicBlock`, torchvision's module names) pretrained on 8 of them with a fixed seed and cached on
  disk: the fast model of the unit tests.
"""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from ..cache import cache_dir, cached_file

__all__ = ["PATTERNS", "SOURCE_CLASSES", "TARGET_CLASSES", "make_patterns", "load_digits_images",
           "load_fashion_mnist", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "to_images", "TinyResNet",
           "pretrained_tiny_resnet", "tensor_dls"]

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


def to_images(gray: torch.Tensor, size: int) -> torch.Tensor:
    "Grey images `(N, H, W)` in [0, 1] as 3-channel float32 images `(N, 3, size, size)` (bilinear resize)."
    x = gray.float()[:, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).repeat(1, 3, 1, 1)


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
    x = to_images(torch.tensor(d.images) / 16.0, size)
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


_PRETRAIN = dict(n_per_class=300, size=32, seed=0, epochs=4, bs=64, lr=3e-3, width=16)


def _pretrain_key(cfg: dict) -> str:
    text = repr(sorted(cfg.items())) + torch.__version__.split("+")[0]
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _pretrain(cfg: dict, path: Path) -> None:
    x, y = make_patterns(cfg["n_per_class"], SOURCE_CLASSES, cfg["size"], seed=cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"])
        model = TinyResNet(num_classes=len(SOURCE_CLASSES), width=cfg["width"])
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
    torch.save(model.state_dict(), path)


def pretrained_tiny_resnet(width: int = 16, verbose: bool = True) -> TinyResNet:
    """The pattern model: trained with a fixed seed on `SOURCE_CLASSES`, cached on disk.

    The first call trains it (about 10 s on 2 CPU cores) and writes the weights to `cache_dir()`
    (atomically; a damaged file is named and rebuilt); later calls load them. The file name encodes
    the training set-up and the torch version.
    """
    cfg = {**_PRETRAIN, "width": width}
    path = cache_dir() / f"tiny_resnet_{_pretrain_key(cfg)}.pth"
    model = TinyResNet(num_classes=len(SOURCE_CLASSES), width=width)

    def build(tmp: Path) -> None:
        if verbose:
            print(f"pretraining the pattern model on {len(SOURCE_CLASSES)} classes (cached at {path})")
        _pretrain(cfg, tmp)

    cached_file(path, build, lambda p: model.load_state_dict(torch.load(p, map_location="cpu", weights_only=True)))
    return model.eval()


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"Where Debian's package `dataset-fashion-mnist` installs the four official idx files."
_FASHION_SUBSET = Path(__file__).with_name("fashion_mnist_subset.npz")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


def load_fashion_mnist(n_train: int | None = None, n_valid: int | None = None, size: int = 32,
                       full: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as `(x_train, y_train, x_valid, y_valid)`: 3-channel float32 images in [0, 1]
    resized to `size`, int64 labels; the first `n_train` training and `n_valid` test images, in the
    official order (deterministic).

    By default from the subset shipped with the package (3000 + 1000 images); `full=True` (or more
    images than the subset holds) reads the official files installed by Debian's
    `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`) from `FASHION_MNIST_DIR`.
    """
    with np.load(_FASHION_SUBSET) as z:
        sub = {k: z[k] for k in z.files}
    need_full = full or (n_train or 0) > len(sub["x_train"]) or (n_valid or 0) > len(sub["x_valid"])
    if need_full:
        names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
        missing = [n for n in names if not (FASHION_MNIST_DIR / n).exists()]
        if missing:
            raise FileNotFoundError(f"the full Fashion-MNIST is read from {FASHION_MNIST_DIR}, which lacks {missing}: "
                                    "apt-get install dataset-fashion-mnist (the package ships the first 3000 "
                                    "training and 1000 test images)")
        sub = dict(zip(("x_train", "y_train", "x_valid", "y_valid"), (_read_idx(FASHION_MNIST_DIR / n) for n in names)))
    xt, yt = sub["x_train"][:n_train], sub["y_train"][:n_train]
    xv, yv = sub["x_valid"][:n_valid], sub["y_valid"][:n_valid]
    return (to_images(torch.from_numpy(xt.copy()) / 255.0, size), torch.from_numpy(yt.astype(np.int64)),
            to_images(torch.from_numpy(xv.copy()) / 255.0, size), torch.from_numpy(yv.astype(np.int64)))


class _Items(list):
    "A list of (x, y) pairs that can carry a `loss_func` and be emptied for `learn.export()`."

    def new_empty(self) -> _Items:
        out = _Items()
        out.__dict__.update(self.__dict__)
        return out


def tensor_dls(x_train, y_train, x_valid, y_valid, bs: int = 64, seed: int | None = 0, device=None):
    """fastai `DataLoaders` over in-memory tensors (shuffled training set, `drop_last` like fastai).

    Batches go to `device` (None: fastai's `default_device()`, the GPU where there is one). Inputs are
    fastai `TensorImage`s, so the `Normalize` that `vision_learner` adds applies as it
    does to images from files. `dls.c` is the number of classes (`vision_learner` needs no `n_out`).
    """
    from fastai.data.core import DataLoaders, TfmdDL
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import TensorCategory, TensorImage, default_device

    train = _Items(zip(TensorImage(x_train), TensorCategory(y_train)))
    valid = _Items(zip(TensorImage(x_valid), TensorCategory(y_valid)))
    train.loss_func = valid.loss_func = CrossEntropyLossFlat()  # what fastai's Learner looks up
    if bs > len(train):
        raise ValueError(f"batch size {bs} is larger than the training set ({len(train)} items)")
    if seed is not None:
        from fastai.torch_core import set_seed
        set_seed(seed)
    # TfmdDL (not a bare DataLoader) has the transform pipelines vision_learner adds Normalize to; the
    # data is in memory, so no loader processes (they would cost a start-up every epoch)
    dls = DataLoaders(TfmdDL(train, bs=bs, shuffle=True, drop_last=True, num_workers=0),
                      TfmdDL(valid, bs=max(bs, 64), num_workers=0), device=device or default_device())
    dls.c = int(torch.cat([torch.as_tensor(y_train), torch.as_tensor(y_valid)]).max()) + 1
    return dls
