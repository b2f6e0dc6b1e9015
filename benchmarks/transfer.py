"""The transfer benchmark: every strategy on the four embedded situations, written to results/.

    python benchmarks/transfer.py [--seeds 3] [--epochs 4]

Writes benchmarks/results/transfer.md (the table, machine, versions, date) and transfer.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import time
from pathlib import Path

import fastai
import torch

from fastai_freeze.demo import SCENARIOS, STRATEGIES, compare, format_table

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads {torch.get_num_threads()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, fastai {fastai.__version__}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    t0 = time.perf_counter()
    rows = compare(list(SCENARIOS), list(STRATEGIES), seeds=a.seeds, epochs=a.epochs,
                   out=RESULTS / "plots")
    total = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "transfer.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    scen = "\n".join(f"- **{s.name}** ({s.size}, {s.similarity}): {s.description}; batch sizes "
                     f"{', '.join(map(str, s.batch_sizes))}" for s in SCENARIOS.values())
    strat = "\n".join(f"- **{k}**: {v[1]}" for k, v in STRATEGIES.items())
    text = f"""# Transfer benchmark

{datetime.date.today().isoformat()} · {machine()} · total {total / 60:.1f} min

Final validation accuracy, mean ± std over {a.seeds} seeds, and seconds per run; the best per row in
bold. Every strategy gets the same budget: 1 warm-up epoch + {a.epochs} epochs (from scratch and feature
extraction: {a.epochs + 1} epochs). The pretrained model is the embedded small ResNet trained on 8
generated pattern classes.

{format_table(rows)}

Scenarios:
{scen}

Strategies:
{strat}
"""
    (RESULTS / "transfer.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
