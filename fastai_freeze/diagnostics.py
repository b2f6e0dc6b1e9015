"""How far each layer's weights moved, where gradients vanish: a callback for any fit, and its plots."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from fastai.callback.core import Callback
from torch import nn

from .probe import _positive

__all__ = ["layer_weights", "relative_change", "WeightDiagnostics"]


def layer_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    "The weight of every layer that has one (biases and BN shifts aside), by module name."
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), nn.Parameter)}


def relative_change(current: torch.Tensor, reference: torch.Tensor) -> float:
    "`||current - reference|| / ||reference||` (Frobenius norms; 0 for an all-zero reference that stayed so)."
    ref = reference.detach().float()
    diff = float((current.detach().float() - ref).norm())
    den = float(ref.norm())
    return diff / den if den > 0 else (0.0 if diff == 0 else float("inf"))


class WeightDiagnostics(Callback):
    """Per layer: weight change since the fit started and since the pretrained weights, gradient norms
    over training, and weight histograms at the start and end of the fit.

    `reference` is the pretrained state (a model or a state dict); by default, the weights when this
    callback first sees the model. Nothing is hooked into the model (it reads weights and gradients
    from the training loop's events), so nothing is left behind. Off while `lr_find` runs.

    After the fit: `change[name]` (per epoch), `drift[name]` (per epoch, against the reference),
    `grad_norms[name]` (per sampled batch), `summary()`, `plot_change()`, `plot_grad_norms()`,
    `plot_histograms()`.
    """
    order = 70  # reads gradients in before_step, after MixedPrecision (10) has unscaled them
    _pause_in_probe = True

    def __init__(self, reference: nn.Module | dict | None = None, every: int = 1, bins: int = 40):
        _positive("every", every, integer=True)  # sample gradient norms every N batches
        _positive("bins", bins, integer=True)
        if reference is not None and not isinstance(reference, (nn.Module, Mapping)):
            raise TypeError(f"reference must be a model, a state dict or None (the weights at the fit's start), "
                            f"got {type(reference).__name__}")
        self.every, self.bins = int(every), int(bins)
        self._reference = reference
        self.reference: dict[str, torch.Tensor] | None = None

    def _ref_from(self, ref, weights: dict) -> dict[str, torch.Tensor]:
        """Reference weights by layer name; when the names differ (the source model before its head
        was cut: `layer1.0.conv1` against `0.4.0.conv1`), pair the layers in order while shapes agree."""
        sd = ref.state_dict() if isinstance(ref, nn.Module) else dict(ref)
        out = {}
        for n in weights:
            key = f"{n}.weight" if n else "weight"
            if key in sd:
                out[n] = sd[key].detach().clone().float()
        if out:
            return out
        ref_ws = [v for k, v in sd.items() if k.endswith("weight") and not k.endswith("num_batches_tracked")]
        for (n, w), r in zip(weights.items(), ref_ws):
            if r.shape != w.shape:
                break
            out[n] = r.detach().clone().float()
        return out

    def before_fit(self):
        self.run = not hasattr(self.learn, "lr_finder")
        if not self.run:
            return
        weights = layer_weights(self.learn.model)
        if self.reference is None:
            src = self._reference if self._reference is not None else self.learn.model
            self.reference = self._ref_from(src, weights)
        self.start = {n: w.detach().clone().float() for n, w in weights.items()}
        self.group_of = {}
        if self.learn.opt is not None:
            pid = {id(p): i for i, pg in enumerate(self.learn.opt.param_lists) for p in pg}
            self.group_of = {n: pid.get(id(w)) for n, w in weights.items()}
        self.change, self.drift = defaultdict(list), defaultdict(list)
        self.grad_norms, self.grad_iters = defaultdict(list), []
        self.hist_start = self._histograms(weights)
        self._weights = weights

    def before_step(self):
        if self.learn.train_iter % self.every:
            return
        self.grad_iters.append(self.learn.train_iter)
        for n, w in self._weights.items():
            # a frozen layer has no gradient to speak of: NaN, not a vanishing 0
            self.grad_norms[n].append(float(w.grad.detach().float().norm())
                                      if w.requires_grad and w.grad is not None else float("nan"))

    def after_epoch(self):
        for n, w in self._weights.items():
            self.change[n].append(relative_change(w, self.start[n]))
            if n in self.reference and self.reference[n].shape == w.shape:
                self.drift[n].append(relative_change(w, self.reference[n]))

    def after_fit(self):
        self.hist_end = self._histograms(self._weights)
        self._weights = {n: None for n in self._weights}  # keep names, drop the references

    def _histograms(self, weights):
        out = {}
        for n, w in weights.items():
            t = w.detach().float().flatten()
            lo, hi = float(t.min()), float(t.max())
            if hi <= lo:
                hi = lo + 1e-8
            out[n] = (torch.histc(t, self.bins, lo, hi), lo, hi)
        return out

    # ------------------------------------------------------------------ reading -------------
    def group_change(self) -> dict[int | None, tuple[float, float]]:
        "Per optimizer group: median relative change since the fit's start and since the reference."
        by = defaultdict(lambda: ([], []))
        for n, g in self.group_of.items():
            if self.change.get(n):
                by[g][0].append(self.change[n][-1])
                by[g][1].append(self.drift[n][-1] if self.drift.get(n) else float("nan"))
        return {g: (float(torch.tensor(a).median()), float(torch.tensor(b).median())) for g, (a, b) in by.items()}

    def summary(self) -> str:
        "One line per layer group: how far it moved (median over its layers' relative weight change)."
        if not getattr(self, "change", None):
            raise ValueError("no fit has been recorded yet")
        parts = []
        for g, (c, d) in sorted(self.group_change().items(), key=lambda kv: (kv[0] is None, kv[0])):
            parts.append(f"group {g}: {100 * c:.2f}% since the fit started, {100 * d:.2f}% from the reference")
        return "; ".join(parts)

    def vanishing(self, ratio: float = 1e-3) -> list[str]:
        """Trained layers whose mean gradient norm is below `ratio` times the largest layer's (frozen
        layers, which have no gradient, are not listed)."""
        means = {}
        for n, v in self.grad_norms.items():
            trained = [x for x in v if x == x]
            if trained:
                means[n] = sum(trained) / len(trained)
        top = max(means.values(), default=0.0)
        return [n for n, v in means.items() if top > 0 and v < ratio * top]

    def plot_change(self, figsize=(10, 4)):
        "Final relative weight change per layer, since the fit started and since the reference."
        import matplotlib.pyplot as plt
        names = [n for n in self.change if self.change[n]]
        fig, ax = plt.subplots(figsize=figsize)
        ax.plot([self.change[n][-1] for n in names], "o-", label="since fit start")
        if any(self.drift.get(n) for n in names):
            ax.plot([self.drift[n][-1] if self.drift.get(n) else float("nan") for n in names], "s-",
                    label="since reference (pretrained)")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("||w - w0|| / ||w0||")
        ax.legend()
        fig.tight_layout()
        return fig

    def plot_grad_norms(self, figsize=(10, 4)):
        "Gradient norm per layer over training (log scale): where gradients vanish."
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=figsize)
        for i, v in enumerate(self.grad_norms.values()):
            ax.plot(self.grad_iters, v, color=plt.cm.viridis(i / max(len(self.grad_norms) - 1, 1)), lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("gradient norm (dark: first layers)")
        fig.tight_layout()
        return fig

    def plot_histograms(self, layers: list[str] | None = None, cols: int = 4):
        "Weight histograms per layer, at the start and at the end of the fit."
        import matplotlib.pyplot as plt
        names = layers or list(self.hist_start)
        rows = -(-len(names) // cols)
        fig, axs = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
        for ax, n in zip(axs.flat, names):
            for hist, label in ((self.hist_start, "start"), (getattr(self, "hist_end", {}), "end")):
                if n in hist:
                    h, lo, hi = hist[n]
                    xs = torch.linspace(lo, hi, len(h))
                    ax.plot(xs, h, label=label)
            ax.set_title(n or "model", fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in list(axs.flat)[len(names):]:
            ax.axis("off")
        axs.flat[0].legend(fontsize=6)
        fig.tight_layout()
        return fig
