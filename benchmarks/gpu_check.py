"""Mixed precision on a GPU: fine_tune_with under every BN policy after `learn.to_fp16()`, and folded
and fused models evaluated in half precision. Needs CUDA; prints a table, exits 1 on a failure.

    python benchmarks/gpu_check.py
"""
from __future__ import annotations

import sys
import warnings

import torch
from fastai.metrics import accuracy

import fastai_freeze  # noqa: F401
from fastai_freeze.core.fuse import inference_model
from fastai_freeze.demo.data import TARGET_CLASSES, make_patterns, pretrained_tiny_resnet, tensor_dls
from fastai_freeze.transfer import new_head_learner

warnings.filterwarnings("ignore")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 0
    source = pretrained_tiny_resnet(verbose=False)
    xt, yt = make_patterns(100, TARGET_CLASSES, size=32, seed=1)
    xv, yv = make_patterns(50, TARGET_CLASSES, size=32, seed=2)
    failures = []
    for policy in ("train", "frozen", "fold", "adapt", "auto"):
        dls = tensor_dls(xt, yt, xv, yv, bs=32, device="cuda")
        learn = new_head_learner(source, dls, metrics=accuracy).to_fp16()
        with learn.no_bar(), learn.no_logging():
            learn.fine_tune_with(2, bn=policy)
        acc32 = float(learn.recorder.values[-1][-1])
        model = learn.model.eval().float()
        x = xv.cuda()
        with torch.inference_mode():
            ref = model(x).argmax(1)
            half = model.half()(x.half()).argmax(1)
            fused = inference_model(model.float(), channels_last=True)[0].half()(x.half()).argmax(1)
        agree_half = float((half == ref).float().mean())
        agree_fused = float((fused == ref).float().mean())
        ok = acc32 > 0.5 and agree_half > 0.99 and agree_fused > 0.99
        print(f"bn={policy:<7} fp16 training accuracy {acc32:.3f}; half-precision predictions agree "
              f"{agree_half:.3f}, fused half {agree_fused:.3f} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(policy)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
