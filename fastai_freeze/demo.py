"""The strategy comparison: every fine-tuning strategy on the four situations, side by side.

`python -m fastai_freeze demo [--quick]` runs it on the embedded default (no download);
`python -m fastai_freeze compare PATH` runs it on an image folder of your own.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import (
    TARGET_CLASSES,
    TinyResNet,
    load_digits_images,
    make_patterns,
    pretrained_tiny_resnet,
    tensor_dls,
)
from .transfer import new_head_learner

__all__ = ["Scenario", "SCENARIOS", "STRATEGIES", "run_strategy", "embedded_learner_factory", "compare_runs",
           "compare", "format_table", "plot_results"]


@dataclass
class Scenario:
    "A target task: how to build its data, its situation in seed 004's terms, and the batch sizes to try."
    name: str
    make: Callable[[], tuple]
    size: str
    similarity: str
    batch_sizes: tuple[int, ...]
    description: str


def _digits(n_train: int):
    x, y = load_digits_images(size=32, seed=0)
    return x[:n_train], y[:n_train], x[1297:], y[1297:]


def _patterns(n_per_class: int):
    xt, yt = make_patterns(n_per_class, TARGET_CLASSES, size=32, seed=1)
    xv, yv = make_patterns(100, TARGET_CLASSES, size=32, seed=2)
    return xt, yt, xv, yv


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("similar-small", lambda: _patterns(50), "small", "similar", (4, 64),
             "4 unseen pattern classes, 200 training images"),
    Scenario("similar-large", lambda: _patterns(250), "large", "similar", (64,),
             "4 unseen pattern classes, 1000 training images"),
    Scenario("different-small", lambda: _digits(200), "small", "different", (4, 64),
             "scikit-learn handwritten digits (real data), 200 training images"),
    Scenario("different-large", lambda: _digits(1200), "large", "different", (64,),
             "scikit-learn handwritten digits (real data), 1200 training images"),
]}


def _fine_tune(learn, epochs, freeze_epochs):
    learn.fine_tune(epochs, freeze_epochs=freeze_epochs)


def _policy(bn):
    def run(learn, epochs, freeze_epochs):
        learn.fine_tune_with(epochs, freeze_epochs=freeze_epochs, bn=bn)
    run.__doc__ = f"fine_tune_with, bn='{bn}'"
    return run


def _fine_tune_with(learn, epochs, freeze_epochs):
    learn.fine_tune_with(epochs, freeze_epochs=freeze_epochs)


def _features(learn, epochs, freeze_epochs):
    "Head only: the body never unfreezes, BN in eval mode (the body is a fixed feature extractor)."
    learn.apply_bn_policy("frozen")
    learn.freeze_body(bn_trainable=False)
    learn.fit_one_cycle(epochs + freeze_epochs, 2e-3)


def _scratch(learn, epochs, freeze_epochs):
    "The same network, randomly initialised, everything trained from the start."
    learn.unfreeze()
    learn.fit_one_cycle(epochs + freeze_epochs, 2e-3)


STRATEGIES: dict[str, tuple[Callable, str]] = {
    "fine_tune": (_fine_tune, "fastai's fine_tune (BN trained, fixed rates)"),
    "bn_train": (_policy("train"), "freeze non-BN, BN trained with batch statistics"),
    "bn_frozen": (_policy("frozen"), "BN fully frozen (eval mode)"),
    "bn_fold": (_policy("fold"), "BN folded into a trainable affine layer"),
    "bn_adapt": (_policy("adapt"), "BN statistics re-estimated (AdaBN), then folded"),
    "fine_tune_with": (_fine_tune_with, "fine_tune_with defaults (bn='auto', range tests)"),
    "features": (_features, "feature extraction: head only, body never unfrozen"),
    "scratch": (_scratch, "training from scratch, same network and budget"),
}


def run_strategy(strategy: str, make_dls: Callable, make_learner: Callable, bs: int, epochs: int, seed: int,
                 freeze_epochs: int = 1):
    """Train one strategy; returns (final validation accuracy, seconds, learner).

    `make_dls(bs, seed)` builds the DataLoaders, `make_learner(dls, pretrained)` the Learner
    (`pretrained=False` for training from scratch). The budget is the same for every strategy:
    `freeze_epochs + epochs` epochs.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {list(STRATEGIES)}")
    dls = make_dls(bs, seed)
    torch.manual_seed(seed)
    learn = make_learner(dls, strategy != "scratch")
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        STRATEGIES[strategy][0](learn, epochs, freeze_epochs)
    secs = time.perf_counter() - t0
    return float(learn.recorder.values[-1][-1]), secs, learn


def embedded_learner_factory(source: torch.nn.Module | None = None) -> Callable:
    "Learners on the embedded pretrained model (a fresh copy each time), or its random twin for scratch."
    from fastai.metrics import accuracy
    source = source if source is not None else pretrained_tiny_resnet()
    width = source.conv1.out_channels if isinstance(source, TinyResNet) else 16

    def make(dls, pretrained: bool):
        src = copy.deepcopy(source) if pretrained else TinyResNet(width=width)
        return new_head_learner(src, dls, metrics=accuracy)
    return make


def compare_runs(name: str, make_dls: Callable, make_learner: Callable, batch_sizes: Sequence[int],
                 strategies: Sequence[str], seeds: int, epochs: int, freeze_epochs: int = 1,
                 progress: bool = True, extra: dict | None = None, records: dict | None = None) -> list[dict]:
    "Every strategy at every batch size over `seeds` seeds on one task; one row each."
    rows = []
    for bs in batch_sizes:
        for strat in strategies:
            accs, times = [], []
            for seed in range(seeds):
                acc, secs, learn = run_strategy(strat, make_dls, make_learner, bs, epochs, seed, freeze_epochs)
                accs.append(acc)
                times.append(secs)
                if strat == "fine_tune_with" and seed == 0 and records is not None:
                    records[(name, bs)] = learn.fine_tune_record
            row = dict(scenario=name, bs=bs, strategy=strat, acc=statistics.mean(accs),
                       sd=statistics.stdev(accs) if len(accs) > 1 else 0.0, secs=statistics.mean(times),
                       seeds=seeds, **(extra or {}))
            rows.append(row)
            if progress:
                print(f"{name:<16} bs={bs:<3} {strat:<15} accuracy {row['acc']:.3f} ± {row['sd']:.3f}"
                      f"   {row['secs']:.1f}s/run", flush=True)
    return rows


def _check_strategies(strategies):
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}: use names from {list(STRATEGIES)}")


def compare(scenarios: Sequence[str] = tuple(SCENARIOS), strategies: Sequence[str] = tuple(STRATEGIES),
            seeds: int = 3, epochs: int = 4, freeze_epochs: int = 1, source: torch.nn.Module | None = None,
            batch_sizes: Sequence[int] | None = None, out: Path | None = None, progress: bool = True) -> list[dict]:
    """Every strategy on every embedded scenario (at its batch sizes) over `seeds` seeds.

    Returns one row per (scenario, batch size, strategy): mean and standard deviation of the final
    validation accuracy and mean seconds per run; with `out`, writes the plots there.
    """
    _check_strategies(strategies)
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise ValueError(f"unknown scenarios {bad}: use names from {list(SCENARIOS)}")
    make_learner = embedded_learner_factory(source)
    rows, records = [], {}
    for sc_name in scenarios:
        sc = SCENARIOS[sc_name]
        data = sc.make()

        def make_dls(bs, seed, data=data):
            return tensor_dls(*data, bs=bs, seed=seed)
        rows += compare_runs(sc_name, make_dls, make_learner, batch_sizes or sc.batch_sizes, strategies, seeds,
                             epochs, freeze_epochs, progress,
                             dict(size=sc.size, similarity=sc.similarity, n_train=len(data[0])), records)
    if out is not None:
        for p in plot_results(rows, records, out):
            print(f"wrote {p}")
    return rows


def format_table(rows: list[dict]) -> str:
    "One Markdown table: a row per scenario and batch size, a column per strategy, the winner marked."
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    keys = list(dict.fromkeys((r["scenario"], r["bs"]) for r in rows))
    head = "| scenario | bs | " + " | ".join(strategies) + " | best |"
    lines = [head, "|" + "---|" * (len(strategies) + 3)]
    for sc, bs in keys:
        cells = {r["strategy"]: r for r in rows if r["scenario"] == sc and r["bs"] == bs}
        best = max(cells.values(), key=lambda r: r["acc"])
        txt = []
        for s in strategies:
            r = cells.get(s)
            if r is None:
                txt.append("")
                continue
            cell = f"{r['acc']:.3f} ± {r['sd']:.3f} ({r['secs']:.1f}s)"
            txt.append(f"**{cell}**" if r is best else cell)
        lines.append(f"| {sc} | {bs} | " + " | ".join(txt) + f" | {best['strategy']} |")
    return "\n".join(lines)


def plot_results(rows: list[dict], records: dict, out: Path) -> list[Path]:
    "Accuracy per strategy per scenario (bars with std), and the fine_tune_with record of each scenario."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    keys = list(dict.fromkeys((r["scenario"], r["bs"]) for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    fig, axs = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.8), squeeze=False, sharey=True)
    for ax, (sc, bs) in zip(axs[0], keys):
        cells = {r["strategy"]: r for r in rows if r["scenario"] == sc and r["bs"] == bs}
        vals = [cells[s]["acc"] if s in cells else 0 for s in strategies]
        errs = [cells[s]["sd"] if s in cells else 0 for s in strategies]
        ax.bar(range(len(strategies)), vals, yerr=errs, color=[f"C{i}" for i in range(len(strategies))])
        ax.set_xticks(range(len(strategies)), strategies, rotation=70, fontsize=7)
        ax.set_title(f"{sc}, bs={bs}", fontsize=9)
    axs[0][0].set_ylabel("validation accuracy")
    fig.tight_layout()
    p = out / "comparison.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(p)
    for (sc, bs), rec in records.items():
        for kind, f in (("run", rec.plot), ("range_tests", rec.plot_range_tests)):
            try:
                fig = f()
            except ValueError:  # no range test in that run
                continue
            p = out / f"fine_tune_with_{sc}_bs{bs}_{kind}.png"
            fig.savefig(p, dpi=90)
            plt.close(fig)
            written.append(p)
    return written
