"""A new head on a trained body: cut the old head, build one for the new classes, keep the rest."""
from __future__ import annotations

import copy

from fastai.callback.hook import num_features_model
from fastai.data.transforms import Normalize
from fastai.layers import AdaptiveConcatPool2d, Flatten
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import apply_init
from fastai.vision.learner import create_head, default_split, has_pool_type
from torch import nn

from .probe import _positive

__all__ = ["cut_body", "simple_head", "new_head_learner"]


def cut_body(model: nn.Module) -> nn.Module:
    """A copy of the body of `model`: everything before its head.

    A fastai vision model (`Sequential(body, head)`) gives `model[0]`; any other model is cut before
    its last pooling layer, as fastai's `create_body` does (`avgpool`, `fc` of a torchvision ResNet).
    """
    if isinstance(model, nn.Sequential) and len(model) == 2 and has_pool_type(model[1]) and not has_pool_type(model[0][-1:]):
        return copy.deepcopy(model[0])
    children = list(model.children())
    idx = next((i for i in reversed(range(len(children))) if has_pool_type(children[i])), None)
    if idx is None or idx == 0:
        raise ValueError(f"cannot find the head of {type(model).__name__}: no pooling layer among its "
                         "children to cut before; pass the body yourself (body=...)")
    return nn.Sequential(*copy.deepcopy(children[:idx]))


def simple_head(nf: int, n_out: int, concat_pool: bool = False) -> nn.Sequential:
    "Pool, flatten, one linear layer: the smallest head (fewer parameters to fit on small data)."
    pool = AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(pool, Flatten(), nn.Linear(nf * (2 if concat_pool else 1), n_out))


def _normalize_of(dls) -> list:
    fs = getattr(getattr(dls, "after_batch", None), "fs", [])
    return [t for t in fs if isinstance(t, Normalize)]


def new_head_learner(source, dls, n_out: int | None = None, head: str = "fastai", body: nn.Module | None = None,
                     splitter=None, loss_func=None, metrics=None, **kwargs) -> Learner:
    """A ready, frozen Learner: the body of `source` (a Learner or a model) under a new head for `dls`.

    - `head='fastai'` builds fastai's `create_head` (concat pooling, two linear layers, BN, dropout);
      `head='simple'` pooling and a single linear layer.
    - The body's weights are copied (the source stays as it is). The splitter is the source
      Learner's when it has one and the model is a fastai vision model, else `default_split`
      (body, head); give `splitter` to choose.
    - The normalisation the source was trained with (its `Normalize` transform) is added to `dls`
      when `dls` has none.
    - The body is frozen with BN trainable (fastai's default), ready for `fine_tune_with`.
    """
    src_learn = source if isinstance(source, Learner) else None
    model = src_learn.model if src_learn is not None else source
    if not isinstance(model, nn.Module):
        raise TypeError(f"source must be a Learner or an nn.Module, got {type(source).__name__}")
    if head not in ("fastai", "simple"):
        raise ValueError(f"head must be 'fastai' or 'simple', got {head!r}")
    if n_out is not None:
        _positive("n_out", n_out, integer=True)
        n_out = int(n_out)
    n_out = n_out if n_out is not None else getattr(dls, "c", None)
    if not n_out:
        raise ValueError("cannot tell the number of classes: pass n_out (dls has no `c`)")
    body = copy.deepcopy(body) if body is not None else cut_body(model)
    nf = num_features_model(body)
    new = simple_head(nf, n_out) if head == "simple" else create_head(nf, n_out)
    apply_init(new, nn.init.kaiming_normal_)
    net = nn.Sequential(body, new)
    if splitter is None:
        src_split = getattr(src_learn, "splitter", None)
        is_vision = isinstance(model, nn.Sequential) and len(model) == 2
        splitter = src_split if (src_split is not None and is_vision) else default_split
    if src_learn is not None and not _normalize_of(dls):
        stats = _normalize_of(src_learn.dls)
        if stats and not hasattr(getattr(dls, "after_batch", None), "fs"):
            raise ValueError("the source was trained with a Normalize transform, but these DataLoaders have no "
                             "after_batch pipeline to add it to: build them with fastai's data block API or "
                             "normalise the inputs yourself")
        for t in stats:
            dls.add_tfms([Normalize(t.mean, t.std, t.axes)], "after_batch")
    learn = Learner(dls, net, loss_func=loss_func or CrossEntropyLossFlat(), splitter=splitter,
                    metrics=metrics, **kwargs)
    learn.freeze_body(freeze_bn=False)
    return learn
