"""The advisor against the transfer benchmark: its pick per scenario and the best strategy measured.

    python benchmarks/advisor.py      (after benchmarks/transfer.py)

Reads benchmarks/results/transfer.csv, asks `suggest_strategy` on each scenario's training data
(seed 0, its batch size) and writes benchmarks/results/advisor.md.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

import fastai_freeze  # noqa: F401
from fastai_freeze.demo.data import tensor_dls
from fastai_freeze.demo import SCENARIOS, embedded_learner_factory

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    rows = list(csv.DictReader(open(RESULTS / "transfer.csv")))
    make = embedded_learner_factory()
    lines = ["# Strategy advisor against the measured best\n",
             "Pick: `learn.suggest_strategy()` on the scenario's training data. Accuracies from transfer.md "
             "(mean over seeds).\n",
             "| scenario | bs | measured: shift, LogME gain, per class | pick | pick's accuracy | best measured | "
             "best accuracy | gap |", "|---|---|---|---|---|---|---|---|"]
    for (sc, bs) in dict.fromkeys((r["scenario"], int(r["bs"])) for r in rows):
        data = SCENARIOS[sc].make()
        learn = make(tensor_dls(*data, bs=bs, seed=0), True)
        adv = learn.suggest_strategy()
        cells = {r["strategy"]: float(r["acc"]) for r in rows if r["scenario"] == sc and int(r["bs"]) == bs}
        best = max(cells, key=cells.get)
        pick = cells.get(adv.strategy, float("nan"))
        lines.append(f"| {sc} | {bs} | {adv.bn_shift:.3f}, {adv.logme_gain:+.3f}, {adv.per_class:.0f} | "
                     f"{adv.strategy} | {pick:.3f} | {best} | {cells[best]:.3f} | {cells[best] - pick:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (RESULTS / "advisor.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
