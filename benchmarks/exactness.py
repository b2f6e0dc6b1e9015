"""Fold and fuse against the eval-mode model, per architecture (random weights, randomised BN statistics).

    python benchmarks/exactness.py

Writes benchmarks/results/exactness.md: the largest relative error of `fold_bn` and of `fuse_conv_bn`
(with and without channels-last) on each architecture, and how many conv+BN pairs were fused.
"""
from __future__ import annotations

import copy
import datetime
import warnings
from pathlib import Path

import timm
import torch
import torchvision

from fastai_freeze.core import bn_layers, fold_bn, fuse_conv_bn

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = [("timm", n) for n in ("resnet18", "resnet50", "efficientnet_b0", "tf_efficientnet_lite0",
                               "mobilenetv3_large_100", "regnety_002", "densenet121")] + \
        [("torchvision", n) for n in ("resnet18", "mobilenet_v3_small", "efficientnet_b0")]


def randomized(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in bn_layers(model):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
    return model.eval()


def main():
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    lines = ["# Fold and fuse against the eval-mode model\n",
             f"{datetime.date.today().isoformat()} · torch {torch.__version__}, timm {timm.__version__} · float32, "
             "random weights, randomised BN statistics, 4 images of 64 px; relative error = max |difference| / "
             "max |output|\n", "| library | architecture | BN layers | fold | fuse | fuse + channels-last | conv+BN pairs fused |",
             "|---|---|---|---|---|---|---|"]
    for lib, name in ARCHS:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10) if lib == "timm" else torchvision.models.get_model(
            name, num_classes=10)
        model = randomized(model)
        with torch.no_grad():
            ref = model(x)
            folded = copy.deepcopy(model)
            fold_bn(folded)
            fused, report = fuse_conv_bn(model)
            fused_cl, _ = fuse_conv_bn(model, channels_last=True)
            errs = [float((out - ref).abs().max() / ref.abs().max()) for out in (folded(x), fused(x), fused_cl(x))]
            lines.append(f"| {lib} | {name} | {len(bn_layers(model))} | {errs[0]:.1e} | {errs[1]:.1e} | "
                         f"{errs[2]:.1e} | {len(report.fused)} |")
        print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "exactness.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
