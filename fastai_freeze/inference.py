"""Inference copies: BN fused into the convolutions, channels-last memory format; exportable."""
from __future__ import annotations

import torch
from fastai.learner import Learner
from fastai.torch_core import params
from fastcore.basics import patch
from torch import nn

from .bn import FuseReport, fuse_conv_bn

__all__ = ["ChannelsLast", "inference_model"]


class ChannelsLast(nn.Module):
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
    and with `channels_last` the weights and inputs in the channels-last format.

    Same outputs as the eval-mode model to float precision. Fusion alone saves little on CPU (one
    elementwise pass per BN); the channels-last format is where most of the speed comes from.
    """
    fused, report = fuse_conv_bn(model, channels_last=channels_last)
    for p in fused.parameters():
        p.requires_grad_(False)
    return (ChannelsLast(fused) if channels_last else fused), report


@patch
def fused_model(self: Learner, channels_last: bool = True) -> nn.Module:
    "An inference copy of this Learner's model (see `inference_model`); the Learner is unchanged."
    return inference_model(self.model, channels_last)[0]


@patch
def export_fused(self: Learner, fname: str = "export_fused.pkl", channels_last: bool = True, **kwargs) -> None:
    """`learn.export` with the fused inference model in place of the training model.

    `load_learner(fname)` gives a Learner whose `predict`/`get_preds` use the fused model. The
    Learner itself keeps its training model.
    """
    # fastai's export rebuilds the optimizer with the splitter: give it a model-agnostic one for the
    # inference copy, and put the training model, its optimizer and its splitter back afterwards
    original, opt, splitter = self.model, self.opt, self.splitter
    self.model, self.opt, self.splitter = inference_model(original, channels_last)[0], None, params
    try:
        self.export(fname, **kwargs)
    finally:
        self.model, self.opt, self.splitter = original, opt, splitter
