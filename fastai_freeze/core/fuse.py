"""Inference copies: each BN folded into the convolution before it, channels-last memory format.

The pairs come from the model's graph (torch.fx), traced with convolutions, BN layers and timm's
own untraceable modules as leaves; only a conv whose single consumer is the BN, each called once,
is fused, so a shared conv or BN is never fused in the wrong place. A model fx cannot trace falls
back to adjacent children of `nn.Sequential` containers (their order is the execution order).
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .bn import (
    BNAffine,
    _all_names,
    _has_stats,
    _set_submodule,
    bn_layers,
    bn_statistics,
    is_bn,
    post_norm_modules,
)

__all__ = ["FuseReport", "conv_bn_pairs", "fuse_conv_bn", "ChannelsLastInput", "inference_model",
           "to_channels_last"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FuseReport:
    "Which (conv, norm) pairs `fuse_conv_bn` fused, the BN layers left as they were, and how pairs were found."
    fused: list[tuple[str, str]] = field(default_factory=list)
    unfused: list[str] = field(default_factory=list)
    method: str = "fx"

    def __str__(self) -> str:
        return (f"fused {len(self.fused)} conv+BN pair(s); {len(self.unfused)} BN layer(s) left unfused "
                f"(pairs found by {'tracing the graph' if self.method == 'fx' else 'Sequential order'})")


def _timm_leaves() -> tuple[tuple[type, ...], tuple]:
    fx_mod = sys.modules.get("timm.layers._fx")
    if fx_mod is None:
        return (), ()
    return tuple(fx_mod.get_notrace_modules()), tuple(fx_mod.get_notrace_functions())


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]]:
    from torch import fx
    leaf_types, autowrap = _timm_leaves()

    class _Tracer(fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=tuple(f for f in autowrap if callable(f)))

        def is_leaf_module(self, m, qualname):
            return (isinstance(m, _CONVS) or is_bn(m) or isinstance(m, leaf_types)
                    or super().is_leaf_module(m, qualname))

    graph = _Tracer().trace(model)
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_bn(mods.get(node.target)) or calls[node.target] != 1:
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), _CONVS)
                and len(src.users) == 1 and calls[src.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    names = _all_names(model)
    pairs = []
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            kids = list(parent.children())
            for a, b in zip(kids, kids[1:]):
                if isinstance(a, _CONVS) and is_bn(b) and len(names[a]) == 1 and len(names[b]) == 1:
                    pairs.append((names[a][0], names[b][0]))
    return pairs


def conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """`(pairs, method)`: the (conv, BN) pairs of `model` where the BN reads the conv's output and
    nothing else does, each module called once; `method` is 'fx' or 'sequential' (the fallback)."""
    bn_layers(model)  # refuses unknown BN subclasses before anything else
    try:
        return _traced_pairs(model), "fx"
    except Exception:  # noqa: BLE001 - any tracing failure means: use the safe fallback
        return _sequential_pairs(model), "sequential"


def _after_norm(bn: nn.Module) -> nn.Module:
    "What a fused BN leaves in its place: its post-normalisation submodules, or nothing."
    post = [m for m in post_norm_modules(bn).values() if not isinstance(m, nn.Identity)]
    return nn.Identity() if not post else post[0] if len(post) == 1 else nn.Sequential(*post)


def to_channels_last(model: nn.Module) -> nn.Module:
    "Convert, in place, the weights of every 2-d convolution to the channels-last format (others are left)."
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def fuse_conv_bn(model: nn.Module, channels_last: bool = False) -> tuple[nn.Module, FuseReport]:
    """An inference copy of `model` with each BN (or `BNAffine`) folded into the conv before it.

    Works on a deep copy in eval mode (the original is untouched); the math is PyTorch's
    `torch.nn.utils.fusion.fuse_conv_bn_weights`. A fused BN is replaced by what it applied after
    normalising (timm's activation), else by `nn.Identity`. With `channels_last=True` the copy's
    2-d convolutions use the channels-last memory format (most of the CPU speed-up).
    Returns `(fused_model, report)`.
    """
    fused = copy.deepcopy(model).eval()
    pairs, method = conv_bn_pairs(fused)
    report = FuseReport(method=method)
    mods = dict(fused.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = mods[conv_name], mods[bn_name]
        if isinstance(bn, BNAffine):
            rm, rv, eps = torch.zeros_like(bn.weight), torch.ones_like(bn.weight), 0.0
            w, b = bn.effective_weight, bn.bias
        else:
            if not _has_stats(bn):
                continue
            rm, rv, eps, w, b = bn_statistics(bn)
            w = w if w is not None else torch.ones_like(rm)
            b = b if b is not None else torch.zeros_like(rm)
        cw, cb = fuse_conv_bn_weights(conv.weight, conv.bias, rm, rv, eps, w, b)
        conv.weight, conv.bias = cw, cb
        _set_submodule(fused, bn_name, _after_norm(bn))
        report.fused.append((conv_name, bn_name))
    for p in fused.parameters():
        p.requires_grad_(False)
    report.unfused = [n for n, _ in bn_layers(fused)]
    if channels_last:
        to_channels_last(fused)
    return fused, report


class ChannelsLastInput(nn.Module):
    "Runs `model` on 4-D inputs in the channels-last memory format, where CPU convolutions are fastest."

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def inference_model(model: nn.Module, channels_last: bool = True) -> tuple[nn.Module, FuseReport]:
    """A frozen, eval-mode copy of `model` for inference: BN fused into the convs (`fuse_conv_bn`),
    and with `channels_last` the 2-d conv weights and 4-D inputs in the channels-last format.

    Same outputs as the eval-mode model to float precision; the original is untouched.
    """
    fused, report = fuse_conv_bn(model, channels_last=channels_last)
    return (ChannelsLastInput(fused) if channels_last else fused), report
