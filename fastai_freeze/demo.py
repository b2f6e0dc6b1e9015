"""The main job on the embedded default: fastai's `fine_tune` against `fine_tune_with`, side by side.

`python -m fastai_freeze demo [--quick] [--seeds N] [--epochs N] [--out DIR]`
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from .data import TARGET_CLASSES, load_digits_images, make_patterns, pretrained_tiny_resnet, tensor_dls
from .transfer import new_head_learner

__all__ = ["SCENARIOS", "run_strategy", "compare", "main"]


def _digits(n_train):
    x, y = load_digits_images(size=32, seed=0)
    return x[:n_train], y[:n_train], x[1000:1500], y[1000:1500]


def _patterns(n_per_class):
    xt, yt = make_patterns(n_per_class, TARGET_CLASSES, size=32, seed=1)
    xv, yv = make_patterns(100, TARGET_CLASSES, size=32, seed=2)
    return xt, yt, xv, yv


SCENARIOS = {
    "digits-small": (lambda: _digits(200), "real data (scikit-learn digits), different domain, 200 images"),
    "patterns-small": (lambda: _patterns(25), "unseen pattern classes, similar domain, 100 images"),
}


def run_strategy(strategy: str, data, bs: int, epochs: int, seed: int, source=None):
    "Train one strategy from the pretrained source model; returns (validation accuracy, seconds, learner)."
    from fastai.metrics import accuracy
    source = source if source is not None else pretrained_tiny_resnet()
    xt, yt, xv, yv = data
    dls = tensor_dls(xt, yt, xv, yv, bs=bs, seed=seed)
    torch.manual_seed(seed)
    learn = new_head_learner(source, dls, metrics=accuracy)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if strategy == "fine_tune":
            learn.fine_tune(epochs)
        elif strategy == "fine_tune_with":
            learn.fine_tune_with(epochs)
        else:
            raise ValueError(f"unknown strategy {strategy!r}: use 'fine_tune' or 'fine_tune_with'")
    secs = time.perf_counter() - t0
    return float(learn.recorder.values[-1][-1]), secs, learn


def compare(scenarios=tuple(SCENARIOS), strategies=("fine_tune", "fine_tune_with"), seeds: int = 3,
            epochs: int = 4, batch_sizes=(32,), out: Path | None = None) -> list[dict]:
    "Every strategy on every scenario and batch size over `seeds` seeds; prints and returns the rows."
    source = pretrained_tiny_resnet()
    rows = []
    last = None
    for sc in scenarios:
        make, desc = SCENARIOS[sc]
        data = make()
        for bs in batch_sizes:
            for strat in strategies:
                accs, times = [], []
                for seed in range(seeds):
                    acc, secs, learn = run_strategy(strat, data, bs, epochs, seed, source)
                    accs.append(acc)
                    times.append(secs)
                    if strat == "fine_tune_with":
                        last = learn
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                rows.append(dict(scenario=sc, bs=bs, strategy=strat, acc=statistics.mean(accs), sd=sd,
                                 secs=statistics.mean(times)))
                r = rows[-1]
                print(f"{sc:<15} bs={bs:<3} {strat:<15} accuracy {r['acc']:.3f} ± {r['sd']:.3f}   "
                      f"{r['secs']:.1f}s/run", flush=True)
    if out is not None and last is not None:
        out.mkdir(parents=True, exist_ok=True)
        rec = last.fine_tune_record
        rec.plot().savefig(out / "fine_tune_with_run.png")
        rec.plot_range_tests().savefig(out / "fine_tune_with_range_tests.png")
        print(f"\nlast fine_tune_with record:\n{rec}\n")
        print(f"plots written: {out / 'fine_tune_with_run.png'}, {out / 'fine_tune_with_range_tests.png'}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastai_freeze", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compare fastai's fine_tune and fine_tune_with on the embedded data")
    d.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    d.add_argument("--seeds", type=int, default=3)
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    a = p.parse_args(argv)
    if a.seeds < 1 or a.epochs < 1:
        p.error("--seeds and --epochs must be >= 1")
    seeds, epochs = (1, 2) if a.quick else (a.seeds, a.epochs)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    compare(seeds=seeds, epochs=epochs, out=a.out)
    return 0
