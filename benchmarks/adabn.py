"""AdaBN re-estimation (`recalibrate_bn`) against one eval pass over the same images.

    python benchmarks/adabn.py [--images 1024] [--size 96] [--bs 64] [--repeats 3]

timm's EfficientNet-Lite0 with its ImageNet weights (the packaged ones), synthetic images. Five
timings, interleaved (ABCDE ABCDE ...) and the median taken, ratios within this one run:
- one eval-mode forward pass over the images (no gradient), as fastai's `validate` runs it: the floor;
- the same with the batches in channels-last layout (what `recalibrate_bn` feeds on a CPU), for reference;
- `recalibrate_bn` as it is: each BN layer's own batch statistics (read off its running statistics at
  momentum 1), merged across batches in float64: a training-mode forward pass, nothing more;
- the same with contiguous batches (what it fed before, on every device);
- the same pass with each BN input copied to float64 and summed (sum and sum of squares), the way
  statistics were pooled before that.
Both estimates are compared with the same pass run in float64.
Writes benchmarks/results/adabn.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
from pathlib import Path

import timm
import torch

from fastai_freeze.core import bn as bnmod
from fastai_freeze.core.bn import recalibrate_bn
from fastai_freeze.zoo import packaged_weights_file

RESULTS = Path(__file__).resolve().parent / "results"


def _float64_sums_hook(store: dict):
    "The reference: every BN input copied to float64, then its sum and sum of squares (as before)."
    def hook(mod, inp):
        x = inp[0].detach().double()
        dims = [0] + list(range(2, x.dim()))
        s = store.setdefault(mod, [0, 0.0, 0.0])
        s[0] += x.numel() // x.shape[1]
        s[1] = s[1] + x.sum(dims)
        s[2] = s[2] + (x * x).sum(dims)

    def as_moments(s):  # [count, sum, sum of squares] -> [count, mean, M2]
        n, s1, s2 = s
        mean = s1 / n
        return [n, mean, s2 - n * mean * mean]
    return hook, as_moments


def recalibrate_float64_sums(model, batches):
    "`recalibrate_bn` with the reference hook in place of the library's."
    original = bnmod.moments_hook
    conv = {}

    def patched(store):
        hook, conv["f"] = _float64_sums_hook(store)
        return hook
    bnmod.moments_hook = patched
    try:
        # the library reads [count, mean, M2]; convert the reference's sums once the pass is done
        todo = [m for _, m in bnmod.bn_layers(model, include_folded=False)]
        with bnmod.recorded_moments(todo) as sums, bnmod.batch_statistics(model, todo):
            bnmod._run_batches(model, batches, None, lambda m, b: m(b))  # as before: contiguous batches
        for m in todo:
            n, mean, m2 = conv["f"](sums[m])
            _, var, _ = bnmod._pooled(n, mean, m2)
            m.running_mean.copy_(mean.float())
            m.running_var.copy_(var.float())
    finally:
        bnmod.moments_hook = original


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(packaged_weights_file("tf_efficientnet_lite0"))))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.images, 3, a.size, a.size, generator=g)
    batches = list(x.split(a.bs))
    m_new, m_old, m_cont = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)

    @torch.no_grad()
    def eval_pass():
        model.eval()
        for b in batches:
            model(b)

    @torch.no_grad()
    def eval_pass_cl():
        model.eval()
        for b in batches:
            model(b.contiguous(memory_format=torch.channels_last))

    fns = {"one eval pass": eval_pass,
           "one eval pass, channels-last input": eval_pass_cl,
           "recalibrate_bn": lambda: recalibrate_bn(m_new, batches),
           "recalibrate_bn, contiguous batches (before)": lambda: recalibrate_bn(m_cont, batches, forward=lambda m, b: m(b)),
           "float64 copies and sums (first release)": torch.no_grad()(lambda: recalibrate_float64_sums(m_old, batches))}
    times = {k: [] for k in fns}
    t_all = time.perf_counter()
    for _ in range(a.repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    med = {k: statistics.median(v) for k, v in times.items()}
    # the truth: the same pass in float64 (model and images in double precision, contiguous)
    m64 = copy.deepcopy(model).double()
    recalibrate_bn(m64, [b.double() for b in batches], forward=lambda m, b: m(b))

    def off(m) -> float:  # the largest difference of a running mean or variance, relative to its layer's largest
        out = []
        for (_, b1), (_, b2) in zip(bnmod.bn_layers(m, include_folded=False), bnmod.bn_layers(m64, include_folded=False)):
            for t1, t2 in ((b1.running_mean, b2.running_mean), (b1.running_var, b2.running_var)):
                out.append(float((t1.double() - t2).abs().max() / t2.abs().max().clamp_min(1e-12)))
        return max(out)
    n_bn = len(bnmod.bn_layers(m_new, include_folded=False))
    base = med["one eval pass"]
    lines = [
        "# AdaBN re-estimation against one eval pass",
        "",
        f"{datetime.date.today()} · torch {torch.__version__}, timm {timm.__version__}, {a.threads} threads · "
        f"EfficientNet-Lite0 (ImageNet), {a.images} synthetic images at {a.size} px, batch {a.bs}, "
        f"median of {a.repeats} interleaved repeats · total {total:.0f}s · `python benchmarks/adabn.py`",
        "",
        "| pass over the images | seconds | vs one eval pass |",
        "|---|---|---|",
    ] + [f"| {k} | {v:.2f} | {v / base:.2f}x |" for k, v in med.items()] + [
        "",
        f"Against the same pass in float64 (model and images in double precision), over {n_bn} BN layers, the "
        f"largest difference of a running mean or variance relative to its layer's largest value: "
        f"`recalibrate_bn` {off(m_new):.1e}, the float64 sums of the float32 pass {off(m_old):.1e}, "
        f"contiguous batches {off(m_cont):.1e}: the float32 forward pass's own rounding, carried through "
        f"{n_bn} layers normalised with batch statistics.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "adabn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
