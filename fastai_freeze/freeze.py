"""Freezing that is explicit about BatchNorm: "freeze non-BN layers", BN as its own group.

A thin layer over fastai's optimizer: the freeze state is `requires_grad` on the parameters of
the optimizer's groups, exactly as fastai keeps it, so `learn.unfreeze()` still undoes it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from fastai.learner import Learner
from fastcore.basics import patch
from fastcore.foundation import L
from torch import nn

from .core.bn import bn_layers, bn_parameters
from .internals import frozen_count, frozen_groups, set_frozen_count

__all__ = ["param_groups", "check_splittable", "body_bn_layers", "head_bn_layers", "set_frozen_bn_trainable", "frozen_state",
           "trainable_groups", "BNSplitter", "rebuild_optimizer", "frozen_prefix", "staged_splitter"]

_SPLITTER_HINT = (
    "Give the Learner a splitter that returns [body_params, head_params], for example "
    "`Learner(dls, model, splitter=lambda m: [params(m.body), params(m.head)])` "
    "(vision_learner and cnn_learner set one for you).")


def param_groups(learn: Learner) -> list[list[nn.Parameter]]:
    "The optimizer's parameter groups, or those its splitter will give (nothing is created)."
    if learn.opt is not None:
        return [list(pg) for pg in learn.opt.param_lists]
    return _groups(learn.splitter(learn.model))


def check_splittable(learn: Learner) -> int:
    "The parameter group count; `ValueError` when there are fewer than two (no body apart from the head)."
    n = len(param_groups(learn))
    if n < 2:
        raise ValueError(
            f"this Learner's model has {n} parameter group: there is no body to freeze apart from the "
            f"head (fastai's freeze() would silently freeze nothing). {_SPLITTER_HINT}")
    return n


def _groups(split) -> list[list[nn.Parameter]]:
    "A splitter's output as a list of groups (fastai treats a flat list of parameters as one group)."
    split = list(split)
    if split and isinstance(split[0], (list, tuple, L)):
        return [list(g) for g in split]
    return [split]


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def body_bn_layers(model: nn.Module, head_params: Sequence[nn.Parameter]) -> list[tuple[str, nn.Module]]:
    """BN layers of the body: those none of whose parameters belong to the head.

    A BN layer without parameters (`affine=False`) counts as the head's when it lives under the
    same top-level child as the head's parameters (`model[1]` in a fastai vision model).
    """
    head_ids = {id(p) for p in head_params}
    head_tops = {_top(n) for n, p in model.named_parameters() if id(p) in head_ids}
    out = []
    for name, m in bn_layers(model):
        ps = list(m.parameters(recurse=False))
        in_head = any(id(p) in head_ids for p in ps) if ps else _top(name) in head_tops
        if not in_head:
            out.append((name, m))
    return out


def head_bn_layers(model: nn.Module, head_params: Sequence[nn.Parameter]) -> list[tuple[str, nn.Module]]:
    "BN layers of the head: those `body_bn_layers` leaves out."
    body = {m for _, m in body_bn_layers(model, head_params)}
    return [(n, m) for n, m in bn_layers(model) if m not in body]


def frozen_state(learn: Learner) -> list[tuple[int, int]]:
    "Per optimizer group: (trainable parameter count, total parameter count)."
    return [(sum(p.requires_grad for p in pg), len(pg)) for pg in param_groups(learn)]


def trainable_groups(learn: Learner) -> list[str]:
    "Per optimizer group: 'T' everything trains, 'b' only its BN parameters train, '.' frozen ('p': some other part)."
    bn_ids = {id(p) for p in bn_parameters(learn.model)}
    out = []
    for pg in learn.opt.param_lists:
        flags = [p.requires_grad for p in pg]
        if all(flags):
            out.append("T")
        elif not any(flags):
            out.append(".")
        else:
            out.append("b" if all(id(p) in bn_ids for p in pg if p.requires_grad) else "p")
    return out


def set_frozen_bn_trainable(learn: Learner, trainable: bool) -> list[nn.Parameter]:
    """Set `requires_grad` of the BN parameters that sit in the optimizer's frozen groups.

    Returns those parameters. The head's groups are not touched.
    """
    frozen = {id(p) for pg in frozen_groups(learn) for p in pg}
    out = [p for _, m in bn_layers(learn.model) for p in m.parameters(recurse=False) if id(p) in frozen]
    for p in out:
        p.requires_grad_(trainable)
    return out


class BNSplitter:
    """Wrap a splitter so that the body's BN parameters form a group of their own.

    Groups become `[body_0 - BN, ..., body_k - BN, body BN, head]`: the BN group sits just before
    the head, so it gets its own learning rate (a discriminative `slice` gives it the second
    highest) and the head stays the last group, as fastai's `freeze()` expects.
    """

    def __init__(self, splitter: Callable):
        if not callable(splitter):
            raise TypeError(f"BNSplitter needs a callable splitter, got {type(splitter).__name__}")
        self.splitter = splitter

    def __call__(self, model: nn.Module) -> list[list[nn.Parameter]]:
        groups = _groups(self.splitter(model))
        if len(groups) < 2:
            raise ValueError(f"the wrapped splitter returned {len(groups)} group. {_SPLITTER_HINT}")
        bn_ids = {id(p) for _, m in body_bn_layers(model, groups[-1]) for p in m.parameters(recurse=False)}
        body = [[p for p in g if id(p) not in bn_ids] for g in groups[:-1]]
        bn = [p for g in groups[:-1] for p in g if id(p) in bn_ids]
        if not bn:
            return groups
        return [g for g in body if g] + [bn, groups[-1]]

    def __repr__(self) -> str:
        return f"BNSplitter({getattr(self.splitter, '__name__', self.splitter)!r})"


@patch
def split_bn(self: Learner) -> int:
    "Give the body's BN parameters a group of their own (see `BNSplitter`); returns the group count."
    if isinstance(self.splitter, BNSplitter):
        return len(self.opt.param_lists) if self.opt is not None else len(self.splitter(self.model))
    if self.splitter is None or len(_groups(self.splitter(self.model))) < 2:
        raise ValueError(f"split_bn needs a splitter with a body and a head. {_SPLITTER_HINT}")
    self.splitter = BNSplitter(self.splitter)
    self.create_opt()
    return len(self.opt.param_lists)


def rebuild_optimizer(learn: Learner) -> None:
    """Recreate `learn.opt` for the current model (after modules were replaced), keeping what can be kept.

    The hyper-parameters per group (when the group count is unchanged), the optimizer state of every
    parameter that survived, and the frozen group index carry over; `requires_grad` flags live on the
    parameters themselves and so are untouched.
    """
    old = learn.opt
    learn.create_opt()
    if old is None:
        return
    new = learn.opt
    if len(old.hypers) == len(new.hypers):
        for h_old, h_new in zip(old.hypers, new.hypers):
            h_new.update(h_old)
    survivors = {id(p) for pg in new.param_lists for p in pg}
    for p, st in old.state.items():
        if id(p) in survivors and st:
            new.state[p] = {**new.state.get(p, {}), **st}
    set_frozen_count(new, frozen_count(old))


def _size(m: nn.Module, ids: set[int]) -> int:
    return sum(p.numel() for p in m.parameters() if id(p) in ids)


def _blocks(model: nn.Module, ids: set[int]) -> list[list[nn.Parameter]]:
    """The body's parameters (`ids`) as blocks in execution order: the children of the first module
    with more than one child holding body parameters, with a child that holds most of the body
    (timm's `blocks`) opened up into its own children."""
    node = model
    while len(kids := [c for c in node.children() if _size(c, ids)]) == 1:
        node = kids[0]
    total = sum(_size(c, ids) for c in kids)
    items = []
    for c in kids:
        inner = [g for g in c.children() if _size(g, ids)]
        items += inner if _size(c, ids) > 0.8 * total and len(inner) > 1 else [c]
    out, seen = [], set()
    for m in items:
        ps = [p for p in m.parameters() if id(p) in ids and id(p) not in seen]
        seen.update(id(p) for p in ps)
        out.append(ps)
    rest = [p for p in model.parameters() if id(p) in ids and id(p) not in seen]
    return [b for b in out + [rest] if b]


class _StagedSplitter:
    "A splitter whose body groups are re-cut into contiguous stages (gradual unfreezing of a 2-group Learner)."

    def __init__(self, splitter: Callable, parts: int):
        self.splitter, self.parts, self.how = splitter, parts, ""

    def __call__(self, model: nn.Module) -> list[list[nn.Parameter]]:
        groups = _groups(self.splitter(model))
        blocks = _blocks(model, {id(p) for g in groups[:-1] for p in g})
        sizes = np.cumsum([sum(p.numel() for p in b) for b in blocks])
        parts = min(self.parts, len(blocks))
        cuts, prev = [], 0
        for k in range(1, parts):  # each cut where the parameter count is closest to k/parts of the body's
            options = range(prev + 1, len(blocks) - (parts - k) + 1)
            prev = min(options, key=lambda i: abs(sizes[i - 1] - sizes[-1] * k / parts))
            cuts.append(prev)
        bounds = [0] + cuts + [len(blocks)]
        self.how = f"{len(blocks)} blocks in execution order, cut near equal parameter counts"
        return [[p for b in blocks[a:z] for p in b] for a, z in zip(bounds, bounds[1:])] + [groups[-1]]


def staged_splitter(splitter: Callable, parts: int = 2) -> _StagedSplitter:
    "`splitter` with the body cut into `parts` contiguous stages of about equal size (the head stays last)."
    if parts < 2:
        raise ValueError(f"parts must be >= 2, got {parts}")
    return _StagedSplitter(splitter, parts)


def frozen_prefix(model: nn.Module) -> list[nn.Module]:
    """The leading modules of a `Sequential` model whose parameters are all frozen, in order.

    A partly frozen `Sequential` child is descended into (gradual unfreezing leaves the early layers of
    the body frozen); the walk stops at the first module with a trainable parameter. A model that is
    not a `Sequential` gives `[]`: its execution order is unknown.
    """
    out: list[nn.Module] = []

    def walk(seq: nn.Sequential) -> bool:
        for child in seq.children():
            if not any(p.requires_grad for p in child.parameters()):
                out.append(child)
            elif isinstance(child, nn.Sequential):
                walk(child)
                return False
            else:
                return False
        return True

    if isinstance(model, nn.Sequential):
        walk(model)
    return out
