"""fastai_freeze: principled, automatic and visible fine-tuning of pretrained networks in fastai.

Importing the package adds new, clearly named Learner methods and changes none of fastai's own:
`fine_tune_with`, `freeze_body`, `split_bn`, `apply_bn_policy`, `suggest_strategy`, `fused_model`,
`export_fused`. The pure-PyTorch core is `fastai_freeze.core` (no fastai import).
"""
from __future__ import annotations

# the modules that add Learner methods, imported for that effect
from . import advisor as _advisor  # noqa: F401  Learner.suggest_strategy
from . import freeze as _freeze  # noqa: F401  Learner.split_bn
from . import inference as _inference  # noqa: F401  Learner.fused_model, Learner.export_fused
from . import policy as _policy  # noqa: F401  Learner.apply_bn_policy, Learner.freeze_body
from . import schedule as _schedule  # noqa: F401  Learner.fine_tune_with
from .callbacks import FrozenPrefix
from .core import (
    BNAffine,
    bn_shift,
    fold_bn,
    freeze_bn_layers,
    fuse_conv_bn,
    inference_model,
    logme,
    recalibrate_bn,
    register_bn_layer,
)
from .diagnostics import WeightDiagnostics
from .features import cached_warmup
from .policy import BNPolicy, BNPolicyCallback
from .probe import RangeTest, range_test
from .record import FineTuneRecord
from .schedule import FineTuneCallback, Gradual, Stop, Unfreeze
from .strategies import run_named_strategy
from .transfer import new_head_learner
from .zoo import packaged_weights

__version__ = "0.2.0"

__all__ = [
    # fine-tuning schedules
    "FineTuneCallback", "Unfreeze", "Gradual", "Stop", "RangeTest", "range_test", "FineTuneRecord", "run_named_strategy",
    # BatchNorm policies and the pure-PyTorch BN toolkit
    "BNPolicy", "BNPolicyCallback", "BNAffine", "fold_bn", "recalibrate_bn", "freeze_bn_layers", "bn_shift",
    "register_bn_layer", "fuse_conv_bn", "inference_model",
    # seeing what happened, speed, models and data
    "WeightDiagnostics", "FrozenPrefix", "cached_warmup", "logme", "new_head_learner", "packaged_weights",
]
