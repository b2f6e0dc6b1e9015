"""The record of a fine-tuning run: what was decided, when and why; printed as a table and plotted."""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .policy import BNDecision

__all__ = ["RangeTestResult", "PhaseRecord", "FineTuneRecord"]


@dataclass
class RangeTestResult:
    """One learning-rate range test: the curve, the suggestion method and the point it chose.

    `lrs`/`losses` are the part of the curve the suggestion saw (fastai's `lr_find` cut: the
    first tenth and the last 5 points dropped, and everything from the first NaN on); `curve` says
    which loss it is ('training loss' or 'held-out loss'), `lrs` are the head group's rates.
    """
    lrs: list[float]
    losses: list[float]
    method: str
    suggestion: float
    point: tuple[float, float] | None
    fell_back: bool = False
    reason: str = ""
    full_lrs: list[float] = field(default_factory=list)
    full_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    curve: str = ""

    def __str__(self) -> str:
        s = f"{self.method} -> {self.suggestion:.3g}"
        return s + f" (fallback: {self.reason})" if self.fell_back else s


@dataclass
class PhaseRecord:
    "One phase of a schedule (warm-up, a gradual stage, the unfrozen fit)."
    name: str
    epochs_planned: int
    lrs: list[float]
    trainable_groups: list[str]
    bn_policy: str
    lr_source: str
    epochs_run: int = 0
    end_reason: str = ""
    range_test: RangeTestResult | None = None
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    iter_lrs: list[float] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)
    values: list[list] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        "The phase's fit plus the range test that chose its rate."
        return self.seconds + (self.range_test.seconds if self.range_test is not None else 0.0)


@dataclass
class FineTuneRecord:
    "Everything a fine-tuning run decided; `print(record)` for the table, `plot()` for the curves."
    bn: BNDecision | None = None
    phases: list[PhaseRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _warm_up(self) -> PhaseRecord | None:
        "The warm-up phase, if a phase with more of the body trainable followed it."
        if len(self.phases) > 1 and self.phases[0].name == "warm-up":
            return self.phases[0]
        return None

    @property
    def unfroze_at_epoch(self) -> int | None:
        "The epoch after which the body was unfrozen (None: it was not, or there was no warm-up)."
        w = self._warm_up()
        return w.epochs_run if w is not None else None

    @property
    def unfreeze_reason(self) -> str:
        "Why the warm-up ended when it did ('' when the body was not unfrozen)."
        w = self._warm_up()
        return w.end_reason if w is not None else ""

    @property
    def bn_seconds(self) -> float:
        "Deciding the BN policy (the probe) and carrying it out (re-estimating, folding)."
        return (self.bn.seconds + self.bn.apply_seconds) if self.bn is not None else 0.0

    @property
    def seconds(self) -> float:
        "Wall time of the whole run: deciding and applying the BN policy, every fit and every range test."
        return self.bn_seconds + sum(p.total_seconds for p in self.phases)

    @property
    def decision_seconds(self) -> float:
        "The part of `seconds` spent deciding: the BN policy's probe and the range tests."
        return (self.bn.seconds if self.bn is not None else 0.0) + sum(rt.seconds for _, rt in self.range_tests)

    @property
    def range_tests(self) -> list[tuple[str, RangeTestResult]]:
        return [(p.name, p.range_test) for p in self.phases if p.range_test is not None]

    def final_metrics(self) -> dict:
        for p in reversed(self.phases):
            if p.values:
                return dict(zip(p.metric_names[1:], p.values[-1]))
        return {}

    def table(self) -> str:
        head = f"{'phase':<12} {'epochs':>7} {'groups trained':<15} {'lr per group':<34} {'lr from':<26} {'time':>7}  end"
        rows = [head, "-" * len(head)]
        for p in self.phases:
            groups = "".join(p.trainable_groups)
            lrs = ", ".join(f"{lr:.2g}" for lr in p.lrs)
            rows.append(f"{p.name:<12} {p.epochs_run:>3}/{p.epochs_planned:<3} {groups:<15} {lrs:<34} "
                        f"{p.lr_source:<26} {p.total_seconds:>6.1f}s  {p.end_reason}")
        out = "\n".join(rows)
        if self.bn is not None:
            out = f"BN: {self.bn}\n" + out
        if self.unfroze_at_epoch is not None:
            out += f"\nunfroze after epoch {self.unfroze_at_epoch}: {self.unfreeze_reason}"
        fm = self.final_metrics()
        if fm:
            out += "\nfinal: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in fm.items())
        out += (f"\ntotal time {self.seconds:.1f}s, of which {self.decision_seconds:.1f}s deciding "
                "(BN policy, range tests)")
        out += "\ngroups: T trains, b only its BN parameters train, . frozen"
        for n in self.notes:
            out += f"\nnote: {n}"
        return out

    __str__ = table

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(self.table())

    def plot(self, figsize=(10, 6)):
        "Loss and learning rate (head group) over the whole run, phase boundaries marked."
        import matplotlib.pyplot as plt
        fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=figsize)
        start = 0
        for p in self.phases:
            xs = range(start, start + len(p.losses))
            ax1.plot(xs, p.losses, label=p.name)
            ax2.plot(xs, p.iter_lrs)
            if start:
                for ax in (ax1, ax2):
                    ax.axvline(start, color="grey", ls="--", lw=1)
            start += len(p.losses)
        ax1.set_ylabel("train loss (smoothed)")
        ax1.legend()
        ax2.set_ylabel("lr (head group)")
        ax2.set_yscale("log")
        ax2.set_xlabel("iteration")
        fig.tight_layout()
        return fig

    def plot_range_tests(self, figsize=None):
        "Each range test's curve with the point it chose."
        import matplotlib.pyplot as plt
        tests = self.range_tests
        if not tests:
            raise ValueError("this run made no range test (every learning rate was given)")
        fig, axs = plt.subplots(1, len(tests), figsize=figsize or (5 * len(tests), 3.5), squeeze=False)
        for ax, (name, rt) in zip(axs[0], tests):
            ax.set_title(f"{name}{' (fallback)' if rt.fell_back else ''}")
            if not rt.full_lrs:  # no sweep ran: say why instead of drawing an empty curve
                ax.text(0.5, 0.5, "\n".join(textwrap.wrap(f"no curve: {rt.reason}; rate {rt.suggestion:.2g}", 40)),
                        ha="center", va="center", transform=ax.transAxes, fontsize=8)
                ax.set_axis_off()
                continue
            ax.plot(rt.full_lrs, rt.full_losses, color="C0")
            ax.set_xscale("log")
            if rt.point is not None and all(math.isfinite(v) for v in rt.point):
                ax.plot(*rt.point, "o", color="C1", label=f"{rt.method}: {rt.suggestion:.2g}")
                ax.legend()
            ax.axvline(rt.suggestion, color="C1", ls=":")
            ax.set_xlabel("learning rate (head group)")
            ax.set_ylabel(rt.curve or "loss")
        fig.tight_layout()
        return fig
