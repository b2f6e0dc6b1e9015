"""fastai_freeze: principled, automatic and visible fine-tuning of pretrained networks in fastai.

Importing the package adds new, clearly named Learner methods (`fine_tune_with`, `freeze_body`,
`split_bn`, `apply_bn_policy`, `new_head`...) and changes none of fastai's own.
"""
from __future__ import annotations

from . import freeze as _freeze_patches  # noqa: F401  Learner.freeze_body, Learner.split_bn
from . import inference as _inference_patches  # noqa: F401  Learner.fused_model, Learner.export_fused
from .advisor import Advice
from .core import (
                 BNAffine,
                 FoldReport,
                 FuseReport,
                 RecalibrationReport,
                 ShiftReport,
                 bn_layers,
                 bn_parameters,
                 bn_shift,
                 fold_bn,
                 freeze_bn_layers,
                 fuse_conv_bn,
                 inference_model,
                 is_bn,
                 logme,  # also Learner.suggest_strategy
                 recalibrate_bn,
                 register_bn_layer,
)
from .diagnostics import WeightDiagnostics, layer_weights, relative_change
from .features import CachedWarmup, FeatureCache, augmentations, cached_warmup, compute_features
from .freeze import (
                 BNSplitter,
                 FrozenBodyShortcut,
                 body_bn_layers,
                 check_splittable,
                 frozen_prefix,
                 frozen_state,
                 rebuild_optimizer,
)
from .policy import (
                 BNDecision,
                 BNPolicy,
                 BNPolicyCallback,
                 choose_bn_policy,
                 decide_bn_policy,
)
from .record import FineTuneRecord, PhaseRecord, RangeTestResult
from .schedule import (
                 DEFAULT_FALLBACK_LR,
                 FineTuneCallback,
                 PlateauRule,
                 StopAtTarget,
                 UnfreezeOnPlateau,
                 learner_snapshot,
                 range_test,
                 restore_learner,
)
from .transfer import cut_body, new_head_learner, simple_head

__version__ = "0.1.0"

__all__ = [
    "BNAffine", "FoldReport", "FuseReport", "RecalibrationReport", "ShiftReport", "bn_layers",
    "bn_parameters", "bn_shift", "fold_bn", "freeze_bn_layers", "register_bn_layer", "fuse_conv_bn", "is_bn", "recalibrate_bn",
    "BNSplitter", "body_bn_layers", "check_splittable", "frozen_state",
    "rebuild_optimizer", "BNDecision", "BNPolicy", "BNPolicyCallback",
    "choose_bn_policy", "decide_bn_policy", "FineTuneRecord", "PhaseRecord", "RangeTestResult",
    "DEFAULT_FALLBACK_LR", "FineTuneCallback", "PlateauRule", "StopAtTarget", "UnfreezeOnPlateau",
    "CachedWarmup", "FeatureCache", "augmentations", "cached_warmup", "compute_features", "inference_model", "FrozenBodyShortcut", "frozen_prefix", "Advice", "logme", "WeightDiagnostics", "layer_weights", "relative_change",
    "learner_snapshot", "range_test", "restore_learner", "cut_body", "new_head_learner", "simple_head",
]
