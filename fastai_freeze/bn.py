"""Pure-PyTorch BatchNorm toolkit: fold, recalibrate (AdaBN), freeze, fuse, measure shift.

Nothing here imports fastai: every function takes an `nn.Module` and returns something plain.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    "BN_TYPES", "BNAffine", "FoldReport", "fold_bn", "is_bn", "bn_layers", "bn_parameters",
    "recalibrate_bn", "RecalibrationReport", "freeze_bn", "set_bn_eval", "bn_modes", "restore_bn_modes",
    "fuse_conv_bn", "FuseReport", "bn_shift", "ShiftReport",
]

BN_TYPES: tuple[type, ...] = (_BatchNorm,)
"BatchNorm1d/2d/3d, SyncBatchNorm and the lazy variants all derive from `_BatchNorm`."


class BNAffine(nn.Module):
    """A trainable per-channel affine map `y = gamma' * x + beta'`, broadcast over dim 1.

    It stands in for a BatchNorm layer whose statistics are fixed: `BNAffine.from_bn(bn)` gives
    exactly the eval-mode output of `bn`, with `gamma' = gamma / sqrt(var + eps)` and
    `beta' = beta - mean * gamma'`. It has no statistics and behaves the same in train and eval
    mode, so it is safe at any batch size.

    `gamma'` is stored as `weight * scale`, with `scale` a fixed buffer. By default
    (`preconditioned=True`) `scale = 1 / sqrt(var + eps)` and `weight = gamma`: the trainable
    parameters then have the same scale, and get the same gradient steps, as the BN layer's own
    `gamma` and `beta`. Training `gamma'` directly (`preconditioned=False`, `scale = 1`) multiplies
    the effective step on a channel by its variance, which is unstable where the pre-BN activations
    are large. Either way `effective_weight` is `gamma'` and `bias` is `beta'`.
    """

    def __init__(self, num_features: int, source: str = "BatchNorm2d",
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be a positive channel count, got {num_features}")
        self.num_features, self.source = num_features, source
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("scale", torch.ones(num_features, device=device, dtype=dtype))

    @property
    def effective_weight(self) -> torch.Tensor:
        "gamma' = weight * scale, the per-channel factor applied to the input."
        return self.weight * self.scale

    @classmethod
    def from_bn(cls, bn: _BatchNorm, preconditioned: bool = True) -> BNAffine:
        "The affine layer that reproduces `bn` in eval mode (float64 arithmetic, cast back)."
        if not isinstance(bn, BN_TYPES):
            raise TypeError(f"expected a BatchNorm layer, got {type(bn).__name__}")
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{type(bn).__name__}({bn.num_features}) has track_running_stats=False: it always "
                "normalises with batch statistics, so there are no fixed statistics to fold. Keep it "
                "as it is (bn='train') or recalibrate a copy with tracked statistics first.")
        ref = bn.weight if bn.weight is not None else bn.running_mean
        mean, var = bn.running_mean.double(), bn.running_var.double()
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
        inv_std = 1 / torch.sqrt(var + bn.eps)
        layer = cls(bn.num_features, type(bn).__name__, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if preconditioned:
                layer.weight.copy_(gamma.to(ref.dtype))
                layer.scale.copy_(inv_std.to(ref.dtype))
            else:
                layer.weight.copy_((gamma * inv_std).to(ref.dtype))
            layer.bias.copy_((beta - mean * gamma * inv_std).to(ref.dtype))
        layer.weight.requires_grad_(bn.weight.requires_grad if bn.weight is not None else True)
        layer.bias.requires_grad_(bn.bias.requires_grad if bn.bias is not None else True)
        layer.train(bn.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BNAffine({self.num_features}) expects input of shape (N, "
                             f"{self.num_features}, ...), got {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), x, self.effective_weight.view(shape))

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded_from={self.source}"


def is_bn(m: nn.Module) -> bool:
    "True for any BatchNorm layer (SyncBatchNorm included) and for a folded `BNAffine`."
    return isinstance(m, BN_TYPES + (BNAffine,))


def bn_layers(model: nn.Module, include_folded: bool = True) -> list[tuple[str, nn.Module]]:
    "Named BN layers of `model` (with `BNAffine` layers unless `include_folded=False`)."
    kinds = BN_TYPES + (BNAffine,) if include_folded else BN_TYPES
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def bn_parameters(model: nn.Module) -> list[nn.Parameter]:
    "The affine parameters of every BN (or folded) layer of `model`."
    return [p for _, m in bn_layers(model) for p in m.parameters(recurse=False)]


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


def fold_bn(model: nn.Module, strict: bool = True, preconditioned: bool = True) -> FoldReport:
    """Replace every BatchNorm layer of `model`, in place, by the equivalent trainable `BNAffine`.

    The folded model's output equals the eval-mode model's output (float32: to about 1e-6).
    `preconditioned` chooses how `BNAffine` stores gamma' (see there; the output is the same).
    A layer with `track_running_stats=False` raises `ValueError` when `strict`, else it is skipped
    and named in the report. A model without BN layers gives an empty report (nothing to do).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn expects an nn.Module, got {type(model).__name__}")
    report = FoldReport()
    for name, bn in bn_layers(model, include_folded=False):
        if not bn.track_running_stats:
            if strict:
                BNAffine.from_bn(bn)  # raises with the explanation
            report.skipped[name] = "track_running_stats=False"
            continue
        _set_submodule(model, name, BNAffine.from_bn(bn, preconditioned))
        report.folded.append(name)
    return report


@dataclass
class RecalibrationReport:
    "What `recalibrate_bn` measured: layers updated, batches and samples seen."
    layers: list[str]
    batches: int
    samples: int

    def __str__(self) -> str:
        return (f"re-estimated the statistics of {len(self.layers)} BatchNorm layer(s) over "
                f"{self.samples} samples in {self.batches} batches")


def _moments_hook(store: dict):
    "A forward pre-hook adding, per module, [count, per-channel sum, per-channel sum of squares] (float64)."
    def hook(mod, inp):
        x = inp[0].detach().double()
        dims = [0] + list(range(2, x.dim()))
        s = store.setdefault(mod, [0, 0.0, 0.0])
        s[0] += x.numel() // x.shape[1]
        s[1] = s[1] + x.sum(dims)
        s[2] = s[2] + (x * x).sum(dims)
    return hook


def _device_of(model: nn.Module) -> torch.device | None:
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device


def _first_tensor(b) -> torch.Tensor:
    while isinstance(b, (list, tuple)):
        b = b[0]
    return b


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, forward=None,
                   max_batches: int | None = None) -> RecalibrationReport:
    """Re-estimate every BN layer's running statistics on new data (AdaBN), exactly.

    Each BN layer gets the mean and the unbiased variance of *all* inputs it saw over `batches`,
    pooled exactly (float64 sums), not a momentum or per-batch average; during the pass BN layers
    normalise with batch statistics, as in training (as PreciseBN does). No weight changes, no
    gradient is computed, dropout is off, and every module's training flag is restored.

    `batches` yields inputs (or tuples whose first element is the input); `forward(model, batch)`
    overrides how a batch is fed.
    """
    layers = [(n, m) for n, m in bn_layers(model, include_folded=False) if m.track_running_stats]
    if not layers:
        raise ValueError("recalibrate_bn: the model has no BatchNorm layer with running statistics "
                         "(already folded? fold after recalibrating)")
    modes = {m: m.training for m in model.modules()}
    sums: dict[nn.Module, list] = {}
    hook = _moments_hook(sums)

    # momentum 0 keeps the running statistics untouched during the pass (so an error midway
    # loses nothing); the exact pooled statistics are written at the end.
    momenta = {m: m.momentum for _, m in layers}
    tracked = {m: m.num_batches_tracked.clone() for _, m in layers if m.num_batches_tracked is not None}
    device = _device_of(model)
    handles = [m.register_forward_pre_hook(hook) for _, m in layers]
    nb = ns = 0
    try:
        model.eval()
        for _, m in layers:
            m.train()
            m.momentum = 0.0
        for i, b in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = _first_tensor(b)
            if forward is None:
                model(x.to(device) if device is not None else x)
            else:
                forward(model, b)
            nb, ns = nb + 1, ns + x.shape[0]
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
        for m, mom in momenta.items():
            m.momentum = mom
        for m, t in tracked.items():
            m.num_batches_tracked.copy_(t)
    if nb == 0:
        raise ValueError("recalibrate_bn: `batches` yielded no batch")
    for _, m in layers:
        n, s1, s2 = sums[m]
        mean = s1 / n
        var = (s2 - n * mean * mean) / max(n - 1, 1)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.clamp_min(0).to(m.running_var.dtype))
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(nb)
    return RecalibrationReport([n for n, _ in layers], nb, ns)


def freeze_bn(model: nn.Module) -> int:
    """Fully freeze every BN layer: affine parameters `requires_grad=False` and eval mode.

    Note that a later `model.train()` (fastai calls it every epoch) puts the layers back in
    training mode: keep them in eval with `set_bn_eval` after it (the policy callback does).
    Returns the number of layers frozen.
    """
    layers = bn_layers(model)
    for _, m in layers:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    set_bn_eval(model)
    return len(layers)


def set_bn_eval(model: nn.Module) -> int:
    "Put every BatchNorm layer in eval mode (running statistics used and left unchanged)."
    layers = bn_layers(model, include_folded=False)
    for _, m in layers:
        m.eval()
    return len(layers)


def bn_modes(model: nn.Module) -> dict[nn.Module, bool]:
    "The training flag of every BN layer, to give back to `restore_bn_modes`."
    return {m: m.training for _, m in bn_layers(model)}


def restore_bn_modes(modes: dict[nn.Module, bool]) -> None:
    for m, t in modes.items():
        m.train(t)


@dataclass
class FuseReport:
    "Which (conv, norm) pairs `fuse_conv_bn` fused, and how many norm layers were left as they were."
    fused: list[tuple[str, str]] = field(default_factory=list)
    unfused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"fused {len(self.fused)} conv+BN pair(s); {len(self.unfused)} BN layer(s) left unfused"


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs (conv, bn) where the BN reads the conv's output and nothing else does.

    Found by tracing with torch.fx; a model that cannot be traced falls back to adjacent pairs
    inside `nn.Sequential` containers, whose order is the execution order.
    """
    names = {m: n for n, m in model.named_modules()}
    try:
        from torch import fx

        class _Tracer(fx.Tracer):
            def is_leaf_module(self, m, qualname):
                return isinstance(m, BNAffine) or super().is_leaf_module(m, qualname)

        graph = _Tracer().trace(model)
        mods = dict(model.named_modules())
        pairs = []
        for node in graph.nodes:
            if node.op != "call_module" or not is_bn(mods.get(node.target, None)):
                continue
            src = node.args[0] if node.args else None
            if (isinstance(src, fx.Node) and src.op == "call_module"
                    and isinstance(mods.get(src.target), _CONVS) and len(src.users) == 1):
                pairs.append((src.target, node.target))
        return pairs
    except Exception:  # noqa: BLE001 - any tracing failure means: use the safe fallback
        pairs = []
        for parent in model.modules():
            if isinstance(parent, nn.Sequential):
                kids = list(parent.children())
                for a, b in zip(kids, kids[1:]):
                    if isinstance(a, _CONVS) and is_bn(b):
                        pairs.append((names[a], names[b]))
        return pairs


@torch.no_grad()
def fuse_conv_bn(model: nn.Module, channels_last: bool = False) -> tuple[nn.Module, FuseReport]:
    """An inference copy of `model` with each BN (or `BNAffine`) folded into the conv before it.

    Works on a deep copy in eval mode (the original is untouched); the math is PyTorch's
    `torch.nn.utils.fusion.fuse_conv_bn_weights`. Fused norms become `nn.Identity`. With
    `channels_last=True` the copy is converted to the channels-last memory format, which is where
    most of the CPU speed-up comes from. Returns `(fused_model, report)`.
    """
    fused = copy.deepcopy(model).eval()
    report = FuseReport()
    mods = dict(fused.named_modules())
    for conv_name, bn_name in _conv_bn_pairs(fused):
        conv, bn = mods[conv_name], mods[bn_name]
        if isinstance(bn, BNAffine):
            rm, rv, eps = torch.zeros_like(bn.weight), torch.ones_like(bn.weight), 0.0
            w, b = bn.effective_weight, bn.bias
        else:
            if not bn.track_running_stats:
                continue
            rm, rv, eps, w, b = bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        cw, cb = fuse_conv_bn_weights(conv.weight, conv.bias, rm, rv, eps, w, b)
        conv.weight, conv.bias = cw, cb
        for p in conv.parameters():
            p.requires_grad_(False)
        _set_submodule(fused, bn_name, nn.Identity())
        report.fused.append((conv_name, bn_name))
    report.unfused = [n for n, _ in bn_layers(fused)]
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    return fused, report


@dataclass
class ShiftReport:
    """How far new data is from the data the BN statistics were estimated on.

    Per layer: the mean over channels of KL(N(new) || N(running)) between per-channel Gaussians,
    in nats. `mean_kl` averages the layers; 0 means the statistics match exactly.
    """
    per_layer: dict[str, float]
    samples: int

    @property
    def mean_kl(self) -> float:
        return float(sum(self.per_layer.values()) / max(len(self.per_layer), 1))

    @property
    def max_kl(self) -> float:
        return float(max(self.per_layer.values(), default=0.0))


@torch.no_grad()
def bn_shift(model: nn.Module, batches: Iterable, max_batches: int | None = 8,
             layers: Iterable[nn.Module] | None = None) -> ShiftReport:
    """Measure, at every BN layer, the divergence between the new data and the running statistics.

    The model runs in eval mode (as at inference, with the pretrained statistics); nothing changes.
    `layers` restricts the measure to some BN modules (a new head's fresh BN layers say nothing
    about the pretraining data, so the fastai layer passes the body's only).
    """
    work = model
    keep = None if layers is None else set(layers)
    layers = [(n, m) for n, m in bn_layers(work, include_folded=False)
              if m.track_running_stats and (keep is None or m in keep)]
    if not layers:
        raise ValueError("bn_shift: the model has no BatchNorm layer with running statistics")
    modes = {m: m.training for m in work.modules()}
    device = _device_of(work)
    work.eval()
    stats: dict[nn.Module, list] = {}
    hook = _moments_hook(stats)

    handles = [m.register_forward_pre_hook(hook) for _, m in layers]
    ns = 0
    try:
        for i, b in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = _first_tensor(b)
            work(x.to(device) if device is not None else x)
            ns += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    if ns == 0:
        raise ValueError("bn_shift: `batches` yielded no batch")
    out = {}
    for name, m in layers:
        n, s1, s2 = stats[m]
        mn = s1 / n
        vn = (s2 / n - mn * mn).clamp_min(0) + m.eps
        mr, vr = m.running_mean.double(), m.running_var.double() + m.eps
        kl = 0.5 * (torch.log(vr / vn) + (vn + (mn - mr) ** 2) / vr - 1)
        out[name] = float(kl.mean())
    return ShiftReport(out, ns)
