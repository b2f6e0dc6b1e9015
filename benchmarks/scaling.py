"""How the cost of each feature grows with the data: time and peak memory at three data sizes.

    python benchmarks/scaling.py [--sizes 1000,10000,60000] [--size 32] [--budget-mb 128]

ImageNet EfficientNet-Lite0 through `vision_learner` on Fashion-MNIST at `--size` px (the full 60k
training set needs Debian's `dataset-fashion-mnist`). Measured, each in a fresh process so that its
peak memory is its own (Linux: the resident set's high-water mark, reset just before the call):
the cached warm-up (1 epoch; features spill to a memory-mapped file beyond `--budget-mb`),
`recalibrate_bn` over the whole training set, `bn_shift` and the automatic BN probe as the library
calls them, a range test as `fine_tune_with` runs it, and `suggest_strategy`.
Writes benchmarks/results/scaling.md and scaling.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OPS = ("cached warm-up, 1 epoch", "recalibrate_bn (all data)", "bn_shift (8 batches)", "BN probe (auto)",
       "range test", "suggest_strategy")


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


class _AnonPeak:
    """The peak of the process's anonymous resident memory (`RssAnon`: what the kernel cannot drop),
    sampled every 2 ms in a thread. The high-water mark `VmHWM` also counts the pages of a
    memory-mapped file the call wrote or read, which the kernel reclaims under memory pressure."""

    def __enter__(self):
        import threading
        self.peak, self._stop = _rss("RssAnon:"), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss("RssAnon:"))

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss("RssAnon:"))


def one(op: str, n: int, size: int, budget_mb: int) -> dict:
    "Run one measurement in this process; returns seconds and memory figures."
    import torch
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    import fastai_freeze  # noqa: F401
    from fastai_freeze import RangeTest, range_test
    from fastai_freeze.core import bn_shift, recalibrate_bn
    from fastai_freeze.demo.comparison import _real_learner
    from fastai_freeze.demo.data import load_fashion_mnist, tensor_dls
    from fastai_freeze.policy import decide_bn_policy
    xt, yt, xv, yv = load_fashion_mnist(n, 500, size=size, full=n > 3000)
    learn = _real_learner(tensor_dls(xt, yt, xv, yv, bs=64))
    learn.freeze()
    model_mb = sum(t.numel() * t.element_size() for t in learn.model.state_dict().values()) / 2**20
    calls = {
        OPS[0]: lambda: (learn.apply_bn_policy("frozen"), learn.freeze_body(freeze_bn=True),
                         fastai_freeze.cached_warmup(learn, 1, 1e-3, memory_budget=budget_mb * 2**20)),
        OPS[1]: lambda: recalibrate_bn(learn.model[0], learn.dls.train.new(shuffle=False, drop_last=False)),
        OPS[2]: lambda: bn_shift(learn.model[0], learn.dls.train),
        OPS[3]: lambda: decide_bn_policy(learn, "auto"),
        OPS[4]: lambda: (learn.unfreeze(), range_test(learn, RangeTest(), lr_mult=100)),
        OPS[5]: lambda: learn.suggest_strategy(),
    }
    with learn.no_bar(), learn.no_logging():
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current resident set
        before, anon_before = _rss("VmRSS:"), _rss("RssAnon:")
        with _AnonPeak() as anon:
            t0 = time.perf_counter()
            out = calls[op]()
            secs = time.perf_counter() - t0
    peak = _rss("VmHWM:")
    extra = {}
    if op == OPS[0]:
        cw = out[-1]
        extra = dict(on_disk=cw.on_disk, feature_mb=cw.nbytes / 2**20)
    if op == OPS[4]:
        extra = dict(fell_back=out[-1].fell_back)
    return dict(op=op, n=n, seconds=secs, peak_extra_mb=(peak - before) / 2**20,
                anon_extra_mb=(anon.peak - anon_before) / 2**20, model_mb=model_mb, **extra)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,60000")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--budget-mb", type=int, default=128)
    p.add_argument("--one", nargs=2, metavar=("OP", "N"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(OPS[int(a.one[0])], int(a.one[1]), a.size, a.budget_mb)))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    t0 = time.perf_counter()
    rows = []
    for n in sizes:
        for i in range(len(OPS)):
            out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--one", str(i), str(n), "--size",
                                  str(a.size), "--budget-mb", str(a.budget_mb)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    # the same cached warm-up at the largest size with glibc's mmap threshold fixed at its initial 128 KiB:
    # by default glibc raises it as large blocks are freed, and then keeps freed batch buffers in its heap
    fixed = subprocess.run([sys.executable, "-W", "ignore", __file__, "--one", "0", str(sizes[-1]), "--size",
                            str(a.size), "--budget-mb", str(a.budget_mb)], capture_output=True, text=True,
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    if fixed.returncode:
        raise SystemExit(fixed.stderr[-2000:])
    fixed_row = json.loads(fixed.stdout.strip().splitlines()[-1])
    print(fixed_row, flush=True)
    total = time.perf_counter() - t0
    model_mb = rows[0]["model_mb"]
    lines = ["# How the cost grows with the data\n",
             f"{datetime.date.today().isoformat()} · ImageNet EfficientNet-Lite0, Fashion-MNIST at {a.size} px, batch 64, "
             f"2 threads · memory_budget {a.budget_mb} MiB, model {model_mb:.0f} MiB · total {total / 60:.1f} min\n",
             "Seconds; the peak anonymous memory the call added to the process (MiB: what the kernel cannot "
             "reclaim); in brackets the peak resident memory it added, which also counts the pages of the "
             "memory-mapped feature file (reclaimable). The data set itself was in memory before.\n",
             "| operation | " + " | ".join(f"{n:,} images" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for op in OPS:
        cells = []
        for n in sizes:
            r = next(r for r in rows if r["op"] == op and r["n"] == n)
            note = " (spilled to disk)" if r.get("on_disk") else ""
            note += " (no sweep: too few batches, fastai's rule)" if r.get("fell_back") else ""
            cells.append(f"{r['seconds']:.1f}s, +{r['anon_extra_mb']:.0f} MiB [+{r['peak_extra_mb']:.0f}]{note}")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    cw = [r for r in rows if r["op"] == OPS[0]]
    lines += ["", "Cached warm-up features: " + ", ".join(f"{r['n']:,} images {r['feature_mb']:.0f} MiB "
                                                         f"({'on disk' if r['on_disk'] else 'in memory'})" for r in cw)
              + f"; the bound for its anonymous peak is memory_budget + model = {a.budget_mb + model_mb:.0f} MiB "
              "plus a batch's activations.", "",
              f"The same cached warm-up of {sizes[-1]:,} images with glibc's mmap threshold fixed "
              f"(`MALLOC_MMAP_THRESHOLD_=131072`): {fixed_row['seconds']:.1f}s, +{fixed_row['anon_extra_mb']:.0f} MiB "
              f"anonymous [+{fixed_row['peak_extra_mb']:.0f}]. By default glibc raises that threshold as large "
              "blocks are freed and then keeps the freed per-batch buffers of the head's fit in its heap: the "
              "difference is memory the allocator holds, not data the library keeps."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for op in OPS:
        rs = [next(r for r in rows if r["op"] == op and r["n"] == n) for n in sizes]
        ax1.plot(sizes, [max(r["seconds"], 0.01) for r in rs], "o-", label=op)
        ax2.plot(sizes, [max(r["anon_extra_mb"], 1) for r in rs], "o-", label=op)
    ax2.axhline(a.budget_mb + model_mb, color="grey", ls="--", label="memory_budget + model")
    for ax, lab in ((ax1, "seconds"), (ax2, "peak added anonymous memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training images")
        ax.set_ylabel(lab)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
