"""Inference copies of a Learner's model: BN fused into the convolutions, channels-last; exportable."""
from __future__ import annotations

from fastai.learner import Learner
from fastai.torch_core import params
from fastcore.basics import patch
from torch import nn

from .core.fuse import inference_model

__all__: list[str] = []  # Learner.fused_model, Learner.export_fused


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
