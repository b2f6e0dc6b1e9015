"""Pure-PyTorch BatchNorm toolkit: fold, recalibrate (AdaBN), freeze, measure shift.

Nothing here imports fastai. Every function takes an `nn.Module` and returns something plain.

**Which layers count as BatchNorm.** Every `_BatchNorm` (BatchNorm1d/2d/3d, SyncBatchNorm, the lazy
variants, subclasses that keep torch's `forward`), torchvision's `FrozenBatchNorm2d`, and timm's
norm-act layers (`BatchNormAct2d`, `SyncBatchNormAct`, `FrozenBatchNormAct2d`), which apply dropout
and an activation after normalising, inside the same module. The library keeps what such a layer
does after normalising: a folded `BatchNormAct2d` becomes a `BNAffine` that still applies the
activation. A `_BatchNorm` subclass that overrides `forward` and is not known is refused with an
error that names it (its `forward` may do anything); `register_bn_layer` makes it known.
"""
from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .state import device_of, first_tensor, kept_modes

__all__ = [
    "BNAffine", "UnknownBNLayerError", "register_bn_layer", "is_bn", "bn_layers", "bn_parameters",
    "bn_statistics", "post_norm_modules", "FoldReport", "fold_bn", "RecalibrationReport",
    "recalibrate_bn", "batch_statistics", "freeze_bn_layers", "set_bn_eval_mode", "ShiftReport", "bn_shift",
    "shift_kl", "moments_hook", "recorded_moments", "to_pass_input", "channels_last_ok", "pass_layout",
]


# ------------------------------------------------------------------ which layers are BN -------
@dataclass(frozen=True)
class _BNKind:
    "How the library reads one class of BN layer."
    post: tuple[str, ...] = ()  # submodules applied after normalising, in order (timm: drop, act)
    fixed: bool = False  # statistics and affine held in buffers, never batch statistics


_KNOWN: dict[type, _BNKind] = {_BatchNorm: _BNKind(), nn.SyncBatchNorm: _BNKind()}
_REGISTERED: dict[type, _BNKind] = {}


class UnknownBNLayerError(ValueError):
    "A BatchNorm subclass whose `forward` the library does not know: refused rather than guessed at."


def register_bn_layer(cls: type, post: Iterable[str] = (), fixed: bool = False) -> type:
    """Make a BatchNorm-like class known: `post` names the submodules its `forward` applies after
    normalising (in order), `fixed=True` says its statistics and affine are buffers (never batch
    statistics). The class must keep `running_mean`, `running_var`, `eps`, `weight` and `bias`.
    Usable as a decorator; returns `cls`."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_bn_layer needs an nn.Module class, got {cls!r}")
    _REGISTERED[cls] = _BNKind(tuple(post), bool(fixed))
    return cls


def _kinds() -> dict[type, _BNKind]:
    # third-party classes are looked up only where their module is already imported: a model that
    # holds one has imported it, and nothing is imported here on the user's behalf
    kinds = dict(_KNOWN)
    tv = sys.modules.get("torchvision.ops.misc")
    if tv is not None and hasattr(tv, "FrozenBatchNorm2d"):
        kinds[tv.FrozenBatchNorm2d] = _BNKind(fixed=True)
    na = sys.modules.get("timm.layers.norm_act")
    if na is not None:
        for name, kind in (("BatchNormAct2d", _BNKind(("drop", "act"))), ("SyncBatchNormAct", _BNKind(("drop", "act"))),
                           ("FrozenBatchNormAct2d", _BNKind(("drop", "act"), fixed=True))):
            if hasattr(na, name):
                kinds[getattr(na, name)] = kind
    kinds.update(_REGISTERED)
    return kinds


def _forward_owner(cls: type) -> type:
    return next(c for c in cls.__mro__ if "forward" in c.__dict__)


def _kind(m: nn.Module, name: str = "") -> _BNKind | None:
    "The kind of a BN layer, None for any other module; raises for an unknown `_BatchNorm` subclass."
    kinds = _kinds()
    kind = kinds.get(type(m)) or kinds.get(_forward_owner(type(m)))
    if kind is None and isinstance(m, _BatchNorm):
        where = f" at {name!r}" if name else ""
        raise UnknownBNLayerError(
            f"{type(m).__module__}.{type(m).__qualname__}{where} is a BatchNorm subclass with a forward of its "
            "own that fastai_freeze does not know, so it cannot tell what folding, fusing or re-estimating it "
            "would change. If it normalises and then applies other submodules, declare them: "
            f"fastai_freeze.register_bn_layer({type(m).__qualname__}, post=('act',)); otherwise use bn='train'.")
    return kind


def is_bn(m: nn.Module) -> bool:
    "True for a BatchNorm layer the library knows (norm-act and frozen kinds included) and for `BNAffine`."
    return isinstance(m, BNAffine) or _kind(m) is not None


def bn_layers(model: nn.Module, include_folded: bool = True) -> list[tuple[str, nn.Module]]:
    """Named BN layers of `model`, each once (with `BNAffine` layers unless `include_folded=False`).

    Raises `UnknownBNLayerError` for a BatchNorm subclass the library does not know."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, BNAffine):
            if include_folded:
                out.append((name, m))
        elif _kind(m, name) is not None:
            out.append((name, m))
    return out


def bn_parameters(model: nn.Module) -> list[nn.Parameter]:
    "The affine parameters of every BN (or folded) layer of `model`."
    return [p for _, m in bn_layers(model) for p in m.parameters(recurse=False)]


def post_norm_modules(m: nn.Module) -> dict[str, nn.Module]:
    "The submodules a BN layer applies after normalising (timm's `drop`, `act`), by attribute name."
    kind = _kind(m) if not isinstance(m, BNAffine) else _BNKind(m.post_names)
    if kind is None:
        raise TypeError(f"{type(m).__name__} is not a BatchNorm layer")
    return {a: getattr(m, a) for a in kind.post if isinstance(getattr(m, a, None), nn.Module)}


def _has_stats(m: nn.Module) -> bool:
    return getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None


def bn_statistics(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None, torch.Tensor | None]:
    "`(running_mean, running_var, eps, weight, bias)` of a BN layer (weight and bias None when absent)."
    if _kind(m) is None:
        raise TypeError(f"{type(m).__name__} is not a BatchNorm layer")
    if not _has_stats(m):
        raise ValueError(f"{type(m).__name__}({m.num_features}) has track_running_stats=False: it always "
                         "normalises with batch statistics, so it has no fixed statistics")
    return m.running_mean, m.running_var, float(m.eps), getattr(m, "weight", None), getattr(m, "bias", None)


# ------------------------------------------------------------------ the affine layer ----------
class BNAffine(nn.Module):
    """A trainable per-channel affine map `y = gamma' * x + beta'` (over dim 1), then what the BN
    layer it replaces applied after normalising (a timm norm-act layer's dropout and activation).

    It stands in for a BatchNorm layer whose statistics are fixed: `BNAffine.from_bn(bn)` gives
    exactly the eval-mode output of `bn`, with `gamma' = gamma / sqrt(var + eps)` and
    `beta' = beta - mean * gamma'`. It has no statistics and behaves the same in train and eval
    mode (but for the source's own dropout), so it is safe at any batch size.

    `gamma'` is stored as `weight * scale`, with `scale` a fixed buffer. By default
    (`preconditioned=True`) `scale = 1 / sqrt(var + eps)` and `weight = gamma`: the trainable
    parameters then have the same scale, and get the same gradient steps, as the BN layer's own
    `gamma` and `beta`. Training `gamma'` directly (`preconditioned=False`, `scale = 1`) multiplies
    the effective step on a channel by its variance. Either way `effective_weight` is `gamma'` and
    `bias` is `beta'`.
    """

    def __init__(self, num_features: int, source: str = "BatchNorm2d", post: dict[str, nn.Module] | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive channel count, got {num_features!r}")
        self.num_features, self.source = num_features, source
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("scale", torch.ones(num_features, device=device, dtype=dtype))
        self.post_names: tuple[str, ...] = tuple(post or ())
        for name, mod in (post or {}).items():
            self.add_module(name, mod)

    @property
    def effective_weight(self) -> torch.Tensor:
        "gamma' = weight * scale, the per-channel factor applied to the input."
        return self.weight * self.scale

    @classmethod
    def from_bn(cls, bn: nn.Module, preconditioned: bool = True) -> BNAffine:
        "The affine layer that reproduces `bn` in eval mode (float64 arithmetic, cast back); it takes over `bn`'s post-normalisation submodules."
        if not is_bn(bn) or isinstance(bn, BNAffine):
            raise TypeError(f"expected a BatchNorm layer, got {type(bn).__name__}")
        if not _has_stats(bn):
            raise ValueError(
                f"{type(bn).__name__}({bn.num_features}) has track_running_stats=False: it always "
                "normalises with batch statistics, so there are no fixed statistics to fold. Keep it "
                "as it is (bn='train') or recalibrate a copy with tracked statistics first.")
        rm, rv, eps, w, b = bn_statistics(bn)
        mean, var = rm.double(), rv.double()
        gamma = w.detach().double() if w is not None else torch.ones_like(mean)
        beta = b.detach().double() if b is not None else torch.zeros_like(mean)
        inv_std = 1 / torch.sqrt(var + eps)
        ref = w if w is not None else rm
        layer = cls(int(rm.numel()), type(bn).__name__, post_norm_modules(bn), device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if preconditioned:
                layer.weight.copy_(gamma.to(ref.dtype))
                layer.scale.copy_(inv_std.to(ref.dtype))
            else:
                layer.weight.copy_((gamma * inv_std).to(ref.dtype))
            layer.bias.copy_((beta - mean * gamma * inv_std).to(ref.dtype))
        # a parameter keeps its flag; buffers (frozen kinds) and absent affine params become trainable
        layer.weight.requires_grad_(w.requires_grad if isinstance(w, nn.Parameter) else True)
        layer.bias.requires_grad_(b.requires_grad if isinstance(b, nn.Parameter) else True)
        layer.train(bn.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BNAffine({self.num_features}) expects input of shape (N, "
                             f"{self.num_features}, ...), got {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = torch.addcmul(self.bias.view(shape), x, self.effective_weight.view(shape))
        for name in self.post_names:
            y = getattr(self, name)(y)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded_from={self.source}"


# ------------------------------------------------------------------ fold ----------------------
@dataclass
class FoldReport:
    "What `fold_bn` did: the names of the folded layers and those it left alone (with why)."
    folded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.folded)

    def __str__(self) -> str:
        s = f"folded {self.count} BatchNorm layer(s) into BNAffine"
        if self.skipped:
            s += f"; skipped {len(self.skipped)}: " + ", ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return s


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _all_names(model: nn.Module) -> dict[nn.Module, list[str]]:
    "Every name under which each module is registered (a shared module has several)."
    names: dict[nn.Module, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(m, []).append(n)
    return names


def fold_bn(model: nn.Module, strict: bool = True, preconditioned: bool = True,
            layers: Iterable[nn.Module] | None = None) -> FoldReport:
    """Replace the BatchNorm layers of `model`, in place, by the equivalent trainable `BNAffine`.

    The folded model's output equals the eval-mode model's output (float32: to about 1e-6). A BN
    layer registered under several names (shared) becomes one `BNAffine` under all of them.
    `layers` restricts the fold to some BN modules (the fastai layer folds the body's, not a new
    head's). `preconditioned` chooses how `BNAffine` stores gamma' (the output is the same).
    A layer with `track_running_stats=False` raises `ValueError` when `strict`, else it is skipped
    and named in the report. A model without BN layers gives an empty report (nothing to do).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn expects an nn.Module, got {type(model).__name__}")
    keep = None if layers is None else set(layers)
    todo = [(n, m) for n, m in bn_layers(model, include_folded=False) if keep is None or m in keep]
    if strict:
        for _, bn in todo:
            if not _has_stats(bn):
                BNAffine.from_bn(bn)  # raises with the explanation, before anything changed
    names = _all_names(model)
    report = FoldReport()
    for name, bn in todo:
        if not _has_stats(bn):
            report.skipped[name] = "track_running_stats=False"
            continue
        new = BNAffine.from_bn(bn, preconditioned)
        for n in names[bn]:
            _set_submodule(model, n, new)
        report.folded.append(name)
    return report


# ------------------------------------------------------------------ statistics ----------------
def _merge_moments(store: dict, mod: nn.Module, n_b: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
    "Add a batch's `(count, mean, M2)` to `store[mod]`, exactly in float64 (Chan et al.'s pairwise update)."
    mean, m2 = mean.double(), m2.double()
    s = store.get(mod)
    if s is None:
        store[mod] = [n_b, mean, m2]
        return
    n_a, mean_a, m2_a = s
    n = n_a + n_b
    delta = mean - mean_a
    store[mod] = [n, mean_a + delta * (n_b / n), m2_a + m2 + delta * delta * (n_a * n_b / n)]


def moments_hook(store: dict):
    """A forward pre-hook keeping, per module, `[count, per-channel mean, per-channel M2]` of its inputs
    (float64; M2 the sum of squared deviations from the mean): each batch's mean and variance in one
    pass in the input's precision (float32 for half inputs), merged exactly in float64."""
    def hook(mod, inp):
        x = inp[0].detach()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var, mean = torch.var_mean(x, [0] + list(range(2, x.dim())), correction=0)
        n_b = x.numel() // x.shape[1]
        _merge_moments(store, mod, n_b, mean, var.double() * n_b)
    return hook


@contextmanager
def _moments_from_bn(layers: list[nn.Module], store: dict) -> Iterator[None]:
    """Inside (within `batch_statistics`), each of `layers` adds its batches' moments to `store`, read off
    its own running statistics after its forward: at momentum 1 they are the batch's mean and unbiased
    variance, so the statistics cost no pass over the activations beyond the layer's own. The running
    statistics and momenta are put back on exit, whatever happens."""
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in layers}

    def hook(mod, args, out):
        x = args[0]
        n_b = x.numel() // x.shape[1]
        _merge_moments(store, mod, n_b, mod.running_mean, mod.running_var.double() * (n_b - 1))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        for m in layers:
            m.momentum = 1.0
        yield
    finally:
        for h in handles:
            h.remove()
        for m, (rm, rv, mom) in saved.items():
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.momentum = mom


@contextmanager
def recorded_moments(layers: Iterable[nn.Module]) -> Iterator[dict]:
    """Inside, every forward of `layers` adds its input's moments to the yielded dict
    (`{module: [count, mean, M2]}`, see `moments_hook`); the hooks are removed on exit, whatever happens."""
    store: dict[nn.Module, list] = {}
    handles = [m.register_forward_pre_hook(moments_hook(store)) for m in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _layers_with_stats(model: nn.Module, layers: Iterable[nn.Module] | None, what: str) -> list[tuple[str, nn.Module]]:
    keep = None if layers is None else set(layers)
    todo = [(n, m) for n, m in bn_layers(model, include_folded=False)
            if _has_stats(m) and (keep is None or m in keep)]
    if not todo:
        raise ValueError(f"{what}: the model has no BatchNorm layer with running statistics"
                         + (" (already folded? fold after recalibrating)" if what == "recalibrate_bn" else ""))
    return todo


def _run_batches(model: nn.Module, batches: Iterable, max_batches: int | None, forward: Callable | None,
                 channels_last: bool = False) -> tuple[int, int]:
    "Feed `batches` to `model` (images channels-last if asked, see `pass_layout`); returns (batches, samples)."
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be None or >= 1, got {max_batches}")
    device = device_of(model)
    nb = ns = 0
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = first_tensor(b)
        if forward is None:
            model(to_pass_input(x, device, channels_last))
        else:
            forward(model, b)
        nb, ns = nb + 1, ns + x.shape[0]
    return nb, ns


def to_pass_input(x: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    "A batch on the model's device, channels-last if asked."
    if device is not None:
        x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def channels_last_ok(model: nn.Module, x) -> bool:
    """Whether a no-grad pass can feed `model` these images channels-last: on a CPU, for 4-D float
    batches, when one image goes through in that layout (eval mode, modes restored; a `view` of a
    feature map in a user's forward needs contiguous activations). The convolutions then keep that
    layout through the network, and a statistics pass costs about one eval pass (`benchmarks/adabn.py`);
    the values, and the statistics up to float rounding, are the same."""
    device = device_of(model)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or len(x) == 0 \
            or (device if device is not None else x.device).type != "cpu":
        return False
    try:
        with torch.no_grad(), kept_modes(model):
            model.eval()
            model(to_pass_input(x[:1], device, True))
    except RuntimeError:
        return False
    return True


def pass_layout(model: nn.Module, batches: Iterable, forward: Callable | None = None) -> tuple[Iterable, bool]:
    """`(batches, channels_last)` for a statistics pass: the first batch is read (and given back in front
    of the rest, so any iterable works) and tried by `channels_last_ok`, before any hook is in place."""
    if forward is not None:
        return batches, False
    it = iter(batches)
    for first in it:
        return itertools.chain([first], it), channels_last_ok(model, first_tensor(first))
    return [], False


def _feed_inputs(model: nn.Module, batch, n_inp: int) -> None:
    "Feed a batch's first `n_inp` elements to `model` (a two-input tabular model: categorical, continuous)."
    if not isinstance(batch, (tuple, list)) or len(batch) < n_inp:
        raise ValueError(f"a batch with at least {n_inp} elements was expected (n_inp={n_inp}), got {type(batch).__name__}")
    device = device_of(model)
    model(*(x.to(device) if device is not None and isinstance(x, torch.Tensor) else x for x in batch[:n_inp]))


def _pooled(n: int, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    "Mean, unbiased and biased variance from the pooled moments."
    m2 = m2.clamp_min(0)
    return mean, m2 / max(n - 1, 1), m2 / n


def _check_finite(what: str, values: dict[str, torch.Tensor]) -> None:
    bad = [n for n, v in values.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what}: the statistics at {len(bad)} BN layer(s) are not finite (first: {bad[0]!r}): "
                         "the data (or the model's output before that layer) holds NaN or infinite values. "
                         "Nothing was changed.")


@dataclass
class RecalibrationReport:
    "What `recalibrate_bn` measured: layers updated, layers the data never reached, batches and samples seen."
    layers: list[str]
    batches: int
    samples: int
    unused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = (f"re-estimated the statistics of {len(self.layers)} BatchNorm layer(s) over "
             f"{self.samples} samples in {self.batches} batches")
        if self.unused:
            s += f"; {len(self.unused)} layer(s) the data did not reach kept theirs ({', '.join(self.unused[:3])})"
        return s


def _batch_stat_hook(post: list[nn.Module]):
    "A forward hook making a fixed-statistics layer normalise with batch statistics (as a BN in training)."
    def hook(mod, args, out):
        y = F.batch_norm(args[0], None, None, mod.weight, mod.bias, True, 0.0, mod.eps)
        for p in post:
            y = p(y)
        return y
    return hook


@contextmanager
def batch_statistics(model: nn.Module, layers: Iterable[nn.Module]) -> Iterator[None]:
    """Inside, `model` is in eval mode (dropout off) but `layers` normalise with batch statistics, as
    in training, frozen kinds included, while their running statistics stay as they are (momentum
    0). On exit (also after an error or an interrupt) every mode, momentum and batch count is back."""
    handles, momenta, tracked = [], {}, {}
    try:
        with kept_modes(model):
            model.eval()
            for m in layers:
                if _kind(m).fixed:
                    handles.append(m.register_forward_hook(_batch_stat_hook(list(post_norm_modules(m).values()))))
                    continue
                momenta[m] = m.momentum
                if getattr(m, "num_batches_tracked", None) is not None:
                    tracked[m] = m.num_batches_tracked.clone()
                m.momentum = 0.0
                m.train()
            yield
    finally:
        for h in handles:
            h.remove()
        for m, mom in momenta.items():
            m.momentum = mom
        for m, t in tracked.items():
            m.num_batches_tracked.copy_(t)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, forward: Callable | None = None,
                   max_batches: int | None = None, layers: Iterable[nn.Module] | None = None,
                   n_inp: int = 1) -> RecalibrationReport:
    """Re-estimate the BN layers' running statistics on new data (AdaBN), exactly.

    Each BN layer gets the mean and the unbiased variance of *all* inputs it saw over `batches`,
    pooled exactly (each batch's moments, as the layer computes them, merged in float64), not a
    momentum or per-batch average; during the pass BN layers normalise with batch statistics, as in
    training (as PreciseBN does), frozen kinds included. It costs about one training-mode forward pass.
    No weight changes, no gradient is computed, dropout is off, and every module's training flag is
    restored, also after an interrupt. Statistics are written only at the end, and only if every one
    is finite (else `ValueError`, nothing changed). Layers the data never reaches (a branch
    that runs only in training) keep theirs and are named in the report.

    `batches` yields inputs (or tuples whose first `n_inp` elements are the model's inputs, as a
    fastai batch `(*xs, y)` with `dls.n_inp`); `forward(model, batch)` overrides how a batch is fed;
    `layers` restricts the update to some BN modules.
    """
    if isinstance(n_inp, bool) or not isinstance(n_inp, int) or n_inp < 1:
        raise ValueError(f"n_inp must be a whole number >= 1, got {n_inp!r}")
    if forward is None and n_inp > 1:
        forward = partial(_feed_inputs, n_inp=n_inp)
    todo = _layers_with_stats(model, layers, "recalibrate_bn")
    mods = [m for _, m in todo]
    own = [m for m in mods if not _kind(m).fixed]  # they compute their batch statistics themselves
    batches, channels_last = pass_layout(model, batches, forward)
    with recorded_moments([m for m in mods if m not in own]) as sums, batch_statistics(model, mods), \
            _moments_from_bn(own, sums):
        nb, ns = _run_batches(model, batches, max_batches, forward, channels_last)
    if nb == 0:
        raise ValueError("recalibrate_bn: `batches` yielded no batch")
    new = {}
    for name, m in todo:
        if m in sums:
            mean, var, _ = _pooled(*sums[m])
            new[name] = (m, mean, var)
    _check_finite("recalibrate_bn", {n: torch.stack([v[1], v[2]]) for n, v in new.items()})
    for m, mean, var in new.values():
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        if getattr(m, "num_batches_tracked", None) is not None:
            m.num_batches_tracked.fill_(nb)
    return RecalibrationReport(list(new), nb, ns, [n for n, m in todo if m not in sums])


def set_bn_eval_mode(model: nn.Module) -> int:
    "Put every BatchNorm layer in eval mode (running statistics used and left unchanged); returns the count."
    layers = bn_layers(model, include_folded=False)
    for _, m in layers:
        m.eval()
    return len(layers)


def freeze_bn_layers(model: nn.Module) -> int:
    """Fully freeze every BN layer: affine parameters `requires_grad=False` and eval mode.

    A later `model.train()` (fastai calls it every epoch) puts the layers back in training mode:
    the fastai layer's policy callback sets them back after it. Returns the number of layers.
    """
    layers = bn_layers(model)
    for _, m in layers:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    set_bn_eval_mode(model)
    return len(layers)


@dataclass
class ShiftReport:
    """How far new data is from the data the BN statistics were estimated on.

    Per layer: the mean over channels of KL(N(new) || N(running)) between per-channel Gaussians,
    in nats. `mean_kl` averages the layers; 0 means the statistics match exactly.
    """
    per_layer: dict[str, float]
    samples: int
    unused: list[str] = field(default_factory=list)

    @property
    def mean_kl(self) -> float:
        return float(sum(self.per_layer.values()) / max(len(self.per_layer), 1))

    @property
    def max_kl(self) -> float:
        return float(max(self.per_layer.values(), default=0.0))


def shift_kl(m: nn.Module, n: int, mean: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    "Mean over channels of KL(N(new) || N(running)) for a BN layer, from the pooled moments of its inputs."
    mn, _, vb = _pooled(n, mean, m2)
    vn = vb + m.eps
    mr, vr = m.running_mean.double(), m.running_var.double() + m.eps
    return 0.5 * (torch.log(vr / vn) + (vn + (mn - mr) ** 2) / vr - 1).mean()


@torch.no_grad()
def bn_shift(model: nn.Module, batches: Iterable, max_batches: int | None = 8,
             layers: Iterable[nn.Module] | None = None) -> ShiftReport:
    """Measure, at every BN layer, the divergence between the new data and the running statistics.

    The model runs in eval mode (as at inference, with the pretrained statistics); nothing changes.
    `layers` restricts the measure to some BN modules (a new head's fresh BN layers say nothing
    about the pretraining data, so the fastai layer passes the body's only). Layers the data never
    reaches are left out and named; a non-finite measurement raises `ValueError`.
    """
    todo = _layers_with_stats(model, layers, "bn_shift")
    batches, channels_last = pass_layout(model, batches)
    with recorded_moments([m for _, m in todo]) as stats, kept_modes(model):
        model.eval()
        _, ns = _run_batches(model, batches, max_batches, None, channels_last)
    if ns == 0:
        raise ValueError("bn_shift: `batches` yielded no batch")
    out = {name: shift_kl(m, *stats[m]) for name, m in todo if m in stats}
    _check_finite("bn_shift", out)
    return ShiftReport({k: float(v) for k, v in out.items()}, ns, [n for n, m in todo if m not in stats])




