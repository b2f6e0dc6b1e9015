"""The pure-PyTorch core: BatchNorm folding, re-estimation, freezing, fusion, LogME.

Nothing under `fastai_freeze.core` imports fastai or matplotlib; every function takes an
`nn.Module` (or arrays) and returns something plain, so it works on any PyTorch model.
"""
from __future__ import annotations

from .bn import (
    BNAffine,
    FoldReport,
    RecalibrationReport,
    ShiftReport,
    UnknownBNLayerError,
    bn_layers,
    bn_parameters,
    bn_shift,
    bn_statistics,
    fold_bn,
    freeze_bn_layers,
    is_bn,
    post_norm_modules,
    recalibrate_bn,
    register_bn_layer,
    set_bn_eval_mode,
)
from .fuse import (
    ChannelsLastInput,
    FuseReport,
    conv_bn_pairs,
    fuse_conv_bn,
    inference_model,
    to_channels_last,
)
from .logme import StatisticsProbe, logme, pooled_features, probe_bn_statistics

__all__ = [
    "BNAffine", "FoldReport", "RecalibrationReport", "ShiftReport", "UnknownBNLayerError", "bn_layers",
    "bn_parameters", "bn_shift", "bn_statistics", "fold_bn", "freeze_bn_layers", "is_bn", "post_norm_modules",
    "recalibrate_bn", "register_bn_layer", "set_bn_eval_mode", "ChannelsLastInput", "FuseReport", "conv_bn_pairs",
    "fuse_conv_bn", "inference_model", "to_channels_last", "logme", "pooled_features", "StatisticsProbe", "probe_bn_statistics",
]
