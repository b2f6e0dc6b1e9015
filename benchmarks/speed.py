"""Speed benchmark on two networks: frozen-phase variants, cached warm-up, fused inference, callback
overhead, and where the time of one `fine_tune_with` run goes next to one `fine_tune` run.

    python benchmarks/speed.py [--repeats 3] [--batches 8] [--size 96] [--bs 64]

Networks: torchvision's resnet18 (random weights: speed does not depend on them) and timm's
EfficientNet-Lite0 with its ImageNet weights (depthwise convolutions, norm-act layers), both through
fastai's `vision_learner`, on synthetic images. Every figure is the median of `--repeats` runs with
the variants interleaved (ABAB...) so that drift on a shared machine hits them alike; the ratios
are taken within this one run. Writes benchmarks/results/speed.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
import warnings
from pathlib import Path

import torch
from fastai.metrics import accuracy
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18

import fastai_freeze  # noqa: F401  (Learner patches)
from fastai_freeze import BNPolicyCallback, FineTuneCallback, FrozenPrefix, WeightDiagnostics, cached_warmup
from fastai_freeze.core.fuse import ChannelsLastInput, inference_model, to_channels_last
from fastai_freeze.demo.data import tensor_dls
from fastai_freeze.zoo import packaged_weights

RESULTS = Path(__file__).resolve().parent / "results"
warnings.filterwarnings("ignore")


def make_learner(net: str, args, train_bn: bool = True, n_batches: int | None = None):
    g = torch.Generator().manual_seed(0)
    n = (n_batches or args.batches) * args.bs
    x = torch.rand(n + args.bs, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (n + args.bs,), generator=g)
    dls = tensor_dls(x[:n], y[:n], x[n:], y[n:], bs=args.bs)
    if net == "resnet18":
        return vision_learner(dls, resnet18, pretrained=False, n_out=10, metrics=accuracy, train_bn=train_bn)
    return vision_learner(dls, **packaged_weights("tf_efficientnet_lite0"), n_out=10, metrics=accuracy,
                          train_bn=train_bn)


def fit_time(learn, cbs=(), epochs=1, lr=1e-3) -> float:
    with learn.no_bar(), learn.no_logging():
        t0 = time.perf_counter()
        learn.fit_one_cycle(epochs, lr, cbs=list(cbs))
        return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(f())
    return {k: statistics.median(v) for k, v in times.items()}


def frozen_setups(net, args) -> dict:
    "name -> (learner, callbacks), each prepared once; the timed part is one epoch."
    out = {}
    a = make_learner(net, args)
    a.freeze()
    out["frozen, fastai default (train_bn=True)"] = (a, [])
    b = make_learner(net, args, train_bn=False)
    b.freeze()
    out["frozen, fastai train_bn=False"] = (b, [])
    for policy, freeze in (("frozen", None), ("fold", True)):
        for prefix in (True, False):
            lrn = make_learner(net, args)
            lrn.apply_bn_policy(policy, freeze_bn=freeze)
            lrn.freeze_body(freeze_bn=True)
            cbs = [FrozenPrefix()] if prefix else []
            name = f"frozen, bn='{policy}'" + (" + inference copy" if prefix else ", plain")
            out[name] = (lrn, cbs)
    u = make_learner(net, args)
    u.unfreeze()
    out["unfrozen (reference)"] = (u, [])
    return out


def same_result(net, args) -> dict:
    """The frozen phase with and without the inference copy, from the same start (weights, data order,
    dropout masks): how far the body's output is from the copy's on one batch, and after 2 frozen epochs
    under bn='frozen' how far the trained weights (relative Frobenius norm of the difference, over all
    of them) and the validation loss are apart. Adam divides each step by the gradient's running RMS,
    so float-precision differences in near-zero gradients become differences of a step's size: the
    element-wise maximum says little, the norm over the weights says how far the results are."""
    out, runs = {}, []
    for cbs in ([], [FrozenPrefix()]):
        torch.manual_seed(0)  # the same new head (and random body) for both
        learn = make_learner(net, args)
        learn.apply_bn_policy("frozen")
        learn.freeze_body(freeze_bn=True)
        if not cbs:
            x = learn.dls.valid.one_batch()[0]  # the validation loader: no shuffle, no random state used
            with torch.no_grad():
                ref = learn.model[0].eval()(x)
                fast = inference_model(learn.model[0], channels_last=True)[0](x)
            out["features"] = float((fast - ref).abs().max() / ref.abs().max())
        torch.manual_seed(1)  # the same dropout masks
        fit_time(learn, cbs, epochs=2)
        runs.append(([v for v in learn.model.state_dict().values() if v.is_floating_point()],
                     float(learn.recorder.values[-1][1])))
    (wa, la), (wb, lb) = runs
    num = sum(float((a - b).double().pow(2).sum()) for a, b in zip(wa, wb)) ** 0.5
    den = sum(float(b.double().pow(2).sum()) for b in wb) ** 0.5
    out["weights"], out["valid_loss"] = num / den, abs(la - lb) / abs(lb)
    return out


def inference_rates(net, args, repeats) -> dict:
    model = make_learner(net, args).model.eval()
    x = torch.rand(args.bs, 3, args.size, args.size)
    variants = {"unfused": model, "fused": inference_model(model, channels_last=False)[0],
                "fused + channels_last": inference_model(model, channels_last=True)[0],
                "unfused + channels_last": ChannelsLastInput(to_channels_last(copy.deepcopy(model)))}

    def rate(m):
        def run():
            with torch.inference_mode():
                m(x)  # warm
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    m(x)
                return args.batches * args.bs / (time.perf_counter() - t0)
        return run
    return interleaved({k: rate(m) for k, m in variants.items()}, repeats)


def _ftw(net, args, n_batches=None, before=None, **kw):
    """One fine_tune_with(2) (on 4 x `--batches` batches per epoch by default: the range test runs there);
    `before(learn)` runs first, on the same Learner."""
    learn = make_learner(net, args, n_batches=n_batches or 4 * args.batches)
    if before is not None:
        before(learn)
    with learn.no_bar(), learn.no_logging():
        return learn.fine_tune_with(2, **kw)


def _eval_pass(learn) -> float:
    "Seconds for one eval pass (inference mode) over the training images, in order, batches of 64."
    from fastai_freeze.internals import in_order
    dl = in_order(learn.dls.train, 64)
    learn.model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for xb, _ in dl:
            learn.model(xb)
    return time.perf_counter() - t0


def _ft(net, args, n_batches=None) -> float:
    learn = make_learner(net, args, n_batches=n_batches)
    with learn.no_bar(), learn.no_logging():
        t0 = time.perf_counter()
        learn.fine_tune(2)
        return time.perf_counter() - t0


def breakdown(net, args) -> tuple[dict, dict, dict]:
    """Where the time of one fine_tune_with(2) goes (its record); fine_tune_with without a sweep against
    fastai's fine_tune, interleaved; what bn='adapt' costs against one eval pass over the same images."""
    rec = _ftw(net, args)
    parts = {"deciding the BN policy (the probe)": rec.bn.seconds, "carrying it out (estimate, fold)": rec.bn.apply_seconds}
    for p in rec.phases:
        if p.range_test is not None:
            parts[f"range test before the {p.name} phase ({len(p.range_test.full_lrs)} steps)"] = p.range_test.seconds
        parts[f"{p.name} ({p.epochs_run} epoch(s))"] = p.seconds
    parts["total"] = rec.seconds
    adapted, passes = [], []

    def with_adapt() -> float:  # an eval pass on the same Learner just before: the two side by side
        adapted.append(_ftw(net, args, args.batches, before=lambda lr: passes.append(_eval_pass(lr)),
                            range_test=False, bn="adapt"))
        return adapted[-1].seconds
    pair = interleaved({
        "fastai's fine_tune(2)": lambda: _ft(net, args, args.batches),
        "fine_tune_with(2, range_test=False)": lambda: _ftw(net, args, args.batches, range_test=False).seconds,
        "fine_tune_with(2, range_test=False, bn='adapt')": with_adapt,
    }, args.repeats)
    ev = statistics.median(passes)
    est = statistics.median(r.bn.apply_seconds for r in adapted)
    return parts, pair, {"one eval pass over the training images": ev, "bn='adapt': estimate and fold": est}


def _probe_before():
    """The probe as it ran before: contiguous batches, and LogME's SVD in NumPy (whose BLAS pool runs as
    many threads as there are cores, beside torch's). Restores both when done."""
    import contextlib
    import importlib

    import numpy as np

    logme_mod = importlib.import_module("fastai_freeze.core.logme")  # the module (the package exports a function of that name)

    @contextlib.contextmanager
    def ctx():
        cl, svd = logme_mod.channels_last_ok, torch.linalg.svd

        def numpy_svd(a, full_matrices=True):
            return tuple(torch.from_numpy(t) for t in np.linalg.svd(a.numpy(), full_matrices=full_matrices))
        logme_mod.channels_last_ok, torch.linalg.svd = (lambda *a, **k: False), numpy_svd
        try:
            yield
        finally:
            logme_mod.channels_last_ok, torch.linalg.svd = cl, svd
    return ctx()


def before_after(net, args) -> dict:
    """The BN probe and the AdaBN estimate as they run now and as they ran before, side by side on the same
    Learner and images (interleaved, medians): the only fair before/after on a shared machine."""
    import contextlib
    import copy as copy_

    from adabn import recalibrate_float64_sums

    from fastai_freeze.core.bn import recalibrate_bn
    from fastai_freeze.core.logme import probe_bn_statistics
    from fastai_freeze.internals import in_order
    from fastai_freeze.policy import PROBE_SAMPLES
    learn = make_learner(net, args)
    model = learn.model
    batches = [(xb.as_subclass(torch.Tensor), yb.as_subclass(torch.Tensor)) for xb, yb in in_order(learn.dls.train, 64)]
    xs = [xb for xb, _ in batches]
    copies = [copy_.deepcopy(model) for _ in range(3)]

    @torch.no_grad()
    def eval_pass():
        model.eval()
        for xb in xs:
            model(xb)

    def probe(before):
        def run():
            model.eval()
            with (_probe_before() if before else contextlib.nullcontext()):
                probe_bn_statistics(model[0], batches, PROBE_SAMPLES)
        return run

    def timed(f):
        def run() -> float:
            t0 = time.perf_counter()
            f()
            return time.perf_counter() - t0
        return run
    return interleaved({k: timed(f) for k, f in {
        "one eval pass over the training images": eval_pass,
        "adapt now: recalibrate_bn": lambda: recalibrate_bn(copies[0], xs),
        "adapt before: contiguous batches": lambda: recalibrate_bn(copies[1], xs, forward=lambda m, b: m(b)),
        "adapt first release: float64 copies and sums": torch.no_grad()(lambda: recalibrate_float64_sums(copies[2], xs)),
        "probe now": probe(False),
        "probe before: contiguous batches, NumPy SVD": probe(True),
    }.items()}, args.repeats)


def run_network(net, args) -> list[str]:
    env = frozen_setups(net, args)
    for learn, cbs in env.values():  # warm every path once (allocator, first-call costs, the copy)
        fit_time(learn, cbs)
    epochs = interleaved({k: (lambda lc=lc: fit_time(*lc)) for k, lc in env.items()}, args.repeats)
    diff = same_result(net, args)

    def cached(k):
        def run():
            learn = make_learner(net, args)
            learn.apply_bn_policy("frozen")
            learn.freeze_body(freeze_bn=True)
            with learn.no_bar(), learn.no_logging():
                t0 = time.perf_counter()
                cached_warmup(learn, k, 1e-3)
                return time.perf_counter() - t0
        return run
    default = env["frozen, fastai default (train_bn=True)"]
    warm = interleaved({"cached warm-up, 1 epoch": cached(1), "cached warm-up, 5 epochs": cached(5),
                        "fastai default, 5 frozen epochs": lambda: fit_time(*default, epochs=5)}, args.repeats)
    # the same work with and without the callbacks: a frozen epoch with BN trainable (as fastai's freeze()
    # leaves it, and FineTuneCallback(bn='train') keeps it), and an unfrozen epoch for the diagnostics
    plain_frozen, with_cbs, plain, diag = (make_learner(net, args) for _ in range(4))
    plain_frozen.freeze()
    with_cbs.freeze()
    plain.unfreeze()
    diag.unfreeze()
    overhead = interleaved({
        "plain frozen epoch": lambda: fit_time(plain_frozen),
        "+ BNPolicyCallback('train') + FineTuneCallback(bn='train')": lambda: fit_time(
            with_cbs, [BNPolicyCallback("train"), FineTuneCallback(freeze_epochs=5, bn="train")]),
        "plain unfrozen epoch": lambda: fit_time(plain),
        "+ WeightDiagnostics (every batch)": lambda: fit_time(diag, [WeightDiagnostics()]),
    }, args.repeats)
    inf = inference_rates(net, args, max(args.repeats, 5))
    parts, pair, adapt = breakdown(net, args)
    ba = before_after(net, args)

    ref, unf = epochs["frozen, fastai default (train_bn=True)"], epochs["unfrozen (reference)"]
    lines = [f"## {net}\n", "**One epoch**\n",
             "| variant | seconds | speed-up vs fastai default frozen | share of an unfrozen epoch |", "|---|---|---|---|"]
    for k, v in epochs.items():
        lines.append(f"| {k} | {v:.2f} | {ref / v:.2f}x | {v / unf:.0%} |")
    lines += ["", f"Same training result (`same_result`): the inference copy's body output is off by "
              f"{diff['features']:.1e} (max relative); after 2 frozen epochs under bn='frozen' from the same start, "
              f"the trained weights with and without it differ by {diff['weights']:.1e} (relative norm) and the "
              f"validation loss by {diff['valid_loss']:.1e} (relative).", "",
              "**Cached-feature warm-up (features computed once, then the head alone)**\n",
              "| variant | seconds | speed-up vs fastai default |", "|---|---|---|"]
    f5 = warm["fastai default, 5 frozen epochs"]
    lines += [f"| fastai default, 1 frozen epoch (above) | {ref:.2f} | 1.00x |",
              f"| cached warm-up, 1 epoch | {warm['cached warm-up, 1 epoch']:.2f} | "
              f"{ref / warm['cached warm-up, 1 epoch']:.2f}x |",
              f"| fastai default, 5 frozen epochs | {f5:.2f} | 1.00x |",
              f"| cached warm-up, 5 epochs | {warm['cached warm-up, 5 epochs']:.2f} | "
              f"{f5 / warm['cached warm-up, 5 epochs']:.2f}x |",
              "", "**Inference throughput (inference mode)**\n", "| model | images/s | vs unfused |", "|---|---|---|"]
    for k, v in inf.items():
        lines.append(f"| {k} | {v:.0f} | {v / inf['unfused']:.2f}x |")
    lines += ["", "**Callback overhead (one fit_one_cycle epoch, the same work with and without)**\n",
              "| fit | seconds | overhead |", "|---|---|---|"]
    base_of = {"+ BNPolicyCallback('train') + FineTuneCallback(bn='train')": "plain frozen epoch",
               "+ WeightDiagnostics (every batch)": "plain unfrozen epoch"}
    for k, v in overhead.items():
        lines.append(f"| {k} | {v:.2f} | {v / overhead[base_of.get(k, k)] - 1:+.1%} |")
    swept = "runs" if any(k.startswith("range test") and v > 0 for k, v in parts.items()) else "falls back to fastai's rule"
    lines += ["", f"**One `fine_tune_with(2)` with the defaults** ({4 * args.batches} training batches per epoch: the "
              f"range test {swept}; from its record)\n", "| part | seconds | share |", "|---|---|---|"]
    for k, v in parts.items():
        lines.append(f"| {k} | {v:.2f} | {v / parts['total']:.0%} |")
    ft = pair["fastai's fine_tune(2)"]
    lines += ["", "**Where no sweep runs: `fine_tune_with` against fastai's `fine_tune`** (the same epochs, "
              f"{args.batches} training batches per epoch, median of {args.repeats} interleaved)\n", "| run | seconds | vs fine_tune |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / ft - 1:+.1%} |" for k, v in pair.items()]
    ev = adapt["one eval pass over the training images"]
    lines += ["", "**bn='adapt' against one eval pass over the same images**\n", "| pass | seconds | vs one eval pass |",
              "|---|---|---|"] + [f"| {k} | {v:.2f} | {v / ev:.2f}x |" for k, v in adapt.items()] + [""]
    ev, total = ba["one eval pass over the training images"], parts["total"]
    lines += [f"**Before / after, side by side in this run** (the same Learner, {args.batches * args.bs} training "
              f"images; the probe's share is of the `fine_tune_with(2)` run above)\n",
              "| pass | seconds | vs one eval pass | share of that run |", "|---|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / ev:.2f}x | " + (f"{v / total:.1%} |" if k.startswith("probe") else "|")
              for k, v in ba.items()] + [""]
    return lines


def _cold_child(which: str, args) -> dict:
    "In a fresh process: the first two calls of `which` ('fine_tune' or 'fine_tune_with'), part by part."
    out = {}
    for call in ("first", "second"):
        if which == "fine_tune":
            out[f"{call} total"] = _ft("efficientnet_lite0", args, args.batches)
        else:
            r = _ftw("efficientnet_lite0", args, args.batches, range_test=False)
            out.update({f"{call} probe": r.bn.seconds, f"{call} warm-up": r.phases[0].seconds,
                        f"{call} total": r.seconds})
    return out


def cold_start(args) -> list[str]:
    """What a first call pays once (imports done; lazy initialisation, first allocations): the first two
    calls of `fine_tune_with(2, range_test=False)` and of fastai's `fine_tune(2)`, each pair in a fresh
    process (EfficientNet-Lite0), the processes alternated `--repeats` times; medians."""
    import json
    import subprocess
    import sys
    got = {"fine_tune": [], "fine_tune_with": []}
    for _ in range(args.repeats):
        for which in got:
            cmd = [sys.executable, __file__, "--cold-child", which, "--batches", str(args.batches),
                   "--size", str(args.size), "--bs", str(args.bs)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            got[which].append(json.loads(res.stdout.strip().splitlines()[-1]))
    med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in got.items()}
    rows = [("fine_tune_with: deciding the BN policy (the probe)", med["fine_tune_with"], "probe"),
            ("fine_tune_with: warm-up (1 epoch)", med["fine_tune_with"], "warm-up"),
            ("fine_tune_with: total", med["fine_tune_with"], "total"),
            ("fastai's fine_tune: total", med["fine_tune"], "total")]
    lines = ["## Cold start (efficientnet_lite0, the first two calls in a fresh process, "
             f"median of {args.repeats} processes each)\n",
             "| part | first call (s) | second call (s) | first / second |", "|---|---|---|---|"]
    for name, m, part in rows:
        a, b = m[f"first {part}"], m[f"second {part}"]
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    extra = (med["fine_tune_with"]["first total"] - med["fine_tune_with"]["second total"],
             med["fine_tune"]["first total"] - med["fine_tune"]["second total"])
    lines += ["", f"What the first call pays once: {extra[0]:.1f} s for `fine_tune_with`, {extra[1]:.1f} s for "
              "fastai's `fine_tune` on the same data.", ""]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--networks", default="resnet18,efficientnet_lite0")
    p.add_argument("--cold-child", choices=["fine_tune", "fine_tune_with"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    if args.cold_child:
        import json
        print(json.dumps(_cold_child(args.cold_child, args)))
        return
    t_start = time.perf_counter()
    body = cold_start(args)
    for net in args.networks.split(","):
        body += run_network(net, args)
    total = time.perf_counter() - t_start
    head = ["# Speed benchmark\n",
            f"{datetime.date.today().isoformat()} · torch {torch.__version__}, {torch.get_num_threads()} threads · "
            f"{args.size} px, batch {args.bs}, {args.batches} training batches per epoch, median of {args.repeats} "
            f"interleaved repeats · total {total:.0f}s\n"]
    text = "\n".join(head + body)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
