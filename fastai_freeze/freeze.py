"""Freezing that is explicit about BatchNorm: "freeze non-BN layers", BN as its own group.

A thin layer over fastai's optimizer: the freeze state is `requires_grad` on the parameters of
the optimizer's groups, exactly as fastai keeps it, so `learn.unfreeze()` still undoes it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastcore.basics import patch
from fastcore.foundation import L
from torch import nn

from .core.bn import bn_layers, bn_parameters
from .distrib import unwrap_model

__all__ = ["check_splittable", "body_bn_layers", "head_bn_layers", "set_frozen_bn_trainable", "frozen_state", "trainable_groups", "BNSplitter",
           "rebuild_optimizer", "frozen_prefix", "FrozenBodyShortcut"]

_SPLITTER_HINT = (
    "Give the Learner a splitter that returns [body_params, head_params], for example "
    "`Learner(dls, model, splitter=lambda m: [params(m.body), params(m.head)])` "
    "(vision_learner and cnn_learner set one for you).")


def check_splittable(learn: Learner) -> None:
    "Raise `ValueError` when the Learner's optimizer has fewer than two parameter groups."
    if learn.opt is None:
        learn.create_opt()
    n = len(learn.opt.param_lists)
    if n < 2:
        raise ValueError(
            f"this Learner's model has {n} parameter group: there is no body to freeze apart from the "
            f"head (fastai's freeze() would silently freeze nothing). {_SPLITTER_HINT}")


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
    if learn.opt is None:
        learn.create_opt()
    return [(sum(p.requires_grad for p in pg), len(pg)) for pg in learn.opt.param_lists]


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
    frozen = {id(p) for pg in learn.opt.param_lists[:learn.opt.frozen_idx] for p in pg}
    out = [p for _, m in bn_layers(learn.model) for p in m.parameters(recurse=False) if id(p) in frozen]
    for p in out:
        p.requires_grad_(trainable)
    return out


@patch
def freeze_body(self: Learner, bn_trainable: bool = True, n: int = -1) -> list[tuple[int, int]]:
    """Freeze the parameter groups before `n` (all but the head by default), BN as asked.

    `bn_trainable=True` is "freeze non-BN layers": the BN affine parameters of the frozen groups
    stay trainable whatever the Learner's `train_bn` says; `False` freezes them too. Raises
    `ValueError` on a one-group model. Returns `frozen_state(learn)`.
    """
    check_splittable(self)
    ngroups = len(self.opt.param_lists)
    if not -ngroups < n < ngroups or n == 0:
        raise ValueError(f"n={n}: pick a group index that leaves at least one group trainable and one "
                         f"frozen, between 1 and {ngroups - 1} (or -1 for 'all but the head')")
    self.opt.freeze_to(n)
    set_frozen_bn_trainable(self, bn_trainable)
    self.opt.clear_state()
    return frozen_state(self)


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
    new.frozen_idx = getattr(old, "frozen_idx", 0)


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


class FrozenBodyShortcut(Callback):
    """Run the frozen leading part of the model without autograd during training batches.

    While nothing in that part trains, its forward pass builds no graph and keeps no activations for
    backward (`torch.no_grad` around each frozen module, through hooks registered for the training
    phase of each epoch and removed after it). As soon as a parameter there is trainable again, that
    module leaves the shortcut at the next epoch. Results are identical to the normal path. fastai
    runs no event when a fit dies of an ordinary exception: `fine_tune_with` then calls
    `remove_hooks()` itself; in a plain fit, call it yourself.
    """
    order = 0
    _pause_in_probe = False

    def __init__(self):
        self._handles: list = []
        self.modules: list[nn.Module] = []

    def before_train(self):
        self.remove_hooks()
        model = unwrap_model(self.learn.model)
        self.modules = [m for m in frozen_prefix(model) if any(True for _ in m.parameters())]
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(_grad_off))
            self._handles.append(m.register_forward_hook(_grad_back, always_call=True))

    def after_train(self):
        self.remove_hooks()

    def after_fit(self):
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _grad_off(mod, args):
    mod._fastai_freeze_grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)


def _grad_back(mod, args, out):
    torch.set_grad_enabled(getattr(mod, "_fastai_freeze_grad", True))
    return out
