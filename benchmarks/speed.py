"""Speed benchmark: frozen-phase variants, cached-feature warm-up, fused inference, callback overhead.

    python benchmarks/speed.py [--repeats 3] [--batches 8] [--size 96] [--bs 64]

torchvision resnet18 (random weights: speed does not depend on them), synthetic images, fastai's
vision_learner. Every figure is the median of `--repeats` runs, the variants interleaved (ABAB...)
so that drift on a shared machine hits them alike; ratios are taken within this one run.
Writes benchmarks/results/speed.md.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time
import warnings
from pathlib import Path

import torch
from fastai.metrics import accuracy
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18

import fastai_freeze  # noqa: F401  (Learner patches)
from fastai_freeze.demo.data import tensor_dls
from fastai_freeze.diagnostics import WeightDiagnostics
from fastai_freeze.features import cached_warmup
from fastai_freeze.freeze import FrozenBodyShortcut
from fastai_freeze.core.fuse import inference_model
from fastai_freeze.policy import BNPolicyCallback
from fastai_freeze.schedule import FineTuneCallback

RESULTS = Path(__file__).resolve().parent / "results"
warnings.filterwarnings("ignore")


def make_learner(args, train_bn=True):
    g = torch.Generator().manual_seed(0)
    n = args.batches * args.bs
    x = torch.randn(n + args.bs, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (n + args.bs,), generator=g)
    dls = tensor_dls(x[:n], y[:n], x[n:], y[n:], bs=args.bs)
    learn = vision_learner(dls, resnet18, pretrained=False, n_out=10, metrics=accuracy, train_bn=train_bn)
    return learn


def epoch_time(learn, cbs=(), epochs=1) -> float:
    with learn.no_bar(), learn.no_logging():
        t0 = time.perf_counter()
        learn.fit_one_cycle(epochs, 1e-3, cbs=list(cbs))
        return time.perf_counter() - t0


def setups(args):
    "name -> (learner, callbacks), each prepared once; the timed part is one epoch."
    out = {}
    a = make_learner(args)
    a.freeze()
    out["frozen, fastai default (train_bn=True)"] = (a, [])
    b = make_learner(args, train_bn=False)
    b.freeze()
    out["frozen, fastai train_bn=False"] = (b, [])
    c = make_learner(args)
    c.apply_bn_policy("frozen")
    c.freeze_body(bn_trainable=False)
    out["frozen, bn='frozen' + shortcut"] = (c, [FrozenBodyShortcut()])
    c2 = make_learner(args)
    c2.apply_bn_policy("frozen")
    c2.freeze_body(bn_trainable=False)
    out["frozen, bn='frozen', no shortcut"] = (c2, [])
    d = make_learner(args)
    d.apply_bn_policy("fold", freeze_bn=True)
    d.freeze_body(bn_trainable=False)
    out["frozen, bn='fold' (frozen) + shortcut"] = (d, [FrozenBodyShortcut()])
    u = make_learner(args)
    u.unfreeze()
    out["unfrozen (reference)"] = (u, [])
    return out


def interleaved(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(f())
    return {k: statistics.median(v) for k, v in times.items()}


def inference_rates(args, repeats):
    learn = make_learner(args)
    model = learn.model.eval()
    x = torch.randn(args.bs, 3, args.size, args.size)
    variants = {"unfused": model, "fused": inference_model(model, channels_last=False)[0],
                "fused + channels_last": inference_model(model, channels_last=True)[0],
                "unfused + channels_last": _channels_last_only(model)}

    def rate(m):
        def run():
            with torch.inference_mode():
                m(x)  # warm
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    m(x)
                return args.batches * args.bs / (time.perf_counter() - t0)
        return run
    return interleaved({k: rate(m) for k, m in variants.items()}, repeats)


def _channels_last_only(model):
    import copy

    from fastai_freeze.core.fuse import ChannelsLastInput as ChannelsLast
    return ChannelsLast(copy.deepcopy(model).to(memory_format=torch.channels_last))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--bs", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    t_start = time.perf_counter()

    env = setups(args)
    for learn, cbs in env.values():  # warm every path once (allocator, first-call costs)
        epoch_time(learn, cbs)
    epochs = interleaved({k: (lambda lc=lc: epoch_time(*lc)) for k, lc in env.items()}, args.repeats)

    def cached(k):
        def run():
            learn = make_learner(args)
            learn.apply_bn_policy("frozen")
            learn.freeze_body(bn_trainable=False)
            with learn.no_bar(), learn.no_logging():
                t0 = time.perf_counter()
                cached_warmup(learn, k, 1e-3)
                return time.perf_counter() - t0
        return run
    fastai_default = env["frozen, fastai default (train_bn=True)"]
    warm = interleaved({"cached warm-up, 1 epoch": cached(1), "cached warm-up, 5 epochs": cached(5),
                        "fastai default, 5 frozen epochs": lambda: epoch_time(*fastai_default, epochs=5)},
                       args.repeats)

    # the same work with and without our callbacks: a frozen epoch (FineTuneCallback starts frozen,
    # BN trainable, like fastai's freeze()), and an unfrozen epoch for the diagnostics
    plain_frozen, with_cbs, plain, diag = (make_learner(args) for _ in range(4))
    plain_frozen.freeze()
    with_cbs.freeze()
    plain.unfreeze()
    diag.unfreeze()
    overhead = interleaved({
        "plain frozen epoch": lambda: epoch_time(plain_frozen),
        "+ BNPolicyCallback('train') + FineTuneCallback": lambda: epoch_time(
            with_cbs, [BNPolicyCallback("train"), FineTuneCallback(unfreeze_epoch=5)]),
        "plain unfrozen epoch": lambda: epoch_time(plain),
        "+ WeightDiagnostics (every batch)": lambda: epoch_time(diag, [WeightDiagnostics()]),
    }, args.repeats)

    inf = inference_rates(args, max(args.repeats, 5))
    total = time.perf_counter() - t_start

    ref = epochs["frozen, fastai default (train_bn=True)"]
    unf = epochs["unfrozen (reference)"]
    lines = ["# Speed benchmark\n",
             f"{datetime.date.today().isoformat()} · torch {torch.__version__}, {torch.get_num_threads()} threads · "
             f"resnet18, {args.size} px, batch {args.bs}, {args.batches} training batches per epoch, "
             f"median of {args.repeats} interleaved repeats · total {total:.0f}s\n",
             "## One epoch\n", "| variant | seconds | speed-up vs fastai default frozen | share of an unfrozen epoch |",
             "|---|---|---|---|"]
    for k, v in epochs.items():
        lines.append(f"| {k} | {v:.2f} | {ref / v:.2f}x | {v / unf:.0%} |")
    lines += ["", "## Cached-feature warm-up (features computed once, then the head alone)\n",
              "| variant | seconds | speed-up vs fastai default |", "|---|---|---|"]
    f5 = warm["fastai default, 5 frozen epochs"]
    lines.append(f"| fastai default, 1 frozen epoch (above) | {ref:.2f} | 1.00x |")
    lines.append(f"| cached warm-up, 1 epoch | {warm['cached warm-up, 1 epoch']:.2f} | "
                 f"{ref / warm['cached warm-up, 1 epoch']:.2f}x |")
    lines.append(f"| fastai default, 5 frozen epochs | {f5:.2f} | 1.00x |")
    lines.append(f"| cached warm-up, 5 epochs | {warm['cached warm-up, 5 epochs']:.2f} | "
                 f"{f5 / warm['cached warm-up, 5 epochs']:.2f}x |")
    lines += ["", "## Inference throughput (inference mode)\n", "| model | images/s | vs unfused |", "|---|---|---|"]
    for k, v in inf.items():
        lines.append(f"| {k} | {v:.0f} | {v / inf['unfused']:.2f}x |")
    lines += ["", "## Callback overhead (one fit_one_cycle epoch, the same work with and without)\n",
              "| fit | seconds | overhead |", "|---|---|---|"]
    base_of = {"+ BNPolicyCallback('train') + FineTuneCallback": "plain frozen epoch",
               "+ WeightDiagnostics (every batch)": "plain unfrozen epoch"}
    for k, v in overhead.items():
        base = overhead[base_of.get(k, k)]
        lines.append(f"| {k} | {v:.2f} | {v / base - 1:+.1%} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
