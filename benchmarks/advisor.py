"""The advisor against the measured best strategy, validated leaving one data set out.

    python benchmarks/advisor.py      (after benchmarks/transfer.py --network real and --network pattern)

Reads results/transfer_<network>.csv and the measurements next to them. For every data set, the
rule's thresholds are fitted on the other data sets only (the number of scenarios where the pick is
within 1 point of the best measured strategy, then the mean gap) and applied to the one left out.
Writes results/advisor.md: the library's own pick per scenario, the held-out pick, and the gaps.
"""
from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

from fastai_freeze.advisor import LARGE_PER_CLASS, SCRATCH_MAX_GAIN, choose_strategy

RESULTS = Path(__file__).resolve().parent / "results"
PER_CLASS = (25, 50, 100, 150, 200, 400)
GAINS = (-0.1, -0.05, 0.0, 0.05, 0.1)
FEATURES_BELOW = (0, 25, 50, 100)  # the head only below this many images per class (0: never)


def rule(per_class, gain, n0, g0, n1) -> str:
    if per_class >= n0 and gain <= g0:
        return "scratch"
    if per_class < n1:
        return "features"
    return "fine_tune_with"


def load() -> list[dict]:
    "One entry per scenario and batch size: the measurements and every strategy's mean accuracy."
    out = []
    for net in ("real", "pattern"):
        csv_path, meas_path = RESULTS / f"transfer_{net}.csv", RESULTS / f"transfer_{net}_measurements.json"
        if not csv_path.exists():
            continue
        meas = {m["scenario"]: m for m in json.loads(meas_path.read_text())}
        rows = list(csv.DictReader(open(csv_path)))
        for sc, bs in dict.fromkeys((r["scenario"], r["bs"]) for r in rows):
            accs = {r["strategy"]: float(r["acc"]) for r in rows if r["scenario"] == sc and r["bs"] == bs}
            out.append(dict(network=net, scenario=sc, bs=int(bs), accs=accs, **{k: meas[sc][k] for k in
                                                                                 ("per_class", "logme_gain")}))
    return out


def gap(entry, pick) -> float:
    accs = entry["accs"]
    best = max(accs.values())
    return best - accs.get(pick, float("-inf")) if pick in accs else float("nan")


def fit(entries) -> tuple:
    "The thresholds that put the most picks within 1 point of the best (then the smallest mean gap)."
    def score(p):
        gaps = [gap(e, rule(e["per_class"], e["logme_gain"], *p)) for e in entries]
        gaps = [g for g in gaps if g == g]
        return (sum(g <= 0.01 for g in gaps), -sum(gaps) / max(len(gaps), 1))
    return max(itertools.product(PER_CLASS, GAINS, FEATURES_BELOW), key=score)


def main() -> None:
    entries = load()
    if not entries:
        raise SystemExit("run benchmarks/transfer.py first")
    lines = ["# Strategy advisor against the measured best", "",
             f"The library's rule: `scratch` where there are at least {LARGE_PER_CLASS} images per class and the "
             f"pretrained features' LogME gain over random ones is at most {SCRATCH_MAX_GAIN}; otherwise "
             "`fine_tune_with`. Leave one data set out: the thresholds of the same rule family (a per-class size "
             f"from {PER_CLASS}, a gain from {GAINS}, and a 'head only below N per class' branch, N from "
             f"{FEATURES_BELOW}) fitted on the other data sets, applied to the one left out.", "",
             "| network | scenario | bs | per class | LogME gain | library's pick | gap | held-out thresholds | "
             "held-out pick | gap | best measured | best |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    within, within_lib = 0, 0
    for e in entries:
        others = [o for o in entries if o["scenario"] != e["scenario"]]
        n0, g0, n1 = fit(others)
        held = rule(e["per_class"], e["logme_gain"], n0, g0, n1)
        lib = choose_strategy(e["per_class"], e["logme_gain"])[0]
        best = max(e["accs"], key=e["accs"].get)
        g_held, g_lib = gap(e, held), gap(e, lib)
        within += g_held <= 0.01
        within_lib += g_lib <= 0.01
        lines.append(f"| {e['network']} | {e['scenario']} | {e['bs']} | {e['per_class']:.0f} | {e['logme_gain']:+.3f} | "
                     f"{lib} | {100 * g_lib:.1f} pt | {n0}, {g0:+.2f}, {n1} | {held} | {100 * g_held:.1f} pt | "
                     f"{best} | {e['accs'][best]:.3f} |")
    n = len(entries)
    lines += ["", f"Within 1 point of the best measured strategy: the library's rule in {within_lib} of {n} "
              f"scenarios, the rule fitted without the scenario's data set in {within} of {n}.",
              f"Thresholds fitted on all data sets: {fit(entries)} (per class, gain, head-only below)."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "advisor.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
